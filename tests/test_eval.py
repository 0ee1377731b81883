"""lmlab.eval and the loss's per-sequence reduction.

- `linear_cross_entropy(..., reduction="row_sum")` equals the plain
  `F.cross_entropy(logits, y, reduction="none").sum(-1)` in value and in its
  gradients w.r.t. hidden states and weight, under a random upstream gradient
  per row (fp32 tightly, bf16 autocast loosely; chunk kernel eager and
  compiled); fully masked rows give 0; `sequence_logprobs` through a model;
- compressor baselines: the sizes the libraries themselves write, round trips,
  xz ahead of zlib where repeats lie beyond DEFLATE's 32 KiB window, empty input;
- bits per byte and perplexity on numbers known in closed form.
"""

import bz2
import lzma
import math
import random
import zlib

import pytest
import torch
import torch.nn.functional as F

from lmlab.eval import (COMPRESSORS, baselines, bits_per_byte, compress,
                        compressor_bits_per_byte, perplexity, sequence_logprobs)
from lmlab.model import ModelConfig, Transformer
from lmlab.model import loss as loss_mod
from lmlab.model.loss import linear_cross_entropy


@pytest.fixture(params=["eager", pytest.param("compiled", marks=pytest.mark.slow)])
def chunk_kernel(request):
    """Run the test with the loss's chunk kernel eager, then compiled by torch.compile."""
    with loss_mod.compiled_kernels(request.param == "compiled"):
        yield request.param


def plain_row_sum(h, w, y):
    """The reference: full logits, per-token nats, summed over each row."""
    logits = F.linear(h, w)  # bf16 under autocast: the softmax in fp32, as training does
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    nats = F.cross_entropy(logits.reshape(-1, w.shape[0]), y.reshape(-1), reduction="none",
                           ignore_index=-100)
    return nats.view(y.shape).sum(-1)


def make(seed, B=4, T=37, d=24, V=101, dtype=torch.float32, mask=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, d, generator=g, dtype=dtype, requires_grad=True)
    w = (torch.randn(V, d, generator=g, dtype=dtype) * 0.5).requires_grad_()
    y = torch.randint(0, V, (B, T), generator=g)
    if mask:
        y[0, :11] = -100  # a prompt that does not count
        y[1] = -100  # a row with nothing to count
        y[2, -3:] = -100  # padding at the end
    upstream = torch.randn(B, generator=g, dtype=dtype)  # e.g. DPO's per-sequence weights
    return h, w, y, upstream


@pytest.mark.parametrize("mask", [True, False])
@pytest.mark.parametrize("chunk", [5, 64, None])
def test_row_sum_equals_plain_in_value_and_gradient(chunk, mask, chunk_kernel):
    h, w, y, up = make(0, mask=mask)
    ref = plain_row_sum(h, w, y)
    gh, gw = torch.autograd.grad(ref, (h, w), up)
    got = linear_cross_entropy(h, w, y, reduction="row_sum", chunk_rows=chunk)
    assert got.shape == (4,) and got.dtype == torch.float32
    fh, fw = torch.autograd.grad(got, (h, w), up)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(fh, gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fw, gw, rtol=1e-5, atol=1e-6)
    if mask:  # the fully masked row: no nats and no gradient
        assert got[1].item() == 0.0
        assert fh[1].abs().max().item() == 0.0


def test_row_sum_gradient_is_per_row_not_scalar():
    """A row whose upstream gradient is 0 must get no gradient (a scalar-scaled backward would)."""
    h, w, y, _ = make(1, mask=False)
    up = torch.tensor([1.0, 0.0, -2.0, 0.5])
    got = linear_cross_entropy(h, w, y, reduction="row_sum", chunk_rows=16)
    (fh,) = torch.autograd.grad(got, (h,), up)
    assert fh[1].abs().max().item() == 0.0
    assert fh[0].abs().max().item() > 0.0
    # row 2's gradient is -2x what it is alone with weight 1
    alone = linear_cross_entropy(h, w, y, reduction="row_sum", chunk_rows=16)
    (g1,) = torch.autograd.grad(alone, (h,), torch.tensor([0.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(fh[2], -2 * g1[2])


def test_row_sum_agrees_with_sum_and_mean():
    h, w, y, _ = make(2)
    rows = linear_cross_entropy(h, w, y, reduction="row_sum", chunk_rows=8)
    total = linear_cross_entropy(h, w, y, reduction="sum", chunk_rows=8)
    torch.testing.assert_close(rows.sum(), total)
    nats = linear_cross_entropy(h, w, y, reduction="none", chunk_rows=8)
    torch.testing.assert_close(rows, nats.sum(-1))


def test_row_sum_keeps_leading_dims():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 3, 9, 8, generator=g, requires_grad=True)
    w = torch.randn(31, 8, generator=g, requires_grad=True)
    y = torch.randint(0, 31, (2, 3, 9), generator=g)
    y[1, 2] = -100
    got = linear_cross_entropy(h, w, y, reduction="row_sum", chunk_rows=7)
    ref = plain_row_sum(h, w, y)
    assert got.shape == (2, 3)
    torch.testing.assert_close(got, ref)
    up = torch.randn(2, 3, generator=g)
    for a, b in zip(torch.autograd.grad(got, (h, w), up), torch.autograd.grad(ref, (h, w), up)):
        torch.testing.assert_close(a, b)


def test_row_sum_under_bf16_autocast_matches_plain(chunk_kernel):
    h, w, y, up = make(4, B=6, T=50, d=32, V=300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = plain_row_sum(h, w, y)
    gh, gw = torch.autograd.grad(ref, (h, w), up)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(h, w, y, reduction="row_sum", chunk_rows=64)
    fh, fw = torch.autograd.grad(got, (h, w), up)
    assert fh.dtype == h.dtype and fw.dtype == w.dtype  # gradients reach the fp32 leaves
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-3)
    # bf16 rounds in a different order here (the per-row weight after the multiply): agree to
    # a few bf16 steps (gradients are O(1)), and be no further than the plain path from fp64
    torch.testing.assert_close(fh, gh, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(fw, gw, rtol=1e-2, atol=1e-2)
    assert got[1].item() == 0.0 and fh[1].abs().max().item() == 0.0
    h64, w64 = (t.detach().double().requires_grad_() for t in (h, w))
    true = torch.autograd.grad(plain_row_sum(h64, w64, y), (h64, w64), up.double())
    for ours, plain, t in zip((fh, fw), (gh, gw), true):
        assert (ours.double() - t).norm() <= 1.1 * (plain.double() - t).norm()


def test_unknown_reduction_is_refused():
    h, w, y, _ = make(5)
    with pytest.raises(ValueError, match="row_sum"):
        linear_cross_entropy(h, w, y, reduction="rows")


def test_sequence_logprobs_through_the_model():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=97, n_layer=2, n_head=4, d_model=32,
                                    max_seq_len=64))
    ids = torch.randint(0, 97, (3, 20))
    targets = torch.roll(ids, -1, 1)
    targets[:, :6] = -100  # score the completion only
    targets[:, -1] = -100
    got = sequence_logprobs(model, ids, targets)
    logp = torch.log_softmax(model(ids).float(), -1)
    ref = torch.where(targets != -100, logp.gather(-1, targets.clamp_min(0)[..., None])[..., 0],
                      0.0).sum(-1)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert (got < 0).all()
    up = torch.tensor([1.0, -1.0, 0.5])
    params = [p for p in model.parameters()]
    for a, b in zip(torch.autograd.grad(got, params, up), torch.autograd.grad(ref, params, up)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------ compressor baselines

def redundant_text(seed=0) -> bytes:
    """A 48 KiB block of random words, four times: each repeat lies beyond DEFLATE's window."""
    rnd = random.Random(seed)
    words = ["".join(rnd.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(2, 9)))
             for _ in range(2000)]
    block = " ".join(rnd.choice(words) for _ in range(9000)).encode()[:48 * 1024]
    return block * 4


def test_compressor_sizes_are_the_libraries_own():
    data = redundant_text()
    expect = {
        "xz": lzma.compress(data, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME),
        "bz2": bz2.compress(data, compresslevel=9),
        "zlib": zlib.compress(data, level=9),
    }
    unpack = {"xz": lzma.decompress, "bz2": bz2.decompress, "zlib": zlib.decompress}
    assert set(COMPRESSORS) == set(expect)
    for name, packed in expect.items():
        assert compress(data, name) == packed
        assert unpack[name](compress(data, name)) == data
        assert compressor_bits_per_byte(data, name) == 8 * len(packed) / len(data)
    assert baselines(data) == {n: 8 * len(p) / len(data) for n, p in expect.items()}


def test_xz_beats_zlib_on_redundant_text():
    b = baselines(redundant_text(1))
    assert b["xz"] < 0.5 * b["zlib"]  # xz's window sees the repeats; zlib's 32 KiB cannot
    assert 0 < b["xz"] < 8 and 0 < b["zlib"] < 8 and 0 < b["bz2"] < 8


def test_compressors_on_empty_and_unknown():
    assert all(math.isnan(v) for v in baselines(b"").values())
    assert math.isnan(compressor_bits_per_byte(b"", "zlib"))
    with pytest.raises(ValueError, match="unknown compressor"):
        compressor_bits_per_byte(b"abc", "gzip")
    with pytest.raises(ValueError, match="unknown compressor"):
        compressor_bits_per_byte(b"", "gzip")


# ------------------------------------------------------------ bits per byte, perplexity

def test_bits_per_byte_known_numbers():
    # a model uniform over 256 byte values spends ln 256 nats = 8 bits on every byte
    n = 1000
    logits = torch.zeros(n, 256)
    y = torch.randint(0, 256, (n,))
    nats = F.cross_entropy(logits, y, reduction="sum").item()
    assert bits_per_byte(nats, n) == pytest.approx(8.0, rel=1e-6)
    # the same total over tokens of 2 bytes each: still 8 bits per byte
    assert bits_per_byte(n * 2 * math.log(256), 2 * n) == pytest.approx(8.0)
    assert bits_per_byte(math.log(2), 1) == pytest.approx(1.0)
    assert bits_per_byte(0.0, 10) == 0.0
    assert math.isnan(bits_per_byte(5.0, 0))
    with pytest.raises(ValueError):
        bits_per_byte(1.0, -1)


def test_perplexity_known_numbers():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(256)) == pytest.approx(256.0)  # uniform over 256 values
    assert perplexity(3.0) == pytest.approx(20.0855, rel=1e-5)
    assert perplexity(1e4) == math.inf  # beyond a float: inf, not OverflowError
    assert perplexity(709.0) == pytest.approx(math.exp(709.0))
    assert math.isnan(perplexity(math.nan))
    assert perplexity(torch.tensor(math.log(50.0))) == pytest.approx(50.0)
