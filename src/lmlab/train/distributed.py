"""Devices, precision and data parallelism, applied to a model from the outside.

Under `torchrun --nproc_per_node N` (or `--nnodes M` machines of N) every
process reads RANK / WORLD_SIZE / LOCAL_RANK from the environment, joins a
process group (nccl on GPUs, gloo on CPU) and trains on its slice of each
global batch. Run without torchrun, the same code is a single process with
world size 1. The model file knows none of this: the Trainer talks to one
strategy object, chosen by `train.strategy`:

- `DDPStrategy` (ddp): every process holds the whole model, gradients and
  AdamW state; DistributedDataParallel all-reduces (averages) the gradients
  during backward, so every copy takes the same step.
- `FSDPStrategy` (fsdp): FSDP2 (`torch.distributed.fsdp.fully_shard`, ZeRO-3)
  keeps 1/W of every weight, gradient and optimizer moment on each of the W
  processes. Each Transformer block is one unit: its weights are all-gathered
  just before its forward (and again before its backward), its gradients
  reduce-scattered after its backward, so a rank holds, for Ψ parameters in
  fp32 with AdamW,

      16 Ψ / W bytes of model state  +  one block gathered  +  activations

  instead of DDP's 16 Ψ. Its checkpoints are sharded (torch.distributed.checkpoint).

Activation checkpointing (`train.activation_checkpointing`, either strategy)
keeps only each block's input in forward and recomputes the block in backward:
activations of one block instead of all L, for about one more forward pass.

On a GPU the device is picked automatically, matmuls in float32 use TF32
(`configure_device`), and batches are built on the CPU in pinned memory and
copied without blocking (`to_device`); attention there is torch's SDPA, which
picks the flash or memory-efficient kernel itself (the blocked attention of
`lmlab.model.transformer` is a CPU path).
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import functools
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_map
from torch.utils.checkpoint import checkpoint

from lmlab.config import TrainConfig
from lmlab.errors import ConfigError

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
    configure_device(dev)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        # joined once per process, left at exit: under torchrun every join rendezvouses in
        # the launcher's one store under the same keys, so a second join after a leave
        # finds the first one's keys, passes its barrier alone and waits in gloo's
        # rendezvous for a peer that has moved on (two runs in one process hung that way)
        atexit.register(shutdown_distributed)
    return Dist(rank, world, local_rank, dev)


def configure_device(dev: torch.device) -> bool:
    """On a CUDA device, let float32 matmuls and convolutions use TF32 (10-bit mantissa
    products, float32 sums: ~8x the float32 rate on Ampere and later; bf16 autocast is the
    usual path, this covers what runs outside it). Returns whether it applied."""
    if dev.type != "cuda":
        return False
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9
        matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return True


def transfer_plan(dev: torch.device) -> tuple[bool, bool]:
    """(pin, prefetch) for feeding batches to `dev`: on CUDA a batch is built ahead in a
    background thread, in pinned (page-locked) memory, so its copy runs without blocking
    while the GPU works; on the CPU the batch is already where it is used."""
    return (True, True) if dev.type == "cuda" else (False, False)


def to_device(batch: Any, dev: torch.device, pin: bool = False) -> Any:
    """The batch (tensors, possibly in tuples / lists / dicts) on `dev`; with `pin`, through
    pinned memory and a non-blocking copy (`batch` is then already pinned: `pin_batch`)."""
    if dev.type == "cpu":
        return batch
    return tree_map(lambda t: t.to(dev, non_blocking=pin) if isinstance(t, torch.Tensor) else t,
                    batch)


def pin_batch(batch: Any) -> Any:
    """The batch's CPU tensors in pinned memory (what a non-blocking copy to a GPU needs)."""
    return tree_map(lambda t: t.pin_memory() if isinstance(t, torch.Tensor) and
                    t.device.type == "cpu" else t, batch)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def blocks(model: nn.Module) -> list[nn.Module]:
    """The Transformer blocks of `model` (every `lmlab.model.transformer.Block`, whichever
    kind holds them: a decoder, an encoder, a classifier's body): the units that FSDP shards
    and activation checkpointing recomputes one at a time. A model without any is one unit."""
    from lmlab.model.transformer import Block

    return [m for m in model.modules() if isinstance(m, Block)]


def checkpoint_blocks(model: nn.Module) -> int:
    """Activation checkpointing per block, from outside: each block's forward runs under
    `torch.utils.checkpoint` (keep its input, recompute it in backward). Names, hooks and
    weights stay as they are; `release_checkpointing` undoes it. Returns the block count."""
    found = blocks(model)
    for block in found:
        if "forward" not in vars(block):
            block.forward = functools.partial(_checkpointed, block.forward, set())
    return len(found)


def _checkpointed(forward, seen: set, *args, **kwargs):
    """`forward` under non-reentrant checkpointing. On a CPU, the first call with each input
    shape runs plain: there lmlab times its attention paths on first use (forward and
    backward of side tensors), which must happen outside the recorded region — inside it,
    every timing would replay the block and the saved tensors would not match."""
    shapes = tuple((t.shape, t.dtype) for t in args if isinstance(t, torch.Tensor))
    first = args and isinstance(args[0], torch.Tensor) and args[0].device.type == "cpu"
    if first and shapes not in seen:
        seen.add(shapes)
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def release_checkpointing(model: nn.Module) -> None:
    for block in blocks(model):
        vars(block).pop("forward", None)


class DDPStrategy:
    """Data parallelism: every process holds the whole model; DDP averages gradients in backward.

    The Trainer talks to a strategy object only — wrap the model, skip the
    gradient all-reduce on accumulation micro-steps, gather the state to
    save, load a saved state, hand the model back — so that the sharded
    strategy (`FSDPStrategy`) takes this one's place without a change to the
    loop. Saving gathers on every rank and rank 0 writes one file of weights.
    """

    sharded = False  # checkpoints: the gathered weights in one file (True: DCP shards)
    lockstep = False  # whether every rank must run each forward pass together (a sharded
    # model all-gathers its weights inside it, so validation keeps the ranks in step)

    def __init__(self, d: Dist, cfg: TrainConfig | None = None):
        self.dist, self.cfg = d, cfg or TrainConfig()

    def wrap(self, model: nn.Module) -> tuple[nn.Module, nn.Module]:
        """(the module whose parameters train, what runs the steps); the optimizer is built
        after this, on the first one's parameters. `model` moves to the device."""
        model = model.to(self.dist.device)
        if self.cfg.activation_checkpointing:
            checkpoint_blocks(model)
        if not self.dist.enabled:
            return model, model
        from torch.nn.parallel import DistributedDataParallel as DDP

        d = self.dist
        return model, DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)

    def unwrap(self, model: nn.Module) -> None:
        """After training: `model` (what `wrap` was given) plain again, with the trained weights."""
        release_checkpointing(model)

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


_DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # None: the parameters' own (float32)


class FSDPStrategy(DDPStrategy):
    """Sharded data parallelism with FSDP2: each rank holds 1/W of weights, gradients and
    optimizer state; `fully_shard` on every Transformer block, then on the root (the
    embeddings, final norm and output layer).

    The sharding is applied to a twin of the model: the same modules, holding the
    same parameter objects at first, which `fully_shard` replaces by sharded
    DTensors on the device; the model handed in keeps its structure, its
    weights are freed while the twin trains, and `unwrap` fills them back from
    the shards. Frozen parameters (a LoRA base) are sharded like the rest and
    get no gradient. Gradients are reduce-scattered after every micro-batch, so
    accumulation never holds a full gradient. `train.reshard_after_forward`,
    `fsdp_param_dtype` and `fsdp_reduce_dtype` are `fully_shard`'s options; in
    one process there is nothing to shard and the model trains as it is (its
    checkpoints are still sharded ones, which any world size resumes).
    """

    sharded = True

    def __init__(self, d: Dist, cfg: TrainConfig | None = None):
        super().__init__(d, cfg)
        self.lockstep = d.enabled
        self._twin: nn.Module | None = None
        self._home = torch.device("cpu")

    def wrap(self, model: nn.Module) -> tuple[nn.Module, nn.Module]:
        if not self.dist.enabled:
            return super().wrap(model)
        try:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        except ImportError:
            raise ConfigError(f"train.strategy: fsdp needs torch >= 2.6 (FSDP2); this is torch "
                              f"{torch.__version__}: upgrade it or use --train.strategy ddp") \
                from None
        from torch.distributed.device_mesh import init_device_mesh

        cfg, d = self.cfg, self.dist
        first = next(model.parameters(), None)
        self._home = first.device if first is not None else torch.device("cpu")
        # a structural copy whose parameters and buffers are the model's own objects
        shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
        twin = copy.deepcopy(model, memo=shared)
        if cfg.activation_checkpointing:
            checkpoint_blocks(twin)
        options = dict(mesh=init_device_mesh(d.device.type, (d.world,)),
                       reshard_after_forward=cfg.reshard_after_forward,
                       mp_policy=MixedPrecisionPolicy(param_dtype=_DTYPES[cfg.fsdp_param_dtype],
                                                      reduce_dtype=_DTYPES[cfg.fsdp_reduce_dtype]))
        for block in blocks(twin):
            fully_shard(block, **options)
        fully_shard(twin, **options)
        for p in model.parameters():  # the twin holds the shards; the full copy goes
            p.data = torch.empty(0, dtype=p.dtype, device=self._home)
        self._twin = twin
        return twin, twin

    def unwrap(self, model: nn.Module) -> None:
        """The trained weights into `model`, one gathered parameter at a time (every rank)."""
        twin, self._twin = self._twin, None
        if twin is None:
            return super().unwrap(model)
        for name, p in twin.named_parameters():
            model.get_parameter(name).data = p.full_tensor().detach().to(self._home)
        model.to(self._home)  # the buffers the twin shared

    def model_state(self, model: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        """The sharded twin's full state dict, gathered into rank 0's CPU memory ({} on the
        other ranks); a plain module's (the model handed back) as DDP's."""
        if model is not self._twin:
            return super().model_state(model, trainable_only)
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_model_state_dict)

        state = get_model_state_dict(model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only))
        if trainable_only:  # a frozen weight tied to another name (lm_head to the embedding)
            # comes back under its second name; keep only what trains, as DDP's does
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            state = {k: v for k, v in state.items() if k in trainable}
        return state


def make_strategy(d: Dist, cfg: TrainConfig | None = None) -> DDPStrategy:
    """The distribution strategy of this run: `train.strategy` (ddp, a no-op in one process)."""
    cfg = cfg or TrainConfig()
    return (FSDPStrategy if cfg.strategy == "fsdp" else DDPStrategy)(d, cfg)


def all_reduce_sum(values: list[float], d: Dist) -> list[float]:
    if not d.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64,
                     device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(values: list[float], d: Dist) -> list[float]:
    """The largest of each value over the ranks (e.g. the most validation batches any has)."""
    if not d.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64,
                     device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def broadcast_object(obj: Any, d: Dist) -> Any:
    """Rank 0's `obj` (anything picklable: a path, a list of names) on every rank."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any, d: Dist) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not d.enabled:
        return [obj]
    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


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
