"""Peak memory per rank of a training step: DDP against FSDP, with and without activation
checkpointing, for lmlab's model presets.

Each setting is its own `torchrun --nproc_per_node W` launch (gloo on the CPU; nccl where
--device cuda) of this file as a worker. A worker builds the preset, lets the real Trainer
wrap it (`train.strategy`, `train.activation_checkpointing`) and build its AdamW, then runs
`Trainer.train_step` --steps times on random tokens (batch --batch per rank, the preset's
context) and reports:

- on a CPU, the peak resident memory of the process during those steps (Linux VmHWM, reset
  with /proc/self/clear_refs after a warm-up step, so neither the full model every rank
  builds before FSDP shards it nor the one-time timing of lmlab's CPU fast paths counts) and
  the resident memory before them (weights and AdamW moments, live between steps); both
  include the ~0.3 GiB of Python, torch and the process group;
- on CUDA, torch.cuda.max_memory_allocated over the steps (reset likewise).

The largest figure over the ranks is printed, in MiB, one row per setting, and a Markdown
table for docs/scaling.md after it.

    python benchmarks/train_memory.py [--presets tiny,small,gpt2-124m] [--world 2]
                                      [--batch 2] [--steps 3] [--device cpu]

lmlab's CPU training asks glibc to keep freed blocks for reuse (`keep_freed_memory`), which
holds a process's resident memory at its high-water mark; the workers here turn that off
(LMLAB_FASTPATH=keep_freed_memory=plain, and a fixed 128 KiB mmap threshold) so that
"before a step" is what lives between steps.
The peak is what decides whether a size fits.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MiB = 1 << 20


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


class RandomTokens:
    """The smallest task of the Trainer's protocol: random windows, next-token loss."""

    eval_keys: tuple[str, ...] = ()

    def __init__(self, vocab: int, seq: int, batch: int):
        self.vocab, self.seq, self.batch = vocab, seq, batch

    def train_batch(self, step, micro, accum, rank, world):
        g = torch.Generator().manual_seed(((step * accum + micro) * world + rank) + 1)
        xy = torch.randint(0, self.vocab, (self.batch, self.seq + 1), generator=g)
        return xy[:, :-1], xy[:, 1:]

    def loss(self, model, batch):
        x, y = batch
        return model(x, targets=y)

    def val_batches(self, rank, world):
        return []

    def eval_sums(self, model, batch):
        return {}

    def eval_metrics(self, sums):
        return {}

    def tokens_per_step(self, accum, world):
        return self.batch * self.seq * accum * world


def worker(a) -> None:
    from lmlab.config import TrainConfig
    from lmlab.model import Transformer, preset
    from lmlab.train.distributed import init_distributed
    from lmlab.train.trainer import Trainer

    d = init_distributed(a.device)
    cfg = preset(a.preset)
    torch.manual_seed(0)
    model = Transformer(cfg)
    train = TrainConfig(strategy=a.strategy, activation_checkpointing=a.ac, precision="fp32",
                        device=a.device, batch_size=a.batch, max_steps=a.steps)
    task = RandomTokens(cfg.vocab_size, cfg.max_seq_len, a.batch)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(model, task, train, run_dir, d)
        trainer.train_step(1e-4)  # warm-up: lmlab times its CPU fast paths on first use, and
        # AdamW allocates its moments; both are one-time
        cuda = d.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            _reset_peak()
        before = torch.cuda.memory_allocated() if cuda else _status_kib("VmRSS") * 1024
        t0 = time.perf_counter()
        for _ in range(a.steps):
            trainer.train_step(1e-4)
        seconds = (time.perf_counter() - t0) / a.steps
        peak = torch.cuda.max_memory_allocated() if cuda else _status_kib("VmHWM") * 1024
        trainer.finish()
    row = {"rank": d.rank, "before": before, "peak": peak, "step_s": seconds,
           "params": sum(p.numel() for p in model.parameters())}
    rows = [None] * d.world
    if d.enabled:
        torch.distributed.all_gather_object(rows, row)
    else:
        rows = [row]
    if d.is_main:
        Path(a.result).write_text(json.dumps(rows))


def launch(preset_name: str, strategy: str, ac: bool, a) -> list[dict] | str:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "rows.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(a.world),
               "--master_port", str(a.port), __file__, "--worker", "--preset", preset_name,
               "--strategy", strategy, "--batch", str(a.batch), "--steps", str(a.steps),
               "--device", a.device, "--result", str(result)] + (["--ac"] if ac else [])
        threads = max(1, (os.cpu_count() or 1) // a.world)
        # malloc returns freed blocks to the OS here (lmlab's CPU default keeps them, which
        # would hold resident memory at its high-water mark and hide what a step frees)
        # and a fixed mmap threshold: each tensor of 128 KiB or more gets its own pages, given
        # back when it is freed (glibc's adaptive threshold would serve them from the heap)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads),
               "LMLAB_FASTPATH": "keep_freed_memory=plain", "MALLOC_MMAP_THRESHOLD_": "131072",
               "MALLOC_TRIM_THRESHOLD_": "131072"}
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.timeout)
        if p.returncode != 0 or not result.is_file():
            return (p.stderr.strip().splitlines() or ["failed"])[-1]
        return json.loads(result.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="tiny,small,gpt2-124m")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2, help="sequences per rank")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--port", type=int, default=29571)
    ap.add_argument("--timeout", type=int, default=900, help="seconds per setting")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--preset", help=argparse.SUPPRESS)
    ap.add_argument("--strategy", help=argparse.SUPPRESS)
    ap.add_argument("--ac", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)

    from lmlab.model import preset

    where = torch.cuda.get_device_name(0) if a.device == "cuda" else _cpu_name()
    print(f"peak memory per rank, {a.world} processes ({a.device}: {where}), batch {a.batch} "
          f"per rank at each preset's context, fp32, AdamW, {a.steps} steps after a warm-up, "
          f"torch "
          f"{torch.__version__}")
    measure = "max_memory_allocated" if a.device == "cuda" else "resident (VmHWM)"
    print(f"{'preset':<11}{'params':>8}  {'strategy':<9}{'act. ckpt':<10}"
          f"{'before step MiB':>16}{'peak MiB':>10}{'s/step':>8}   ({measure})")
    table = []
    for name in a.presets.split(","):
        cfg = preset(name)
        for strategy in ("ddp", "fsdp"):
            for ac in (False, True):
                got = launch(name, strategy, ac, a)
                if isinstance(got, str):
                    print(f"{name:<11}{'':>8}  {strategy:<9}{'on' if ac else 'off':<10}  "
                          f"failed: {got}")
                    continue
                before = max(r["before"] for r in got) / MiB
                peak = max(r["peak"] for r in got) / MiB
                step_s = max(r["step_s"] for r in got)
                params = f"{got[0]['params'] / 1e6:.1f}M"
                print(f"{name:<11}{params:>8}  {strategy:<9}{'on' if ac else 'off':<10}"
                      f"{before:>16.0f}{peak:>10.0f}{step_s:>8.2f}", flush=True)
                table.append(f"| {name} ({cfg.n_layer}×{cfg.d_model}, T={cfg.max_seq_len}) | "
                             f"{params} | {strategy} | {'on' if ac else 'off'} | {before:.0f} | "
                             f"{peak:.0f} | {step_s:.2f} |")
    print()
    print("| preset | params | strategy | activation ckpt | before a step (MiB) | "
          "peak (MiB) | s/step |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(table))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return "cpu"


if __name__ == "__main__":
    main()
