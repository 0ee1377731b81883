"""The n-gram language model with interpolated Kneser–Ney smoothing: counted, not trained.

An n-gram model applies the chain rule and then forgets all but the last n − 1 tokens
(the Markov assumption):

    p(w_1 … w_T) = ∏_t p(w_t | w_1 … w_{t−1}) ≈ ∏_t p(w_t | w_{t−n+1} … w_{t−1})

The maximum-likelihood estimate c(h w) / c(h •) gives probability 0 to every n-gram the
training text lacks, so one unseen n-gram makes a held-out text impossible. Interpolated
Kneser–Ney (Chen & Goodman 1999) takes a discount D off every seen count and hands the
mass it frees to the next shorter context h⁻ (h without its oldest token), down to the
uniform distribution over the vocabulary (so every id keeps p > 0 and each distribution
sums to 1):

    P_k(w | h) = (c_k(h w) − D_k(c_k(h w))) / c_k(h •)  +  γ_k(h) · P_{k−1}(w | h⁻)
    γ_k(h)     = (D_k1 · N1(h •) + D_k2 · N2(h •) + D_k3+ · N3+(h •)) / c_k(h •)
    P_0(w)     = 1 / V

Here c_n are the raw counts of the highest order n, and below it c_k(g) = N1+(• g), the
*continuation count*: how many distinct tokens precede the k-gram g. A lower order is
only asked when the longer context was rare, so it should say how many contexts a word
completes, not how often it occurs. N_i(h •) counts the words seen i times after h. A
context never seen defers whole (γ = 1). The discounts are the modified Kneser–Ney
estimates of each order from its count-of-counts n_1 … n_4:

    Y = n_1 / (n_1 + 2 n_2),  D_1 = 1 − 2Y n_2/n_1,  D_2 = 2 − 3Y n_3/n_2,  D_3+ = 3 − 4Y n_4/n_3

(an estimate outside (0, c] falls back to KenLM's 0.5, 1, 1.5), or one fixed `discount`
for every order. At position t the context is the row's tokens up to t, the last n − 1
of them; fewer at the start of a row, where the recursion starts at order len(h) + 1.

`uniform_floor=False` is the switch for an exact comparison with nltk's
`KneserNeyInterpolated` (which takes one fixed discount): its lowest order is the plain
continuation distribution N1+(• w) / N1+(• •), with no discount and no uniform share, so
an id never seen after another token gets p = 0.

Storage: each order's n-grams are int64 keys Σ_i t_i · V^(k−1−i) (so sorted keys are the
n-grams in lexicographic order, and the n-grams of one context are one block), stored
sorted with their counts as buffers (`keys{k}`, `counts{k}`: safetensors holds them as
they are). Lookups are `torch.searchsorted` over whole batches; the probabilities each
entry contributes are derived from the counts after fitting or loading (`_derive`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmlab.errors import ConfigError, InputError
from lmlab.model import register_kind
from lmlab.model.loss import IGNORE_INDEX

MIN_ORDER, MAX_ORDER = 2, 5
# by val bpb on the quickstart's corpus: 4 % below order 3; order 5 gains 1.2 % more for 1.7×
# the tables (docs/theory/ngram.md)
DEFAULT_ORDER = 4
FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)  # KenLM's --discount_fallback, for counts 1, 2, 3+


def _pack(tokens: np.ndarray, k: int, vocab_size: int) -> np.ndarray:
    """The key of every k-gram of `tokens`: Σ_i t_i · V^(k−1−i)."""
    n = max(len(tokens) - k + 1, 0)
    key = np.zeros(n, np.int64)
    for i in range(k):
        key = key * vocab_size + tokens[i:i + n]
    return key


class _Tally:
    """Counts of int64 keys, merged by sorting. A chunk's counts wait until the waiting ones
    hold as many keys as the table, so each key is re-sorted O(log chunks) times."""

    def __init__(self):
        self.keys, self.counts = np.zeros(0, np.int64), np.zeros(0, np.int64)
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, keys: np.ndarray) -> None:
        self.pending.append(np.unique(keys, return_counts=True))
        if sum(len(k) for k, _ in self.pending) >= len(self.keys):
            self._merge()

    def _merge(self) -> None:
        keys = np.concatenate([self.keys, *(k for k, _ in self.pending)])
        counts = np.concatenate([self.counts, *(c for _, c in self.pending)])
        self.pending = []
        if not len(keys):
            return
        order = np.argsort(keys, kind="stable")
        keys, counts = keys[order], counts[order]
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        self.keys, self.counts = keys[starts], np.add.reduceat(counts, starts)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        self._merge()
        return self.keys, self.counts


def _find(table: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, found) of each of `keys` in the sorted, non-empty `table`."""
    i = torch.searchsorted(table, keys).clamp_(max=len(table) - 1)
    return i, table[i] == keys


@dataclass
class NGramState:
    """Decoding: the last order − 1 tokens of each row, right-aligned (B, order − 1), how many
    of them are real (B,), and the rows' left padding (B,), which never enters a context."""

    context: torch.Tensor
    length: torch.Tensor
    pad: torch.Tensor | None
    position: int = 0


@register_kind("ngram")
class NGramLM(nn.Module):
    """An n-gram model (order 2–5) with interpolated Kneser–Ney smoothing; `fit_counts` fits it."""

    max_seq_len = None  # the context is order − 1 tokens; a sequence may be any length
    default_seq_len = 256  # validation windows when the run sets none, as the quickstart's

    def __init__(self, vocab_size: int, order: int = DEFAULT_ORDER, discount: float | None = None,
                 uniform_floor: bool = True, sizes: list[int] | None = None):
        super().__init__()
        if not MIN_ORDER <= order <= MAX_ORDER:
            raise ConfigError(f"model.order: {order}; an n-gram model takes {MIN_ORDER} to "
                              f"{MAX_ORDER} tokens per n-gram")
        if vocab_size < 1:
            raise ConfigError(f"model.vocab_size: {vocab_size}; it must be at least 1")
        if vocab_size ** order > 2 ** 63:
            fits = max((k for k in range(1, order) if vocab_size ** k <= 2 ** 63), default=0)
            raise ConfigError(f"model.order: {order}-grams of a {vocab_size:,}-token vocabulary "
                              f"do not fit in a 63-bit key; use model.order {fits} or less, or a "
                              "smaller vocabulary")
        if discount is not None and not 0 < discount <= 1:
            raise ConfigError(f"model.discount: {discount}; a fixed Kneser–Ney discount is in "
                              "(0, 1] (leave it unset to estimate one per order)")
        sizes = list(sizes) if sizes is not None else [0] * order
        if len(sizes) != order:
            raise ConfigError(f"model.sizes: {len(sizes)} table sizes for order {order}")
        self.vocab_size, self.order, self.discount = vocab_size, order, discount
        self.uniform_floor = uniform_floor
        self._set_tables({k: (np.zeros(n, np.int64), np.zeros(n, np.int64))
                          for k, n in enumerate(sizes, 1)})
        # loading a model directory copies the counts in: derive what they imply again
        self.register_load_state_dict_post_hook(lambda module, keys: module._derive())

    # ------------------------------------------------------------ the kind protocol

    @classmethod
    def from_config_dict(cls, d: dict) -> NGramLM:
        return cls(**d)

    @classmethod
    def from_spec(cls, fields: dict) -> NGramLM:
        fields = {k: v for k, v in fields.items() if k != "preset"}  # presets are Transformers'
        extra = sorted(set(fields) - {"vocab_size", "order", "discount"})
        if extra:
            raise ConfigError(f"model.{extra[0]}: means nothing for model.kind ngram, which takes "
                              "model.order and model.discount; remove it")
        return cls(**fields)

    def config_dict(self) -> dict:
        return {"vocab_size": self.vocab_size, "order": self.order, "discount": self.discount,
                "uniform_floor": self.uniform_floor, "sizes": self.sizes}

    @property
    def sizes(self) -> list[int]:
        """Stored n-grams of each order, 1 … order."""
        return [len(self.table(k)[0]) for k in range(1, self.order + 1)]

    def num_params(self) -> int:
        """Stored counts (one per n-gram of every order)."""
        return sum(self.sizes)

    def table(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sorted keys, counts) of order k: raw counts at the highest order, else continuation."""
        return getattr(self, f"keys{k}"), getattr(self, f"counts{k}")

    # ------------------------------------------------------------ fitting

    def fit_counts(self, chunks: Iterable[np.ndarray]) -> int:
        """Count the n-grams of one token stream, given as consecutive pieces, and make them
        the model's tables (replacing any before); return the tokens counted."""
        n, V = self.order, self.vocab_size
        tallies = {k: _Tally() for k in range(2, n + 1)}
        carry, seen = np.zeros(0, np.int64), 0
        for chunk in chunks:
            chunk = np.asarray(chunk, dtype=np.int64)
            if chunk.size and (chunk.min() < 0 or chunk.max() >= V):
                raise InputError(f"token ids outside [0, {V}) in the training text; the shards "
                                 "were made with another tokenizer than the model's")
            stream = np.concatenate([carry, chunk])
            for k, tally in tallies.items():  # the k-grams that end in this chunk
                tally.add(_pack(stream[max(len(carry) - k + 1, 0):], k, V))
            carry, seen = stream[-(n - 1):], seen + len(chunk)
        tables = {n: tallies[n].result()}
        for k in range(n - 1, 0, -1):
            # continuation count N1+(• g): the distinct (k+1)-grams that end with g
            ends = tallies[k + 1].result()[0] % V ** k
            tables[k] = np.unique(ends, return_counts=True)
        self._set_tables(tables)
        return seen

    def _set_tables(self, tables: dict[int, tuple[np.ndarray, np.ndarray]]) -> None:
        for k, (keys, counts) in tables.items():
            self.register_buffer(f"keys{k}", torch.from_numpy(np.ascontiguousarray(keys, np.int64)))
            self.register_buffer(f"counts{k}",
                                 torch.from_numpy(np.ascontiguousarray(counts, np.int64)))
        self._derive()

    def discounts(self, k: int) -> torch.Tensor:
        """D_k by count (index 0, 1, 2, 3+; D(0) = 0), from order k's count-of-counts."""
        if self.discount is not None:
            return torch.tensor([0.0] + [self.discount] * 3, dtype=torch.float64)
        _, counts = self.table(k)
        n1, n2, n3, n4 = torch.bincount(counts.clamp(max=5), minlength=6)[1:5].tolist()
        y = n1 / (n1 + 2 * n2) if n1 + n2 else 0.0
        estimates = [c - (c + 1) * y * nxt / now if now else -1.0
                     for c, now, nxt in ((1, n1, n2), (2, n2, n3), (3, n3, n4))]
        return torch.tensor([0.0] + [d if 0 < d <= c else fallback for c, d, fallback
                                     in zip((1, 2, 3), estimates, FALLBACK_DISCOUNTS)],
                            dtype=torch.float64)

    @torch.no_grad()
    def _derive(self) -> None:
        """From the counts, what each stored n-gram contributes: its discounted share
        `alpha{k}` of its context, and per context the mass `gamma{k}` passed down."""
        V = self.vocab_size
        for k in range(1, self.order + 1):
            keys, counts = self.table(k)
            if k == 1 and not self.uniform_floor:  # nltk's lowest order: undiscounted
                discount = torch.zeros(len(counts), dtype=torch.float64, device=counts.device)
            else:
                discount = self.discounts(k).to(counts.device)[counts.clamp(max=3)]
            kept = counts - discount  # c_k(h w) − D_k(c_k(h w))
            if k == 1:
                total = counts.sum().double()
                if total > 0:
                    gamma = discount.sum() / total
                    p1 = torch.full((V,), float(gamma) / V, dtype=torch.float64,
                                    device=counts.device)
                    p1.index_add_(0, keys, kept / total)  # P_1(w) = kept/total + γ · P_0(w)
                else:  # nothing counted: the uniform distribution
                    p1 = torch.full((V,), 1.0 / V, dtype=torch.float64, device=counts.device)
                self.register_buffer("p1", p1, persistent=False)
                continue
            contexts, inverse, per_context = torch.unique_consecutive(
                keys // V, return_inverse=True, return_counts=True)
            total = torch.zeros(len(contexts), dtype=torch.float64, device=counts.device)
            total.index_add_(0, inverse, counts.double())  # c_k(h •)
            gamma = torch.zeros_like(total).index_add_(0, inverse, discount) / total  # γ_k(h)
            start = F.pad(per_context.cumsum(0), (1, 0))
            self.register_buffer(f"alpha{k}", kept / total[inverse], persistent=False)
            self.register_buffer(f"contexts{k}", contexts, persistent=False)
            self.register_buffer(f"start{k}", start, persistent=False)
            self.register_buffer(f"gamma{k}", gamma, persistent=False)

    # ------------------------------------------------------------ probabilities

    def _context_keys(self, context: torch.Tensor) -> list[torch.Tensor]:
        """Keys of each row's last j tokens, j = 1 … order − 1 (rows right-aligned)."""
        out, key = [], torch.zeros(len(context), dtype=torch.int64, device=context.device)
        for j in range(1, self.order):
            key = key + context[:, -j] * self.vocab_size ** (j - 1)
            out.append(key)
        return out

    def _levels(self, context: torch.Tensor, length: torch.Tensor):
        """For k = 2 … order: (k, key of the k − 1 token context, its index, whether the row
        has that many tokens and the context was seen)."""
        for k, key in enumerate(self._context_keys(context), 2):
            contexts = getattr(self, f"contexts{k}")
            if len(contexts):  # an order with no n-grams passes everything down
                at, seen = _find(contexts, key)
                yield k, key, at, seen & (length >= k - 1)

    def probs_of(self, context: torch.Tensor, length: torch.Tensor,
                 words: torch.Tensor) -> torch.Tensor:
        """P(word | context) (M,) float64 for contexts (M, order − 1) of `length` real tokens."""
        p = self.p1[words]
        for k, key, at, seen in self._levels(context, length):
            i, hit = _find(self.table(k)[0], key * self.vocab_size + words)
            alpha = torch.where(hit & seen, getattr(self, f"alpha{k}")[i], 0.0)
            p = alpha + torch.where(seen, getattr(self, f"gamma{k}")[at], 1.0) * p
        return p

    def distribution(self, context: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """P(· | context) (M, V) float64: the same recursion, every word at once."""
        M, V = len(context), self.vocab_size
        p = self.p1.expand(M, V).clone()
        for k, _, at, seen in self._levels(context, length):
            if not seen.any():
                continue
            p *= torch.where(seen, getattr(self, f"gamma{k}")[at], 1.0)[:, None]
            # each seen context's block of n-grams, laid end to end: (row, entry) pairs
            start = getattr(self, f"start{k}")
            n = torch.where(seen, start[at + 1] - start[at], 0)
            ends = n.cumsum(0)
            flat = torch.arange(int(ends[-1]), device=context.device)
            row = torch.searchsorted(ends, flat, right=True)
            entry = start[at][row] + flat - (ends - n)[row]
            p.index_put_((row, self.table(k)[0][entry] % V), getattr(self, f"alpha{k}")[entry],
                         accumulate=True)
        return p

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None,
                reduction: str = "mean") -> torch.Tensor:
        """Log-probabilities (B, T, V) as logits, or with `targets` the cross-entropy
        −log P(target | context), reduced as `linear_cross_entropy` reduces it."""
        if reduction not in ("mean", "sum", "row_sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum', 'row_sum' or 'none', "
                             f"not {reduction!r}")
        B, T = ids.shape
        # the context of position t: the row's tokens t − order + 2 … t (fewer at its start)
        context = F.pad(ids, (self.order - 2, 0)).unfold(1, self.order - 1, 1).reshape(B * T, -1)
        length = (torch.arange(T, device=ids.device) + 1).clamp(max=self.order - 1).repeat(B)
        if targets is None:
            return self.distribution(context, length).log().view(B, T, self.vocab_size)
        y = targets.reshape(-1)
        counted = y != IGNORE_INDEX
        p = self.probs_of(context, length, torch.where(counted, y, 0))
        nats = torch.where(counted, -p.log(), 0.0).view(B, T)
        if reduction == "none":
            return nats
        if reduction == "row_sum":
            return nats.sum(-1)
        return nats.sum() / counted.sum() if reduction == "mean" else nats.sum()

    # ------------------------------------------------------------ generation

    def new_decode_state(self, batch_size: int, max_len: int,
                         pad: torch.Tensor | None = None) -> NGramState:
        device = self.p1.device
        return NGramState(torch.zeros(batch_size, self.order - 1, dtype=torch.int64, device=device),
                          torch.zeros(batch_size, dtype=torch.int64, device=device), pad)

    def decode_step(self, ids: torch.Tensor, state: NGramState) -> torch.Tensor:
        T = ids.shape[1]
        real = T if state.pad is None else (
            state.position + torch.arange(T, device=ids.device)[None] >= state.pad[:, None]).sum(1)
        # left padding comes first, so a row's last `length` tokens are all real
        state.context = torch.cat([state.context, ids], 1)[:, -(self.order - 1):]
        state.length = (state.length + real).clamp(max=self.order - 1)
        state.position += T
        return self.distribution(state.context, state.length).log()
