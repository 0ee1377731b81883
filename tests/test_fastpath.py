"""`lmlab.model.fastpath` chooses fast paths by measurement and keeps the plain op otherwise.

- the selector: the faster candidate wins, a tie (within the 5 % margin)
  keeps the plain op, decisions are cached per key (and per thread count),
  LMLAB_FASTPATH forces either side, nothing is measured under torch.compile;
  timed with a fake clock where exact times matter, with a sleeping candidate
  where a real one does;
- in place (`run`): every call returns its candidate's real result, and the
  choice follows the schedule's timings;
- the model's paths go through it: Linear's matrix-vector product, CPU
  training attention, the loss (and its memory rule), `keep_freed_memory`.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from lmlab.model import ModelConfig, Transformer, fastpath
from lmlab.model import loss as loss_mod
from lmlab.model import transformer as tr
from lmlab.model.loss import linear_cross_entropy
from lmlab.model.transformer import Linear


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.delenv(fastpath.ENV, raising=False)
    fastpath.clear()
    yield
    fastpath.clear()


def force(monkeypatch, value):
    """Set LMLAB_FASTPATH, to be read again on the next choice (it is read once, then cached)."""
    monkeypatch.setenv(fastpath.ENV, value)
    fastpath._modes = None  # `fresh` clears it again before the environment is restored


class FakeClock:
    """perf_counter for fastpath: candidates advance it by what they 'take'."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now

    def takes(self, seconds, calls=None, result=None):
        def candidate(*args):
            self.now += seconds
            if calls is not None:
                calls.append(args)
            return result
        return candidate


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(fastpath, "time", c)
    return c


@pytest.mark.parametrize("fast_s, expected", [(0.50, "fast"), (0.94, "fast"), (0.96, "plain"),
                                              (1.00, "plain"), (1.50, "plain")])
def test_choose_needs_a_clear_margin_to_leave_the_plain_op(clock, fast_s, expected):
    got = fastpath.choose("op", (1,), {"plain": clock.takes(1e-3), "fast": clock.takes(fast_s * 1e-3)})
    assert got == expected
    (d,) = fastpath.decisions()
    assert (d.name, d.key, d.choice, d.how) == ("op", (1,), expected, "measured")
    assert d.seconds == pytest.approx({"plain": 1e-3, "fast": fast_s * 1e-3})


def test_choose_picks_the_best_of_several_and_times_them_interleaved(clock):
    order = []
    cands = {name: (lambda name, s: lambda: (order.append(name), clock.takes(s)()))(name, s)
             for name, s in (("plain", 3e-3), ("a", 2e-3), ("b", 1e-3))}
    assert fastpath.choose("op", ("k",), cands, repeats=4, min_repeats=4) == "b"
    warmup, rounds = order[:3], order[3:]
    assert warmup == ["plain", "a", "b"] and len(rounds) == 12
    assert rounds[:3] == ["b", "a", "plain"] and rounds[3:6] == ["plain", "a", "b"]


def test_a_really_slow_candidate_loses_either_way():
    slow = lambda: time.sleep(0.01)  # noqa: E731
    quick = lambda: None  # noqa: E731
    assert fastpath.choose("op", ("fast slow",), {"plain": quick, "fast": slow}) == "plain"
    assert fastpath.choose("op", ("plain slow",), {"plain": slow, "fast": quick}) == "fast"


def test_choice_is_cached_per_key_and_thread_count(clock):
    calls = []
    cands = {"plain": clock.takes(2e-3, calls), "fast": clock.takes(1e-3, calls)}
    assert fastpath.choose("op", (4, torch.float32), cands, 7) == "fast"
    n = len(calls)
    assert n >= 2 * (1 + 3) and all(args == (7,) for args in calls)
    assert fastpath.choose("op", (4, torch.float32), cands, 7) == "fast"
    assert len(calls) == n  # cached: nothing timed again
    fastpath.choose("op", (4, torch.bfloat16), cands, 7)
    assert len(calls) == 2 * n  # another key is measured afresh
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        fastpath.choose("op", (4, torch.float32), cands, 7)
        assert len(calls) == 3 * n  # and so is another thread count
    finally:
        torch.set_num_threads(threads)
    assert len(fastpath.decisions()) == 3


def test_decisions_survive_a_checkpoint_round_trip_and_replace_a_new_measurement(clock):
    """A resumed run computes with the paths the saved run chose (bit-identical losses)."""
    import json

    from collections import namedtuple

    Key = namedtuple("Key", "rows dtype grad")
    slow_plain = {"plain": clock.takes(2e-3), "fast": clock.takes(1e-3)}
    assert fastpath.choose("op", Key(8, torch.bfloat16, True), slow_plain) == "fast"
    saved = json.loads(json.dumps(fastpath.export_decisions()))  # as trainer_state.pt holds it
    fastpath.clear()
    slow_fast = {"plain": clock.takes(1e-3), "fast": clock.takes(2e-3)}
    assert fastpath.choose("op", Key(8, torch.bfloat16, True), slow_fast) == "plain"
    assert fastpath.adopt_decisions(saved) == 1
    calls = []
    counted = {"plain": clock.takes(1e-3, calls), "fast": clock.takes(2e-3, calls)}
    assert fastpath.choose("op", Key(8, torch.bfloat16, True), counted) == "fast"
    assert calls == []  # adopted, not measured again
    (d,) = fastpath.decisions()
    assert d.how == "adopted from a checkpoint"


def test_env_forces_either_side_without_measuring(monkeypatch, clock):
    calls = []
    cands = {"plain": clock.takes(1e-3, calls), "fast": clock.takes(9e-3, calls)}
    force(monkeypatch, "fast")
    assert fastpath.choose("op", (1,), cands) == "fast"  # though it is slower
    force(monkeypatch, "plain")
    assert fastpath.choose("op", (1,), {"plain": cands["fast"], "fast": cands["plain"]}) == "plain"
    force(monkeypatch, "other=plain, op=fast")
    assert fastpath.choose("op", (1,), cands) == "fast"
    assert fastpath.mode("other") == "plain" and fastpath.mode("third") == "auto"
    force(monkeypatch, "plain,op=auto")
    assert fastpath.mode("op") == "auto" and fastpath.mode("third") == "plain"
    assert calls == []
    assert {(d.choice, d.how.startswith("forced")) for d in fastpath.decisions()} == {
        ("fast", True), ("plain", True)}
    assert fastpath.run("op", (1,), cands) is None and calls  # auto again for "op": measuring
    force(monkeypatch, "quick")
    with pytest.raises(ValueError, match="quick"):
        fastpath.mode("op")


def test_env_is_read_once_until_clear(monkeypatch):
    force(monkeypatch, "plain")
    assert fastpath.mode("op") == "plain"
    monkeypatch.setenv(fastpath.ENV, "fast")
    assert fastpath.mode("op") == "plain"  # cached
    fastpath.clear()
    assert fastpath.mode("op") == "fast"


def test_nothing_is_measured_while_compiling(monkeypatch, clock):
    calls = []
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    cands = {"plain": clock.takes(9e-3, calls, "p"), "fast": clock.takes(1e-3, calls, "f")}
    assert fastpath.choose("op", (1,), cands) == "plain"
    assert fastpath.run("op", (1,), cands) == "p"
    assert len(calls) == 1 and fastpath.decisions() == []
    # the model's attention keeps its compiled-branch rule: blocked, unmeasured
    q = torch.randn(1, 2, 8, 4)
    assert tr._blocked_attention_wins(q, q, q) and fastpath.decisions() == []


def test_run_measures_in_place_and_returns_real_results(clock):
    results = []
    cands = {"plain": lambda x: (clock.takes(3e-3)(), ("plain", x))[1],
             "fast": lambda x: (clock.takes(1e-3)(), ("fast", x))[1]}
    for i in range(2 + 2 * 5):  # warm-up call each, then 5 rounds
        results.append(fastpath.run("op", (1,), cands, i))
        assert (fastpath.decisions() == []) == (i < 11)
    assert [x for _, x in results] == list(range(12))  # each call did its own work
    assert sorted(n for n, _ in results) == ["fast"] * 6 + ["plain"] * 6
    (d,) = fastpath.decisions()
    assert d.choice == "fast" and d.seconds == pytest.approx({"plain": 3e-3, "fast": 1e-3})
    assert all(fastpath.run("op", (1,), cands, i)[0] == "fast" for i in range(5))
    assert "op [1; " in fastpath.report() and "3.00x" in fastpath.report()


def test_run_from_several_threads_decides_once_and_returns_every_result(clock):
    import threading

    cands = {"plain": lambda i: ("plain", i), "fast": lambda i: ("fast", i)}
    results, errors = {}, []

    def worker(t):
        try:
            for i in range(20):
                results[t, i] = fastpath.run("op", (1,), cands, (t, i))[1]
        except Exception as e:  # noqa: BLE001 - any error fails the test below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and all(v == k for k, v in results.items()) and len(results) == 80
    assert [d.name for d in fastpath.decisions()] == ["op"]


def test_linear_matvec_keeps_f_linear_where_the_blocked_product_loses(monkeypatch):
    slow = tr._MATVEC_PATHS["blocked"]

    def slower(*args):
        time.sleep(0.005)
        return slow(*args)

    monkeypatch.setitem(tr._MATVEC_PATHS, "blocked", slower)
    layer = Linear(64, 128)
    x = torch.randn(2, 64)
    with torch.no_grad():
        for _ in range(20):
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    (d,) = fastpath.decisions()
    assert d.name == "linear_matvec" and d.choice == "plain"
    assert d.key == (2, 64, 128, torch.float32, True)
    assert "linear_matvec [rows=2, in_features=64, out_features=128, dtype=float32, bias=True" \
        in fastpath.report()
    calls = []
    monkeypatch.setitem(tr._MATVEC_PATHS, "blocked", lambda *a: calls.append(a))
    with torch.no_grad():
        layer(x)
    assert calls == []  # decided: the blocked product is not run again


def test_linear_matvec_is_only_considered_without_autograd_for_few_rows():
    layer = Linear(64, 128)
    layer(torch.randn(2, 64))  # autograd: F.linear, nothing to choose
    with torch.no_grad():
        layer(torch.randn(17, 64))  # too many rows
        Linear(64, 127)(torch.randn(1, 64))  # no row blocks
    assert fastpath.decisions() == []


def tiny_model():
    cfg = ModelConfig(vocab_size=300, n_layer=2, n_head=4, d_model=32, max_seq_len=300)
    torch.manual_seed(0)
    return Transformer(cfg)


@pytest.mark.parametrize("mode, blocked", [("fast", True), ("plain", False)])
def test_training_attention_follows_the_forced_choice(monkeypatch, mode, blocked):
    force(monkeypatch, mode)
    used = []
    real = tr.causal_attention_blocked
    monkeypatch.setattr(tr, "causal_attention_blocked", lambda *a: used.append(1) or real(*a))
    model = tiny_model()
    x = torch.randint(0, 300, (2, 40))
    model(x, targets=x).backward()
    assert bool(used) == blocked
    assert {d.choice for d in fastpath.decisions() if d.name == "attention"} == {
        "blocked" if blocked else "plain"}


def test_training_attention_is_measured_forward_and_backward(monkeypatch):
    model = tiny_model()
    x = torch.randint(0, 300, (2, 40))
    model(x, targets=x).backward()
    (d,) = [d for d in fastpath.decisions() if d.name == "attention"]
    assert d.how == "measured" and set(d.seconds) == {"plain", "blocked"}
    assert d.key == tr._AttentionKey(2, 4, 4, 40, 8, torch.float32, torch.float32)
    with torch.no_grad():  # generation and evaluation: SDPA, nothing measured
        model(x)
    assert len([d for d in fastpath.decisions() if d.name == "attention"]) == 1


def test_loss_chooses_per_grad_mode_and_keeps_chunked_for_large_logits(monkeypatch):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(64, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    y = torch.randint(0, 50, (64,), generator=g)
    ref = F.cross_entropy(h @ w.t(), y)
    torch.testing.assert_close(linear_cross_entropy(h, w, y), ref)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, y), ref.detach())
    ds = [d for d in fastpath.decisions() if d.name == "linear_cross_entropy"]
    assert sorted(d.key.grad for d in ds) == [False, True]
    assert all(d.how == "measured" and set(d.seconds) == {"plain", "chunked"} for d in ds)

    fastpath.clear()
    monkeypatch.setattr(loss_mod, "MAX_PLAIN_LOGITS", 64 * 50 - 1)
    monkeypatch.setattr(loss_mod, "_plain_mean", None)  # would fail if called
    torch.testing.assert_close(linear_cross_entropy(h, w, y), ref)
    (d,) = fastpath.decisions()
    assert d.choice == "chunked" and d.how.startswith("rule") and not d.seconds


def test_forced_plain_loss_is_f_cross_entropy(monkeypatch):
    force(monkeypatch, "linear_cross_entropy=plain")
    monkeypatch.setattr(loss_mod._LinearCrossEntropy, "apply", None)  # would fail if called
    g = torch.Generator().manual_seed(1)
    h = torch.randn(30, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(20, 8, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 20, (30,), generator=g)
    y[:5] = -100
    got = linear_cross_entropy(h, w, y, reduction="sum")
    torch.testing.assert_close(got, F.cross_entropy(h @ w.t(), y, reduction="sum"))
    y[:] = -100  # nothing counted: 0, as the chunked loss gives, not nan
    assert linear_cross_entropy(h, w, y).item() == 0.0


def test_keep_freed_memory_is_a_recorded_rule(monkeypatch):
    from lmlab.train import distributed

    monkeypatch.setattr(distributed, "_allocator_tuned", False)
    force(monkeypatch, "keep_freed_memory=plain")
    assert distributed.keep_freed_memory() is False
    (d,) = fastpath.decisions()
    assert (d.name, d.choice) == ("keep_freed_memory", "plain") and "forced" in d.how


def test_loss_keeps_the_fused_chunk_kernel_under_train_compile(monkeypatch):
    """Under compiled_kernels (train.compile) the chunked loss is kept by rule, untimed."""
    timed = []
    monkeypatch.setattr(fastpath, "choose", lambda *a, **k: timed.append(a) or fastpath.PLAIN)
    h = torch.randn(64, 16, requires_grad=True)
    w = torch.randn(40, 16, requires_grad=True)
    y = torch.randint(0, 40, (64,))
    with loss_mod.compiled_kernels(True):
        assert not loss_mod._plain_is_faster(h, w, y, 32, 64, False)
    assert timed == []
    (d,) = [d for d in fastpath.decisions() if d.name == "linear_cross_entropy"]
    assert d.choice == "chunked" and "train.compile" in d.how
    assert loss_mod._plain_is_faster(h, w, y, 32, 64, False)  # eager: measured (here: plain)
    assert len(timed) == 1
