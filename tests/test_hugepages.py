"""Weights in huge pages (`lmlab.model.hugepages`): moved, never changed.

`place` copies a model's CPU parameters into one 2 MiB-aligned arena. What must hold:
every parameter lands there with the same values and stays the same Parameter object
(tied weights stay tied, an optimizer keeps working), decoding gives the same tokens bit
for bit, a second call moves nothing, a deep copy is a model of its own, and
LMLAB_FASTPATH=hugepages=plain leaves the weights where they are.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lmlab.infer import generate_ids
from lmlab.model import Transformer, fastpath, hugepages, preset

pytestmark = pytest.mark.skipif(hugepages.thp_mode() not in ("always", "madvise"),
                                reason="the kernel has no transparent huge pages here")


def make() -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("tiny", vocab_size=97, d_model=64, n_head=4,
                              max_seq_len=64)).eval()


@pytest.fixture(autouse=True)
def auto(monkeypatch):
    monkeypatch.setattr(hugepages, "MIN_BYTES", 0)  # the tiny test models too
    monkeypatch.delenv(fastpath.ENV, raising=False)
    fastpath.clear()
    yield
    fastpath.clear()


def test_place_moves_every_parameter_into_one_aligned_arena_unchanged():
    model = make()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    objects = {n: p for n, p in model.named_parameters()}
    assert not hugepages.placed(model)
    assert hugepages.place(model)
    assert hugepages.placed(model)
    lo, hi = model.__dict__[hugepages._SPAN]
    assert lo % hugepages.HUGE == 0
    for n, p in model.named_parameters():
        assert p is objects[n]  # the same Parameter, new memory
        assert lo <= p.data_ptr() < hi
        assert p.data_ptr() % 64 == 0
        assert torch.equal(p, before[n]), n
    assert model.lm_head.weight is model.tok_emb.weight  # a tied head stays tied
    ptrs = [p.data_ptr() for p in model.parameters()]
    assert hugepages.place(model)  # already there: nothing moves
    assert [p.data_ptr() for p in model.parameters()] == ptrs


def test_decoding_places_the_weights_and_gives_the_same_tokens():
    model, ref = make(), make()
    fastpath.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hugepages, "place", lambda m: False)  # the reference stays put
        want = generate_ids(ref, [[1, 2, 3], [4, 5]], 12, temperature=0)
    assert not hugepages.placed(ref)
    got = generate_ids(model, [[1, 2, 3], [4, 5]], 12, temperature=0)
    assert hugepages.placed(model)  # the first CPU inference step placed them
    assert got == want


def test_a_placed_model_trains_and_copies():
    model = make()
    hugepages.place(model)
    twin = copy.deepcopy(model)
    assert not hugepages.placed(twin)  # its own memory, not the arena's
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 97, (2, 16))
    losses = []
    for _ in range(5):
        loss = model(ids[:, :-1], targets=ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert hugepages.placed(model)  # the optimizer updated the arena in place
    assert not torch.equal(model.tok_emb.weight, twin.tok_emb.weight)


def test_small_weights_stay_where_they_are(monkeypatch):
    monkeypatch.setattr(hugepages, "MIN_BYTES", 8 << 20)
    model = make()  # ~30 KB of weights
    ptrs = [p.data_ptr() for p in model.parameters()]
    assert not hugepages.place(model)
    assert [p.data_ptr() for p in model.parameters()] == ptrs


def test_hugepages_plain_leaves_the_weights_where_they_are(monkeypatch):
    monkeypatch.setenv(fastpath.ENV, "hugepages=plain")
    fastpath.clear()
    model = make()
    ptrs = [p.data_ptr() for p in model.parameters()]
    assert not hugepages.place(model)
    generate_ids(model, [1, 2, 3], 4, temperature=0)
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert any(d.name == "hugepages" and d.choice == fastpath.PLAIN
               for d in fastpath.decisions())
