"""The one training loop of lmlab.

A task says what a batch is and what the loss is; `Trainer` does everything
else, the same way for every task:

    for each step:
        lr ← peak · warmup(step) · cosine(progress)
        for each micro-batch:  loss = task.loss(model, batch) / accum;  loss.backward()
        clip the gradient norm; stop (or skip) if it is not finite
        optimizer step
        every k steps: log · validate · checkpoint
    on Ctrl-C / SIGTERM: checkpoint, then return so the run can be resumed

A task implements:

    train_batch(step, micro, accum, rank, world) -> batch   (a pure function of its arguments)
    loss(model, batch) -> scalar tensor (mean over the batch)
    val_batches(rank, world) -> iterable of batches
    eval_keys -> tuple of the sums eval_sums returns, e.g. ("loss_sum", "tokens")
    eval_sums(model, batch) -> dict of those sums for one batch
    eval_metrics(sums) -> dict, e.g. {"val_loss": .., "val_bpb": ..}
    tokens_per_step(accum, world) -> int        (for tokens/s and MFU; samples for a
                                                 task without tokens)

A batch is a tensor or a tuple / list / dict of them, built on the CPU; the
Trainer moves it to the device. Every rank all-reduces the same `eval_keys`,
whether or not it got validation batches, so a tiny validation split cannot
make the ranks disagree about what they reduce.

Distribution goes through one strategy object (`lmlab.train.distributed`,
`train.strategy`: ddp or fsdp): it wraps the model (the optimizer is built
after, on the wrapped model's parameters), gathers and loads the state
that checkpoints hold (one file, or DCP shards for a sharded strategy), and
hands the model back after training (`finish`).

Because a batch is a pure function of its step, on a GPU the next one is built
in a background thread, in pinned memory, while the current one computes
(`lmlab.train.distributed.transfer_plan`), and copied without blocking.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import nn

from lmlab.config import TrainConfig
from lmlab.errors import InputError, LmlabError
from lmlab.model import fastpath
from lmlab.model.loss import compiled_kernels
from lmlab.train import checkpoint as ckpt
from lmlab.train.distributed import (Dist, all_reduce_max, all_reduce_sum, autocast,
                                     autocast_dtype, broadcast_floats, keep_freed_memory,
                                     make_strategy, pin_batch, to_device, transfer_plan)
from lmlab.train.metrics import MetricsLog, measured_peak_flops
from lmlab.train.optim import build_adamw, cosine_with_warmup

log = logging.getLogger(__name__)


class NonFiniteError(LmlabError):
    """The loss or gradient became NaN/inf."""


class Task(Protocol):
    def train_batch(self, step: int, micro: int, accum: int, rank: int, world: int) -> Any: ...
    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor: ...
    def val_batches(self, rank: int, world: int): ...
    eval_keys: tuple[str, ...]
    def eval_sums(self, model: nn.Module, batch: Any) -> dict[str, float]: ...
    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]: ...
    def tokens_per_step(self, accum: int, world: int) -> int: ...


@dataclass
class FitResult:
    step: int
    status: str  # "finished" | "time limit" | "interrupted (SIGINT)" | ...
    tokens_seen: int
    seconds: float  # training time of the whole run (resumes added up), compilation included
    tokens_per_sec: float  # steady state: over the last logging window, like `mfu`
    mfu: float
    last_train_loss: float
    val: dict[str, float] = field(default_factory=dict)
    checkpoint: str | None = None
    skipped_steps: int = 0


class Trainer:
    """Runs `task` on `model` under `cfg`; writes metrics and checkpoints to `run_dir`.

    `callback(event, data)` receives "start", "log", "eval", "checkpoint" events
    (on the main process only); the CLI draws progress from them. With
    `trainable_only`, checkpoints hold only the parameters that require a
    gradient (e.g. an adapter over a frozen base the task rebuilds).
    """

    def __init__(self, model: nn.Module, task: Task, cfg: TrainConfig, run_dir: str | Path,
                 dist: Dist, tokenizer_dir: str | None = None,
                 callback: Callable[[str, dict], None] | None = None, flops_per_token: float = 0.0,
                 trainable_only: bool = False):
        self.given = model  # what `finish` hands back, trained
        self.trainable_only = trainable_only
        if dist.device.type == "cpu":
            keep_freed_memory()
        self.task, self.cfg, self.dist = task, cfg, dist
        self.run_dir = Path(run_dir)
        self.tokenizer_dir = tokenizer_dir
        self.callback = callback if (callback and dist.is_main) else (lambda e, d: None)
        self.flops_per_token = flops_per_token
        self.amp_dtype = autocast_dtype(cfg.precision, dist.device)
        # fp16 has too few exponent bits for small gradients: scale the loss up, unscale
        # before clipping (bf16 has fp32's range and needs none of this)
        self.scaler = (torch.amp.GradScaler(dist.device.type)
                       if self.amp_dtype == torch.float16 else None)
        self.step = 0
        # the best validation so far, when the task names a metric to keep the best weights
        # by (`best_metric`, higher is better): {"metric", "value", "step"}; see _keep_best
        self.best: dict | None = None
        self.train_seconds = 0.0  # accumulated over resumes, drives time-based schedules
        self.skipped = 0
        self.saved_step = -1
        self._stop_signal: str | None = None
        self.metrics = MetricsLog(self.run_dir, enabled=dist.is_main)
        # what runs the steps: the strategy (DDP, FSDP) and compilation wrap the plain module,
        # and the optimizer is built after wrapping (a sharding strategy replaces the parameters)
        self.strategy = make_strategy(dist, cfg)
        self.raw_model, self.model = self.strategy.wrap(model)
        self.optimizer = build_adamw(self.raw_model, cfg.lr, cfg.weight_decay,
                                     (cfg.beta1, cfg.beta2))
        if cfg.compile:
            self.model = torch.compile(self.model)
        self.pin, prefetch = transfer_plan(dist.device)
        self._feed = ThreadPoolExecutor(1, "lmlab-batches") if prefetch else None
        self._ahead: tuple[tuple[int, int], Future] | None = None

    # ------------------------------------------------------------ state

    def resume(self) -> Path | None:
        """Load the newest intact checkpoint of run_dir, if any; return its path.

        A damaged checkpoint is named in a warning and an older one used
        (`checkpoint.load_newest_intact`); none intact is an InputError. The
        metrics log then forgets the rows past the step resumed from (all of
        them when there is no checkpoint: the run starts again from step 0).
        """
        loaded = ckpt.load_newest_intact(self.run_dir)
        if loaded is None:
            self.metrics.truncate_after(0)
            return None
        path, state = loaded.path, loaded.state
        if loaded.sharded:  # DCP: whatever the world size it was written at
            ckpt.load_sharded(path, self.raw_model, self.optimizer, self.trainable_only)
        elif self.strategy.sharded and self.dist.enabled:
            raise InputError(f"{path}: written by --train.strategy ddp (one file of weights); "
                             "resume it with --train.strategy ddp")
        else:
            self._load_one_file(loaded)
        ckpt.restore_rng(state)
        # compute with the fast paths the saved run chose, not a new measurement's
        fastpath.adopt_decisions(json.loads(state.get("fastpath", "[]")))
        self.step = self.saved_step = state["step"]
        self.train_seconds = state.get("train_seconds", 0.0)
        self.skipped = state.get("skipped", 0)
        self.best = json.loads(state.get("best", "null"))
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.metrics.truncate_after(self.step)
        log.info("resumed from %s at step %d", path, self.step)
        return path

    def _load_one_file(self, loaded: ckpt.LoadedCheckpoint) -> None:
        path = loaded.path
        self.strategy.load_model_state(self.raw_model, loaded.weights, path,
                                       partial=self.trainable_only)
        try:
            self.strategy.load_optimizer_state(self.raw_model, self.optimizer,
                                               loaded.state["optimizer"])
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(
                f"{path / ckpt.STATE_FILE}: optimizer state does not fit this model ({e}); resume "
                "with the config the run was started with, or start over with a new --out_dir"
            ) from None

    def finish(self) -> nn.Module:
        """After `fit`: the model given to the Trainer, plain again and holding the trained
        weights (every rank calls it: a sharded strategy gathers them)."""
        if self._feed is not None:
            self._feed.shutdown()
        self.strategy.unwrap(self.given)
        return self.given

    def model_state(self) -> dict[str, torch.Tensor]:
        """What the model directory of this run holds (all ranks call it; rank 0 writes)."""
        return self.strategy.model_state(self.raw_model, self.trainable_only)

    def save(self) -> Path | None:
        path = None
        state = {"train_seconds": self.train_seconds, "skipped": self.skipped,
                 "best": json.dumps(self.best),
                 "fastpath": json.dumps(fastpath.export_decisions()),
                 "scaler": self.scaler.state_dict() if self.scaler else {}}
        if self.strategy.sharded:  # every rank writes its shards
            path = ckpt.save_sharded_checkpoint(
                self.run_dir, self.step, self.raw_model, self.optimizer, state, self.dist,
                tokenizer_dir=self.tokenizer_dir, keep_last=self.cfg.keep_checkpoints,
                trainable_only=self.trainable_only)
        else:
            weights = self.model_state()
            optimizer = self.strategy.optimizer_state(self.raw_model, self.optimizer)
            if self.dist.is_main:
                path = ckpt.save_checkpoint(
                    self.run_dir, self.step, self.raw_model, weights, optimizer, state,
                    tokenizer_dir=self.tokenizer_dir, keep_last=self.cfg.keep_checkpoints)
        if path is not None:
            self.callback("checkpoint", {"step": self.step, "path": str(path)})
        if self.dist.enabled:
            torch.distributed.barrier()
        self.saved_step = self.step
        return path

    # ------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        model.eval()
        keys = tuple(self.task.eval_keys)
        sums = dict.fromkeys(keys, 0.0)
        batches, extra = self.task.val_batches(self.dist.rank, self.dist.world), []
        if self.strategy.lockstep:  # a sharded model gathers weights in every forward pass:
            # a rank with fewer batches repeats one (its results dropped) until all are done
            batches = list(batches)
            (most,) = all_reduce_max([len(batches)], self.dist)
            spare = batches[:1] or list(itertools.islice(
                self.task.val_batches(0, self.dist.world), 1))
            extra = spare * (int(most) - len(batches))
        with autocast(self.dist.device, self.amp_dtype):
            for batch in batches:
                got = self.task.eval_sums(model, self.to_device(batch))
                if set(got) != set(keys):
                    raise ValueError(f"{type(self.task).__name__}.eval_sums returned {sorted(got)}; "
                                     f"its eval_keys are {sorted(keys)}")
                for k, v in got.items():
                    sums[k] += float(v)
            for batch in extra:
                self.task.eval_sums(model, self.to_device(batch))
        model.train()
        # every rank joins the same all-reduce, even one that got no batches
        totals = all_reduce_sum([sums[k] for k in keys], self.dist)
        return self.task.eval_metrics(dict(zip(keys, totals)))

    # ------------------------------------------------------------ the loop

    def _on_signal(self, signum, frame):
        name = signal.Signals(signum).name
        if self._stop_signal is not None:  # a second Ctrl-C means now
            raise KeyboardInterrupt
        self._stop_signal = name
        log.warning("%s received: finishing the current step, then saving a checkpoint", name)

    def to_device(self, batch):
        """The batch (tensors, possibly in tuples / lists / dicts) on this process's device."""
        return to_device(pin_batch(batch) if self.pin else batch, self.dist.device, self.pin)

    def _build(self, step: int, micro: int):
        d, accum = self.dist, self.cfg.grad_accum
        batch = self.task.train_batch(step, micro, accum, d.rank, d.world)
        return pin_batch(batch) if self.pin else batch

    def train_batch(self, micro: int):
        """Micro-batch `micro` of this step on the device. With a feed thread, the next one
        (the next micro-batch, or the next step's first) is built while this one computes."""
        at = (self.step, micro)
        if self._feed is None:
            batch = self._build(*at)
        else:
            ahead, self._ahead = self._ahead, None
            batch = ahead[1].result() if ahead and ahead[0] == at else self._build(*at)
            nxt = (self.step, micro + 1) if micro + 1 < self.cfg.grad_accum else (self.step + 1, 0)
            self._ahead = (nxt, self._feed.submit(self._build, *nxt))
        return to_device(batch, self.dist.device, self.pin)

    def train_step(self, lr: float) -> tuple[float, float]:
        """One optimizer step at learning rate `lr`: (mean loss, gradient norm before clipping)."""
        cfg, d, model = self.cfg, self.dist, self.model
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=d.device)
        for micro in range(cfg.grad_accum):
            batch = self.train_batch(micro)
            # with train.compile, the loss's chunk kernel (outside the model's graph) is compiled too
            with (self.strategy.no_sync(model, micro < cfg.grad_accum - 1), autocast(d.device, self.amp_dtype),
                  compiled_kernels(cfg.compile)):
                loss = self.task.loss(model, batch) / cfg.grad_accum
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            loss_sum += loss.detach()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.raw_model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # sharded gradients: a DTensor, summed over ranks
            grad_norm = grad_norm.full_tensor()
        gn, loss_value = float(grad_norm), float(loss_sum)  # one device sync per step
        # with fp16, overflowing gradients under a finite loss are the scaler's business: its
        # step() skips the update and update() lowers the scale
        fp16_overflow = self.scaler is not None and math.isfinite(loss_value)
        if not (math.isfinite(gn) and math.isfinite(loss_value)) and not fp16_overflow:
            if cfg.nonfinite == "stop":
                good = ckpt.latest_checkpoint(self.run_dir)
                raise NonFiniteError(
                    f"step {self.step}: loss {loss_value} / gradient norm {gn} is not finite; "
                    f"stopped without saving. Last good checkpoint: {good or 'none'}. "
                    "Lower train.lr, or set train.nonfinite=skip")
            self.skipped += 1
            log.warning("step %d: non-finite loss/gradient, batch skipped", self.step)
        elif self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self._ahead is not None:  # built by now (it ran beside this step's GPU work):
            self._ahead[1].result()  # nothing outside the step runs beside the task
        self.step += 1
        return loss_value, gn

    def fit(self) -> FitResult:
        cfg, d = self.cfg, self.dist
        self.model.train()

        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, self._on_signal)

        peak = measured_peak_flops(d.device.type, self.amp_dtype or torch.float32) * d.world
        tokens_per_step = self.task.tokens_per_step(cfg.grad_accum, d.world)
        self._tokens_per_step = tokens_per_step
        max_seconds = cfg.max_minutes * 60 if cfg.max_minutes else None
        self.callback("start", {"step": self.step, "max_steps": cfg.max_steps,
                                "max_seconds": max_seconds, "peak_flops": peak,
                                "tokens_per_step": tokens_per_step})
        status, val, loss_value = "finished", {}, float("nan")
        window_t0, window_tokens, window_loss, window_n = time.perf_counter(), 0, 0.0, 0
        last_ckpt = None
        tok_s = mfu = 0.0
        try:
            while True:
                progress = self.step / max(1, cfg.max_steps)
                if max_seconds:
                    progress = max(progress, self.train_seconds / max_seconds)
                # rank 0's clock and signals decide, so all ranks use one lr and stop together
                progress, stop_sig = broadcast_floats(
                    [progress, float(self._stop_signal is not None)], d)
                if self.step >= cfg.max_steps or progress >= 1.0:
                    status = "finished" if self.step >= cfg.max_steps else "time limit"
                    break
                if stop_sig:
                    status = f"interrupted ({self._stop_signal or 'signal'})"
                    break

                t0 = time.perf_counter()
                lr = cfg.lr * cosine_with_warmup(self.step, cfg.warmup_steps, progress,
                                                 cfg.min_lr_ratio)
                loss_step, gn = self.train_step(lr)
                self.train_seconds += time.perf_counter() - t0
                window_tokens += tokens_per_step
                window_loss += loss_step
                window_n += 1

                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    (mean_loss,) = all_reduce_sum([window_loss / window_n], d)
                    loss_value = mean_loss / d.world
                    dt = time.perf_counter() - window_t0
                    tok_s = window_tokens / dt
                    mfu = tok_s * self.flops_per_token / peak if peak else 0.0
                    rec = {"step": self.step, "train_loss": loss_value, "lr": lr,
                           "grad_norm": gn, "tokens_per_sec": tok_s, "mfu": mfu,
                           "tokens": self.step * tokens_per_step, "elapsed": self.train_seconds}
                    self.metrics.write(rec)
                    self.callback("log", rec)
                    window_t0, window_tokens, window_loss, window_n = time.perf_counter(), 0, 0.0, 0

                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
                    val = self._eval_and_log()
                    window_t0 = time.perf_counter()  # validation time is not training throughput
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    last_ckpt = self.save()
                    window_t0 = time.perf_counter()
        finally:
            for sig, h in handlers.items():
                signal.signal(sig, h)

        if not status.startswith("interrupted"):
            val = self._eval_and_log()
        if self.saved_step != self.step:  # decided alike on every rank: save() holds a barrier
            last_ckpt = self.save()
        self.metrics.close()
        return FitResult(step=self.step, status=status,
                         tokens_seen=self.step * tokens_per_step, seconds=self.train_seconds,
                         tokens_per_sec=tok_s, mfu=mfu, last_train_loss=loss_value, val=val,
                         checkpoint=str(last_ckpt) if last_ckpt else None,
                         skipped_steps=self.skipped)

    def _eval_and_log(self) -> dict[str, float]:
        # the plain module: no DDP hooks or recompilation for eval mode are needed to score
        val = self.evaluate(self.raw_model)
        # where the run stood: the curves of val metrics against tokens and training seconds
        rec = {"step": self.step, "tokens": self.step * getattr(self, "_tokens_per_step", 0),
               "elapsed": self.train_seconds, **val}
        self.metrics.write(rec)
        self.callback("eval", rec)
        self._keep_best(val)
        return val

    def _keep_best(self, val: dict[str, float]) -> None:
        """A task with `best_metric` (e.g. "val_macro_f1", higher is better) keeps the weights of
        its best validation in RUN/best/ (a model directory, written atomically); the run's
        final model directory then holds those (`train.runner.run_task`)."""
        metric = getattr(self.task, "best_metric", None)
        if not metric or metric not in val or not math.isfinite(val[metric]):
            return
        if self.best is not None and val[metric] <= self.best["value"]:
            return
        self.best = {"metric": metric, "value": val[metric], "step": self.step}
        weights = self.model_state()  # every rank: the strategy may gather
        if self.dist.is_main:
            ckpt.save_best(self.run_dir, self.raw_model, weights, self.best, self.tokenizer_dir)
            self.callback("best", dict(self.best))
