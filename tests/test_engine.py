"""The engine: continuous batching gives each request what it would get alone.

References: one-at-a-time greedy decoding, a full forward's log-softmax, transformers'
logits processors, and the single-row filters of lmlab.infer.sampling.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from lmlab.infer import generate_ids
from lmlab.infer.engine import Engine, QueueFull, SamplingParams
from lmlab.infer.sampling import (
    GenerationError, penalize_repeats, sample_rows, top_k_filter, top_p_filter,
)
from lmlab.model import Transformer, model_class, preset

pytestmark = pytest.mark.usefixtures("plain_ops")  # conftest: unmeasured ops, one thread


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request):
    torch.manual_seed(0)
    kind = "llama-tiny" if request.param == "llama" else "tiny"
    return Transformer(preset(kind, vocab_size=300, d_model=64, n_head=4, max_seq_len=96)).eval()


PROMPTS = [[1, 2, 3], [5] * 11, [7, 8], [9, 4] * 10, [11, 12, 13, 14], [3], [6] * 30]


def greedy(max_tokens, **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=0, stop_ids=(), **kw)


def test_requests_joining_and_leaving_get_their_one_at_a_time_tokens(model):
    """max_batch 3, seven requests of different lengths and budgets, four submitted later
    while others run: every request's tokens equal its own greedy decode, token for token."""
    budgets = [30, 5, 17, 9, 40, 1, 12]
    alone = [generate_ids(model, p, n, temperature=0) for p, n in zip(PROMPTS, budgets)]
    engine = Engine(model, max_batch=3)
    sizes = []
    decode = model.decode_slots

    def counting(ids, slots):
        sizes.append(ids.shape[0])
        return decode(ids, slots)

    model.decode_slots = counting
    try:
        reqs = [engine.submit(p, greedy(n)) for p, n in zip(PROMPTS[:3], budgets[:3])]
        for step in range(100):
            if step in (2, 4, 6, 9):  # joins mid-run
                i = len(reqs)
                reqs.append(engine.submit(PROMPTS[i], greedy(budgets[i])))
            if not engine.step() and len(reqs) == len(PROMPTS):
                break
    finally:
        del model.decode_slots
    assert [r.result().token_ids for r in reqs] == alone
    assert max(sizes) == 3 and min(sizes) >= 1
    # a finished row is not computed: the batch never holds more rows than are running
    assert sum(sizes) == sum(budgets) - len(budgets)  # every token but each first (prefill)


def test_a_cancelled_request_frees_its_slot_at_the_next_step(model):
    engine = Engine(model, max_batch=2)
    a, b = engine.submit([1, 2], greedy(50)), engine.submit([3, 4], greedy(50))
    waiting = engine.submit([5, 6], greedy(3))
    engine.step()
    engine.step()
    assert engine.stats()["running"] == 2 and engine.stats()["queue_depth"] == 1
    a.cancel()
    engine.step()  # a leaves before the decode; the waiting request takes its slot
    assert a.result().finish_reason == "cancelled" and len(a.result().token_ids) == 2
    assert engine.stats()["queue_depth"] == 0
    assert engine.stats()["running"] == 2
    while engine.step():
        pass
    assert waiting.result().token_ids == generate_ids(model, [5, 6], 3, temperature=0)
    assert b.result().token_ids == generate_ids(model, [3, 4], 50, temperature=0)


def test_the_same_seed_gives_the_same_tokens_alone_and_in_a_batch(model):
    kw = dict(max_tokens=25, temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.3)
    alone = Engine(model).generate([PROMPTS[1]], SamplingParams(seed=7, **kw))[0].token_ids
    engine = Engine(model, max_batch=4)
    params = [SamplingParams(seed=100 + i, **kw) for i in range(len(PROMPTS))]
    params[1] = SamplingParams(seed=7, **kw)
    params[3] = greedy(25)  # a greedy row in the same batch
    out = engine.generate(PROMPTS, params)
    assert out[1].token_ids == alone
    assert out[3].token_ids == generate_ids(model, PROMPTS[3], 25, temperature=0)
    other = Engine(model).generate([PROMPTS[1]], SamplingParams(seed=8, **kw))[0].token_ids
    assert other != alone


def test_logprobs_are_the_full_forwards_log_softmax(model):
    prompt = PROMPTS[3]
    r = Engine(model).generate([prompt], SamplingParams(max_tokens=12, temperature=1.0, seed=1,
                                                       logprobs=True, top_logprobs=3,
                                                       stop_ids=()))[0]
    seq = torch.tensor([prompt + r.token_ids])
    with torch.no_grad():
        ref = torch.log_softmax(model(seq)[0].float(), -1)[len(prompt) - 1:-1]
    got = torch.tensor([lp.logprob for lp in r.logprobs])
    want = ref.gather(1, torch.tensor(r.token_ids)[:, None]).squeeze(1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for lp, row in zip(r.logprobs, ref):
        values, ids = row.topk(3)
        assert [t[0] for t in lp.top] == ids.tolist()
        torch.testing.assert_close(torch.tensor([t[2] for t in lp.top]), values, atol=1e-5,
                                   rtol=0)


def test_per_row_filters_equal_the_single_row_filters_and_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    # one row at a time through top_k_filter / top_p_filter: the support of sample_rows
    settings = [(0.7, 5, 0.8), (1.3, 0, 0.5), (1.0, 20, 1.0)]
    temp = torch.tensor([s[0] for s in settings])
    top_k = torch.tensor([s[1] for s in settings])
    top_p = torch.tensor([s[2] for s in settings])
    for i, (t, k, p) in enumerate(settings):
        z = logits[i:i + 1] / t
        z = top_k_filter(z, k) if k else z
        want = torch.softmax(top_p_filter(z, p), -1)[0]
        u = torch.rand(20000, dtype=torch.float64)
        draws = sample_rows(logits[i:i + 1].expand(20000, 50), temp[i].expand(20000), u,
                            top_k[i].expand(20000), top_p[i].expand(20000))
        freq = torch.bincount(draws, minlength=50).float() / 20000
        assert set(draws.tolist()) <= set(want.nonzero().flatten().tolist())
        assert (freq - want).abs().max() < 0.015
    # greedy rows in a sampled batch are argmax
    out = sample_rows(logits, torch.tensor([0.0, 1.0, 0.0]), torch.rand(3, dtype=torch.float64))
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()
    # the repetition penalty is transformers' (CTRL)
    ids = torch.tensor([[1, 4, 4, 9], [2, 3, 30, 31], [0, 0, 0, 0]])
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, ids, True)
    for theta in (1.2, 0.8):
        want = RepetitionPenaltyLogitsProcessor(theta)(ids, logits.clone())
        got = penalize_repeats(logits, seen, torch.full((3,), theta))
        torch.testing.assert_close(got, want)


def test_stop_strings_are_held_back_and_cut_and_the_pieces_are_the_decoded_text(chat_model_dir):
    import lmlab

    lm = lmlab.load(chat_model_dir)
    engine = Engine(lm.model, lm.tokenizer)
    prompt = "北京、上海和深圳"
    full = engine.generate([prompt], SamplingParams(max_tokens=40, temperature=0,
                                                    stop_ids=()))[0]
    text = full.text
    # streamed whole: the pieces are the decoding of all ids (a random model's ids can
    # hold invalid UTF-8, which decodes to U+FFFD there and only there)
    assert text == lm.tokenizer.decode(full.token_ids)
    stop = text[len(text) // 2:len(text) // 2 + 3]  # surely occurs
    want = text[:text.index(stop)]
    pieces = []
    req = engine.submit(prompt, SamplingParams(max_tokens=40, temperature=0, stop=[stop, "🙂x"],
                                               stop_ids=()))
    while engine.step():
        pass
    for ev in req:
        pieces.append(ev.text)
    assert "".join(pieces) == want == req.result().text
    assert req.result().finish_reason == "stop"
    assert all(stop not in "".join(pieces[:i]) for i in range(len(pieces) + 1))


def test_threaded_engine_serves_concurrent_clients_and_closes_cleanly(model):
    alone = [generate_ids(model, p, 15, temperature=0) for p in PROMPTS]
    results = [None] * len(PROMPTS)
    with Engine(model, max_batch=3) as engine:
        def client(i):
            results[i] = engine.submit(PROMPTS[i], greedy(15)).result(timeout=60).token_ids

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        hanging = engine.submit([1], greedy(None))
    assert results == alone
    assert hanging.result(timeout=10).finish_reason == "cancelled"  # close() ends it
    assert not any(t.name == "lmlab-engine" for t in threading.enumerate())


def test_bad_requests_fail_at_submit_and_a_full_queue_says_so(model):
    engine = Engine(model, max_batch=1, max_queue=1)
    for bad, field in [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
                       (dict(max_tokens=0), "max_tokens"), (dict(top_logprobs=21), "top_logprobs"),
                       (dict(repetition_penalty=0), "repetition_penalty")]:
        with pytest.raises(GenerationError, match=field):
            engine.submit([1], SamplingParams(**bad))
    with pytest.raises(GenerationError, match="longer than the model's context"):
        engine.submit([1] * 97)
    with pytest.raises(GenerationError, match="outside"):
        engine.submit([300])
    with pytest.raises(GenerationError, match="stop strings need a tokenizer"):
        engine.submit([1], SamplingParams(stop=["x"]))
    engine.submit([1]), engine.submit([2])  # one for the free slot, one in the queue
    with pytest.raises(QueueFull):
        engine.submit([3])


@pytest.mark.parametrize("kind", ["lstm", "ngram"])
def test_kinds_without_slots_run_in_lockstep_with_the_same_tokens(kind):
    torch.manual_seed(0)
    fields = {"vocab_size": 300}
    if kind == "lstm":
        fields |= dict(d_model=32, n_layer=1)
    else:
        fields |= dict(order=3)
    model = model_class(kind).from_spec(fields).eval()
    if kind == "ngram":  # counted, not trained: some counts so that it predicts
        model.fit_counts([np.random.default_rng(0).integers(0, 300, 2000)])
    alone = [generate_ids(model, p, 10, temperature=0) for p in PROMPTS[:4]]
    engine = Engine(model, max_batch=2)
    out = engine.generate(PROMPTS[:4], [greedy(10)] * 4)
    assert [c.token_ids for c in out] == alone


def test_warm_up_settles_the_fast_paths_and_leaves_the_engine_as_new(model, monkeypatch):
    """warm_up times each measured fast path at every batch size before any request (the
    linear layers' few-row keys for rows 1..max_batch, the masked and unmasked decode
    attention), and the engine then decodes exactly as one that was never warmed."""
    from lmlab.model import fastpath

    monkeypatch.setenv(fastpath.ENV, "auto")  # this test is about the measured choices
    fastpath.clear()
    prompts, budget = PROMPTS[:4], 8
    cold = Engine(model, max_batch=3).generate(prompts, greedy(budget))
    fastpath.clear()
    engine = Engine(model, max_batch=3)
    assert engine.warm_up(budget_s=60) == 3
    rows = {d.key[0] for d in fastpath.decisions() if d.name == "linear_matvec"}
    assert rows == {1, 2, 3}
    masked = {d.key[-1] for d in fastpath.decisions() if d.name == "decode_attention"}
    assert masked == {False, True}
    assert engine._slots is None and engine.stats()["tokens_generated"] == 0
    warm = engine.generate(prompts, greedy(budget))
    # the same tokens as the cold engine (fp32 paths may differ in rounding, not in argmax
    # on this model: a difference here means warm_up left state behind)
    assert [c.token_ids for c in warm] == [c.token_ids for c in cold]
    assert Engine(model, max_batch=3).warm_up(budget_s=0.0) == 1  # the budget is kept
