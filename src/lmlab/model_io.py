"""The model directory: the one on-disk format every stage reads and writes.

A model directory holds

    config.json         {"kind": "transformer", "lmlab_model": {...the model's config_dict()...}}
    model.safetensors   the weights, by the model's parameter names
    tokenizer files     tokenizer.json, tokenizer_config.json, ... (optional)

This module is the only place that knows that layout. `kind` names the model
class through the registry in `lmlab.model` (a config.json written before
kinds existed has no "kind" and is a Transformer). Weights go through
safetensors only (never pickle), so loading a directory cannot run code. A
tensor that two names share (tied input/output embeddings) is stored once,
under its first name in the state dict: safetensors refuses two names for one
storage, and one copy is also what the tie means.

Writes are atomic (`lmlab.fileio.write_dir_atomically`): a new directory
appears in one rename, so a reader never sees half a model; into an existing
directory (a training run that also holds metrics and checkpoints) each file
is renamed into place, weights first and config.json last.

An adapter run (LoRA, `lmlab.finetune.lora`) is a model directory that holds
only what training changed — the adapters and a task's new head — and names the
base it needs in config.json:

    "adapter": {"type": "lora", "lora": {"r", "alpha", "dropout", "targets"},
                "base": {"path": absolute base directory, "into": "" or "body",
                         "config": the base's config.json,
                         "weights": {"bytes", "sha256"} of its model.safetensors},
                "trained": ["head"]}

`load_model_dir` rebuilds it: the base's weights (into the named submodule), the
adapter layers, then the saved tensors. A base that is gone or no longer the
one trained on (another config.json or model.safetensors) is refused in one line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lmlab.errors import InputError, LmlabError
from lmlab.fileio import write_dir_atomically
from lmlab.model import DEFAULT_KIND, build_model
from lmlab.outputs import absolute

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_KEY = "lmlab_model"
ADAPTER_KEY = "adapter"  # an adapter run's record of its base (see the module docstring)
# tokenizer.json and tokenizer_config.json are lmlab's tokenizer format; the rest are
# what Hugging Face tokenizers may also need (chat template saved apart, slow-tokenizer
# vocabularies), carried along so a directory stays loadable by AutoTokenizer, and the
# generation config, which names an imported model's stop tokens.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "generation_config.json",
)


def copy_tokenizer_files(tokenizer_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files present in `tokenizer_dir` to `out_dir`; return their names."""
    src, dst = Path(tokenizer_dir), Path(out_dir)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def has_tokenizer_files(directory: str | os.PathLike) -> bool:
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)


def is_model_config(d: Any) -> bool:
    """Whether a parsed config.json is an lmlab model's (not, say, a Hugging Face one)."""
    return isinstance(d, dict) and CONFIG_KEY in d


def model_config_json(model: nn.Module) -> dict[str, Any]:
    """What config.json holds for `model`: its kind and its config dict (and an adapter
    model's record of its base, which `lmlab.finetune.lora.apply_lora` set)."""
    adapter = getattr(model, "adapter_config", None)
    return {"kind": model.kind, CONFIG_KEY: model.config_dict(),
            **({ADAPTER_KEY: adapter} if adapter else {})}


def read_model_config(path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """(kind, config dict) of a model directory, or of its config.json given directly."""
    kind, config, _ = _read_config_json(path)
    return kind, config


def _read_config_json(path: str | os.PathLike) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(kind, config dict, the whole config.json) of a model directory or its config.json."""
    root = Path(path)
    config_path = root if root.is_file() else root / CONFIG_FILE
    if not config_path.is_file():
        raise InputError(f"{root}: no {CONFIG_FILE}; expected a model directory written by lmlab")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{config_path}: not valid JSON ({e}); re-save the model") from e
    if not is_model_config(raw):
        hint = (f"it looks like a Hugging Face model ({raw['model_type']}); "
                f"convert it with `lmlab import-hf {config_path.parent} OUT_DIR`"
                if isinstance(raw, dict) and "model_type" in raw else "re-save it with lmlab")
        raise InputError(f"{config_path}: not an lmlab model config (no {CONFIG_KEY!r} key); {hint}")
    kind = raw.get("kind", DEFAULT_KIND)
    if not isinstance(kind, str) or not isinstance(raw[CONFIG_KEY], dict):
        raise InputError(f"{config_path}: 'kind' must be a string and {CONFIG_KEY!r} an object")
    return kind, raw[CONFIG_KEY], raw


def read_adapter_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """The "adapter" record of an adapter run's config.json (None: a plain model directory)."""
    return _read_config_json(path)[2].get(ADAPTER_KEY)


def _weights_fingerprint(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"bytes": path.stat().st_size, "sha256": digest}


def base_record(base_dir: str | os.PathLike) -> dict[str, Any]:
    """What an adapter run records of its base model directory: its absolute path, its
    config.json and the size and SHA-256 of its weights (so a changed base is detected)."""
    root = Path(base_dir)
    _, _, raw = _read_config_json(root)
    if not (root / WEIGHTS_FILE).is_file():
        raise InputError(f"{root}: no {WEIGHTS_FILE}; the base model needs its weights")
    return {"path": absolute(root), "config": raw,
            "weights": _weights_fingerprint(root / WEIGHTS_FILE)}


def _check_base(run: Path, base: dict[str, Any]) -> Path:
    """The base directory an adapter run names, if it is still the one trained on."""
    path = Path(base["path"])
    fix = ("restore the base the adapters were trained on (or merge the run with `lmlab lora "
           "merge` while you have it)")
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise InputError(f"{run}: its base model {path} is gone (an adapter run holds only "
                         f"the adapters); {fix}")
    _, _, raw = _read_config_json(path)
    what = (CONFIG_FILE if raw != base["config"] else
            WEIGHTS_FILE if _weights_fingerprint(path / WEIGHTS_FILE) != base["weights"] else None)
    if what:
        raise InputError(f"{run}: its base model {path} has changed since the adapters were "
                         f"trained ({what} differs); {fix}")
    return path


def _alias_groups(model: nn.Module) -> list[list[str]]:
    """State-dict names grouped by the tensor they name (a tie makes a group of two)."""
    groups: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(name)
    return list(groups.values())


def weights_to_save(model: nn.Module, state: dict[str, torch.Tensor] | None = None
                    ) -> dict[str, torch.Tensor]:
    """`state` (default: the model's whole state dict), each shared tensor under one name."""
    full = model.state_dict() if state is None else state
    keep = dict(full)
    for names in _alias_groups(model):
        for alias in [n for n in names if n in keep][1:]:
            keep.pop(alias)
    return {k: v.detach().contiguous() for k, v in keep.items()}


def write_model_files(directory: str | os.PathLike, model: nn.Module,
                      tokenizer_dir: str | os.PathLike | None = None,
                      state: dict[str, torch.Tensor] | None = None) -> None:
    """Write the files of a model directory into `directory` as they are (no renames).

    Callers make it atomic by writing into a staging directory of
    `lmlab.fileio.write_dir_atomically` (`save_model_dir`, checkpoints).
    """
    if tokenizer_dir is not None and not has_tokenizer_files(tokenizer_dir):
        raise InputError(
            f"{tokenizer_dir}: no tokenizer files (expected tokenizer.json); "
            "pass the directory the tokenizer was saved to, or none"
        )
    directory = Path(directory)
    if state is None and getattr(model, "adapter_config", None):  # an adapter model: its own
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        state = {k: v for k, v in model.state_dict().items() if k in trained}
    save_file(weights_to_save(model, state), str(directory / WEIGHTS_FILE),
              metadata={"format": "pt"})
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, directory)
    (directory / CONFIG_FILE).write_text(json.dumps(model_config_json(model), indent=2),
                                         encoding="utf-8")


def save_model_dir(model: nn.Module, out_dir: str | os.PathLike,
                   tokenizer_dir: str | os.PathLike | None = None,
                   state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `model` as a model directory: its config, its weights (or `state`, e.g. only the
    trainable part; an adapter model's default), and the tokenizer files of `tokenizer_dir`
    if given."""
    return write_dir_atomically(
        out_dir, lambda d: write_model_files(d, model, tokenizer_dir, state), last=CONFIG_FILE)


# ------------------------------------------------------------------ reading weights safely
#
# The one way lmlab reads tensors from disk. Weights come from safetensors (no code runs
# on load) or, for Hugging Face's older files and trainer state, `torch.load` with
# weights_only=True, which refuses any pickled object but tensors and plain containers.
# A damaged or hostile file is an `UnreadableFile` (an InputError) of one line naming it.

class UnreadableFile(InputError):
    """A file that cannot be read as what it should be: `path`, `reason`, and the fix."""

    def __init__(self, path: str | os.PathLike, reason: str,
                 fix: str = "the file is damaged or incomplete: write it again (or restore it)"):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: {reason}; {fix}")


def _first_line(e: BaseException, limit: int = 120) -> str:
    """The gist of a library's error: its first sentence (the advice after it rarely applies;
    torch's, to pass weights_only=False, must never reach a user)."""
    text = (str(e).strip().splitlines() or [""])[0].split(". ")[0]
    return "" if "weights_only" in text else text[:limit]


def _refused_for_safety(e: pickle.UnpicklingError) -> bool:
    """Whether torch's weights-only unpickler refused an object (not a malformed stream:
    random bytes also fail as "Weights only load failed", with other words)."""
    return any(s in str(e) for s in ("GLOBAL", "allowlist", "Trying to call reduce"))


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; `UnreadableFile` naming it if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise UnreadableFile(path, "missing", "restore it or give the right directory")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        detail = _first_line(e)
        raise UnreadableFile(path, f"not a readable safetensors file ({path.stat().st_size:,} "
                                   f"bytes{'; ' + detail if detail else ''})") from None


def read_torch_file(path: str | os.PathLike, what: str = "PyTorch file") -> Any:
    """`torch.load(path, weights_only=True)`: tensors and plain containers only.

    A file holding other Python objects is refused for safety (unpickling them could
    run any code); lmlab never loads those, and says so."""
    path = Path(path)
    if not path.is_file():
        raise UnreadableFile(path, "missing", "restore it or give the right directory")
    if path.stat().st_size == 0:
        raise UnreadableFile(path, "empty")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if _refused_for_safety(e):
            raise UnreadableFile(
                path, "refused for safety: it holds arbitrary Python objects besides tensors, "
                      "and unpickling those could run any code",
                "lmlab loads only tensors and plain values (save weights with safetensors)"
            ) from None
        raise UnreadableFile(path, f"corrupt (not a {what})") from None
    except Exception as e:  # a truncated zip, EOFError, OSError, ...: many types, one meaning
        detail = _first_line(e)
        raise UnreadableFile(path, f"truncated or corrupt ({type(e).__name__}"
                                   f"{': ' + detail if detail else ''})") from None


def _stored_float_dtype(weights_path: Path) -> torch.dtype | None:
    with safe_open(str(weights_path), framework="pt") as f:
        for key in f.keys():
            dtype = f.get_slice(key).get_dtype()
            if dtype in ("F16", "BF16", "F32", "F64"):
                return {"F16": torch.float16, "BF16": torch.bfloat16,
                        "F32": torch.float32, "F64": torch.float64}[dtype]
    return None


def _short(names: list[str]) -> str:
    return f"{names[:5]}{'...' if len(names) > 5 else ''}"


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], source,
                           partial: bool = False) -> None:
    """Load `state` into `model`, raising InputError that names `source` on any mismatch.

    A shared tensor (a tie) may come under any of its names, since other writers
    (e.g. ``safetensors.torch.save_model``) may keep either one. With `partial`,
    names the state lacks keep their current values (a checkpoint of the
    trainable part only); unknown names and wrong shapes are still errors.
    """
    state = dict(state)
    own = model.state_dict()
    missing = []
    for names in _alias_groups(model):
        present = [n for n in names if n in state]
        if not present:
            missing += names[:1]
            continue
        for alias in names:  # one name loads the shared tensor
            if alias != present[0]:
                state.pop(alias, None)
    unexpected = sorted(set(state) - set(own))
    if (missing and not partial) or unexpected:
        raise InputError(
            f"{source}: weights do not match config.json (missing {_short(sorted(missing))}, "
            f"unexpected {_short(unexpected)}); re-save the model or fix its config"
        )
    bad_shapes = [f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}"
                  for k, v in state.items() if v.shape != own[k].shape]
    if bad_shapes:
        raise InputError(f"{source}: weight shapes do not match config.json: {bad_shapes[:3]}")
    model.load_state_dict(state, strict=False)  # completeness was checked above


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast floating-point parameters only: `module.to(dtype)` would also round float32
    buffers such as the RoPE frequencies, which shifts angles at long positions."""
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    return model


def build_from_dir(path: str | os.PathLike) -> nn.Module:
    """A freshly initialised model of the kind and config a model directory names (no weights)."""
    kind, config = read_model_config(path)
    try:
        return build_model(kind, config)
    except (LmlabError, TypeError, ValueError) as e:
        raise InputError(f"{Path(path) / CONFIG_FILE}: invalid model config: {e}") from e


def load_model_dir(path: str | os.PathLike, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None) -> nn.Module:
    """Build the model of a model directory with its weights; `dtype=None` keeps the stored dtype."""
    root = Path(path)
    weights_path = root / WEIGHTS_FILE
    # Built on the CPU and moved after: the RoPE table is computed in float64, which
    # some accelerators (MPS) do not have.
    model = build_from_dir(root)
    if not weights_path.is_file():
        raise InputError(f"{root}: no {WEIGHTS_FILE}; the directory holds a config but no weights")
    adapter = read_adapter_record(root)
    if adapter:
        _load_adapter_run(model, root, adapter)
    else:
        load_state_dict_strict(model, read_safetensors(weights_path), weights_path)
    target = dtype or _stored_float_dtype(weights_path)
    if target is not None:
        cast_parameters(model, target)
    return model.to(device).eval()


def _load_adapter_run(model: nn.Module, root: Path, record: dict[str, Any]) -> None:
    """Fill `model` (built from an adapter run's config) with its base's weights, then put
    the adapters in place and load what the run saved; nothing may stay at its fresh init."""
    from lmlab.finetune.lora import merge_adapters, restore_adapters

    base = record.get("base") if isinstance(record, dict) else None
    if not (isinstance(base, dict) and {"path", "into", "config", "weights"} <= set(base)
            and {"lora", "trained"} <= set(record)):
        raise InputError(f"{root / CONFIG_FILE}: malformed {ADAPTER_KEY!r} record; re-save the run")
    base_path, into = _check_base(root, base), base["into"]
    weights_path = root / WEIGHTS_FILE
    saved = read_safetensors(weights_path)
    pre = f"{into}." if into else ""
    base_model = merge_adapters(load_model_dir(base_path))  # an adapter run as base: folded
    # a name tied to a saved tensor (lm_head.weight to a trained, grown tok_emb.weight) is
    # the run's too: the base's version of it (other rows, maybe) must not be loaded
    tensors = model.state_dict(keep_vars=True)
    ties: dict[int, set[str]] = {}
    for name, t in tensors.items():
        ties.setdefault(id(t), set()).add(name)
    run_owned = set().union(*(ties[id(tensors[k])] for k in saved if k in tensors)) if saved \
        else set()
    state = {k: v for k, v in base_model.state_dict().items() if pre + k not in run_owned | set(saved)}
    load_state_dict_strict(model.get_submodule(into) if into else model, state,
                           base_path / WEIGHTS_FILE, partial=True)
    unfilled = sorted(set(model.state_dict()) - set(saved) - run_owned - {pre + k for k in state})
    restore_adapters(model, record)
    unfilled += sorted(n for n, p in model.named_parameters() if p.requires_grad and n not in saved)
    if unfilled:
        raise InputError(f"{weights_path}: lacks {_short(unfilled)}, which neither the run nor "
                         f"its base {base_path} holds; re-save the run")
    load_state_dict_strict(model, saved, weights_path, partial=True)
