"""The run plumbing every training task shares: `run_task(model, task, train_cfg, out_dir)`.

A task (pretraining, classification, SFT, ...) builds its model and its data
and hands both here. `run_task` does the rest, the same way for every task:

    join the torchrun process group (or run as one process) and pick the device
    claim the output directory: refuse one that holds anything but this run
    (checkpoints included), unless resuming or overwriting
    write the resolved run config (config.yaml) next to the outputs
    build the Trainer (strategy, optimizer, compilation) and resume if asked
    run the loop; then save the final model directory, plot the loss curve

The run directory is itself a model directory (config.json names the model's
kind, model.safetensors its weights, plus the tokenizer files), so
`lmlab generate --model RUN_DIR` and `lmlab.load(RUN_DIR)` take it. Checkpoints
store what the model supplies — its config dict and its state dict, or only
the trainable part (`trainable_only`) — so no model has to pretend to be a
Transformer.

A model that is counted, not trained (the n-gram: `model.fit_counts`), goes through
`fit_task` instead: the same run directory and the task's own validation, no loop.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lmlab.config import TrainConfig, to_yaml
from lmlab.errors import ConfigError
from lmlab.fileio import atomic_write_text
from lmlab.model_io import save_model_dir
from lmlab.outputs import OutputClaim, claim_output_dir
from lmlab.train.checkpoint import list_checkpoints, read_best
from lmlab.train.distributed import init_distributed
from lmlab.train.metrics import MetricsLog, plot_loss_curve
from lmlab.train.trainer import FitResult, Task, Trainer

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    fit: FitResult
    run_dir: Path
    params: int
    model_config: dict
    loss_png: Path | None
    kind: str = ""
    best: dict | None = None  # {"metric", "value", "step"} when the task keeps its best weights


def claim_run_dir(run_dir: str | Path, command: str = "train", inputs: dict | None = None,
                  reads: tuple = (), overwrite: bool = False, resume: bool = False) -> OutputClaim:
    """Claim a training run's directory (`lmlab.outputs.claim_output_dir`): refused if it holds
    anything but this run unless `resume` or `overwrite`; a fresh start (not `resume`) empties
    what an earlier run of it left. A task that writes into the run directory before training
    (a tokenizer it trains) claims it first and hands the claim to `run_task`."""
    run_dir = Path(run_dir)
    is_main = int(os.environ.get("RANK", "0")) == 0  # only rank 0 changes the directory
    claim = claim_output_dir(run_dir, command, inputs, reads=reads, overwrite=overwrite,
                             resume=resume, flag="--out_dir", overwrite_flag="--overwrite true",
                             resume_hint="--resume true to continue its training")
    if is_main and not resume and claim.state in ("same", "overwrite"):
        # a fresh run: what an earlier run of this directory left goes (with "same", only a
        # run that never reached a checkpoint: one with checkpoints is refused below)
        if claim.state == "overwrite" or not list_checkpoints(run_dir):
            claim.state = "overwrite"
            claim.clear()
    _refuse_checkpoints(run_dir, resume)
    if is_main:
        claim.record()
    return claim


def _refuse_checkpoints(run_dir: Path, resume: bool) -> None:
    if not resume and list_checkpoints(run_dir):
        raise ConfigError(f"{run_dir}: already holds checkpoints; pass --resume true to continue "
                          "that run, --overwrite true to start it again, or choose another --out_dir")


def _claim(run_dir: Path, claim: OutputClaim | None, command: str, inputs: dict | None,
           reads: tuple, overwrite: bool, resume: bool) -> None:
    if claim is None:
        claim_run_dir(run_dir, command, inputs, reads, overwrite, resume)
    else:  # the caller claimed it (the quickstart's directory)
        _refuse_checkpoints(run_dir, resume)


def _write_run_config(run_dir: Path, cfg: Any) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    if dataclasses.is_dataclass(cfg):
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))


def run_task(model: nn.Module, task: Task, train: TrainConfig, out_dir: str | Path, *,
             resume: bool = False, run_config: Any = None, tokenizer_dir: str | None = None,
             callback: Callable[[str, dict], None] | None = None, flops_per_token: float = 0.0,
             trainable_only: bool = False, command: str = "train",
             inputs: dict | None = None, reads: tuple = (), overwrite: bool = False,
             claim: OutputClaim | None = None) -> RunResult:
    """Train `model` on `task` under `train` into `out_dir`; run under torchrun for DDP or
    FSDP (`train.strategy`). `model` comes back trained, a plain module, on every rank.

    `run_config` (a dataclass, default `train`) is written as config.yaml.
    `flops_per_token` feeds MFU (0: not reported). Returns when the run ends —
    finished, at its time limit, or interrupted by a signal (then with a
    checkpoint to resume from).

    `out_dir` is claimed first (`lmlab.outputs.claim_output_dir`, as `command` of
    `inputs`, never inside one of `reads`): one holding anything but this run is
    refused unless `resume` or `overwrite` (which empties it first); a caller that
    claimed it already (the quickstart's directory) passes its `claim`.
    """
    run_dir = Path(out_dir)
    _claim(run_dir, claim, command, inputs, reads, overwrite, resume)
    d = init_distributed(train.device)  # the process group stays joined until exit
    if d.is_main:
        _write_run_config(run_dir, run_config if run_config is not None else train)
    trainer = Trainer(model, task, train, run_dir, d, tokenizer_dir=tokenizer_dir,
                      callback=callback, flops_per_token=flops_per_token,
                      trainable_only=trainable_only)
    if resume and trainer.resume() is None:
        log.warning("--resume: no checkpoint in %s yet; starting from step 0", run_dir)
    result = trainer.fit()
    trainer.finish()  # `model` holds the trained weights (a sharded strategy gathers them)
    weights = trainer.strategy.model_state(model, trainable_only)  # rank 0 writes them
    png = None
    if d.is_main and trainer.best is not None:  # the task keeps its best validation's
        best = read_best(run_dir)
        if best is not None and best[0].get("step") == trainer.best["step"]:
            weights = best[1]
            log.info("the model directory holds the weights of step %d (best %s %.4f)",
                     trainer.best["step"], trainer.best["metric"], trainer.best["value"])
    if d.is_main:
        save_model_dir(model, run_dir, tokenizer_dir=tokenizer_dir, state=weights)
        png = plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss.png")
    params = sum(p.numel() for p in model.parameters())  # a tied tensor counts once
    return RunResult(fit=result, run_dir=run_dir, params=params,
                     model_config=model.config_dict(), loss_png=png, kind=model.kind,
                     best=trainer.best)


def fit_task(model: nn.Module, task: Any, train: TrainConfig, out_dir: str | Path, *,
             resume: bool = False, run_config: Any = None, tokenizer_dir: str | None = None,
             callback: Callable[[str, dict], None] | None = None, command: str = "train",
             inputs: dict | None = None, reads: tuple = (), overwrite: bool = False,
             claim: OutputClaim | None = None) -> RunResult:
    """`run_task` for a model that is counted, not trained (`model.fit_counts`: the n-gram).

    The same run directory (claimed, config.yaml, metrics.jsonl, the final model directory
    with the tokenizer files) and the task's own validation (`val_batches`, `eval_sums`,
    `eval_metrics`: val loss, ppl and bits per byte as for any model), but no gradient loop:
    the model counts `task.train_chunks()` in one pass. `train.max_minutes` stops the count
    when spent (status "time limit", the tokens counted so far kept); steps, learning rates
    and checkpoints do not apply, so `resume` counts again (to the same tables). Progress
    goes to `callback` as the Trainer's "start", "log" and "eval" events.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"model.kind {model.kind}: it is counted in one process; run it "
                          "without torchrun")
    run_dir = Path(out_dir)
    _claim(run_dir, claim, command, inputs, reads, overwrite, resume)
    _write_run_config(run_dir, run_config if run_config is not None else train)
    if resume:
        log.info("%s: a counted model has no checkpoints; --resume counts again", run_dir)
    cb = callback or (lambda event, data: None)
    metrics = MetricsLog(run_dir)
    metrics.truncate_after(0)  # a count again replaces the rows of the one before
    max_seconds = train.max_minutes * 60 if train.max_minutes else None
    cb("start", {"step": 0, "max_steps": None, "max_seconds": max_seconds, "peak_flops": 0.0,
                 "tokens_per_step": 0})
    t0 = time.perf_counter()
    done = {"step": 0, "tokens": 0, "status": "finished"}

    def chunks():
        for chunk in task.train_chunks():
            if max_seconds and time.perf_counter() - t0 >= max_seconds:
                done["status"] = "time limit"
                return
            yield chunk  # the model counts it before asking for the next
            done["step"] += 1
            done["tokens"] += len(chunk)
            elapsed = time.perf_counter() - t0
            cb("log", {"step": done["step"], "tokens": done["tokens"], "elapsed": elapsed,
                       "tokens_per_sec": done["tokens"] / elapsed})

    model.fit_counts(chunks())
    seconds = time.perf_counter() - t0
    model.eval()
    sums = dict.fromkeys(task.eval_keys, 0.0)
    with torch.no_grad():
        for batch in task.val_batches(0, 1):
            for k, v in task.eval_sums(model, batch).items():
                sums[k] += float(v)
    val = task.eval_metrics(sums)
    rec = {"step": done["step"], "tokens": done["tokens"], "elapsed": seconds, **val}
    metrics.write(rec)
    metrics.close()
    cb("eval", rec)
    save_model_dir(model, run_dir, tokenizer_dir=tokenizer_dir)
    fit = FitResult(step=done["step"], status=done["status"], tokens_seen=done["tokens"],
                    seconds=seconds, tokens_per_sec=done["tokens"] / seconds, mfu=0.0,
                    last_train_loss=float("nan"), val=val)
    return RunResult(fit=fit, run_dir=run_dir, params=model.num_params(),
                     model_config=model.config_dict(), loss_png=None, kind=model.kind)
