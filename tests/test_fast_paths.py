"""The model's fast paths equal the plain computations they replace.

- `linear_cross_entropy` (chunked, gradient computed in the forward pass) vs
  `F.cross_entropy(h @ W.T, y)`: loss and gradients, with ignored positions,
  under bf16 autocast, and as per-token nats for evaluation; with its chunk
  kernel eager and compiled (`compiled_kernels`);
- `causal_attention_blocked` vs SDPA with `is_causal=True`: outputs and gradients,
  eager (mask as a bias in the multiply) and under torch.compile (mask fused
  into the softmax);
- `Linear`'s blocked matrix-vector product vs `F.linear`;
- a training step of the whole model through these paths vs the same model
  computing logits and calling `F.cross_entropy`, with SDPA attention.

Which path runs is chosen by measurement (`lmlab.model.fastpath`), so every
test here runs twice, with LMLAB_FASTPATH forcing the fast paths and then the
plain ops: both must give the plain reference's outputs and gradients.
"""

import pytest
import torch
import torch.nn.functional as F

from lmlab.model import ModelConfig, Transformer, fastpath
from lmlab.model import loss as loss_mod
from lmlab.model.loss import linear_cross_entropy
from lmlab.model.transformer import Linear, causal_attention_blocked


@pytest.fixture(autouse=True, params=["fast", "plain"])
def forced(request, monkeypatch):
    """LMLAB_FASTPATH forcing every choice one way: "fast", then "plain"."""
    monkeypatch.setenv(fastpath.ENV, request.param)
    fastpath.clear()
    yield request.param
    fastpath.clear()


def chosen(name):
    return {d.choice for d in fastpath.decisions() if d.name == name}


def plain_ce(h, w, y):
    return F.cross_entropy((h @ w.t()).view(-1, w.shape[0]), y.reshape(-1))


@pytest.fixture(params=["eager", pytest.param("compiled", marks=pytest.mark.slow)])
def chunk_kernel(request):
    """Run the test with the loss's chunk kernel eager, then compiled by torch.compile."""
    with loss_mod.compiled_kernels(request.param == "compiled"):
        yield request.param


@pytest.mark.parametrize("chunk", [7, 64, None])
def test_linear_cross_entropy_equals_plain(chunk, chunk_kernel, forced):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 50, 24, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(101, 24, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 101, (3, 50), generator=g)
    y[0, :9] = -100  # not counted, as in SFT loss masking
    y[2, -1] = -100
    ref = plain_ce(h, w, y)
    gh, gw = torch.autograd.grad(ref, (h, w))
    got = linear_cross_entropy(h, w, y, chunk_rows=chunk)
    fh, fw = torch.autograd.grad(got, (h, w))
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(fh, gh)
    torch.testing.assert_close(fw, gw)
    # sum, and per-token nats for evaluation
    torch.testing.assert_close(linear_cross_entropy(h, w, y, reduction="sum", chunk_rows=chunk),
                               ref * (y != -100).sum())
    nats = linear_cross_entropy(h, w, y, reduction="none", chunk_rows=chunk)
    plain = F.cross_entropy((h @ w.t()).transpose(1, 2), y, reduction="none")
    torch.testing.assert_close(nats, plain)
    # an explicit chunk_rows always chunks; without one the forced choice is taken
    assert chosen("linear_cross_entropy") == (
        set() if chunk else {"chunked" if forced == "fast" else "plain"})


@pytest.mark.parametrize("chunk", [64, None])
def test_linear_cross_entropy_under_bf16_autocast_matches_plain(chunk, chunk_kernel):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(300, 32, generator=g, requires_grad=True)
    w = (torch.randn(500, 32, generator=g) * 0.1).requires_grad_()
    y = torch.randint(0, 500, (300,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(h, w).float(), y)
    gh, gw = torch.autograd.grad(ref, (h, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(h, w, y, chunk_rows=chunk)
    fh, fw = torch.autograd.grad(got, (h, w))
    assert fh.dtype == h.dtype and fw.dtype == w.dtype  # gradients reach the fp32 leaves
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fh, gh, atol=1e-5, rtol=1e-3)
    torch.testing.assert_close(fw, gw, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("T, compiled", [(1, False), (5, False), (64, False), (65, False),
                                         (200, False), pytest.param(200, True, marks=pytest.mark.slow)])
def test_blocked_causal_attention_equals_sdpa(T, compiled):
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(2, 3, T, 16, generator=g, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    attend = causal_attention_blocked
    if compiled:  # its other branch: the mask fused into the softmax by inductor
        attend = torch.compile(causal_attention_blocked, dynamic=False)
    out = attend(q, k, v, block=32)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(ref, (q, k, v), go)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("rows", [1, 3, 8, 16, 40])
@pytest.mark.parametrize("shape", [(96, 32), (32, 96), (30, 17), (7, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_fast_matvec_equals_f_linear(rows, shape, dtype, forced):
    out_f, in_f = shape
    layer = Linear(in_f, out_f).to(dtype)
    x = torch.randn(rows, 1, in_f, dtype=dtype)
    tol = {} if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), **tol)
        layer.bias = None
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight), **tol)
    eligible = rows <= 16 and out_f % 2 == 0  # weight rows split into 2 or 4 blocks
    assert chosen("linear_matvec") == (
        set() if not eligible else {"blocked" if forced == "fast" else "plain"})


@pytest.mark.parametrize("sdpa_gqa", [True, False])  # False: torch < 2.5, K/V heads repeated
@pytest.mark.parametrize("family", ["gpt2", "llama-gqa"])
def test_training_step_through_fast_paths_equals_plain_model(monkeypatch, family, sdpa_gqa,
                                                             forced):
    import lmlab.model.transformer as tr

    monkeypatch.setattr(tr, "_SDPA_GQA", sdpa_gqa)
    kw = {} if family == "gpt2" else dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu",
                                          n_kv_head=2, tie_embeddings=False, bias=False)
    cfg = ModelConfig(vocab_size=300, n_layer=2, n_head=4, d_model=32, max_seq_len=300, **kw)
    torch.manual_seed(0)
    model = Transformer(cfg)
    x = torch.randint(0, 300, (2, 260))  # > one 128-position attention block
    y = torch.randint(0, 300, (2, 260))
    fast = model(x, targets=y)
    fast_grads = torch.autograd.grad(fast, list(model.parameters()))
    expected = {"fast": ({"blocked"}, {"chunked"}), "plain": ({"plain"}, {"plain"})}[forced]
    assert (chosen("attention"), chosen("linear_cross_entropy")) == expected

    monkeypatch.setattr(tr, "causal_attention_blocked",
                        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    plain = F.cross_entropy(model(x).view(-1, 300), y.view(-1))
    plain_grads = torch.autograd.grad(plain, list(model.parameters()))
    torch.testing.assert_close(fast, plain)
    for a, b in zip(fast_grads, plain_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("sdpa_gqa", [True, False])
@pytest.mark.parametrize("family", ["gpt2", "llama-gqa"])
def test_decode_attention_equals_the_full_forward(monkeypatch, family, sdpa_gqa, forced):
    """One-query decode steps through either attention path give the full forward's logits,
    with and without left padding (the batched generation loop's mask)."""
    import lmlab.model.transformer as tr
    from lmlab.infer import generate_ids

    monkeypatch.setattr(tr, "_SDPA_GQA", sdpa_gqa)
    kw = {} if family == "gpt2" else dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu",
                                          n_kv_head=2, tie_embeddings=False, bias=False)
    cfg = ModelConfig(vocab_size=97, n_layer=2, n_head=4, d_model=32, max_seq_len=64, **kw)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    x = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        full = model(x)
        state = model.new_decode_state(2, 30)
        steps = [model.decode_step(x[:, :5], state)]
        steps += [model.decode_step(x[:, t:t + 1], state) for t in range(5, 30)]
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 4:], atol=1e-5, rtol=1e-5)
    assert chosen("decode_attention") == {"matmul" if forced == "fast" else "plain"}
    prompts = [x[0, :9].tolist(), x[1, :3].tolist()]  # padded in a batch of two
    batched = generate_ids(model, prompts, 12, temperature=0, eos_id=None)
    assert batched == [generate_ids(model, p, 12, temperature=0, eos_id=None) for p in prompts]
