"""Perplexity and bits per byte from cross-entropy in nats (formulas: `lmlab.eval`)."""

from __future__ import annotations

import math

# e^x overflows a float64 past ln(max float) ≈ 709.78
_MAX_EXP = math.log(1.7976931348623157e308)


def perplexity(mean_nats: float) -> float:
    """e^(mean nats per token): the size of a uniform choice as uncertain as the model.

    A loss too large for a float (> ~709.8 nats) gives inf instead of raising
    OverflowError; NaN (a diverged run) stays NaN.
    """
    x = float(mean_nats)
    return math.inf if x > _MAX_EXP else math.exp(x)


def bits_per_byte(nats_sum: float, n_bytes: int) -> float:
    """Total cross-entropy in nats over a text's UTF-8 bytes, in bits per byte: Σ/(ln 2 · bytes).

    NaN when there are no bytes (no rate is defined over nothing).
    """
    if n_bytes < 0:
        raise ValueError(f"n_bytes must be >= 0, not {n_bytes}")
    if n_bytes == 0:
        return math.nan
    return float(nats_sum) / (math.log(2) * n_bytes)
