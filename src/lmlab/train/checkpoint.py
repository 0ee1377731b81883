"""Checkpoints: a model directory plus the state needed to continue training.

    run_dir/checkpoints/step_000200/
        config.json  model.safetensors  tokenizer.json ...   (a model directory: `--model` takes it)
        trainer_state.pt    optimizer, step, RNG states, run progress (torch.load weights_only=True)

A checkpoint is written into a staging directory (`.step_000200.tmp-` and a random suffix, by
`lmlab.fileio.write_dir_atomically`) and renamed when complete, so a crash
(even SIGKILL) mid-write leaves the previous checkpoints intact and the
half-written one is ignored and cleaned up on resume. The weights saved are
what the distribution strategy gathered (the whole model, or only its
trainable part when the task asks for that).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import torch

from lmlab.fileio import TMP_MARK, write_dir_atomically
from lmlab.model_io import write_model_files

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.pt"
_NAME = re.compile(r"^step_(\d{6,})$")


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir, step: int, model, weights: dict, optimizer_state: dict, state: dict,
                    tokenizer_dir=None, keep_last: int = 3) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep_last`.

    `weights` is the state dict to store (as the strategy gathered it),
    `optimizer_state` the optimizer's, `state` the rest of the trainer's.
    """
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    full_state = {
        "step": step,
        "optimizer": optimizer_state,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        **state,
    }

    def write_files(directory: Path) -> None:
        write_model_files(directory, model, tokenizer_dir, weights)
        with open(directory / STATE_FILE, "wb") as f:
            torch.save(full_state, f)
            f.flush()
            os.fsync(f.fileno())

    if final.exists():  # re-saving the same step (e.g. final save right after a periodic one)
        shutil.rmtree(final)
    write_dir_atomically(final, write_files, last=STATE_FILE)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(run_dir) -> Path | None:
    """The newest complete checkpoint; half-written `.tmp` ones are removed."""
    root = checkpoint_dir(run_dir)
    if root.is_dir():
        for p in root.glob(f".step_*{TMP_MARK}*"):
            log.warning("removing incomplete checkpoint %s (the run stopped while writing it)", p)
            shutil.rmtree(p, ignore_errors=True)
    done = list_checkpoints(run_dir)
    return done[-1] if done else None


def load_trainer_state(ckpt: Path) -> dict:
    return torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["rng_cpu"])
    if torch.cuda.is_available() and state.get("rng_cuda"):
        torch.cuda.set_rng_state_all(state["rng_cuda"])
