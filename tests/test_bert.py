"""The BERT-style encoder (kind "bert"): BERT's masking recipe, masked-LM pretraining through
`pretrain()`, padding that changes nothing on any attention path, Hugging Face
BertForMaskedLM in and out with equal logits, and its pooled output under `finetune classify`."""

from __future__ import annotations

import json
import os
import random
import re
import signal

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import lmlab
from lmlab.config import ClassifyConfig, ModelSpec, PretrainConfig, TrainConfig
from lmlab.errors import ConfigError, InputError
from lmlab.finetune.classify import finetune_classify
from lmlab.model import Transformer, build_from_spec, fastpath
from lmlab.model.encoder import Encoder
from lmlab.train.metrics import read_metrics
from lmlab.train.mlm import MASK_RATE, Masking, mask_token
from lmlab.train.pretrain import pretrain
from tests.conftest import CHINESE, run_cli, write_shards

transformers = pytest.importorskip("transformers")


def tiny_bert(vocab_size: int = 300, **kw) -> Encoder:
    fields = dict(preset="tiny", vocab_size=vocab_size, d_model=32, n_head=4, d_ff=64,
                  max_seq_len=64)
    return build_from_spec("bert", {**fields, **kw}).eval()


# ---------------------------------------------------------------- the masking recipe

def test_masking_follows_bert_recipe(tokenizer):
    masking = Masking(tokenizer, seed=3)
    assert (masking.mask_id, masking.vocab_size) == (tokenizer.vocab_size, tokenizer.vocab_size + 1)
    rng = np.random.default_rng(0)
    ids = torch.from_numpy(rng.integers(5, tokenizer.vocab_size, (256, 64)))
    specials = torch.tensor([tokenizer.eos_id, tokenizer.pad_id, tokenizer.bos_id])
    ids[:, ::7] = specials[torch.arange(10) % 3]  # EOS, pad and BOS every 7th position
    x, y = masking(ids, step=5)
    chosen = y != -100
    assert torch.equal(y[chosen], ids[chosen])  # targets: the original tokens
    assert not chosen[:, ::7].any()  # specials are never chosen
    assert torch.equal(x[~chosen], ids[~chosen])  # nothing else is touched
    n_real = (~torch.isin(ids, specials)).sum(1)
    assert torch.equal(chosen.sum(1), torch.round(MASK_RATE * n_real.double()).long())
    masked = x[chosen] == masking.mask_id
    kept = x[chosen] == ids[chosen]
    random_ = ~masked & ~kept
    n = chosen.sum().item()  # 256 rows × 8 = 2,048 predictions: shares within ±3.5 %
    assert abs(masked.sum().item() / n - 0.8) < 0.035
    assert abs(random_.sum().item() / n - 0.1) < 0.025
    assert abs(kept.sum().item() / n - 0.1) < 0.025  # (a random draw of the same id counts here)
    never = torch.cat([specials, torch.tensor([masking.mask_id])])
    assert not torch.isin(x[chosen][random_], never).any()  # replacements are real tokens

    # a pure function of (seed, step, window): a resumed run and any batch layout mask alike
    again = masking(ids.flip(0), step=5)
    assert torch.equal(again[0].flip(0), x) and torch.equal(again[1].flip(0), y)
    assert not torch.equal(masking(ids, step=6)[1], y)
    assert not torch.equal(Masking(tokenizer, seed=4)(ids, step=5)[1], y)
    val = masking(ids, None)  # validation: fixed masks
    assert torch.equal(val[1], masking(ids, None)[1]) and not torch.equal(val[1], y)


# ---------------------------------------------------------------- pretraining

@pytest.fixture(scope="module")
def shards(tmp_path_factory, tokenizer, tokenizer_dir, corpus_texts):
    return write_shards(tmp_path_factory.mktemp("shards"), tokenizer, tokenizer_dir,
                        CHINESE * 40 + corpus_texts[:2], val_every=7)  # val: Chinese prose


def mlm_cfg(shards, out_dir, **train) -> PretrainConfig:
    base = dict(batch_size=16, max_steps=60, lr=5e-3, warmup_steps=5, eval_every=30,
                eval_tokens=4096, log_every=1, checkpoint_every=0, precision="fp32", seed=5,
                weight_decay=0.0)
    base.update(train)
    return PretrainConfig(data=str(shards), out_dir=str(out_dir), seq_len=48, objective="mlm",
                          model=ModelSpec(kind="bert", preset="tiny", d_model=64, n_head=4,
                                          d_ff=128, max_seq_len=64),
                          train=TrainConfig(**base))


def losses(run_dir):
    return [r["train_loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "train_loss" in r]


@pytest.fixture(scope="module")
def bert_run(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("mlm") / "run"
    return pretrain(mlm_cfg(shards, out)), out


@pytest.mark.slow
def test_mlm_pretraining_learns(bert_run, tokenizer, tmp_path):
    r, out = bert_run
    assert r.kind == "bert" and r.fit.step == 60
    ls = losses(out)
    assert np.mean(ls[-5:]) < ls[0] - 1.5, ls  # from ~ln(2049) = 7.6
    val = r.fit.val
    assert set(val) == {"val_mlm_loss", "val_mlm_acc"}  # no bits per byte: see lmlab.train.mlm
    assert val["val_mlm_loss"] < np.log(tokenizer.vocab_size) - 1.5
    assert val["val_mlm_acc"] > 0.1
    lm = lmlab.load(out)
    assert isinstance(lm.model, Encoder) and lm.model.vocab_size == tokenizer.vocab_size + 1
    with pytest.raises(InputError, match="not a next-token language model"):
        lm.generate("def ", max_new_tokens=4)
    rc, _, err = run_cli(["generate", "--model", out, "--prompt", "def "])
    assert rc == 2 and "bidirectional encoder" in err and "Traceback" not in err
    # next-token scores of an encoder would be meaningless: the report card refuses it
    rc, _, err = run_cli(["eval", "--model", str(out), "--out", str(tmp_path / "card")])
    assert rc == 2 and "not a next-token language model" in err


def test_mlm_resume_is_exact(shards, tmp_path):
    straight, run = tmp_path / "straight", tmp_path / "resumed"
    pretrain(mlm_cfg(shards, straight, max_steps=8, eval_every=0))

    def stop_at_3(event, data):
        if event == "log" and data["step"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    assert pretrain(mlm_cfg(shards, run, max_steps=8, eval_every=0),
                    callback=stop_at_3).fit.status == "interrupted (SIGTERM)"
    cfg = mlm_cfg(shards, run, max_steps=8, eval_every=0)
    cfg.resume = True
    pretrain(cfg)
    assert losses(run) == losses(straight)


def test_objective_and_kind_must_agree(shards, tmp_path):
    rc, _, err = run_cli(["pretrain", "--data", shards, "--out_dir", tmp_path / "a",
                          "--model.kind", "bert", "--model.preset", "tiny"])
    assert rc == 2 and "would see the very token it predicts; pass --objective mlm" in err
    assert "Traceback" not in err
    cfg = mlm_cfg(shards, tmp_path / "b")
    cfg.model = ModelSpec(preset="tiny")
    with pytest.raises(ConfigError, match="needs a bidirectional encoder"):
        pretrain(cfg)
    cfg = mlm_cfg(shards, tmp_path / "c")
    cfg.model.vocab_size = 2048  # the tokenizer's size, without the mask id
    with pytest.raises(ConfigError, match=r"2048 tokens \+ the mask id"):
        pretrain(cfg)
    with pytest.raises(ConfigError, match="an encoder's: set --model.kind bert"):
        Transformer.from_spec({"preset": "bert-base"})
    with pytest.raises(ConfigError, match="type_vocab_size"):
        Transformer.from_spec({"preset": "tiny", "type_vocab_size": 2})


# ---------------------------------------------------------------- padding

@pytest.fixture
def fastpath_mode(monkeypatch):
    def set_mode(mode: str) -> None:
        monkeypatch.setenv(fastpath.ENV, mode)
        fastpath.clear()
    yield set_mode
    monkeypatch.delenv(fastpath.ENV, raising=False)
    fastpath.clear()


@pytest.mark.parametrize("mode", ["plain", "fast"])
@pytest.mark.parametrize("backend", [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION])
@pytest.mark.parametrize("grad", [False, True])
def test_padding_changes_no_real_token(mode, backend, grad, fastpath_mode):
    """Each row, right-padded into a batch, gives what it gives alone — forced plain and fast
    paths (fast: the blocked matrix-vector product; the causal blocked attention must never
    run), both CPU SDPA kernels, inference and training mode with autograd."""
    fastpath_mode(mode)
    model = tiny_bert()
    model.train(grad)
    lengths = [13, 5, 9, 1]
    rows = [torch.randint(5, 300, (n,)) for n in lengths]
    ids = torch.full((4, 13), 2)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
    real = torch.arange(13)[None] < torch.tensor(lengths)[:, None]
    # math stays allowed: the flash kernel refuses the transposed view the blocked
    # matrix-vector product returns for a short row alone
    with torch.set_grad_enabled(grad), sdpa_kernel([backend, SDPBackend.MATH]):
        batched = model(ids, attention_mask=real)
        for i, r in enumerate(rows):
            alone = model(r[None])[0]
            torch.testing.assert_close(batched[i, :len(r)], alone, atol=2e-5, rtol=1e-5)
        # the mask is what does it: without it the pads change the short rows
        assert not torch.allclose(model(ids)[1, :5], batched[1, :5], atol=1e-3)
    if grad:
        batched[real].sum().backward()  # a finite gradient through the masked path
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert not any(d.name == "attention" for d in fastpath.decisions())


def test_a_row_of_padding_only_stays_finite():
    model = tiny_bert()
    ids = torch.randint(5, 300, (2, 6))
    out = model(ids, attention_mask=torch.tensor([[1] * 6, [0] * 6]))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], model(ids[:1])[0], atol=2e-5, rtol=1e-5)


# ---------------------------------------------------------------- Hugging Face

def hf_bert_dir(path, cls_name: str = "BertForMaskedLM", **kw):
    torch.manual_seed(1)
    config = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=40, **kw)
    model = getattr(transformers, cls_name)(config).eval()
    model.save_pretrained(path)
    return model


def hf_logits(model, ids, mask, types):
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    return out.prediction_logits if hasattr(out, "prediction_logits") else out.logits


def wordpiece_tokenizer(path):
    """A WordPiece tokenizer (BERT's kind), trained here, saved as transformers saves one."""
    from tokenizers import BertWordPieceTokenizer

    wp = BertWordPieceTokenizer(lowercase=False)
    wp.train_from_iterator(CHINESE * 4, vocab_size=120, min_frequency=1)
    fast = transformers.BertTokenizerFast(tokenizer_object=wp._tokenizer, cls_token="[CLS]",
                                          sep_token="[SEP]", pad_token="[PAD]",
                                          mask_token="[MASK]", unk_token="[UNK]")
    fast.save_pretrained(path)


@pytest.mark.parametrize("cls_name", ["BertForMaskedLM", "BertForPreTraining"])
def test_hf_bert_import_export_equal_logits(cls_name, tmp_path):
    hf = hf_bert_dir(tmp_path / "hf", cls_name, hidden_act="gelu")
    wordpiece_tokenizer(tmp_path / "hf")
    rc, out, err = run_cli(["import-hf", tmp_path / "hf", tmp_path / "ours"])
    assert rc == 0, err
    lm = lmlab.load(tmp_path / "ours")
    assert isinstance(lm.model, Encoder) and lm.model.cfg.mlp == "gelu_exact"

    ids = torch.randint(0, 120, (3, 17))
    mask = torch.ones_like(ids)
    mask[1, 10:] = mask[2, 3:] = 0
    types = (torch.arange(17) >= 8).long().expand(3, -1)
    with torch.no_grad():
        for m in (mask, None):
            ref = hf_logits(hf, ids, m, types)
            ours = lm.model(ids, attention_mask=m, token_type_ids=types)
            real = torch.ones_like(ids, dtype=torch.bool) if m is None else m.bool()
            torch.testing.assert_close(ours[real], ref[real], atol=1e-4, rtol=1e-4)
        if cls_name == "BertForPreTraining":  # Google's checkpoints hold a trained pooler
            h = lm.model(ids, attention_mask=mask, token_type_ids=types, return_hidden=True)
            torch.testing.assert_close(lm.model.pooled(h), hf.bert(
                input_ids=ids, attention_mask=mask, token_type_ids=types).pooler_output,
                atol=1e-4, rtol=1e-4)

    # BERT's WordPiece tokenizer came along, with its own [MASK]: no row is added for one
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert lm.tokenizer.encode("北京是中国的首都") == theirs(
        "北京是中国的首都", add_special_tokens=False)["input_ids"]
    assert mask_token(lm.tokenizer) == (lm.tokenizer.token_id("[MASK]"), lm.tokenizer.vocab_size)

    rc, _, err = run_cli(["export-hf", tmp_path / "ours", tmp_path / "back"])
    assert rc == 0, err
    back = transformers.BertForMaskedLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids, attention_mask=mask,
                                        token_type_ids=types).logits[mask.bool()],
                                   hf_logits(hf, ids, mask, types)[mask.bool()],
                                   atol=1e-4, rtol=1e-4)
    if cls_name == "BertForPreTraining":  # the pooler goes out too
        seq = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "back")
        torch.testing.assert_close(seq.bert.pooler.dense.weight, hf.bert.pooler.dense.weight)


def test_an_lmlab_bert_exports_to_transformers(tmp_path):
    from lmlab.interop.hf import export_hf
    from lmlab.model_io import save_model_dir

    model = tiny_bert(type_vocab_size=1, tie_embeddings=False, mlp="gelu")
    with torch.no_grad():  # non-zero biases and norms, so a dropped one shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    save_model_dir(model, tmp_path / "ours")
    export_hf(tmp_path / "ours", tmp_path / "hf")
    hf = transformers.BertForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.hidden_act == "gelu_new" and not hf.config.tie_word_embeddings
    ids = torch.randint(0, 300, (2, 20))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask)[mask.bool()],
                                   hf(input_ids=ids, attention_mask=mask).logits[mask.bool()],
                                   atol=1e-4, rtol=1e-4)


def test_old_bert_names_import(tmp_path):
    """Google's converted files: no "bert." prefix, LayerNorm.gamma / beta, decoder weights."""
    from lmlab.interop.hf import from_hf

    hf = hf_bert_dir(tmp_path / "hf")
    old = {re.sub(r"LayerNorm\.bias$", "LayerNorm.beta",
                  re.sub(r"LayerNorm\.weight$", "LayerNorm.gamma", k.removeprefix("bert."))): v
           for k, v in hf.state_dict().items()}
    assert "embeddings.LayerNorm.gamma" in old and "cls.predictions.decoder.weight" in old
    ids = torch.randint(0, 120, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(from_hf(hf.config.to_dict(), old)(ids),
                                   hf(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_unsupported_bert_is_one_clear_error(tmp_path):
    hf_bert_dir(tmp_path / "hf", position_embedding_type="relative_key")
    rc, _, err = run_cli(["import-hf", tmp_path / "hf", tmp_path / "ours"])
    assert rc == 2 and "position_embedding_type 'relative_key'" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------- classification

POS, NEG = ["好看", "精彩", "喜欢", "推荐"], ["难看", "无聊", "失望", "退货"]
SUBJECTS = ["这本书", "这部电影", "这家店", "这个故事", "北京的菜", "上海的天气"]


@pytest.mark.slow
def test_finetune_classify_reads_the_pooled_output(bert_run, tmp_path):
    """A head on the MLM-pretrained encoder's pooler learns a label that one word in the middle
    of the text carries; predictions are the same alone as in a padded batch."""
    _, body = bert_run
    rng = random.Random(0)
    rows = []
    for i in range(360):
        label = rng.choice(["pos", "neg"])
        word = rng.choice(POS if label == "pos" else NEG)
        rows.append({"text": f"{rng.choice(SUBJECTS)}真的很{word}，第{i}次", "label": label})
    data = tmp_path / "reviews.jsonl"
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    out = tmp_path / "clf"
    r = finetune_classify(ClassifyConfig(
        data=str(data), model=str(body), out_dir=str(out), max_len=32,
        train=TrainConfig(batch_size=16, max_steps=60, lr=2e-3, warmup_steps=5, eval_every=30,
                          eval_tokens=0, log_every=10, checkpoint_every=0, precision="fp32",
                          weight_decay=0.0)))
    assert r.run.best["value"] > 0.8, r.run.best  # val macro-F1; chance is 0.5
    assert r.test["accuracy"] > 0.75, r.test
    clf = lmlab.load(out)
    assert clf.model.pool == "pooler" and clf.model.body.kind == "bert"
    texts = ["这部电影真的很精彩", "这家店真的很难看，第一次也是最后一次，再也不来了"]
    alone = [clf.classify(t)[1] for t in texts]
    batched = [p for _, p in clf.classify(texts)]
    for a, b in zip(alone, batched):
        assert a == pytest.approx(b, abs=1e-5)
