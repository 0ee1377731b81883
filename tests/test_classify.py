"""Text classification through the one loop: the LSTM from scratch and a head on a Transformer
learn a separable set; the best validation's weights are kept; predictions batched = alone."""

from __future__ import annotations

import json
import random

import pytest
import torch

import lmlab
from lmlab.config import ClassifierSpec, ClassifyConfig, TrainConfig
from lmlab.eval.metrics import scores_from_confusion
from lmlab.finetune.classify import finetune_classify
from lmlab.model import Transformer, preset
from lmlab.model_io import save_model_dir
from lmlab.train.checkpoint import read_best
from tests.conftest import run_cli

POS = ["好", "棒", "喜欢", "满意", "推荐", "great", "love"]
NEG = ["差", "烂", "失望", "讨厌", "退货", "bad", "awful"]
FILLER = ["这本书", "质量", "物流", "价格", "今天", "我们", "the item", "quality", "shipping"]


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    """600 texts whose label is told by one sentiment word among three neutral ones."""
    rng = random.Random(0)
    rows = []
    for i in range(600):
        label = rng.choice(["pos", "neg"])
        words = rng.sample(FILLER, 3) + [rng.choice(POS if label == "pos" else NEG)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words) + f" #{i}", "label": label})
    path = tmp_path_factory.mktemp("syn") / "syn.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    return path


def train_cfg(**kw):
    base = dict(batch_size=16, max_steps=100, lr=1e-2, warmup_steps=5, eval_every=25,
                eval_tokens=0, log_every=10, checkpoint_every=0, precision="fp32",
                weight_decay=0.0)
    base.update(kw)
    return TrainConfig(**base)


def test_lstm_from_scratch_learns_a_separable_set(syn, tmp_path):
    out = tmp_path / "lstm"
    r = finetune_classify(ClassifyConfig(
        data=str(syn), from_scratch=True, vocab_size=400, out_dir=str(out), max_len=24,
        head=ClassifierSpec(d_embed=32, hidden=32, dropout=0.0), train=train_cfg()))
    assert r.run.kind == "lstm-classifier"
    assert r.test["macro_f1"] >= 0.95, r.test
    # the model directory holds the best validation's weights, not the last step's
    best, weights = read_best(out)
    assert best["step"] == r.run.best["step"] and best["metric"] == "val_macro_f1"
    final = lmlab.load(out)
    for k, v in final.model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    # batched predictions equal one-at-a-time ones (padding never leaks into a row)
    texts = ["这本书 喜欢 质量", "物流 失望 价格 今天 我们 the item", "great"]
    batched = final.classify(texts)
    alone = [final.classify(t) for t in texts]
    assert [b[0] for b in batched] == [a[0] for a in alone] == ["pos", "neg", "pos"]
    for b, a in zip(batched, alone):
        assert b[1] == pytest.approx(a[1], abs=1e-5)
    assert (out / "confusion_test.png").stat().st_size > 1000
    assert json.loads((out / "test_metrics.json").read_text())["test"]["n"] == r.test["n"]


def test_head_on_a_transformer_and_a_linear_probe(syn, tmp_path, tokenizer_dir, tokenizer):
    torch.manual_seed(0)
    body = Transformer(preset("tiny", vocab_size=tokenizer.vocab_size, n_layer=2, d_model=64,
                              n_head=4, max_seq_len=64))
    save_model_dir(body, tmp_path / "body", tokenizer_dir=tokenizer_dir)
    r = finetune_classify(ClassifyConfig(
        data=str(syn), model=str(tmp_path / "body"), out_dir=str(tmp_path / "ft"), max_len=32,
        train=train_cfg(lr=3e-3)))
    assert r.run.kind == "classifier" and r.test["macro_f1"] >= 0.95, r.test
    # a linear probe trains the head only: the body's weights stay those of the body dir
    r = finetune_classify(ClassifyConfig(
        data=str(syn), model=str(tmp_path / "body"), out_dir=str(tmp_path / "probe"), max_len=32,
        head=ClassifierSpec(freeze_body=True), train=train_cfg(max_steps=20, eval_every=10)))
    probe = lmlab.load(tmp_path / "probe").model
    for k, v in body.state_dict().items():
        assert torch.equal(probe.body.state_dict()[k], v), k


def test_validation_scores_from_a_confusion_matrix_equal_sklearn():
    from sklearn.metrics import accuracy_score, f1_score

    rng = random.Random(1)
    truth = [rng.randrange(3) for _ in range(200)]
    pred = [t if rng.random() < 0.7 else rng.randrange(3) for t in truth]
    cm = [[sum(1 for t, p in zip(truth, pred) if (t, p) == (i, j)) for j in range(3)]
          for i in range(3)]
    import numpy as np

    m = scores_from_confusion(np.array(cm))
    assert m["accuracy"] == pytest.approx(accuracy_score(truth, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(truth, pred, average="macro"))


def test_the_commands(syn, tmp_path):
    out = tmp_path / "run"
    rc, stdout, err = run_cli(["finetune", "classify", "--data", syn, "--from_scratch", "true",
                               "--vocab_size", 400, "--out_dir", out, "--max_len", 24,
                               "--head.d_embed", 16, "--head.hidden", 16,
                               "--train.max_steps", 30, "--train.eval_every", 15,
                               "--train.batch_size", 16, "--train.lr", 0.01])
    assert rc == 0, err
    assert "test macro-F1" in stdout and "lmlab classify" in stdout
    texts = tmp_path / "texts.txt"
    texts.write_text("这本书 喜欢\n物流 失望\n", encoding="utf-8")
    rc, stdout, err = run_cli(["classify", "--model", out, "--input", texts])
    assert rc == 0, err
    rows = [json.loads(x) for x in (tmp_path / "texts.predictions.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == ["这本书 喜欢", "物流 失望"]
    assert all(abs(sum(r["probs"].values()) - 1) < 1e-5 for r in rows)
    # an existing predictions file is not replaced silently
    rc, _, err = run_cli(["classify", "--model", out, "--input", texts])
    assert rc == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("content, word", [
    ('{"text": "a"}\n{"text": "b"}\n', "label"),          # no label anywhere
    ('{"label": "pos"}\n', "text"),                         # no text anywhere
])
def test_bad_labelled_data_is_one_line(tmp_path, content, word):
    f = tmp_path / "bad.jsonl"
    f.write_text(content, encoding="utf-8")
    rc, _, err = run_cli(["finetune", "classify", "--data", f, "--from_scratch", "true",
                          "--out_dir", tmp_path / "o"])
    assert rc == 2 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and str(f) in err and word in err, err
    assert not (tmp_path / "o").exists()
