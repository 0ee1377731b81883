"""A decoder-only Transformer that is GPT-2 or LLaMA by configuration.

Read top to bottom: norms, rotary embeddings, attention, MLP, block, model.
Each block computes (pre-norm residual)

    x = x + Attention(Norm(x))
    x = x + MLP(Norm(x))

and attention is softmax(Q Kᵀ / √d_k) V through
`torch.nn.functional.scaled_dot_product_attention`, which picks a fused kernel
(flash / memory-efficient / math) for the device. Two CPU fast paths stand
beside the plain ops, a blocked causal attention for training and a blocked
matrix-vector product for decoding (`Linear`); each is taken only where
`lmlab.model.fastpath` measures it faster on the machine at hand.

Weights are laid out for speed, not for any one checkpoint format: Q, K and V
come from one fused Linear, and SwiGLU's gate and up projections from another,
so each costs one matmul. `lmlab.interop` maps them to and from Hugging Face.
The key/value cache for generation lives here too (`KVCache`), because which
positions a query may attend to is part of the model's arithmetic.

`lmlab.model.encoder` builds a BERT-style encoder from the same layers: blocks
with `causal=False` (every query sees every real key) and `post_norm=True`.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.model import fastpath, hugepages, register_kind
from lmlab.model.config import ModelConfig, preset
from lmlab.model.loss import compute_dtype, linear_cross_entropy

_SDPA_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) * weight, computed in float32 as LLaMA does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


# ---------------------------------------------------------------- linear layers

def _row_blocks(out_features: int) -> int:
    return 4 if out_features % 4 == 0 else 2 if out_features % 2 == 0 else 0


_MATVEC_KEY = ("rows", "in_features", "out_features", "dtype", "bias")  # a plain tuple: cheaper


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, names and init), with a CPU matrix-vector product
    that is used where it measures faster.

    Decoding one token multiplies a few rows by every weight matrix, and that
    product is bound by how fast the weights stream from memory. The same
    product can be written as a batched multiply over k = 4 (or 2) blocks of
    weight rows:

        y = bmm(W.view(k, out/k, in), xᵀ expanded to (k, in, M)).view(out, M)ᵀ + b

    Same arithmetic, same result up to float rounding order (tested). Which of
    the two streams faster depends on the CPU and its BLAS: on a 2-core AMD
    EPYC (torch 2.13) `F.linear` on 1-4 fp32 rows streamed 6-14 GB/s and the
    blocked product 20-32 GB/s, while on a 2-core Xeon with AMX the blocked
    product streamed ~24 GB/s where `F.linear` reached 50-110. So on a CPU,
    without autograd, for ≤ 16 rows, `fastpath.run` times both over the first
    calls with each (rows, shape, dtype) inside the model, where the weights
    stream as they do in decoding, and keeps the blocked product only if it is
    ≥ 5 % faster (`LMLAB_FASTPATH=linear_matvec=plain|fast` fixes it).
    Everywhere else it is `F.linear`. Under torch.compile nothing is measured
    and the AMD rule stays (fp32, ≤ 4 rows, or ≤ 16 and out ≥ in).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if (x.device.type == "cpu" and x.dtype == w.dtype and x.dtype.is_floating_point
                and not (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))
                and compute_dtype(x) == x.dtype and w.is_contiguous()):
            rows, k = x.numel() // self.in_features, _row_blocks(self.out_features)
            if k and 0 < rows <= 16:
                if torch.compiler.is_compiling():  # nothing is measured: the AMD rule
                    wide = self.out_features >= self.in_features
                    if x.dtype == torch.float32 and (rows <= 4 or wide):
                        return _blocked_matvec(x, w, b, k)
                else:
                    return _measured_matvec(x, w, b, k, rows, self.in_features,
                                            self.out_features)
        return F.linear(x, w, b)


def _measured_matvec(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, k: int,
                     rows: int, in_f: int, out_f: int) -> torch.Tensor:
    """x Wᵀ + b for a few rows on a CPU: the blocked product or `F.linear`, whichever
    `fastpath.run` measured faster for this shape (`Linear` and the lean decode step)."""
    return fastpath.run("linear_matvec", (rows, in_f, out_f, x.dtype, b is not None),
                        _MATVEC_PATHS, x, w, b, k, fields=_MATVEC_KEY)


def _expanded_t(x: torch.Tensor, k: int) -> torch.Tensor:
    """x (rows, in) transposed and expanded to (k, in, rows): one strided view where x is
    contiguous (the same strides as x.t().expand(...), in one op instead of two)."""
    rows, in_f = x.shape
    if x.is_contiguous():
        return x.as_strided((k, in_f, rows), (0, 1, in_f))
    return x.t().expand(k, in_f, rows)


def _blocked_matvec(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                    k: int) -> torch.Tensor:
    """x Wᵀ + b as a batched multiply over k blocks of W's rows (see `Linear`)."""
    out_f, in_f = w.shape
    x2 = x.reshape(-1, in_f)
    rows = x2.shape[0]
    xt = _expanded_t(x2, k)
    if b is None:
        y = torch.bmm(w.view(k, out_f // k, in_f), xt)
    else:  # the bias added inside the same call: one op fewer per layer and step
        y = torch.baddbmm(b.view(k, out_f // k, 1), w.view(k, out_f // k, in_f), xt)
    if rows == 1:  # (k, out/k, 1) is already the row
        return y.view(*x.shape[:-1], out_f)
    # a transposed view, not a copy: what follows reads it in place
    return y.view(out_f, rows).t().reshape(*x.shape[:-1], out_f)


_MATVEC_PATHS = {fastpath.PLAIN: lambda x, w, b, k: F.linear(x, w, b), "blocked": _blocked_matvec}


# ---------------------------------------------------------------- rotary embeddings

def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies θ_i = theta^(-2i/d), with the scalings real checkpoints use."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    sc = cfg.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / sc["factor"]
    elif kind == "llama3":
        # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, smooth in between
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old_ctx = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_ctx / lo) & (wavelen >= old_ctx / hi)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    elif kind != "default":
        raise ValueError(f"unsupported rope scaling {kind!r}")
    return inv_freq.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+d/2}) by position-dependent angles (the 'rotate half' layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


# ---------------------------------------------------------------- KV cache

class KVCache:
    """Keys and values of past positions, preallocated for `max_len` positions.

    `pos` is the number of positions already stored; every sequence in the batch
    shares it (the batched engine left-pads prompts to make that so).
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int,
                 device=None, dtype: torch.dtype = torch.float32):
        shape = (batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.max_len = max_len
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, H_kv, T, D) at the current position; return all keys/values so far."""
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, T: int) -> None:
        """T more positions are stored (the model calls this after its last layer)."""
        self.pos += T

    @classmethod
    def over(cls, k: list[torch.Tensor], v: list[torch.Tensor]) -> "KVCache":
        """An empty cache writing into given per-layer tensors (views of a larger cache)."""
        cache = cls.__new__(cls)
        cache.k, cache.v, cache.max_len, cache.pos = k, v, k[0].shape[2], 0
        return cache


class SlotCache:
    """The KV cache of a running batch whose rows come and go (continuous batching).

    One preallocated row ("slot") per sequence, each at its own length `lens[i]`:
    a request joining the batch is prefilled into a free slot alone (a batch-1
    `KVCache` over that slot's row, no copy), then decodes one token per step
    together with the others through `rows(n)`, which writes each row's new key
    and value at that row's own length. The running rows are kept in slots
    0..n-1: a row that leaves is replaced by the last one (`move`), so a step
    computes only live rows and reads the cache as views, never gathers it.

    Memory: 2 (K and V) × n_layer × n_kv_head × head_dim × bytes per element, per
    position per slot. The length grows by doubling (`reserve`) up to
    max_seq_len, so short chats on a long-context model do not allocate its
    whole context for every slot.
    """

    def __init__(self, cfg: ModelConfig, n_slots: int, max_len: int, device, dtype):
        self.cfg, self.n_slots, self.device, self.dtype = cfg, n_slots, device, dtype
        self.max_len = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.lens = [0] * n_slots
        self.reserve(max_len)

    def reserve(self, length: int) -> None:
        """Room for `length` positions in every slot (doubling, capped at the model's context)."""
        if length <= self.max_len:
            return
        new = min(max(length, 2 * self.max_len), self.cfg.max_seq_len)
        if new < length:
            raise ValueError(f"{length} positions > the model's max_seq_len {self.cfg.max_seq_len}")
        shape = (self.n_slots, self.cfg.n_kv_head, new, self.cfg.head_dim)
        for name in ("k", "v"):
            grown = [torch.zeros(shape, device=self.device, dtype=self.dtype)
                     for _ in range(self.cfg.n_layer)]
            for old, t in zip(getattr(self, name), grown):  # none at the first reserve
                t[:, :, :self.max_len] = old
            setattr(self, name, grown)
        self.max_len = new

    def slot(self, i: int) -> KVCache:
        """A batch-1 `KVCache` writing slot i's row in place, from position 0 (a prefill)."""
        return KVCache.over([k[i:i + 1] for k in self.k], [v[i:i + 1] for v in self.v])

    def rows(self, n: int) -> "_SlotRows":
        """Slots 0..n-1 as one batch, for a decode step of one token per row."""
        return _SlotRows(self, n)

    def move(self, src: int, dst: int) -> None:
        """Slot dst takes slot src's sequence (the cache of its `lens[src]` positions)."""
        if src == dst:
            return
        n = self.lens[src]
        for store in (self.k, self.v):
            for t in store:
                t[dst, :, :n] = t[src, :, :n]
        self.lens[dst], self.lens[src] = n, 0


class _SlotRows:
    """A decode step's view of slots 0..n-1 (the `cache` argument of `Transformer.forward`):
    row i's key/value goes to position lens[i]; where the lengths differ, a key mask hides
    each row's positions past its own length and its RoPE/learned position is lens[i]."""

    def __init__(self, slots: SlotCache, n: int):
        self.slots, self.n = slots, n
        lens = slots.lens[:n]
        self.pos = max(lens)  # past: the longest row's stored positions
        self.ragged = min(lens) != self.pos
        self.mask = self.positions = None
        if self.ragged:
            device = slots.device
            self._lens = torch.tensor(lens, device=device)
            self._rows = torch.arange(n, device=device)
            self.positions = self._lens[:, None]
            # (n, 1, 1, pos + 1): True where a key belongs to the row (its past and itself)
            self.mask = (torch.arange(self.pos + 1, device=device)[None, :]
                         <= self._lens[:, None])[:, None, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        kc, vc = self.slots.k[layer], self.slots.v[layer]
        if self.n != kc.shape[0]:
            kc, vc = kc[:self.n], vc[:self.n]
        if self.ragged:  # each row at its own length: (rows, positions) pairs
            kc[self._rows, :, self._lens] = k[:, :, 0]
            vc[self._rows, :, self._lens] = v[:, :, 0]
        else:  # narrow, not slicing: fewer ops on a step's hot path
            kc.narrow(2, self.pos, 1).copy_(k)
            vc.narrow(2, self.pos, 1).copy_(v)
        end = self.pos + 1
        return kc.narrow(2, 0, end), vc.narrow(2, 0, end)

    def advance(self, T: int) -> None:
        lens = self.slots.lens
        for i in range(self.n):
            lens[i] += T


# ---------------------------------------------------------------- attention and MLP

CAUSAL_BLOCK = 128


def causal_attention_blocked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             block: int = CAUSAL_BLOCK) -> torch.Tensor:
    """softmax(Q Kᵀ/√d + causal mask) V, one block of queries at a time.

    Query block i only multiplies the keys it may see (positions < (i+1)·block),
    so a causal pass does (n+1)/2n of the full Q Kᵀ and P V work for n blocks
    (3/4 at 256 positions, 9/16 at 1,024). Scores are softmaxed in fp32. Eager,
    the mask is a 0 / −∞ bias that the scores' multiply adds in (`baddbmm`);
    under torch.compile, inductor fuses it into the softmax. The two give the
    same bits when the scale is a power of two. On a CPU its forward plus
    backward can beat SDPA's CPU flash kernel, whose backward pass dominates a
    training step (on a 2-core AMD EPYC, bf16, 8 x 6 heads x 256 x 64: 23 ms
    through SDPA, 9-10 ms this way under torch.compile), so `Attention` uses it
    for CPU training where `_blocked_attention_wins` measures it faster.
    """
    T, D = q.shape[-2:]
    scale, acc = D ** -0.5, torch.promote_types(q.dtype, torch.float32)  # acc: the softmax's
    compiling = torch.compiler.is_compiling()
    if not compiling:  # baddbmm wants (batch·heads, T, D)
        lead = q.shape[:-2]
        q, k, v = (t.reshape(-1, T, D) for t in (q, k, v))
    outs = []
    for start in range(0, T, block):
        end = min(T, start + block)
        qb, kb, vb = q[..., start:end, :], k[..., :end, :], v[..., :end, :]
        # key j is visible to query i when j ≤ i
        qi = torch.arange(start, end, device=q.device)[:, None]
        kj = torch.arange(end, device=q.device)[None, :]
        if compiling:  # inductor fuses mask and scale into its softmax kernel
            s = torch.where(kj <= qi, (qb @ kb.transpose(-1, -2)).to(acc) * scale, float("-inf"))
        else:  # eager: the multiply adds the mask in, as a 0 / −∞ bias (two passes fewer)
            bias = torch.zeros(end - start, end, dtype=q.dtype, device=q.device)
            s = torch.baddbmm(bias.masked_fill_(kj > qi, float("-inf")), qb,
                              kb.transpose(-1, -2), alpha=scale)
        outs.append(torch.softmax(s, -1, dtype=acc).to(v.dtype) @ vb)
    y = torch.cat(outs, dim=-2) if len(outs) > 1 else outs[0]
    return y if compiling else y.view(*lead, T, D)


class _AttentionKey(NamedTuple):
    batch: int
    heads: int
    kv_heads: int
    T: int
    head_dim: int
    dtype: torch.dtype
    compute_dtype: torch.dtype


def _sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The plain op, K/V heads shared as `Attention.forward` shares them."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1 and _SDPA_GQA:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _blocked_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return causal_attention_blocked(q, k, v)


def _forward_backward(attend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))  # apart from the model's graph
    out = attend(q, k, v)
    torch.autograd.grad(out, (q, k, v), torch.ones_like(out))


_ATTENTION_PATHS = {fastpath.PLAIN: functools.partial(_forward_backward, _sdpa_causal),
                    "blocked": functools.partial(_forward_backward, _blocked_causal)}


def _blocked_attention_wins(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether CPU training attention goes through `causal_attention_blocked` rather than SDPA.

    Timed once per shape and dtype (`fastpath.choose`): forward plus backward
    of both on this call's q, k, v (B, heads, T, d), detached, which costs a
    few ms to a few hundred on the first training step. Under torch.compile
    nothing is measured and the blocked path is kept (its fused form won on
    the AMD CPU).
    """
    if torch.compiler.is_compiling():
        return True
    B, H, T, D = q.shape
    key = _AttentionKey(B, H, k.shape[1], T, D, q.dtype, compute_dtype(q))
    return fastpath.choose("attention", key, _ATTENTION_PATHS, q, k, v) != fastpath.PLAIN


class Attention(nn.Module):
    """Self-attention: causal (a decoder's), or with `causal=False` an encoder's, in which every
    query sees every key that `attn_mask` lets through (the padding mask, or none).

    With `cfg.qk_norm` (Qwen3) each head's query and key are RMS-normalised over head_dim,
    with a learned gain shared by the heads, before RoPE: q ← RMSNorm(q), k ← RMSNorm(k)."""

    def __init__(self, cfg: ModelConfig, causal: bool = True):
        super().__init__()
        self.causal = causal
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
        self.qkv = Linear(cfg.d_model, q_dim + 2 * kv_dim, bias=cfg.qkv_bias)
        self.proj = Linear(q_dim, cfg.d_model, bias=cfg.bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.dropout = cfg.dropout

    def forward(self, x, rope=None, cache: KVCache | None = None, layer: int = 0,
                attn_mask: torch.Tensor | None = None):
        B, T, _ = x.shape
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.qkv(x).split([q_dim, kv_dim, kv_dim], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:  # per head, over head_dim
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.pos
            k, v = cache.update(layer, k, v)
        if (T == 1 and past and x.device.type == "cpu" and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling()):
            # one decode step: one query against the cache, the choice measured (see below)
            key = (B, self.n_head, self.n_kv_head, self.head_dim, _pow2_at_least(past + 1),
                   q.dtype, attn_mask is not None)
            y = fastpath.run("decode_attention", key, _DECODE_ATTENTION, q, k, v, attn_mask,
                             fields=_DECODE_KEY)
            return self.proj(y.transpose(1, 2).reshape(B, T, -1))
        if not self.causal:  # bidirectional: no causal mask, so no blocked path either
            y = _attention_sdpa(q, k, v, attn_mask, self.dropout if self.training else 0.0)
            return self.proj(y.transpose(1, 2).reshape(B, T, -1))
        # training on a CPU: the blocked path where its backward measures faster than SDPA's
        blocked = (attn_mask is None and not past and T > 1 and x.device.type == "cpu"
                   and torch.is_grad_enabled() and not (self.training and self.dropout)
                   and _blocked_attention_wins(q, k, v))
        gqa = {}
        if self.n_kv_head != self.n_head:  # grouped-query attention: share each K/V head
            if _SDPA_GQA and not blocked:  # torch >= 2.5 shares the heads inside the kernel
                gqa = {"enable_gqa": True}
            else:
                rep = self.n_head // self.n_kv_head
                k = k.repeat_interleave(rep, dim=1)
                v = v.repeat_interleave(rep, dim=1)
        if blocked:
            y = causal_attention_blocked(q, k, v)
            return self.proj(y.transpose(1, 2).reshape(B, T, -1))
        if attn_mask is None and past and T > 1:
            # a chunk after cached positions: causal within the chunk, all of the past visible
            attn_mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask,
            is_causal=attn_mask is None and past == 0 and T > 1,
            dropout_p=self.dropout if self.training else 0.0, **gqa,
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


def _pow2_at_least(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _attention_sdpa(q, k, v, mask, dropout_p: float = 0.0):
    """SDPA without a causal mask (`mask`: True = may attend), its K/V heads shared inside the
    kernel (torch ≥ 2.5) or repeated: a decode step's plain op, and an encoder's attention."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1 and not _SDPA_GQA:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    gqa = {"enable_gqa": True} if rep > 1 and _SDPA_GQA else {}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, **gqa)


def _decode_attention_matmul(q, k, v, mask):
    """softmax(q Kᵀ/√d) V for one query per row, as two small matrix products.

    SDPA's CPU kernel is built for long query blocks; for a single query it pays
    its tiling and threading set-up on a product of a few thousand FLOPs. Here
    the query heads that share a K/V head are stacked as rows of one product
    (GQA without repeating the cache), the mask (B, 1, 1, L) hides left padding,
    and the softmax runs in fp32.
    """
    B, H, _, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    qg = q.reshape(B, Hkv, H // Hkv, D) * D ** -0.5
    s = torch.matmul(qg, k.transpose(-1, -2))  # (B, Hkv, H/Hkv, L)
    if mask is not None:
        s = s.masked_fill(~mask.reshape(B, 1, 1, L), float("-inf"))
    p = torch.softmax(s, -1, dtype=torch.promote_types(s.dtype, torch.float32)).to(v.dtype)
    return torch.matmul(p, v).reshape(B, H, 1, D)


_DECODE_KEY = ("batch", "heads", "kv_heads", "head_dim", "keys_up_to", "dtype", "masked")
# a decode step on a CPU: which is faster depends on the CPU (and torch's SDPA kernel); timed
# in place over the first steps of each shape by fastpath.run (key lengths bucketed by powers
# of two), SDPA kept unless the two products are ≥ 5 % faster
_DECODE_ATTENTION = {fastpath.PLAIN: _attention_sdpa, "matmul": _decode_attention_matmul}


_GELU_2C = 2 * math.sqrt(2 / math.pi)


class MLP(nn.Module):
    """GELU: proj(gelu(fc x)).  SwiGLU: proj(silu(gate x) * (up x)), gate and up fused in fc.

    "gelu" is GPT-2's tanh approximation, "gelu_exact" BERT's x·Φ(x) (they differ by ~1e-3)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        self.exact_gelu = cfg.mlp == "gelu_exact"
        n_in = 2 * cfg.d_ff if self.swiglu else cfg.d_ff
        self.fc = Linear(cfg.d_model, n_in, bias=cfg.bias)
        self.proj = Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.proj(self.activate(self.fc(x))))

    def activate(self, h: torch.Tensor) -> torch.Tensor:
        """The nonlinearity between fc and proj (the lean decode step calls it too)."""
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up
        if self.exact_gelu:
            return F.gelu(h)  # BERT's x·Φ(x), Φ the normal CDF
        if torch.compiler.is_compiling():
            # GPT-2's "gelu_new", ½x(1 + tanh u) = x·σ(2u): the same function, and inductor's
            # sigmoid kernel (with its derivative) is twice as fast as its tanh on a CPU
            return h * torch.sigmoid(_GELU_2C * (h + 0.044715 * h * h * h))
        return F.gelu(h, approximate="tanh")  # GPT-2's "gelu_new"


class Block(nn.Module):
    """Pre-norm x + F(Norm(x)) (a decoder's); `post_norm`: Norm(x + F(x)), BERT's order.
    `causal=False` makes its attention bidirectional (an encoder's)."""

    def __init__(self, cfg: ModelConfig, causal: bool = True, post_norm: bool = False):
        super().__init__()
        self.post_norm = post_norm
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg, causal)
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rope=None, cache=None, layer=0, attn_mask=None):
        if self.post_norm:
            x = self.norm1(x + self.dropout(self.attn(x, rope, cache, layer, attn_mask)))
            return self.norm2(x + self.mlp(x))
        x = x + self.dropout(self.attn(self.norm1(x), rope, cache, layer, attn_mask))
        return x + self.mlp(self.norm2(x))


# ---------------------------------------------------------------- decode state

class DecodeState:
    """What `Transformer.decode_step` carries between steps: the KV cache, and for a
    left-padded batch the key mask and per-row position offsets, built once.

    Left padding puts every row's last prompt token in the same column, so the
    cache keeps one `pos`. A boolean mask hides pad columns from every query,
    and each row's positions count from 0 at its first real token, so a row's
    result does not depend on what it was batched with.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype,
                 pad: torch.Tensor | None = None):
        self.cache = KVCache(cfg, batch_size, max_len, device, dtype)
        self.pad = self.key_mask = None
        if pad is not None and bool((pad > 0).any()):
            self.pad = pad.to(device)[:, None]
            # (B, 1, 1, max_len): True where the key is a real token
            self.key_mask = (torch.arange(max_len, device=device)[None, :] >= self.pad)[:, None, None]

    def mask_and_positions(self, T: int):
        if self.pad is None:
            return None, None  # no padding: the model's mask-free path
        pos = self.cache.pos
        keys = self.key_mask[..., :pos + T]
        positions = (torch.arange(pos, pos + T, device=keys.device)[None, :] - self.pad).clamp(min=0)
        if T == 1:
            return keys, positions
        causal = torch.ones(T, pos + T, dtype=torch.bool, device=keys.device).tril(pos)
        # each pad query may see itself: for a query with no visible key, softmax is 0/0 and
        # some torch versions and kernels return NaN, which would then flow into later
        # layers' pad keys and, as 0 * NaN, into the real rows
        itself = torch.zeros(T, pos + T, dtype=torch.bool, device=keys.device)
        itself[:, pos:] = torch.eye(T, dtype=torch.bool, device=keys.device)
        return (causal & keys) | itself, positions


# ---------------------------------------------------------------- the model

@register_kind("transformer")
class Transformer(nn.Module):
    """The decoder-only Transformer, GPT-2 or LLaMA by its `ModelConfig` (kind "transformer")."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos_emb == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.pos_emb == "rope":
            self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.reset_parameters()

    def _apply(self, fn, recurse=True):
        # .to(bfloat16) would round the RoPE frequencies too (radians of error by position
        # 4000); keep them float32 whatever dtype the weights take
        super()._apply(fn, recurse)
        self.__dict__.pop("_lean", None)  # the CPU decode step's plan holds the old tensors
        if self.cfg.pos_emb == "rope":
            self.inv_freq = rope_inv_freq(self.cfg).to(self.inv_freq.device)
        return self

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02), zero biases, unit norms; residual projections / √(2·n_layer)."""
        std = self.cfg.init_std
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                # the two Linears that write into the residual stream, scaled so its variance
                # does not grow with depth
                scale = 1 / math.sqrt(2 * self.cfg.n_layer) if name.endswith("proj") else 1.0
                nn.init.normal_(m.weight, 0.0, std * scale)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def rope_cos_sin(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos, sin for absolute positions (T,) → (T, head_dim), or per row (B, T) → (B, 1, T, head_dim)."""
        angles = positions.float()[..., None] * self.inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        if angles.dim() == 3:  # one row of positions per sequence: broadcast over heads
            angles = angles[:, None]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    # ------------------------------------------------ the kind protocol (see lmlab.model)

    @classmethod
    def from_config_dict(cls, d: dict) -> "Transformer":
        return cls(ModelConfig.from_dict(d))

    @classmethod
    def from_spec(cls, fields: dict) -> "Transformer":
        """`fields`: a preset name under "preset" (default "small") and overrides of its fields."""
        fields = dict(fields)
        return cls(preset(fields.pop("preset", None) or "small", **fields))

    def config_dict(self) -> dict:
        return self.cfg.to_dict()

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def max_seq_len(self) -> int:
        return self.cfg.max_seq_len

    def flops_per_token(self, seq_len: int | None = None) -> float:
        return self.cfg.flops_per_token(seq_len)

    def new_decode_state(self, batch_size: int, max_len: int,
                         pad: torch.Tensor | None = None) -> DecodeState:
        param = self.tok_emb.weight
        return DecodeState(self.cfg, batch_size, max_len, param.device, param.dtype, pad)

    def decode_step(self, input_ids: torch.Tensor, state: DecodeState) -> torch.Tensor:
        mask, positions = state.mask_and_positions(input_ids.shape[1])
        h = self(input_ids, cache=state.cache, attn_mask=mask, positions=positions,
                 return_hidden=True)
        # only the last position's logits are needed; the others would cost T x vocab x d
        return self.lm_head(h[:, -1])

    # ------------------------------------------------ the slot protocol (continuous batching)

    def new_slots(self, n_slots: int, max_len: int) -> SlotCache:
        """A cache for up to `n_slots` sequences, `max_len` positions each to begin with."""
        param = self.tok_emb.weight
        return SlotCache(self.cfg, n_slots, max_len, param.device, param.dtype)

    def prefill_slot(self, ids: torch.Tensor, slots: SlotCache, slot: int) -> torch.Tensor:
        """Run a prompt (T,) into an empty slot; the next-token logits (1, vocab)."""
        cache = slots.slot(slot)
        h = self(ids[None], cache=cache, return_hidden=True)
        slots.lens[slot] = cache.pos
        return self.lm_head(h[:, -1])

    def decode_slots(self, ids: torch.Tensor, slots: SlotCache) -> torch.Tensor:
        """One token per running slot, ids (n,) for slots 0..n-1; next-token logits (n, vocab)."""
        rows = slots.rows(ids.shape[0])
        plan = _lean_plan(self, ids)
        if plan is not None:  # a CPU inference step: the same arithmetic with less Python
            return _decode_lean(self, plan, ids, rows)
        h = self(ids[:, None], cache=rows, attn_mask=rows.mask, positions=rows.positions,
                 return_hidden=True)
        return self.lm_head(h[:, -1])

    # ------------------------------------------------ forward

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                attn_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                return_hidden: bool = False, targets: torch.Tensor | None = None,
                reduction: str = "mean"):
        """Logits (B, T, vocab) for token ids (B, T).

        With `targets` (B, T; -100 = not counted) it returns instead the
        next-token cross-entropy (`reduction` as in `linear_cross_entropy`),
        computed without materialising the logits.

        With `cache`, the ids continue the cached positions and the cache advances.
        `attn_mask` (bool, broadcastable to (B, H, T, past+T); True = may attend)
        overrides the causal mask, e.g. for left-padded batches, whose `positions`
        (B, T) then count from 0 at each row's first real token.
        """
        B, T = input_ids.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.max_seq_len and self.pos_emb is not None:
            raise ValueError(f"sequence of {start + T} tokens > max_seq_len {self.cfg.max_seq_len}")
        if positions is None:
            positions = torch.arange(start, start + T, device=input_ids.device)
        x = self.tok_emb(input_ids)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        else:
            rope = self.rope_cos_sin(positions, x.dtype)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, cache, i, attn_mask)
        if cache is not None:
            cache.advance(T)
        x = self.norm(x)
        if targets is not None:
            return linear_cross_entropy(x, self.lm_head.weight, targets, reduction=reduction)
        return x if return_hidden else self.lm_head(x)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ---------------------------------------------------------------- the decode step on a CPU

# A decode step on a CPU multiplies one row per sequence by every weight; at the small preset
# those products take ~5 ms of a ~10 ms step on a 2-core EPYC, and the rest is mostly Python:
# each nn.Module call costs ~7 µs there, each parameter read through a module ~2 µs, and a
# step makes ~70 calls and ~200 reads. `_decode_lean` is `forward` for that one case — the
# same ops in the same order on the same tensors, the same measured fast paths — walking a
# plan of plain tensors built once. It runs only where it is exactly `forward`'s arithmetic:
# CPU, no autograd, eval mode, no autocast, a plain `Transformer` (not FSDP's or another
# wrapper's subclass) whose blocks hold lmlab's own `Linear`s (a LoRA wrapper is not one), no
# forward hooks; the plan is rebuilt when a module or parameter is assigned anywhere
# (`_structure` below), when a module's class changes (`_check`) or the model moves (`_apply`).

_structure = [0]  # bumped whenever any module, parameter or buffer is (re)assigned


def _bump(*_args) -> None:
    _structure[0] += 1


for _register in ("register_module_module_registration_hook",
                  "register_module_parameter_registration_hook",
                  "register_module_buffer_registration_hook"):
    getattr(nn.modules.module, _register)(_bump)


class _LeanLayer(NamedTuple):
    norm1: tuple
    qkv: tuple
    proj: tuple
    norm2: tuple
    fc: tuple
    fc2: tuple
    q_norm: RMSNorm | None
    k_norm: RMSNorm | None
    activate: Callable  # the block's MLP.activate


class _LeanPlan(NamedTuple):
    stamp: int
    modules: list
    layers: list
    norm: tuple
    head: tuple


def _norm_args(m: nn.Module):
    """(torch.layer_norm's arguments) for a LayerNorm, or (the RMSNorm) for an RMSNorm."""
    if type(m) is nn.LayerNorm:  # the call F.layer_norm makes, without its Python wrapper
        return (m.normalized_shape, m.weight, m.bias, m.eps, False)
    return (m,) if type(m) is RMSNorm else None


def _apply_norm(args: tuple, x: torch.Tensor) -> torch.Tensor:
    return args[0].forward(x) if len(args) == 1 else torch.layer_norm(x, *args)


class _LeanLinear(NamedTuple):
    w: torch.Tensor
    b: torch.Tensor | None
    k: int  # row blocks of the blocked product (0: F.linear only)
    in_f: int
    out_f: int
    w3: torch.Tensor | None  # w.view(k, out/k, in) and b.view(k, out/k, 1), made once
    b3: torch.Tensor | None


def _lin_args(m: nn.Module):
    """A `_LeanLinear` for one of lmlab's `Linear`s; None for anything else."""
    if type(m) is not Linear or not m.weight.is_contiguous():
        return None
    w, b, k, o, i = m.weight, m.bias, _row_blocks(m.out_features), m.out_features, m.in_features
    return _LeanLinear(w, b, k, i, o, w.view(k, o // k, i) if k else None,
                       b.view(k, o // k, 1) if k and b is not None else None)


def _lean_plan(model: "Transformer", ids: torch.Tensor) -> _LeanPlan | None:
    """The plan for `_decode_lean`, or None where the module path must run."""
    if (ids.device.type != "cpu" or torch.is_grad_enabled() or model.training
            or type(model) is not Transformer or torch.compiler.is_compiling()):
        return None
    emb = model.tok_emb.weight
    if compute_dtype(emb) != emb.dtype:  # autocast would change the products' dtype
        return None
    plan = model.__dict__.get("_lean")
    state = _UNCHANGED if plan is not None and plan.stamp == _structure[0] else _CHANGED
    if state is _UNCHANGED:
        state = _check(plan.modules)
    if state is _CHANGED:  # first use, or a module was assigned or changed its class
        plan = model.__dict__["_lean"] = _build_lean_plan(model, _structure[0])
        state = _check(plan.modules)
    return plan if state is _UNCHANGED and plan.layers is not None else None


_UNCHANGED, _CHANGED, _HOOKED = "unchanged", "changed", "hooked"


def _check(modules: list) -> str:
    """Whether every module still has the class it had when the plan was built (LoRA and
    parametrizations change a layer's class in place), and none has a forward hook."""
    g = nn.modules.module
    hooked = bool(g._global_forward_hooks or g._global_forward_pre_hooks)
    for m, cls in modules:
        if type(m) is not cls:
            return _CHANGED
        if m._forward_hooks or m._forward_pre_hooks:
            hooked = True
    return _HOOKED if hooked else _UNCHANGED


def _build_lean_plan(model: "Transformer", stamp: int) -> _LeanPlan:
    plan = _lean_parts(model, stamp)
    # the weights into huge pages first (a rule, see hugepages.py), then the plan over them
    if plan.layers is not None and not hugepages.placed(model) and hugepages.place(model):
        plan = _lean_parts(model, stamp)
    return plan


def _lean_parts(model: "Transformer", stamp: int) -> _LeanPlan:
    modules = [(m, type(m)) for m in model.modules()]
    none = _LeanPlan(stamp, modules, None, (), ())
    if not model.tok_emb.weight.dtype.is_floating_point:
        return none
    layers = []
    for blk in model.blocks:
        a, m = blk.attn, blk.mlp
        if (type(blk) is not Block or type(a) is not Attention or type(m) is not MLP
                or blk.post_norm or not a.causal):
            return none
        parts = (_norm_args(blk.norm1), _lin_args(a.qkv), _lin_args(a.proj),
                 _norm_args(blk.norm2), _lin_args(m.fc), _lin_args(m.proj))
        if any(p is None for p in parts):
            return none
        layers.append(_LeanLayer(*parts, a.q_norm, a.k_norm, m.activate))
    norm, head = _norm_args(model.norm), _lin_args(model.lm_head)
    if norm is None or head is None:
        return none
    return _LeanPlan(stamp, modules, layers, norm, head)


def _lean_blocked(x: torch.Tensor, a: _LeanLinear) -> torch.Tensor:
    """`_blocked_matvec` for x (n, in) with the weight's views made once (the same calls)."""
    n = x.shape[0]
    xt = _expanded_t(x, a.k)
    y = torch.bmm(a.w3, xt) if a.b3 is None else torch.baddbmm(a.b3, a.w3, xt)
    return y.view(n, a.out_f) if n == 1 else y.view(a.out_f, n).t()


# the same choices as _MATVEC_PATHS (one measurement per shape serves both), lean arguments
_LEAN_MATVEC = {fastpath.PLAIN: lambda x, a: F.linear(x, a.w, a.b), "blocked": _lean_blocked}


def _lean_linear(a: _LeanLinear, x: torch.Tensor) -> torch.Tensor:
    """`Linear.forward` in a lean step, x (n, in) (whose caller checked what its first test
    checks: CPU, no autograd, no autocast, the weight's dtype)."""
    n = x.shape[0]
    if a.k and 0 < n <= 16:
        return fastpath.run("linear_matvec", (n, a.in_f, a.out_f, x.dtype, a.b is not None),
                            _LEAN_MATVEC, x, a, fields=_MATVEC_KEY)
    return F.linear(x, a.w, a.b)


def _decode_lean(model: "Transformer", plan: _LeanPlan, ids: torch.Tensor,
                 rows: "_SlotRows") -> torch.Tensor:
    """`decode_slots` through the module path, op for op, without the modules (see above).

    The hidden states are (n, d) rather than forward's (n, 1, d): the same numbers in the
    same order, so each product is the same kernel call on the same memory, with fewer
    views around it (a query is (n, H, 1, D) straight from the fused projection)."""
    cfg = model.cfg
    n = ids.shape[0]
    H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    q_dim = H * D
    positions = rows.positions  # (n, 1) where the rows' lengths differ, else None
    x = F.embedding(ids, model.tok_emb.weight)
    rope = None
    if model.pos_emb is not None:  # the same rows of the table forward's embedding call reads
        pos = model.pos_emb.weight
        x = x + (pos[rows.pos] if positions is None else F.embedding(positions[:, 0], pos))
    else:
        if positions is None:
            positions = torch.arange(rows.pos, rows.pos + 1, device=ids.device)
        rope = model.rope_cos_sin(positions, x.dtype)
    mask = rows.mask
    key = (n, H, Hkv, D, _pow2_at_least(rows.pos + 1), x.dtype, mask is not None)
    for i, layer in enumerate(plan.layers):
        h = _apply_norm(layer.norm1, x)
        qkv = _lean_linear(layer.qkv, h)  # (n, (H + 2 Hkv) D)
        if H == Hkv:  # the same (n, H, 1, D) views as a split of the last dim, in fewer ops
            q, k, v = qkv.view(n, 3, H, 1, D).unbind(1)
        else:
            q, k, v = qkv.view(n, H + 2 * Hkv, 1, D).split([H, Hkv, Hkv], dim=1)
        if layer.q_norm is not None:
            q, k = layer.q_norm.forward(q), layer.k_norm.forward(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k, v = rows.update(i, k, v)
        if rows.pos:
            y = fastpath.run("decode_attention", key, _DECODE_ATTENTION, q, k, v, mask,
                             fields=_DECODE_KEY)
        else:  # an empty cache: the module path's SDPA (a query sees itself)
            y = _attention_sdpa(q, k, v, mask)
        x = x + _lean_linear(layer.proj, y.reshape(n, q_dim))
        h = layer.activate(_lean_linear(layer.fc, _apply_norm(layer.norm2, x)))
        x = x + _lean_linear(layer.fc2, h)
    rows.advance(1)
    return _lean_linear(plan.head, _apply_norm(plan.norm, x))
