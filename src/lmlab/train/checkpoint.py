"""Checkpoints: a model directory plus the state needed to continue training.

    run_dir/checkpoints/step_000200/
        config.json  model.safetensors  tokenizer.json ...   (a model directory: `--model` takes it)
        trainer_state.pt    optimizer, step, RNG states, run progress (torch.load weights_only=True)
        manifest.json       every other file's size and sha256, written last

Under `train.strategy fsdp` a checkpoint is sharded instead
(torch.distributed.checkpoint, DCP): no rank ever holds the whole model —

    run_dir/checkpoints/step_000200/
        __0_0.distcp  __1_0.distcp ...   each rank's shards of the weights and AdamW moments
        .metadata                        which shard holds which slice of which tensor
        config.json  tokenizer.json ...  the model's config (no model.safetensors)
        trainer_state.pt                 step, RNG states, run progress ("sharded": True)
        manifest.json                    every other file's size and sha256 (each rank hashes
                                         its share of the files), written last

Every rank writes its own shards into the one staging directory (the run
directory must be on a filesystem all nodes share), rank 0 renames it when all
are complete. DCP records each tensor's global shape, so any world size loads
it: each rank reads the slices it now owns (`load_sharded`), one process reads
everything. `export_checkpoint` turns one into a plain model directory.

A checkpoint is written into a staging directory (`.step_000200.tmp-` and a random suffix, by
`lmlab.fileio.write_dir_atomically`) and renamed when complete, so a crash
(even SIGKILL) mid-write leaves the previous checkpoints intact and the
half-written one is ignored and cleaned up on resume. The weights saved are
what the distribution strategy gathered (the whole model, or only its
trainable part when the task asks for that).

Resume checks rather than guesses that a checkpoint is intact
(`load_newest_intact`): the manifest's sizes and hashes must match, and the
weights and the trainer state must load. A checkpoint that fails is named in a
warning with the reason, and the next older one is tried; when none is left,
resume stops with one line saying what to do. A checkpoint written before
manifests existed is accepted when it loads ("no manifest: verified by
loading"); one whose trainer state says it was written with a manifest that is
now missing counts as damaged. The trainer state is read with
`torch.load(weights_only=True)` only: a file holding other Python objects is
refused for safety, never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lmlab.errors import InputError
from lmlab.fileio import TMP_MARK, write_dir_atomically
from lmlab.model_io import (CONFIG_FILE, WEIGHTS_FILE, UnreadableFile, build_from_dir,
                            copy_tokenizer_files, has_tokenizer_files, load_state_dict_strict,
                            model_config_json, read_adapter_record, read_safetensors,
                            read_torch_file, save_model_dir, write_model_files)
from lmlab.outputs import absolute, claim_output_dir
from lmlab.train.distributed import Dist, broadcast_object, gather_objects

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.pt"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "lmlab-checkpoint-manifest/1"
_NAME = re.compile(r"^step_(\d{6,})$")
_CHUNK = 1 << 22


class CheckpointError(InputError):
    """One checkpoint cannot be resumed from: `path` (the file, or the checkpoint) and `reason`."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: {reason}")


@dataclass
class LoadedCheckpoint:
    path: Path
    weights: dict[str, torch.Tensor]
    state: dict
    verified: str  # "manifest" or "loading" (a checkpoint written before manifests)
    sharded: bool = False  # DCP shards: `weights` is empty, `load_sharded` reads them


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_step(path: str | os.PathLike) -> int:
    return int(_NAME.match(Path(path).name).group(1))


def save_checkpoint(run_dir, step: int, model, weights: dict, optimizer_state: dict, state: dict,
                    tokenizer_dir=None, keep_last: int = 3) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep_last`.

    `weights` is the state dict to store (as the strategy gathered it),
    `optimizer_state` the optimizer's, `state` the rest of the trainer's.
    Checkpoints of later steps (left by a run that resumed from an older one
    because they were damaged) are neither counted nor deleted: the run
    replaces each when it reaches its step again.
    """
    final = _fresh(run_dir, step)
    full_state = _trainer_state(step, state, optimizer=optimizer_state)

    def write_files(directory: Path) -> None:
        write_model_files(directory, model, tokenizer_dir, weights)
        _write_state(directory, full_state)
        write_manifest(directory, step)

    write_dir_atomically(final, write_files, last=MANIFEST_FILE)
    _keep_newest(run_dir, step, keep_last)
    return final


def _fresh(run_dir, step: int) -> Path:
    """Where checkpoint `step` goes, an older one of that step removed (re-saving the same
    step, e.g. the final save right after a periodic one)."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    if final.exists():
        shutil.rmtree(final)
    return final


def _trainer_state(step: int, state: dict, **extra) -> dict:
    return {"step": step, **extra, "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "manifest": True,  # a missing manifest.json then means damage, not an old checkpoint
            **state}


def _write_state(directory: Path, full_state: dict) -> None:
    with open(directory / STATE_FILE, "wb") as f:
        torch.save(full_state, f)
        f.flush()
        os.fsync(f.fileno())


def _keep_newest(run_dir, step: int, keep_last: int) -> None:
    if keep_last > 0:
        done = [p for p in list_checkpoints(run_dir) if checkpoint_step(p) <= step]
        for old in done[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------ sharded (DCP)


def _dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer | None,
               trainable_only: bool) -> dict:
    """What DCP saves and loads: the model's and the optimizer's state by parameter name,
    each rank's own shards of a sharded model (the whole tensors of a plain one)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_state_dict)

    options = StateDictOptions(ignore_frozen_params=trainable_only)
    if optimizer is None:
        return {"model": get_model_state_dict(model, options=options)}
    weights, moments = get_state_dict(model, optimizer, options=options)
    return {"model": weights, "optim": moments}


def save_sharded_checkpoint(run_dir, step: int, model: nn.Module,
                            optimizer: torch.optim.Optimizer, state: dict, d: Dist,
                            tokenizer_dir=None, keep_last: int = 3,
                            trainable_only: bool = False) -> Path | None:
    """Write checkpoint `step` as DCP shards (every rank calls it and writes its own; none
    gathers the model), atomically: all write into rank 0's staging directory, which rank 0
    renames once the manifest is written. `trainable_only`: the frozen weights are left out
    (a LoRA base, rebuilt from its directory). Returns the path on rank 0, else None."""
    import torch.distributed.checkpoint as dcp

    app = _dcp_state(model, optimizer, trainable_only)
    full_state = _trainer_state(step, state, sharded=True)

    def write_files(staging: str | None) -> None:
        directory = Path(broadcast_object(staging, d))
        dcp.save(app, checkpoint_id=directory, no_dist=not d.enabled)  # each rank its
        # shards, rank 0 the .metadata
        if d.is_main:
            (directory / CONFIG_FILE).write_text(json.dumps(model_config_json(model), indent=2),
                                                 encoding="utf-8")
            if tokenizer_dir is not None:
                copy_tokenizer_files(tokenizer_dir, directory)
            _write_state(directory, full_state)
        names = broadcast_object(sorted(_files(directory)) if d.is_main else None, d)
        share = {n: _file_entry(directory / n) for n in names[d.rank::d.world]}
        if d.is_main:
            write_manifest(directory, step, {k: v for part in gather_objects(share, d)
                                             for k, v in part.items()})
        else:
            gather_objects(share, d)

    if not d.is_main:
        write_files(None)
        return None
    final = _fresh(run_dir, step)
    write_dir_atomically(final, lambda tmp: write_files(str(tmp)), last=MANIFEST_FILE)
    _keep_newest(run_dir, step, keep_last)
    return final


def load_sharded(ckpt: str | os.PathLike, model: nn.Module,
                 optimizer: torch.optim.Optimizer | None = None,
                 trainable_only: bool = False) -> None:
    """Fill `model` (sharded or not, at any world size; every rank calls it) and `optimizer`
    from the DCP checkpoint `ckpt`: each rank reads the slices it holds."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    app = _dcp_state(model, optimizer, trainable_only)
    try:
        dcp.load(app, checkpoint_id=Path(ckpt), no_dist=not _joined())
    except Exception as e:  # DCP wraps a missing key or a bad shard in its own errors
        raise CheckpointError(ckpt, f"its shards do not load into this model ({_first(e)}); "
                                    "resume with the config the run was started with") from None
    set_state_dict(model, optimizer or [], model_state_dict=app["model"],
                   optim_state_dict=app.get("optim", {}),
                   options=StateDictOptions(ignore_frozen_params=trainable_only,
                                            strict=not trainable_only))


def export_checkpoint(ckpt: str | os.PathLike, out_dir: str | os.PathLike,
                      overwrite: bool = False) -> Path:
    """Write the sharded checkpoint `ckpt` as a plain model directory at `out_dir` (config.json,
    model.safetensors, its tokenizer files): what every other command reads. One process
    reads all the shards. An adapter run's checkpoint becomes an adapter run directory."""
    ckpt = Path(ckpt)
    if not (ckpt / STATE_FILE).is_file():
        raise InputError(f"{ckpt}: not a training checkpoint (no {STATE_FILE}); give one of "
                         "RUN/checkpoints/step_N")
    loaded = read_checkpoint(ckpt)
    if not loaded.sharded:
        raise InputError(f"{ckpt}: not a sharded checkpoint; it is a model directory already "
                         "(--model takes it as it is)")
    claim = claim_output_dir(out_dir, "export checkpoint", {"checkpoint": absolute(ckpt)},
                             reads=[ckpt], overwrite=overwrite)
    model = build_from_dir(ckpt)
    record = read_adapter_record(ckpt)
    if record:
        from lmlab.finetune.lora import restore_adapters

        restore_adapters(model, record)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    state = {k: v for k, v in model.state_dict().items() if not record or k in trained}
    import torch.distributed.checkpoint as dcp

    dcp.load({"model": state}, checkpoint_id=ckpt, no_dist=True)
    load_state_dict_strict(model, state, ckpt, partial=bool(record))
    out = save_model_dir(model, out_dir, tokenizer_dir=ckpt if has_tokenizer_files(ckpt) else None)
    claim.record()
    return out


def _joined() -> bool:
    """Whether this process is one of a process group's (else DCP reads in one process)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _first(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0][:160]}" if lines else type(e).__name__


BEST_DIR, BEST_FILE = "best", "best.json"


def save_best(run_dir, model, weights: dict, best: dict, tokenizer_dir=None) -> Path:
    """Write RUN/best/: a model directory of the best validation's weights, with best.json
    ({"metric", "value", "step"}) beside them; replaced whole each time it improves."""
    def write_files(directory: Path) -> None:
        write_model_files(directory, model, tokenizer_dir, weights)
        (directory / BEST_FILE).write_text(json.dumps(best, indent=2), encoding="utf-8")

    return write_dir_atomically(Path(run_dir) / BEST_DIR, write_files, last=BEST_FILE,
                                replace=True)


def read_best(run_dir) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """(best.json, weights) of RUN/best/, or None if the run kept none."""
    d = Path(run_dir) / BEST_DIR
    if not (d / BEST_FILE).is_file():
        return None
    return json.loads((d / BEST_FILE).read_text(encoding="utf-8")), read_safetensors(d / WEIGHTS_FILE)


def list_checkpoints(run_dir) -> list[Path]:
    """The checkpoint directories (`step_NNNNNN`), oldest first; whether each is intact is
    for `load_newest_intact` to check (a staging directory of an interrupted write is not one)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if _NAME.match(p.name) and p.is_dir()]
    return sorted(done, key=checkpoint_step)


def latest_checkpoint(run_dir) -> Path | None:
    """The newest checkpoint directory (unverified); half-written `.tmp` ones are removed."""
    root = checkpoint_dir(run_dir)
    if root.is_dir():
        for p in root.glob(f".step_*{TMP_MARK}*"):
            log.warning("removing incomplete checkpoint %s (the run stopped while writing it)", p)
            shutil.rmtree(p, ignore_errors=True)
    done = list_checkpoints(run_dir)
    return done[-1] if done else None


# ------------------------------------------------------------ the manifest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.is_file() and p.name != MANIFEST_FILE]


def _file_entry(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


def write_manifest(directory: str | os.PathLike, step: int,
                   files: dict[str, dict] | None = None) -> Path:
    """Record the size and sha256 of every file in checkpoint `directory` in manifest.json
    (`files`: those entries, computed already, e.g. by the ranks that share the hashing).

    Written last, after the other files are complete, so that a manifest
    vouches for exactly what is there.
    """
    directory = Path(directory)
    if files is None:
        files = {name: _file_entry(directory / name) for name in _files(directory)}
    files = dict(sorted(files.items()))
    out = directory / MANIFEST_FILE
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"format": MANIFEST_FORMAT, "step": step, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    return out


def _plain_name(name) -> bool:
    """A file name inside the checkpoint (a manifest must not point elsewhere)."""
    return isinstance(name, str) and name not in ("", ".", "..") and not set(name) & {"/", "\\"}


def verify_manifest(ckpt: str | os.PathLike) -> bool:
    """Check checkpoint `ckpt` against its manifest: True when every listed file has its
    recorded size and sha256, False when there is no manifest; CheckpointError otherwise."""
    ckpt = Path(ckpt)
    mf = ckpt / MANIFEST_FILE
    if not mf.is_file():
        return False
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(mf, f"unreadable manifest ({type(e).__name__}: {e})") \
            from e
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files or not all(
            _plain_name(name) and isinstance(entry, dict) and isinstance(entry.get("size"), int)
            and isinstance(entry.get("sha256"), str) for name, entry in files.items()):
        raise CheckpointError(mf, "not a checkpoint manifest (no valid 'files' table)")
    for name, entry in files.items():  # sizes first: cheap, and they catch truncation
        f = ckpt / name
        if not f.is_file():
            raise CheckpointError(f, "missing (the manifest lists it)")
        size = f.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(f, f"{size} bytes, the manifest says {entry['size']} "
                                     "(truncated or overwritten)")
    for name, entry in files.items():
        if _sha256(ckpt / name) != entry["sha256"]:
            raise CheckpointError(ckpt / name, "content does not match its sha256 in the manifest "
                                               "(changed or corrupted after it was written)")
    return True


# ------------------------------------------------------------ reading


def load_trainer_state(ckpt: str | os.PathLike) -> dict:
    """The trainer state of checkpoint `ckpt` (torch.load, weights_only=True); CheckpointError
    if it is missing, unreadable, refused for safety, or not a trainer state."""
    f = Path(ckpt) / STATE_FILE
    try:
        state = read_torch_file(f, "PyTorch file lmlab wrote")
    except UnreadableFile as e:
        raise CheckpointError(f, e.reason) from None
    if not (isinstance(state, dict) and isinstance(state.get("step"), int)
            and (isinstance(state.get("optimizer"), dict) or state.get("sharded") is True)
            and isinstance(state.get("rng_cpu"), torch.Tensor)
            and state["rng_cpu"].dtype == torch.uint8):
        raise CheckpointError(f, "not a trainer state (expected step, optimizer and RNG state)")
    return state


def load_weights(ckpt: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights of checkpoint `ckpt` (safetensors); CheckpointError if unreadable."""
    f = Path(ckpt) / WEIGHTS_FILE
    try:
        return read_safetensors(f)
    except UnreadableFile as e:
        raise CheckpointError(f, e.reason) from None


def read_checkpoint(ckpt: str | os.PathLike) -> LoadedCheckpoint:
    """Verify and read checkpoint `ckpt`: manifest (if any), weights, trainer state."""
    ckpt = Path(ckpt)
    verified = "manifest" if verify_manifest(ckpt) else "loading"
    state = load_trainer_state(ckpt)
    if verified == "loading" and state.get("manifest"):
        raise CheckpointError(ckpt / MANIFEST_FILE,
                              "missing, though this checkpoint was written with one")
    if _NAME.match(ckpt.name) and state["step"] != checkpoint_step(ckpt):
        raise CheckpointError(ckpt / STATE_FILE,
                              f"holds step {state['step']}, not the {checkpoint_step(ckpt)} "
                              "its directory is named for")
    if state.get("sharded"):
        _check_dcp_metadata(ckpt)
        return LoadedCheckpoint(ckpt, {}, state, verified, sharded=True)
    return LoadedCheckpoint(ckpt, load_weights(ckpt), state, verified)


def _check_dcp_metadata(ckpt: Path) -> None:
    """A sharded checkpoint's index of its shards must read (the shards' bytes are the
    manifest's to vouch for)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        FileSystemReader(ckpt).read_metadata()
    except Exception as e:  # a missing or damaged index, whatever DCP raises for it
        raise CheckpointError(ckpt / ".metadata", f"unreadable shard index ({_first(e)})") \
            from None


def load_newest_intact(run_dir: str | os.PathLike) -> LoadedCheckpoint | None:
    """The newest checkpoint of `run_dir` that verifies and loads, or None if it has none.

    When an older one is used, each newer, damaged one is named in a warning
    with the reason; if every checkpoint is damaged, InputError says so on one
    line (each one's reason) and what to do.
    """
    if latest_checkpoint(run_dir) is None:  # also clears the litter of interrupted writes
        return None
    problems: list[tuple[Path, CheckpointError]] = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            loaded = read_checkpoint(path)
        except CheckpointError as e:
            problems.append((path, e))
            continue
        for bad, e in problems:
            log.warning("checkpoint %s is damaged, not resuming from it: %s", bad,
                        _within(e, bad))
        if problems:
            log.warning("resuming from %s, the newest intact checkpoint", path)
        if loaded.verified == "loading":
            log.warning("checkpoint %s: no manifest (written before lmlab kept one): "
                        "verified by loading", path)
        return loaded
    why = "; ".join(_within(e, checkpoint_dir(run_dir)) for _, e in problems)
    raise InputError(
        f"{run_dir}: no intact checkpoint to resume from ({why}); start the run again with "
        "--overwrite true (this deletes its checkpoints) or into a new --out_dir")


def _within(e: CheckpointError, root: Path) -> str:
    """`e` with its path relative to `root` (the checkpoint, or all of them)."""
    try:
        where = e.path.relative_to(root)
    except ValueError:
        where = e.path
    return e.reason if where == Path(".") else f"{where}: {e.reason}"


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["rng_cpu"])
    if torch.cuda.is_available() and state.get("rng_cuda"):
        torch.cuda.set_rng_state_all(state["rng_cuda"])
