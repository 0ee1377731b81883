"""What a run records: metrics.jsonl, TensorBoard events, a loss-curve PNG, and MFU.

MFU (model FLOPs utilisation) = achieved model FLOPs/s ÷ peak FLOPs/s of the
device. There is no spec sheet for a CPU, so the peak is *measured*: a large
matmul in the training dtype, timed for a fraction of a second. On a GPU the
same measurement comes close to the vendor's dense figure.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from functools import lru_cache
from pathlib import Path

import torch

from lmlab.fileio import atomic_write_text

log = logging.getLogger(__name__)


@lru_cache(maxsize=None)
def measured_peak_flops(device_type: str, dtype: torch.dtype = torch.float32,
                        n: int = 2048, seconds: float = 0.4) -> float:
    """FLOP/s of an n×n matmul in `dtype` on this device (best of a short timed loop).

    The size grows from 256 to `n` only while one multiply stays short: a CPU that
    emulates bf16 (~1 GFLOP/s) would otherwise spend minutes on a 2048² warm-up
    before the first training step.
    """
    dev = torch.device(device_type)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def once(a, b) -> float:
        t0 = time.perf_counter()
        a @ b
        sync()
        return time.perf_counter() - t0

    size = min(256, n)
    while True:
        # constants, not torch.randn: the timing must not advance the global RNG (a run's
        # dropout masks would then depend on whether the peak was measured before it)
        a = torch.full((size, size), 0.5, device=dev, dtype=dtype)
        b = torch.full((size, size), 0.25, device=dev, dtype=dtype)
        dt = once(a, b)  # the first call also warms up the kernel
        if size >= n or dt > seconds / 8:
            break
        size *= 2
    best, t_end = 2 * size**3 / dt, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        best = max(best, 2 * size**3 / once(a, b))
    return best


class MetricsLog:
    """Appends one JSON object per line; mirrors scalars to TensorBoard when it is installed."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.path = self.run_dir / "metrics.jsonl"
        self.tb = None
        # after a resume: the step resumed from and the rows (as key sets) already logged at
        # it, so that redoing one (the final validation of a finished run) adds no duplicate
        self._resumed_at: tuple[int, list[frozenset]] | None = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:
                log.info("tensorboard not installed; skipping TensorBoard events")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        if self._resumed_at and record.get("step") == self._resumed_at[0] \
                and frozenset(record) in self._resumed_at[1]:
            log.debug("metrics: step %s already has this row (logged before the resume)",
                      record.get("step"))
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def truncate_after(self, step: int) -> None:
        """On resume, forget records past the checkpoint so the log reads as one run.

        Every row of a later step goes (training and validation alike: those
        steps are redone), and so does a line that is not a JSON object (the
        half-written last line of a killed run). The file is rewritten atomically.
        """
        if not self.enabled:
            return
        self._resumed_at = (step, [])
        if not self.path.is_file():
            return
        keep, dropped, bad = [], 0, 0
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict) or not isinstance(row.get("step", 0), (int, float)):
                bad += 1
                continue
            if row.get("step", 0) > step:
                dropped += 1
                continue
            keep.append(line)
            if row.get("step", 0) == step:
                self._resumed_at[1].append(frozenset(row))
        if bad:
            log.warning("%s: dropped %d unreadable line(s) (e.g. a write the last run did "
                        "not finish)", self.path, bad)
        if dropped:
            log.info("%s: dropped %d row(s) after step %d, which the resumed run redoes",
                     self.path, dropped, step)
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    p = Path(path)
    return [json.loads(x) for x in p.read_text(encoding="utf-8").splitlines() if x.strip()]


def plot_loss_curve(metrics_path: str | os.PathLike, out_png: str | os.PathLike) -> Path | None:
    """Train and validation loss against step, as a PNG (None if matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed; no loss-curve PNG")
        return None
    rows = read_metrics(metrics_path)
    train = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", lw=1.5, ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return Path(out_png)
