"""Devices, precision and data parallelism, applied to a model from the outside.

Under `torchrun --nproc_per_node N` every process reads RANK / WORLD_SIZE /
LOCAL_RANK from the environment, joins a process group (nccl on GPUs, gloo on
CPU) and wraps the model in DistributedDataParallel, which averages gradients
across processes during backward (`DDPStrategy`, the one strategy object the
Trainer talks to). Run without torchrun, the same code is a single process
with world size 1. The model file knows none of this.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name != "auto":
        dev = torch.device(name)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local_rank)
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def init_distributed(device: str = "auto") -> Dist:
    """Join the torchrun process group if there is one; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, dev)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class DDPStrategy:
    """Data parallelism: every process holds the whole model; DDP averages gradients in backward.

    The Trainer talks to a strategy object only — wrap the model, skip the
    gradient all-reduce on accumulation micro-steps, gather the state to save,
    load a saved state — so that a sharded strategy (FSDP2) can take this
    one's place without a change to the loop. Saving gathers on every rank (a
    sharded strategy needs all ranks there) and rank 0 writes.
    """

    def __init__(self, d: Dist):
        self.dist = d

    def wrap(self, model: nn.Module) -> nn.Module:
        """What runs the steps (the optimizer is built after this, on `model`'s parameters)."""
        if not self.dist.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        d = self.dist
        return DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)

    def no_sync(self, wrapped: nn.Module, skip: bool):
        """During gradient accumulation, only the last micro-step needs the all-reduce."""
        if skip and hasattr(wrapped, "no_sync"):
            return wrapped.no_sync()
        return contextlib.nullcontext()

    def model_state(self, model: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        """The full (unsharded) state dict of the plain module, for rank 0 to save."""
        state = model.state_dict()
        if trainable_only:
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            state = {k: v for k, v in state.items() if k in trainable}
        return state

    def load_model_state(self, model: nn.Module, state: dict[str, torch.Tensor], source,
                         partial: bool = False) -> None:
        from lmlab.model_io import load_state_dict_strict

        load_state_dict_strict(model, state, source, partial=partial)

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        return optimizer.state_dict()

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                             state: dict) -> None:
        optimizer.load_state_dict(state)


def make_strategy(d: Dist) -> DDPStrategy:
    """The distribution strategy of this run (today: DDP, a no-op in a single process)."""
    return DDPStrategy(d)


def all_reduce_sum(values: list[float], d: Dist) -> list[float]:
    if not d.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64,
                     device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def broadcast_floats(values: list[float], d: Dist) -> list[float]:
    """Rank 0's values on every rank (e.g. a time-based stop decision all must share)."""
    if not d.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64,
                     device=d.device if d.device.type == "cuda" else "cpu")
    dist.broadcast(t, src=0)
    return t.tolist()


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` ('auto', 'bf16', 'fp16', 'fp32') on `device`."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    # auto: bf16 wherever it is fast and safe (Ampere+ GPUs, and modern CPUs via oneDNN/AMX/AVX512)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        # native bf16 (AVX512-BF16 / AMX) makes autocast ~2x faster; emulated bf16 is slower
        # than fp32, so fall back there
        return torch.bfloat16 if _cpu_has_fast_bf16() else None
    return None


def _cpu_has_fast_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_allocator_tuned = False


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed blocks for reuse instead of returning them to the OS.

    A CPU training step allocates and frees the same activation buffers every
    step. By default glibc serves blocks above its mmap threshold with fresh
    pages and unmaps them on free, so every step page-faults its activations in
    again: ~30,000 faults per step for the 6-layer benchmark model, several
    percent of the step. Raising the mmap threshold to its maximum (32 MiB on
    64-bit) and the trim threshold out of reach keeps those pages mapped (the
    same effect as the jemalloc / tcmalloc preloads recommended for CPU
    PyTorch). Process-wide and idempotent; a no-op off glibc. Returns whether it applied.

    A rule, not a measurement (unlike `lmlab.model.fastpath`'s kernels). It
    changes no kernel and no arithmetic, only whether freed blocks are handed
    back to the OS; keeping them removes page faults and adds none, whatever
    the CPU, since the faults come from glibc's defaults, not from the
    processor. What it costs is memory: the process keeps its peak heap.
    Timing it would take whole training steps each way, and being process-wide
    it cannot be undone for blocks already freed. `LMLAB_FASTPATH=plain` (or
    `keep_freed_memory=plain`) leaves malloc alone; the decision is recorded
    in `fastpath.decisions()`.
    """
    global _allocator_tuned
    from lmlab.model import fastpath

    if _allocator_tuned:
        return True
    if fastpath.mode("keep_freed_memory") == "plain":
        fastpath.record("keep_freed_memory", ("glibc malloc",), "plain",
                        f"forced by {fastpath.ENV}")
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        ok = (libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1
              and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1)
    except (OSError, AttributeError):
        ok = False
    fastpath.record("keep_freed_memory", ("glibc malloc",), "keep" if ok else "plain",
                    "rule: removes page faults, keeps the peak heap" if ok
                    else "rule: no glibc mallopt here")
    _allocator_tuned = ok
    return ok
