"""Cross-entropy of the output layer, computed in row chunks without the full logits.

The language-model loss is

    loss = mean over tokens t of  −log softmax(h_t Wᵀ)[y_t]

with h (N, d) the final hidden states, W (V, d) the output embedding and y the
targets. Written plainly it makes an (N, V) logits tensor, an fp32 copy of it
for the softmax, and the same again in the backward pass: for 2,048 tokens and
a 8,192-token vocabulary that is ~200 MB of memory traffic per step, and on a
CPU those passes cost as much as a third of the output layer's matrix multiply.

`linear_cross_entropy` takes rows in chunks small enough to stay in cache. For
each chunk it computes the logits, their log-softmax in fp32, the loss, and —
because the loss is the end of the graph — its gradient at once:

    ∂loss/∂z = (softmax(z) − onehot(y)) / N,    ∂loss/∂h = (∂loss/∂z) W

keeping only ∂loss/∂z (in the compute dtype, as the plain path's backward
would) for ∂loss/∂W = (∂loss/∂z)ᵀ h in the backward pass. The arithmetic is
the same as `F.cross_entropy(h @ W.T, y)`; tests hold the two equal. (The
idea is the one of Liger Kernel's fused linear cross-entropy and Apple's
Cut Cross-Entropy, here in plain torch ops so it runs on every device.)

Fewer passes over memory is not always less time: the plain op's large
multiplies may run faster than many chunk-sized ones on another machine. So
for "mean" and "sum" (without an explicit `chunk_rows`) the two are timed on
the first call with each shape, dtype and grad mode, and the chunked loss is
used only where it is ≥ 5 % faster, or where the plain op's logits would be
too large to hold (`_plain_is_faster`, `lmlab.model.fastpath`;
`LMLAB_FASTPATH=linear_cross_entropy=plain|fast` fixes the choice).

reduction "row_sum" (one −log p(sequence) per row, for DPO and multiple-choice
scores) has an upstream gradient per row, not one scalar: the forward then keeps
∂z = softmax(z) − onehot(y) unscaled and returns the nats of every token, and the
backward weights each token by its row's gradient g_t (the `.sum(-1)` over a row
hands g_row to each of its tokens): ∂h_t = g_t · (∂z_t) W,  ∂W = (∂z)ᵀ (g ⊙ h).

The per-chunk softmax and gradient are five eager passes over the chunk's
logits (log-softmax, exp, the one-hot subtraction, scaling, rounding). Inside
`with compiled_kernels():` (the Trainer's steps when `train.compile` is on)
those passes are one `torch.compile`d function, `_softmax_grad_rows`: inductor
makes it a max pass, a sum-of-exp pass and one pass that writes the gradient
in the compute dtype, about 2.5× less time per chunk on the reference CPU.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from lmlab.model import fastpath

IGNORE_INDEX = -100


def _chunk_rows(vocab: int, device: torch.device) -> int:
    # a chunk of fp32 logits: ~8 MB on a CPU (L2/L3-sized), ~128 MB on an accelerator
    budget = 2 ** 21 if device.type == "cpu" else 2 ** 25
    return max(32, min(4096, budget // vocab))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run a Linear in here, else x's own."""
    dev = x.device.type
    try:
        enabled = torch.is_autocast_enabled(dev)
        dtype = torch.get_autocast_dtype(dev) if enabled else x.dtype
    except (TypeError, AttributeError):  # torch < 2.4: per-device functions
        enabled = torch.is_autocast_cpu_enabled() if dev == "cpu" else torch.is_autocast_enabled()
        dtype = (torch.get_autocast_cpu_dtype() if dev == "cpu"
                 else torch.get_autocast_gpu_dtype()) if enabled else x.dtype
    return dtype


def _softmax_grad_rows(z: torch.Tensor, y: torch.Tensor, inv: torch.Tensor,
                       grad_out: torch.Tensor) -> torch.Tensor:
    """Write (softmax(z) − onehot(y))·inv into grad_out; return log p(y) per row (0 where y = −100).

    The same arithmetic as the eager passes in `_LinearCrossEntropy.forward`,
    written as one function for `torch.compile` to fuse (see `compiled_kernels`).
    """
    zf = z.to(torch.promote_types(z.dtype, torch.float32))
    m = zf.amax(-1, keepdim=True)
    e = torch.exp(zf - m)
    s = e.sum(-1, keepdim=True)
    valid = (y != IGNORE_INDEX)[:, None]
    hit = torch.arange(z.shape[-1], device=z.device)[None, :] == y[:, None]
    grad_out.copy_(torch.where(valid, (e / s - hit.to(e.dtype)) * inv, 0.0))
    logp_y = zf.gather(1, y.clamp_min(0)[:, None]) - m - s.log()
    return torch.where(valid, logp_y, 0.0).squeeze(1)


_use_compiled = contextvars.ContextVar("lmlab_compiled_loss_kernels", default=False)
_compiled_rows = None  # `_softmax_grad_rows` under torch.compile, made on first use


@contextlib.contextmanager
def compiled_kernels(enabled: bool = True):
    """Within this block, the loss's per-chunk softmax and gradient run as one torch.compile'd
    kernel (the Trainer wraps its steps in it when `train.compile` is on)."""
    token = _use_compiled.set(enabled)
    try:
        yield
    finally:
        _use_compiled.reset(token)


def _chunk_kernel():
    global _compiled_rows
    if not _use_compiled.get():
        return None
    if _compiled_rows is None:
        _compiled_rows = torch.compile(_softmax_grad_rows)
    return _compiled_rows


class _LinearCrossEntropy(torch.autograd.Function):
    """The mean nats over the n_valid counted rows (a scalar), or with per_token
    the nats of every row (N,), 0 where y = −100.

    Either way the forward pass stores ∂out/∂z and ∂out/∂h for the upstream
    gradient to scale in backward: a scalar for the mean; for per_token one
    weight per row g_t (e.g. a sequence's gradient, spread over its tokens by
    the `.sum(-1)` that makes "row_sum"), applied as ∂h_t·g_t and
    ∂W = (∂z)ᵀ (h ⊙ g), so the (N, V) gradient is never rescaled.
    """

    @staticmethod
    def forward(ctx, h, w, y, chunk: int, n_valid: int, masked: bool, per_token: bool = False):
        N, V = h.shape[0], w.shape[0]
        grad_h = torch.empty_like(h)
        grad_z = torch.empty(N, V, dtype=h.dtype, device=h.device)
        z = torch.empty(min(chunk, N), V, dtype=h.dtype, device=h.device)
        acc = torch.promote_types(h.dtype, torch.float32)  # the softmax's dtype
        total = torch.zeros((), dtype=acc, device=h.device)
        nats = torch.empty(N, dtype=acc, device=h.device) if per_token else None
        inv = 1.0 if per_token else 1.0 / max(1, n_valid)
        kernel = _chunk_kernel()
        inv_t = torch.tensor(inv, dtype=acc, device=h.device) if kernel else None
        for i in range(0, N, chunk):
            hc, yc = h[i:i + chunk], y[i:i + chunk]
            zc, gc = z[:hc.shape[0]], grad_z[i:i + chunk]
            torch.mm(hc, w.t(), out=zc)
            if kernel is not None:
                picked = kernel(zc, yc, inv_t, gc)
            else:
                logp = torch.log_softmax(zc, -1, dtype=acc)
                ysafe = yc.clamp_min(0)[:, None] if masked else yc[:, None]
                picked = logp.gather(1, ysafe).squeeze(1)
                p = logp.exp_()  # softmax, in place of the log-probabilities
                p.scatter_add_(1, ysafe, torch.full_like(picked, -1.0)[:, None])
                if masked:
                    valid = (yc != IGNORE_INDEX)
                    picked = picked * valid
                    p.mul_(valid[:, None])
                torch.mul(p, inv, out=gc)  # scaled and rounded to the compute dtype in one pass
            if per_token:
                torch.neg(picked, out=nats[i:i + chunk])
            else:
                total -= picked.sum()
            torch.mm(gc, w, out=grad_h[i:i + chunk])
        ctx.save_for_backward(grad_h, grad_z, h)
        return nats if per_token else total * inv

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_z, h = ctx.saved_tensors
        if grad_out.dim() == 0:  # the mean: one scalar scales both gradients
            g = grad_out.to(h.dtype)
            grad_w = (grad_z.t() @ h) * g if ctx.needs_input_grad[1] else None
            return grad_h * g, grad_w, None, None, None, None, None
        g = grad_out.to(torch.promote_types(h.dtype, torch.float32))[:, None]  # per row (N, 1)
        grad_w = grad_z.t() @ (h * g).to(h.dtype) if ctx.needs_input_grad[1] else None
        return (grad_h * g).to(h.dtype), grad_w, None, None, None, None, None


@torch.no_grad()
def _token_nats(h, w, y, chunk: int) -> torch.Tensor:
    acc = torch.promote_types(h.dtype, torch.float32)
    out = torch.empty(h.shape[0], dtype=acc, device=h.device)
    for i in range(0, h.shape[0], chunk):
        logp = torch.log_softmax(h[i:i + chunk] @ w.t(), -1, dtype=acc)
        yc = y[i:i + chunk]
        nats = -logp.gather(1, yc.clamp_min(0)[:, None]).squeeze(1)
        out[i:i + chunk] = nats.masked_fill(yc == IGNORE_INDEX, 0.0)
    return out


# ---- plain or chunked: chosen by measurement (lmlab.model.fastpath)

class _LossKey(NamedTuple):
    rows: int
    vocab: int
    dim: int
    dtype: torch.dtype
    device: str
    grad: bool
    masked: bool
    compiled_kernel: bool


MAX_PLAIN_LOGITS = 2 ** 25  # elements (128 MiB in fp32): above this the chunked loss is kept


def _plain_mean(h, w, y, n_valid: int) -> torch.Tensor:
    """The plain op, `F.cross_entropy(h @ W.T, y)`, with the softmax in fp32 and the
    chunked loss's convention for a batch with no counted position (0, not nan)."""
    z = h @ w.t()
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    total = F.cross_entropy(z, y, ignore_index=IGNORE_INDEX, reduction="sum")
    return total * (1.0 / max(1, n_valid))


def _loss_forward_backward(plain: bool, h, w, y, chunk, n_valid, masked, grad) -> None:
    if grad:  # leaves apart from the model's graph, needing the gradients the model's do
        h, w = (t.detach().requires_grad_(t.requires_grad) for t in (h, w))
    loss = (_plain_mean(h, w, y, n_valid) if plain
            else _LinearCrossEntropy.apply(h, w, y, chunk, n_valid, masked))
    if grad:
        torch.autograd.grad(loss, [t for t in (h, w) if t.requires_grad])


_LOSS_PATHS = {fastpath.PLAIN: functools.partial(_loss_forward_backward, True),
               "chunked": functools.partial(_loss_forward_backward, False)}


def _plain_is_faster(h, w, y, chunk: int, n_valid: int, masked: bool) -> bool:
    """Whether the mean/sum loss goes through `F.cross_entropy` rather than the chunked loss.

    The chunked loss is not CPU-specific, so this holds on every device: once
    per (rows, vocab, dim, dtype, device, grad mode, ...) both are timed on
    this call's inputs (`fastpath.choose`; forward plus backward when a
    gradient is wanted, forward alone otherwise, where the chunked loss's
    gradient in the forward pass is wasted) and the chunked one is kept only
    if it is ≥ 5 % faster. Where the plain op's logits would exceed
    `MAX_PLAIN_LOGITS` elements the chunked loss is kept without timing: it
    exists as much for memory (no (N, V) logits, their fp32 copy and their
    gradient) as for speed.
    """
    grad = torch.is_grad_enabled() and (h.requires_grad or w.requires_grad)
    key = _LossKey(h.shape[0], w.shape[0], h.shape[1], h.dtype, h.device.type, grad, masked,
                   _use_compiled.get())
    name = "linear_cross_entropy"
    if fastpath.mode(name) == "auto" and key.compiled_kernel:
        # under train.compile the chunk kernel is fused, and the plain op would run eager at
        # a graph break. Timed apart the plain op won on an AVX2 EPYC (1.0 vs 1.2 s), but the
        # compiled step with it ran at 391 tok/s against 513 with the fused kernel (one run
        # each, benchmarks/train_throughput.py): the isolated timing does not predict the
        # step, so the fused kernel is kept, as before measurement existed
        fastpath.record(name, key, "chunked", "rule: under train.compile the chunk kernel is fused")
        return False
    if fastpath.mode(name) == "auto" and h.shape[0] * w.shape[0] > MAX_PLAIN_LOGITS:
        fastpath.record(name, key, "chunked",
                        f"rule: the plain op's logits would exceed {MAX_PLAIN_LOGITS:,} elements")
        return False
    return fastpath.choose(name, key, _LOSS_PATHS, h, w, y, chunk, n_valid, masked, grad,
                           sync=fastpath.synchronizer(h.device)) == fastpath.PLAIN


# Runs eager inside a compiled model (its chunks are a Python loop and a custom autograd
# function; `compiled_kernels` compiles the chunk body instead). torch._disable_dynamo
# imports dynamo on the first call, not at import: `torch.compiler.disable` here cost
# every `lmlab` command ~2 s of start-up importing it.
_eager_only = getattr(torch, "_disable_dynamo", None) or torch.compiler.disable


@_eager_only
def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         reduction: str = "mean", chunk_rows: int | None = None) -> torch.Tensor:
    """Cross-entropy of logits `hidden @ weight.T` against `targets`, without making the logits.

    hidden (..., d), weight (V, d), targets (...) with -100 marking positions
    that do not count. reduction "mean" (over counted positions), "sum", and
    "row_sum" — one sum of nats per row of targets (its last dim summed:
    targets (B, T) → (B,); ignored positions count 0, a fully ignored row is 0),
    i.e. −log p(sequence), for DPO and multiple-choice scores — are
    differentiable; "none" returns per-position nats (0 where ignored) without
    gradient, for evaluation. Under autocast the multiplies run in its dtype and
    the softmax in fp32, as `F.cross_entropy(lm_head(h).float(), y)` would.
    """
    dtype = compute_dtype(hidden)
    h = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
    w = weight.to(dtype)
    y = targets.reshape(-1).long()  # gather and scatter index with int64
    chunk = chunk_rows or _chunk_rows(w.shape[0], h.device)
    if reduction not in ("mean", "sum", "row_sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum', 'row_sum' or 'none', not {reduction!r}")
    with torch.autocast(h.device.type, enabled=False):
        if reduction == "none":
            return _token_nats(h, w, y, chunk).view(targets.shape)
        masked = bool((y == IGNORE_INDEX).any())
        n_valid = int((y != IGNORE_INDEX).sum()) if masked else y.numel()
        if reduction == "row_sum":  # per-token nats with gradient, summed over each row
            nats = _LinearCrossEntropy.apply(h, w, y, chunk, n_valid, masked, True)
            return nats.view(targets.shape).sum(-1)
        if chunk_rows is None and _plain_is_faster(h, w, y, chunk, n_valid, masked):
            loss = _plain_mean(h, w, y, n_valid)
        else:
            loss = _LinearCrossEntropy.apply(h, w, y, chunk, n_valid, masked)
    if reduction == "sum":
        return loss * n_valid
    return loss
