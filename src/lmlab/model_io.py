"""The model directory: the one on-disk format every stage reads and writes.

A model directory holds

    config.json         the architecture, as ``{"lmlab_model": {...ModelConfig...}}``
    model.safetensors   the weights, by the parameter names of `lmlab.model.Transformer`
    tokenizer files     tokenizer.json, tokenizer_config.json, ... (optional)

Weights go through safetensors only (never pickle), so loading a directory
cannot run code. Tied input/output embeddings are stored once, under
``tok_emb.weight``: safetensors refuses two names for one storage, and one copy
is also what the tie means.

Writes are atomic where it matters: a new directory is built under a temporary
name beside the target and renamed into place, so a reader never sees half a
model; into an existing directory (e.g. a training run that also holds
metrics and checkpoints) each file is written to a temporary name and renamed,
weights first and config.json last.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lmlab.errors import ConfigError, InputError
from lmlab.model import ModelConfig, Transformer

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# tokenizer.json and tokenizer_config.json are lmlab's tokenizer format; the rest are
# what Hugging Face tokenizers may also need (chat template saved apart, slow-tokenizer
# vocabularies), carried along so a directory stays loadable by AutoTokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
TIED_KEY, TIED_ALIAS = "tok_emb.weight", "lm_head.weight"


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


def _weights_to_save(model: Transformer) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if model.cfg.tie_embeddings:
        state.pop(TIED_ALIAS)
    return {k: v.detach().contiguous() for k, v in state.items()}


def write_dir_atomically(out_dir: str | os.PathLike, write_files: Callable[[Path], None],
                         last: str = CONFIG_FILE) -> Path:
    """Run `write_files(tmp_dir)` and move what it wrote to `out_dir` by renames.

    A new `out_dir` appears in one rename. An existing one (it may hold more, such
    as a run's checkpoints, which must survive) gets each file renamed into
    place, `last` after the others so that the config never describes weights
    that are not yet there.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory; choose another output path")
    fresh = not out.exists()
    stage_parent = out.parent if fresh else out
    stage_parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=stage_parent))
    try:
        write_files(tmp)
        if fresh:
            os.replace(tmp, out)
        else:
            for name in sorted((p.name for p in tmp.iterdir()), key=lambda n: n == last):
                os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a no-op once renamed away
    return out


def save_model_dir(model: Transformer, out_dir: str | os.PathLike,
                   tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Write `model` (and the tokenizer files of `tokenizer_dir`, if given) as a model directory."""
    if tokenizer_dir is not None and not has_tokenizer_files(tokenizer_dir):
        raise InputError(
            f"{tokenizer_dir}: no tokenizer files (expected tokenizer.json); "
            "pass the directory the tokenizer was saved to, or none"
        )

    def write_files(directory: Path) -> None:
        save_file(_weights_to_save(model), str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, directory)
        model.cfg.save(directory / CONFIG_FILE)

    return write_dir_atomically(out_dir, write_files)


def _stored_float_dtype(weights_path: Path) -> torch.dtype | None:
    with safe_open(str(weights_path), framework="pt") as f:
        for key in f.keys():
            dtype = f.get_slice(key).get_dtype()
            if dtype in ("F16", "BF16", "F32", "F64"):
                return {"F16": torch.float16, "BF16": torch.bfloat16,
                        "F32": torch.float32, "F64": torch.float64}[dtype]
    return None


def load_state_dict_strict(model: Transformer, state: dict[str, torch.Tensor], source) -> None:
    """Load `state` into `model`, raising InputError that names `source` on any mismatch.

    A tied model accepts its shared embedding under either name, since other
    writers (e.g. ``safetensors.torch.save_model``) may keep either one.
    """
    state = dict(state)
    if model.cfg.tie_embeddings:
        if TIED_KEY not in state and TIED_ALIAS in state:
            state[TIED_KEY] = state[TIED_ALIAS]
        state.pop(TIED_ALIAS, None)
    expected = {k for k in model.state_dict() if not (model.cfg.tie_embeddings and k == TIED_ALIAS)}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise InputError(
            f"{source}: weights do not match config.json (missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}); re-save the model or fix its config"
        )
    own = model.state_dict()
    bad_shapes = [f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}"
                  for k, v in state.items() if v.shape != own[k].shape]
    if bad_shapes:
        raise InputError(f"{source}: weight shapes do not match config.json: {bad_shapes[:3]}")
    model.load_state_dict(state, strict=False)  # tied alias already checked above


def cast_parameters(model: Transformer, dtype: torch.dtype) -> Transformer:
    """Cast parameters only: `module.to(dtype)` would also round the float32 RoPE
    frequency buffer, which shifts angles at long positions."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def load_model_dir(path: str | os.PathLike, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None) -> Transformer:
    """Build the Transformer of a model directory; `dtype=None` keeps the stored dtype."""
    root = Path(path)
    config_path, weights_path = root / CONFIG_FILE, root / WEIGHTS_FILE
    if not config_path.is_file():
        raise InputError(f"{root}: no {CONFIG_FILE}; expected a model directory written by lmlab")
    try:
        with open(config_path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{config_path}: not valid JSON ({e}); re-save the model") from e
    if "lmlab_model" not in raw:
        hint = (f"it looks like a Hugging Face model ({raw['model_type']}); "
                f"convert it with `lmlab import-hf {root} OUT_DIR`"
                if "model_type" in raw else "re-save it with lmlab")
        raise InputError(f"{config_path}: not an lmlab model config (no 'lmlab_model' key); {hint}")
    try:
        cfg = ModelConfig.from_dict(raw["lmlab_model"])
    except (ConfigError, TypeError) as e:
        raise InputError(f"{config_path}: invalid model config: {e}") from e
    if not weights_path.is_file():
        raise InputError(f"{root}: no {WEIGHTS_FILE}; the directory holds a config but no weights")

    # Built on the CPU and moved after: the RoPE table is computed in float64, which
    # some accelerators (MPS) do not have.
    model = Transformer(cfg)
    load_state_dict_strict(model, load_file(str(weights_path)), weights_path)
    target = dtype or _stored_float_dtype(weights_path)
    if target is not None:
        cast_parameters(model, target)
    return model.to(device).eval()
