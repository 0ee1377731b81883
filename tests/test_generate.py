"""The generation loop against simple references.

KV-cache decoding is checked against recomputing the whole sequence each step,
batched (left-padded) decoding against one prompt at a time, the samplers
against hand-made logits, and the text streamer against `decode` of all ids.
"""

import pytest
import torch

from lmlab.infer import (
    GenerationError, TextStreamer, generate, generate_ids, generate_text, sample_next,
    stream_text, top_k_filter, top_p_filter,
)
from lmlab.model import ModelConfig, Transformer

FAMILIES = {
    "gpt2": dict(pos_emb="learned"),
    "llama-gqa": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2,
                      tie_embeddings=False),
}


@pytest.fixture(autouse=True)
def _one_thread():
    # these models are tiny: a second thread only adds synchronisation, which costs
    # milliseconds per op when the machine is shared and the other thread is descheduled
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small(family: str, vocab_size: int = 97, **kw) -> Transformer:
    # init_std 0.3: confident, varied predictions, so a wrong position or a leaked pad
    # changes the tokens instead of hiding in near-uniform logits
    cfg = ModelConfig(vocab_size=vocab_size, n_layer=2, n_head=4, d_model=32, max_seq_len=64,
                      init_std=0.3, **{**FAMILIES[family], **kw})
    return Transformer(cfg).eval()


def greedy_full_forward(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """The reference: no cache, the whole sequence through the model at every step."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_greedy_equals_full_forward(family):
    model = small(family)
    prompt = torch.randint(0, 97, (11,)).tolist()
    expected = greedy_full_forward(model, prompt, 30)
    assert len(set(expected)) > 5  # a non-trivial continuation
    assert generate_ids(model, prompt, 30, temperature=0) == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_equals_one_at_a_time(family):
    model = small(family)
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (9, 3, 14, 1)]
    one_by_one = [generate_ids(model, p, 20, temperature=0) for p in prompts]
    assert generate_ids(model, prompts, 20, temperature=0) == one_by_one
    # and the references agree with the no-cache decode
    assert one_by_one[1] == greedy_full_forward(model, prompts[1], 20)


def test_stream_is_step_by_step_and_batch_shape():
    model = small("gpt2")
    it = generate(model, [[1, 2, 3], [4]], 5, temperature=0)
    step = next(it)
    assert isinstance(step, list) and len(step) == 2 and all(isinstance(t, int) for t in step)
    assert not torch.is_inference_mode_enabled()  # the mode never leaks into the caller
    assert len(list(it)) == 4
    assert all(isinstance(t, int) for t in generate(model, [1, 2, 3], 3, temperature=0))
    assert list(generate(model, [1, 2, 3], 0)) == []


def test_same_seed_same_tokens_different_seed_different():
    model = small("llama-gqa")
    prompt = [5, 6, 7]
    a = generate_ids(model, prompt, 40, temperature=1.0, seed=1)
    b = generate_ids(model, prompt, 40, temperature=1.0, seed=1)
    c = generate_ids(model, prompt, 40, temperature=1.0, seed=2)
    assert a == b
    assert a != c
    # an explicit seed does not touch (and is not touched by) the global RNG
    torch.manual_seed(123)
    assert generate_ids(model, prompt, 40, temperature=1.0, seed=1) == a


def test_top_k_1_equals_greedy():
    model = small("gpt2")
    prompt = [3, 1, 4, 1, 5]
    greedy = generate_ids(model, prompt, 25, temperature=0)
    assert generate_ids(model, prompt, 25, temperature=0.8, top_k=1, seed=0) == greedy


def test_top_p_keeps_smallest_set_reaching_p():
    # sorted: 0.5 (id 1), 0.3 (id 3), 0.15 (id 2), 0.05 (id 0)
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()

    def kept(p):
        return set(torch.isfinite(top_p_filter(logits, p))[0].nonzero().flatten().tolist())

    assert kept(0.4) == {1}  # the top token alone reaches 0.4
    assert kept(0.5) == {1}
    assert kept(0.7) == {1, 3}  # 0.5 < 0.7 <= 0.8
    assert kept(0.9) == {1, 3, 2}  # 0.8 < 0.9 <= 0.95
    assert kept(0.99) == {0, 1, 2, 3}
    assert kept(1.0) == {0, 1, 2, 3}
    # rows are filtered independently
    two = torch.stack([logits[0], logits[0].flip(-1)])
    assert torch.isfinite(top_p_filter(two, 0.7)).sum(-1).tolist() == [2, 2]
    # sampling draws only from the nucleus, in proportion to the renormalised probabilities
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits.expand(4000, 4), temperature=1.0, top_p=0.7, generator=g)
    assert set(draws.tolist()) == {1, 3}
    assert abs((draws == 1).float().mean().item() - 0.5 / 0.8) < 0.03


def test_top_k_filter_and_greedy_sampling():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.5], [3.0, 0.0, 0.5, 0.2]])
    kept = torch.isfinite(top_k_filter(logits, 2))
    assert kept.tolist() == [[False, True, False, True], [True, False, True, False]]
    assert sample_next(logits, temperature=0).tolist() == [1, 0]


def test_eos_stops_and_is_yielded():
    model = small("gpt2")
    prompt = [10, 20, 30]
    free = generate_ids(model, prompt, 20, temperature=0)
    eos = free[4]
    stop = free.index(eos)
    assert generate_ids(model, prompt, 20, temperature=0, eos_id=eos) == free[:stop + 1]
    assert generate_ids(model, prompt, 20, temperature=0, eos_id=eos, stop_at_eos=False) == free
    # in a batch the stopped row yields None while the others go on
    other = [1, 2]
    steps = list(generate(model, [prompt, other], 20, temperature=0, eos_id=eos))
    rows = generate_ids(model, [prompt, other], 20, temperature=0, eos_id=eos)
    assert rows[0] == free[:stop + 1]
    assert all(s[0] is None for s in steps[stop + 1:])
    assert len(steps) == max(len(r) for r in rows)


def test_max_seq_len_is_respected():
    model = small("gpt2")  # learned positions, max_seq_len 64
    assert len(generate_ids(model, list(range(60)), 50, temperature=0)) == 5  # 60 + 5 - 1 fed
    with pytest.raises(GenerationError, match="max_seq_len"):
        next(generate(model, list(range(65)), 5))
    with pytest.raises(ValueError):  # GenerationError is also a ValueError
        generate(model, list(range(65)), 5)


@pytest.mark.parametrize("kwargs", [dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=0)])
def test_bad_settings_raise_at_call(kwargs):
    with pytest.raises(GenerationError):
        generate(small("gpt2"), [1, 2], 5, **kwargs)


def test_empty_prompt_and_bad_ids_raise():
    model = small("gpt2")
    with pytest.raises(GenerationError, match="empty"):
        generate(model, [], 5)
    with pytest.raises(GenerationError, match="outside"):
        generate(model, [1, 97], 5)


TEXT = "注意力机制 lets 模型 see 🤖🚀 and 👩‍💻 too. 北京🌏"


def test_streamer_never_splits_a_character(tokenizer):
    ids = tokenizer.encode(TEXT)
    # the text must really contain characters whose bytes span several tokens
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    streamer = TextStreamer(tokenizer)
    pieces = [streamer.put(i) for i in ids]
    pieces.append(streamer.flush())
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode(ids) == TEXT


def test_streamer_flush_returns_an_unfinished_tail(tokenizer):
    ids = tokenizer.encode("ab🤖")
    streamer = TextStreamer(tokenizer)
    out = "".join(streamer.put(i) for i in ids[:-1])
    assert "\ufffd" not in out
    assert out + streamer.flush() == tokenizer.decode(ids[:-1])


def test_generate_text_with_tokenizer(tokenizer):
    model = small("llama-gqa", vocab_size=tokenizer.vocab_size)
    text = generate_text(model, tokenizer, "北京", max_new_tokens=30, seed=3)
    assert isinstance(text, str) and text
    assert text == "".join(stream_text(model, tokenizer, "北京", max_new_tokens=30, seed=3))
    ids = generate_ids(model, tokenizer.encode("北京"), 30, seed=3, eos_id=tokenizer.eos_id)
    if ids[-1] == tokenizer.eos_id:
        ids = ids[:-1]
    assert text == tokenizer.decode(ids)
    assert generate_text(model, tokenizer, "", max_new_tokens=5, temperature=0)  # starts from EOS


def test_loaded_model_generate(tmp_path, tokenizer, tokenizer_dir):
    """`lmlab.load(dir).generate`: text; seeded sampling repeats; greedy is generate_ids' greedy."""
    import lmlab
    from lmlab.model_io import save_model_dir

    model = small("llama-gqa", vocab_size=tokenizer.vocab_size)
    save_model_dir(model, tmp_path / "m", tokenizer_dir=tokenizer_dir)
    lm = lmlab.load(tmp_path / "m")
    prompt = "def "
    sampled = lm.generate(prompt, max_new_tokens=20, temperature=1.0, seed=5)
    assert isinstance(sampled, str) and sampled
    assert lm.generate(prompt, max_new_tokens=20, temperature=1.0, seed=5) == sampled
    assert lm.generate(prompt, max_new_tokens=20, temperature=1.0, seed=6) != sampled

    ids = generate_ids(model, tokenizer.encode(prompt), 20, temperature=0)
    if tokenizer.eos_id in ids:  # the text stops at EOS, without it
        ids = ids[:ids.index(tokenizer.eos_id)]
    assert len(set(ids)) > 3  # a non-trivial continuation
    assert lm.generate(prompt, max_new_tokens=20, temperature=0) == tokenizer.decode(ids)
