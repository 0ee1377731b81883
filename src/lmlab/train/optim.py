"""AdamW with decay / no-decay groups, and the warmup + cosine learning-rate schedule.

Weight decay shrinks weights toward zero each step (decoupled from the gradient,
Loshchilov & Hutter 2019). It is applied to the matrices that multiply
activations and not to biases or norm gains, whose scale is meaningful as it
is: decaying a LayerNorm gain only fights the normalisation.
"""

from __future__ import annotations

import inspect
import logging
import math

import torch
from torch import nn

log = logging.getLogger(__name__)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_adamw(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95),
                eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step where this torch build supports it."""
    groups = param_groups(model, weight_decay)
    fused_ok = "fused" in inspect.signature(torch.optim.AdamW).parameters
    if fused_ok:
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
        except (RuntimeError, ValueError) as e:  # e.g. fused unsupported on this device/dtype
            log.info("fused AdamW unavailable (%s); using foreach", e)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def cosine_with_warmup(step: int, warmup_steps: int, progress: float,
                       min_ratio: float = 0.1) -> float:
    """Multiplier of the peak learning rate: a linear warmup times a cosine decay.

        warmup(step)    = min(1, (step + 1) / (warmup_steps + 1))
        cosine(p)       = min_ratio + (1 - min_ratio) · ½ (1 + cos(π p)),   p ∈ [0, 1]

    `progress` p is the fraction of the run done: step / max_steps, or elapsed /
    time budget for a run limited by minutes, whichever is further along.
    """
    warmup = min(1.0, (step + 1) / (warmup_steps + 1))
    p = min(1.0, max(0.0, progress))
    return warmup * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p)))
