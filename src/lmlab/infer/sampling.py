"""Choosing the next token from a row of logits: greedy, temperature, top-k, top-p.

Given logits z over the vocabulary, sampling draws from softmax(z / T):

- T = 0 is the limit T → 0, i.e. greedy argmax (deterministic, no random draw);
- top-k keeps the k largest logits and renormalises over them;
- top-p ("nucleus", Holtzman et al. 2019) keeps the smallest set of most probable
  tokens whose total probability reaches p, so the candidate set widens when the
  model is unsure and narrows when it is confident.

Filters apply in that order (temperature, then top-k, then top-p), as in Hugging
Face `transformers`, so the same settings mean the same thing in both. Random
draws take an explicit `torch.Generator`: a seeded generator makes a whole
generation reproducible without touching the global RNG that training and other
callers share.

The engine's rows each carry their own settings, so `sample_rows` takes them
as tensors, one entry per row, and draws by inverting each row's cumulative
distribution at a uniform number u the row's own generator gave: token i is
chosen when F(i−1) ≤ u·F(V) < F(i). A row's draw then depends on its seed
alone, never on which other rows share the step. A repetition penalty θ
(Keskar et al. 2019, CTRL; as in `transformers`) first divides the positive
logits of every id already in the row's text by θ and multiplies the negative
ones by θ (`penalize_repeats`).
"""

from __future__ import annotations

import torch

from lmlab.errors import InputError

__all__ = ["GenerationError", "sample_next", "top_k_filter", "top_p_filter", "check_sampling_args",
           "sample_rows", "penalize_repeats"]


class GenerationError(InputError, ValueError):
    """Generation settings that cannot be used, or a prompt that does not fit the model.

    A ValueError for Python callers, and an lmlab InputError so that the CLI
    reports it in one line instead of a traceback.
    """


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise GenerationError for meaningless settings (temperature < 0, p outside (0, 1])."""
    if temperature < 0:
        raise GenerationError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise GenerationError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise GenerationError(f"top_p must be in (0, 1] or None, got {top_p}")


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Logits with all but the k largest of each row set to -inf (ties at the k-th value kept)."""
    if k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Logits with everything outside each row's nucleus set to -inf.

    The nucleus is the smallest prefix of the tokens sorted by probability whose
    cumulative probability reaches p; the most probable token is always kept.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # a token is dropped when the tokens before it already reach p on their own
    drop = (probs.cumsum(dim=-1) - probs) >= p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token id of each row of `logits` (B, V), as a (B,) int64 tensor.

    `temperature=0` is greedy and ignores top_k / top_p. `generator` makes the
    draw reproducible; None uses torch's global RNG.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    # float32: bf16 logits would round small probabilities to zero before the cut-offs
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Logits (n, V) with each row's already-seen ids (`seen`, bool (n, V)) made less likely by
    that row's `penalty` (n,): z/θ where z > 0, z·θ where z ≤ 0; θ = 1 leaves the row as it is."""
    theta = penalty[:, None].to(logits.dtype)
    return torch.where(seen, torch.where(logits > 0, logits / theta, logits * theta), logits)


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, uniform: torch.Tensor,
                top_k: torch.Tensor | None = None, top_p: torch.Tensor | None = None) -> torch.Tensor:
    """The next id of each row of `logits` (n, V), every row with its own settings.

    `temperature` (n,): 0 = greedy for that row. `uniform` (n,) float64 in [0, 1): the
    row's random number. `top_k` (n,) int, 0 = off; `top_p` (n,) float, ≥ 1 = off.
    Filters in `sample_next`'s order (temperature, top-k, top-p), with top-k's ties at
    the k-th value kept as `top_k_filter` keeps them.
    """
    greedy = temperature == 0
    best = logits.argmax(dim=-1)
    if bool(greedy.all()):
        return best
    z = logits.float() / torch.where(greedy, 1.0, temperature.float())[:, None]
    if top_k is None and top_p is None:
        return torch.where(greedy, best, _inverse_cdf(z.softmax(dim=-1), uniform))
    z, order = z.sort(dim=-1, descending=True)
    if top_k is not None:
        V = z.shape[-1]
        k = torch.where(top_k > 0, top_k, V).clamp(max=V)
        z = z.masked_fill(z < z.gather(1, (k - 1)[:, None]), float("-inf"))
    probs = z.softmax(dim=-1)
    if top_p is not None:  # as top_p_filter: dropped when the tokens before reach p alone
        p = torch.where(top_p >= 1, float("inf"), top_p.float())[:, None]
        probs = probs.masked_fill((probs.cumsum(dim=-1) - probs) >= p, 0.0)
    choice = order.gather(1, _inverse_cdf(probs, uniform)[:, None]).squeeze(1)
    return torch.where(greedy, best, choice)


def _inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Per row, the first id whose cumulative probability exceeds u × the row's total
    (unnormalised rows are fine: a filter's zeros are renormalised away)."""
    cdf = probs.double().cumsum(dim=-1)
    x = uniform.to(cdf.device, torch.float64) * cdf[:, -1]
    idx = torch.searchsorted(cdf, x[:, None], right=True).squeeze(1)
    return idx.clamp(max=probs.shape[-1] - 1)
