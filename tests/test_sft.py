"""Chat SFT: the loss is the masked reference's and blind to user/system labels, a packed
row computes each example as it would alone, batches are a function of the step (ranks
disjoint, accumulation token-weighted), a toy set teaches a model to answer and stop,
resume repeats the run, and bad input is one `path:line` error with nothing written."""

import json
import os
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import lmlab
from lmlab.config import LoraSpec, SFTConfig, TrainConfig
from lmlab.data.chat import prompt_ids, render_chat
from lmlab.errors import ConfigError, InputError
from lmlab.finetune.sft import (IGNORE, Example, SFTTask, collate, encode_examples, finetune_sft,
                                make_example, masked_targets, model_nats)
from lmlab.infer import generate_ids
from lmlab.model import Transformer, preset
from lmlab.model_io import save_model_dir
from lmlab.tokenizer import IM_END, Tokenizer, train_tokenizer
from lmlab.train.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("plain_ops")  # conftest: unmeasured ops, one thread

CATEGORIES = {"动物": "猫狗马牛羊鸡", "水果": "梨桃杏枣橘", "颜色": "红蓝绿黄紫"}
TEMPLATES = ["{x}是什么？", "请问{x}属于哪一类？", "{x}属于什么？", "告诉我{x}是哪类"]
TOY = [{"prompt": t.format(x=x), "response": c}
       for c, xs in CATEGORIES.items() for x in xs for t in TEMPLATES]  # 64 questions

CONVERSATION = [
    {"role": "system", "content": "你是一个乐于助人的助手。"},
    {"role": "user", "content": "猫是什么？"},
    {"role": "assistant", "content": "动物"},
    {"role": "user", "content": "Is a pear a fruit?"},
    {"role": "assistant", "content": "Yes, 梨 is a fruit."},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [r["prompt"] + r["response"] for r in TOY] * 5 + [m["content"] for m in CONVERSATION]
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(texts * 3, vocab_size=320).save(out)
    return Tokenizer.load(out)


def tiny(vocab_size, kind="tiny", **kw):
    torch.manual_seed(0)
    return Transformer(preset(kind, vocab_size=vocab_size, d_model=64, n_head=2,
                              max_seq_len=128, **kw))


def examples(tok, rows):
    return [make_example(*render_chat(tok, [{"role": "user", "content": r["prompt"]},
                                            {"role": "assistant", "content": r["response"]}]))
            for r in rows]


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


def test_loss_is_the_masked_reference_and_ignores_user_and_system_labels(tok):
    model = tiny(tok.vocab_size)
    ids, mask = render_chat(tok, CONVERSATION)
    labels = np.array(ids[1:])

    def sft_grad(labels):
        batch = collate([Example(np.array(ids), masked_targets(labels, mask))], [(0,)], 0)
        model.zero_grad()
        loss = model_nats(model, batch) / int((batch["targets"] != IGNORE).sum())
        loss.backward()
        return loss.detach(), grads(model)

    loss, g = sft_grad(labels)
    # the reference: full logits, the mask applied by hand, F.cross_entropy
    model.zero_grad()
    logits = model(torch.tensor([ids]))[0, :-1]
    ref_labels = torch.tensor([y if mask[t + 1] else -100 for t, y in enumerate(labels)])
    ref = F.cross_entropy(logits, ref_labels, ignore_index=-100)
    ref.backward()
    assert torch.allclose(loss, ref, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g, grads(model)))
    # a user or system token's label changed: the gradient is the same, bit for bit
    user = [t for t in range(len(labels)) if not mask[t + 1]]
    changed = labels.copy()
    changed[user[2]] = changed[user[-1]] = (labels[user[2]] + 7) % tok.vocab_size
    assert all(torch.equal(a, b) for a, b in zip(g, sft_grad(changed)[1]))
    # an assistant token's label changed: it is not
    answer = [t for t in range(len(labels)) if mask[t + 1]]
    changed = labels.copy()
    changed[answer[0]] = (labels[answer[0]] + 7) % tok.vocab_size
    assert not all(torch.equal(a, b) for a, b in zip(g, sft_grad(changed)[1]))


@pytest.mark.parametrize("kind", ["tiny", "llama-tiny"])  # learned positions, RoPE
def test_a_packed_row_computes_each_example_as_alone(tok, kind):
    model = tiny(tok.vocab_size, kind).eval()
    exs = examples(tok, TOY[:3]) + [make_example(*render_chat(tok, CONVERSATION[1:3]))]
    packed = collate(exs, [(0, 1, 2), (3,)], 0)
    assert packed["attn_mask"].shape[1] == 1 and packed["positions"][0, len(exs[0].ids)] == 0
    with torch.no_grad():
        nats = model_nats(model, packed, "none")
        logits = model(packed["ids"], attn_mask=packed["attn_mask"],
                       positions=packed["positions"])
        t = 0
        for k, ex in enumerate(exs[:3] + exs[3:]):
            b, t = (0, t) if k < 3 else (1, 0)
            alone = collate(exs, [(k,)], 0)
            assert "attn_mask" not in alone  # one example: plain causal attention
            n = len(ex.ids)
            assert torch.allclose(nats[b, t:t + n], model_nats(model, alone, "none")[0],
                                  atol=1e-5, rtol=0)
            assert torch.allclose(logits[b, t:t + n], model(alone["ids"])[0], atol=1e-5, rtol=0)
            t += n


def test_batches_are_a_function_of_the_step_ranks_disjoint_accumulation_token_weighted(tok):
    exs = examples(tok, TOY[:40])

    def task(batch_size, batching="pack"):
        return SFTTask(exs, exs[:4], 64, batch_size, batching, 0, seed=3)

    a = task(2)
    assert sorted(i for row in a.epoch_rows(0) for i in row) == list(range(40))
    assert all(sum(len(exs[i].ids) for i in row) <= 64 for row in a.epoch_rows(1))
    one, again = a.train_batch(7, 1, 2, 1, 2), task(2).train_batch(7, 1, 2, 1, 2)
    assert all(torch.equal(one[k], again[k]) for k in one)
    rows = [a._rows(7, m, 2, r, 2) for m in range(2) for r in range(2)]
    flat = [row for rs in rows for row in rs]
    assert len(set(flat)) == len(flat)  # no row twice in one step
    # two micro-batches (or two ranks) of 2 rows give the gradient of one batch of those
    # 4 rows: the mean over the step's trained tokens, however they are split
    model = tiny(tok.vocab_size)
    for accum, world in ((2, 1), (1, 2)):
        model.zero_grad()
        for m in range(accum):
            for r in range(world):
                (a.loss(model, a.train_batch(3, m, accum, r, world)) / accum / world).backward()
        split = grads(model)
        model.zero_grad()
        b = task(4)
        whole = b.train_batch(3, 0, 1, 0, 1)
        b.loss(model, whole).backward()
        assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(split, grads(model)))
        assert b.loss(model, whole).item() == pytest.approx(
            model_nats(model, whole).item() / int((whole["targets"] != IGNORE).sum()), rel=1e-6)
    pad = task(2, "pad")
    assert [len(r) for r in pad.epoch_rows(0)] == [1] * 40
    assert "attn_mask" not in pad.train_batch(0, 0, 1, 0, 1)


def test_overlong_conversations_are_counted_truncated_or_dropped(tok):
    convs = [("f:1", [{"role": "user", "content": "猫是什么？" * 8},
                      {"role": "assistant", "content": "动物"}]),  # answer beyond the cut
             ("f:2", CONVERSATION[1:]),  # cut in its second answer
             ("f:3", CONVERSATION[1:3])]
    long = len(render_chat(tok, CONVERSATION[1:])[0])
    short = len(render_chat(tok, CONVERSATION[1:3])[0])
    first = len(render_chat(tok, convs[0][1])[0])
    seq = short + 2
    assert long > seq and first > seq
    kept, counts = encode_examples(tok, convs, seq, "truncate")
    assert counts == dict(conversations=3, truncated=1, tokens_cut=long - seq, dropped_overlong=0,
                          dropped_no_answer=1, examples=2)
    assert [len(e.ids) for e in kept] == [seq, short]
    kept, counts = encode_examples(tok, convs, seq, "drop")
    assert (counts["dropped_overlong"], counts["truncated"], counts["examples"]) == (2, 0, 1)


@pytest.fixture(scope="module")
def gpt2_base(tmp_path_factory):
    """A base model whose tokenizer (GPT-2 style, as transformers saves it) has no chat
    template: SFT adds ChatML's tokens and grows the model."""
    root = tmp_path_factory.mktemp("gpt2")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    texts = [r["prompt"] + r["response"] for r in TOY] * 10 + ["user assistant system"] * 10
    hf.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=hf, bos_token="<|endoftext|>",
                            eos_token="<|endoftext|>").save_pretrained(root / "tok")
    save_model_dir(tiny(Tokenizer.load(root / "tok").vocab_size), root / "base",
                   tokenizer_dir=root / "tok")
    return root / "base"


def sft_cfg(base, data, out, **train):
    t = dict(batch_size=8, max_steps=60, lr=3e-3, warmup_steps=5, eval_every=0, log_every=5,
             checkpoint_every=0, precision="fp32", device="cpu", weight_decay=0.0, seed=1)
    t.update(train)
    return SFTConfig(model=str(base), data=str(data), out_dir=str(out), val_fraction=0.2,
                     seq_len=64, eval_rows=16, max_new_tokens=8, train=TrainConfig(**t))


@pytest.mark.slow
def test_sft_teaches_a_base_model_to_answer_and_stop(gpt2_base, tmp_path):
    data = write_jsonl(tmp_path / "toy.jsonl", TOY)
    r = finetune_sft(sft_cfg(gpt2_base, data, tmp_path / "out"))
    assert r.run.fit.status == "finished" and r.data["train"] + r.data["val"] == 64
    assert r.before["n"] == r.after["n"] == r.data["val"]
    assert r.after["exact_match"] > r.before["exact_match"]
    assert r.after["stopped"] == 1.0 > r.before["stopped"]
    saved = json.loads((tmp_path / "out" / "sft_eval.json").read_text())
    assert saved["after"] == r.after and saved["answers"][0]["reference"] in CATEGORIES
    assert 0 < r.run.fit.val["val_loss"] < 1.0
    # the run directory is a chat model: the grown tokenizer, and it stops at <|im_end|>
    lm = lmlab.load(tmp_path / "out")
    assert lm.tokenizer.vocab_size == lm.model.vocab_size and lm.tokenizer.chat_template
    prompt = prompt_ids(lm.tokenizer, [{"role": "user", "content": "请问鸡属于哪一类？"}])
    out = generate_ids(lm.model, prompt, 8, temperature=0, eos_id=lm.tokenizer.stop_ids)
    assert out[-1] == lm.tokenizer.token_id(IM_END) and len(out) < 8
    assert lm.tokenizer.decode(out[:-1]) == "动物"


def test_resume_repeats_the_uninterrupted_run(tok, tmp_path):
    base = tmp_path / "base"
    save_model_dir(tiny(tok.vocab_size), base, tokenizer_dir=tok.path)
    data = write_jsonl(tmp_path / "toy.jsonl", TOY[:32])

    def cfg(out, **kw):
        c = sft_cfg(base, data, out, max_steps=8, log_every=1, batch_size=2, grad_accum=2, **kw)
        c.eval_rows = 0
        return c

    finetune_sft(cfg(tmp_path / "straight"))

    def stop_at_4(event, d):
        if event == "log" and d["step"] == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    first = finetune_sft(cfg(tmp_path / "run"), callback=stop_at_4)
    assert first.run.fit.status == "interrupted (SIGTERM)" and first.after is None
    resumed = cfg(tmp_path / "run")
    resumed.resume = True
    finetune_sft(resumed)

    def losses(d):
        return [row["train_loss"] for row in read_metrics(d / "metrics.jsonl")
                if "train_loss" in row]

    assert len(losses(tmp_path / "run")) == 8
    assert losses(tmp_path / "run") == losses(tmp_path / "straight")


def test_lora_sft_trains_adapters_only(tok, gpt2_base, tmp_path):
    base = tmp_path / "base"
    save_model_dir(tiny(tok.vocab_size, "llama-tiny"), base, tokenizer_dir=tok.path)
    data = write_jsonl(tmp_path / "toy.jsonl", TOY[:24])
    cfg = sft_cfg(base, data, tmp_path / "out", max_steps=4)
    cfg.lora = LoraSpec(r=4, alpha=8.0)
    cfg.eval_rows = 2
    r = finetune_sft(cfg)
    assert r.run.fit.step == 4 and r.after["n"] == 2
    lm = lmlab.load(tmp_path / "out")
    lm_base = lmlab.load(base)
    x = torch.tensor([prompt_ids(tok, CONVERSATION[:2])])
    with torch.no_grad():
        assert not torch.allclose(lm.model(x), lm_base.model(x))  # the adapters moved it
    saved = (tmp_path / "out" / "model.safetensors").stat().st_size
    assert saved < (base / "model.safetensors").stat().st_size / 4  # adapters, not the model
    # a base without a chat template: ChatML's new rows (the tied embedding) train beside the
    # adapters, and the run loads back with its grown vocabulary
    cfg.model, cfg.out_dir = str(gpt2_base), str(tmp_path / "grown")
    r = finetune_sft(cfg)
    grown = lmlab.load(tmp_path / "grown")
    assert grown.model.vocab_size == grown.tokenizer.vocab_size > lmlab.load(gpt2_base).model.vocab_size
    reply = grown.chat("你好", max_new_tokens=4, temperature=0)
    assert isinstance(reply, str)


def test_bad_conversations_are_one_line_naming_the_line_and_write_nothing(tok, tmp_path):
    base = tmp_path / "base"
    save_model_dir(tiny(tok.vocab_size), base, tokenizer_dir=tok.path)
    good = json.dumps(TOY[0], ensure_ascii=False)
    for line, why in {
        '{"messages": [{"role": "user", "content": "hi"}]}': "no assistant turn",
        '{"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]}':
            "message 1 has role 'bot'",
        '{"text": "hi"}': "none of the formats",
        "not json": "not JSON",
    }.items():
        data = tmp_path / "bad.jsonl"
        data.write_text(f"{good}\n{good}\n{line}\n")
        out = tmp_path / "out"
        with pytest.raises(InputError, match=f"{data}:3: {why}"):
            finetune_sft(sft_cfg(base, data, out))
        assert not out.exists()
