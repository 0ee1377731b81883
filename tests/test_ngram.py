"""The n-gram kind: interpolated Kneser–Ney against nltk, distributions that sum to 1, counts
that survive a save, and the same harness as the Transformer — `pretrain()` (counting, not a
gradient loop), val bits per byte, `lmlab.load`, the one generation loop, `lmlab generate`."""

import argparse
import collections
import json
import math

import numpy as np
import pytest
import torch

import lmlab
from lmlab.config import ModelSpec, PretrainConfig, TrainConfig
from lmlab.data.shards import TokenShards
from lmlab.errors import ConfigError
from lmlab.infer import generate_ids
from lmlab.model import NGramLM
from lmlab.model_io import load_model_dir, save_model_dir
from lmlab.train.metrics import read_metrics
from lmlab.train.pretrain import pretrain
from tests.conftest import run_cli, write_shards

# real text, word-level: the docstrings of three standard-library modules; id 0 starts the
# stream and occurs nowhere else (nltk divides by zero on a context with no left neighbour)
WORDS = (argparse.__doc__ + collections.__doc__ + json.__doc__).split()
VOCAB = {w: i for i, w in enumerate(sorted(set(WORDS)), 1)}
IDS = np.array([0] + [VOCAB[w] for w in WORDS])
V = len(VOCAB) + 1


def fitted(order: int, **kw) -> NGramLM:
    model = NGramLM(V, order=order, **kw)
    model.fit_counts([IDS])
    return model


def contexts(order: int, n: int, seed: int = 0):
    """(context (n, order−1), length (n,)): half taken from the text, half random ids, with
    every length from 0 (no context) to order − 1."""
    rng = np.random.default_rng(seed)
    at = rng.integers(order, len(IDS), n)
    ctx = np.stack([IDS[t - order + 1:t] for t in at])
    ctx[n // 2:] = rng.integers(0, V, (n - n // 2, order - 1))
    return torch.from_numpy(ctx), torch.from_numpy(rng.integers(0, order, n))


@pytest.mark.parametrize("order", [2, 3, 4, 5])
@pytest.mark.parametrize("discount", [None, 0.6])
def test_every_distribution_sums_to_one_and_scores_agree_with_it(order, discount):
    model = fitted(order, discount=discount)
    ctx, length = contexts(order, 400)
    p = model.distribution(ctx, length)
    assert p.shape == (400, V) and p.dtype == torch.float64
    assert (p.sum(-1) - 1).abs().max() < 1e-12
    assert p.min() > 0  # the uniform floor: no id is impossible
    words = torch.randint(0, V, (400,))
    assert torch.allclose(model.probs_of(ctx, length, words), p[torch.arange(400), words],
                          rtol=1e-13, atol=0)
    # forward: log-probabilities as logits, and the cross-entropy of the same numbers
    ids = torch.from_numpy(IDS[None, 100:160])
    logits = model(ids)
    nats = model(ids[:, :-1], targets=ids[:, 1:], reduction="none")
    torch.testing.assert_close(-logits[0, :-1].gather(-1, ids[0, 1:, None])[:, 0], nats[0],
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("order", [2, 3, 4, 5])
def test_agrees_with_nltk_kneser_ney_interpolated(order):
    """nltk's KneserNeyInterpolated: one fixed discount, and a lowest order without a uniform
    share, which `uniform_floor=False` reproduces; the text counted in two pieces."""
    from nltk.lm import KneserNeyInterpolated  # imported here: it takes seconds
    from nltk.util import everygrams

    model = NGramLM(V, order=order, discount=0.75, uniform_floor=False)
    model.fit_counts([IDS[:333], IDS[333:]])
    text = [str(t) for t in IDS]
    ref = KneserNeyInterpolated(order, discount=0.75)
    ref.fit([everygrams(text, max_len=order)], vocabulary_text=text)
    ctx, length = contexts(order, 150, seed=order)
    ctx = ctx.clamp(min=1)  # no context holds the start token (see IDS)
    words = torch.where(torch.rand(150) < 0.5, torch.randint(1, V, (150,)),
                        torch.from_numpy(IDS[np.random.default_rng(1).integers(1, len(IDS), 150)]))
    ours = model.probs_of(ctx, length, words).log()
    theirs = torch.tensor([math.log(ref.score(str(int(w)), [str(int(t)) for t in c[len(c) - n:]]
                                              if n else None))
                           for c, n, w in zip(ctx, length, words)], dtype=torch.float64)
    assert (ours - theirs).abs().max() <= 1e-9
    assert theirs.exp().min() < 1e-3 < theirs.exp().max()  # rare and likely words alike


def test_counts_and_modified_discounts_match_a_plain_count():
    order = 3
    model = fitted(order)
    grams = collections.Counter(tuple(IDS[i:i + order]) for i in range(len(IDS) - order + 1))
    keys, counts = model.table(order)
    assert dict(zip(keys.tolist(), counts.tolist())) == {
        (a * V + b) * V + c: n for (a, b, c), n in grams.items()}
    # continuation counts of bigrams: distinct left neighbours
    left = collections.Counter(g[1:] for g in grams)
    keys2, counts2 = model.table(2)
    assert dict(zip(keys2.tolist(), counts2.tolist())) == {
        a * V + b: n for (a, b), n in left.items()}
    n1, n2, n3, n4 = (sum(1 for c in grams.values() if c == i) for i in (1, 2, 3, 4))
    y = n1 / (n1 + 2 * n2)
    want = [0, 1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3]
    assert model.discounts(order).tolist() == pytest.approx(want, rel=1e-12)
    # counting in pieces of any size gives the same tables
    again = NGramLM(V, order=order)
    again.fit_counts(np.array_split(IDS, [1, 2, 50, 51, 400]))
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_save_and_load_give_the_same_counts_and_scores(tmp_path):
    model = fitted(4)
    save_model_dir(model, tmp_path / "m")
    back = load_model_dir(tmp_path / "m")
    assert isinstance(back, NGramLM) and back.config_dict() == model.config_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    ids = torch.from_numpy(IDS[None, :300])
    assert torch.equal(model(ids), back(ids))
    assert torch.equal(model(ids[:, :-1], targets=ids[:, 1:], reduction="row_sum"),
                       back(ids[:, :-1], targets=ids[:, 1:], reduction="row_sum"))


def test_reductions_and_ignored_targets():
    model = fitted(3)
    ids = torch.from_numpy(np.stack([IDS[:41], IDS[41:82]]))
    x, y = ids[:, :-1], ids[:, 1:].clone()
    y[0, :5] = -100
    nats = model(x, targets=y, reduction="none")
    assert nats.shape == (2, 40) and (nats[0, :5] == 0).all()
    assert torch.equal(model(x, targets=y, reduction="row_sum"), nats.sum(-1))
    assert model(x, targets=y, reduction="sum") == nats.sum()
    assert model(x, targets=y) == nats.sum() / 75


def test_config_errors_are_one_line_naming_the_field():
    with pytest.raises(ConfigError, match="model.order: 6"):
        NGramLM(100, order=6)
    with pytest.raises(ConfigError, match="model.order: 5-grams of a 50,257-token vocabulary.*"
                                          "model.order 4"):
        NGramLM(50257, order=5)
    with pytest.raises(ConfigError, match="model.discount"):
        NGramLM(100, discount=1.5)
    with pytest.raises(ConfigError, match="model.n_head: means nothing for model.kind ngram"):
        ModelSpec(kind="ngram", n_head=2).build_model(vocab_size=100)
    assert ModelSpec(kind="ngram", order=2).build_model(vocab_size=100).order == 2


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tokenizer, tokenizer_dir, corpus_texts):
    return write_shards(tmp_path_factory.mktemp("shards"), tokenizer, tokenizer_dir,
                        corpus_texts[:40], val_every=10)


def ngram_cfg(shards, out_dir, order, **train) -> PretrainConfig:
    return PretrainConfig(data=str(shards), out_dir=str(out_dir),
                          model=ModelSpec(kind="ngram", order=order),
                          train=TrainConfig(eval_tokens=16384, **train))


def test_pretrain_counts_and_measures_like_any_kind(shards, tmp_path, tokenizer):
    uniform = pretrain(ngram_cfg(shards, tmp_path / "none", 3, max_minutes=1e-9))
    assert uniform.fit.status == "time limit" and uniform.fit.tokens_seen == 0
    assert uniform.fit.val["val_loss"] == pytest.approx(math.log(tokenizer.vocab_size), rel=1e-12)

    val = {}
    for order in (2, 3):
        r = pretrain(ngram_cfg(shards, tmp_path / f"o{order}", order))
        assert r.kind == "ngram" and r.fit.status == "finished" and r.params > 0
        assert r.fit.tokens_seen == len(TokenShards(shards, "train"))
        val[order] = r.fit.val
    # counted on 36 files of code: 2.27 < 2.38 < 3.39 bits per byte (uniform over 2,048 ids)
    assert val[3]["val_bpb"] < val[2]["val_bpb"] < 0.75 * uniform.fit.val["val_bpb"]

    run = tmp_path / "o3"
    rows = read_metrics(run / "metrics.jsonl")
    assert len(rows) == 1 and rows[0]["val_bpb"] == val[3]["val_bpb"] and rows[0]["tokens"] > 0
    assert (run / "config.yaml").is_file() and (run / "tokenizer.json").is_file()
    cfg = ngram_cfg(shards, run, 3)
    cfg.resume = True  # no checkpoints: it counts again, to the same tables
    again = pretrain(cfg)
    assert again.fit.val == val[3]
    assert len(read_metrics(run / "metrics.jsonl")) == 1


@pytest.mark.slow
def test_generation_goes_through_the_one_loop(shards, tmp_path, tokenizer):
    run = tmp_path / "run"
    pretrain(ngram_cfg(shards, run, 4))
    lm = lmlab.load(run)
    assert isinstance(lm.model, NGramLM)
    text = lm.generate("def ", max_new_tokens=12, temperature=0)
    assert text and text == lm.generate("def ", max_new_tokens=12, temperature=0)
    prompts = [tokenizer.encode("import os\n"), tokenizer.encode("x"),
               tokenizer.encode("def f(a, b):"), tokenizer.encode("北京")]
    batched = generate_ids(lm.model, prompts, 8, temperature=0, eos_id=None)
    alone = [generate_ids(lm.model, p, 8, temperature=0, eos_id=None) for p in prompts]
    assert batched == alone
    sampled = generate_ids(lm.model, prompts, 8, temperature=1.0, seed=3, eos_id=None)
    assert sampled == generate_ids(lm.model, prompts, 8, temperature=1.0, seed=3, eos_id=None)
    for prompt, new in zip(prompts, alone):  # greedy = the full forward's argmax, step by step
        ids = prompt + new[:-1]
        full = lm.model(torch.tensor([ids]))[0].argmax(-1).tolist()
        assert full[len(prompt) - 1:] == new
    rc, out, err = run_cli(["generate", "--model", run, "--prompt", "def ",
                            "--max-new-tokens", 12, "--temperature", 0])
    assert rc == 0, err
    assert out.startswith("def " + text)
