"""DPO through the one loop: the loss equals the formula and TRL's on the same numbers, response
log-probs equal a full-logits reference, held-out reward accuracy rises, the reference is
computed once (and read back on resume), LoRA keeps the base and takes it as the reference,
and bad pairs are one line naming path:line."""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import lmlab
from lmlab.config import DPOConfig, LoraSpec, TrainConfig
from lmlab.errors import ConfigError, InputError
from lmlab.finetune import dpo
from lmlab.finetune.dpo import (REF_FILE, dpo_loss, encode_pairs, finetune_dpo, pair_batch,
                                pair_logps, read_preferences, reference_logps)
from lmlab.model import Transformer, preset
from lmlab.model_io import load_model_dir, read_safetensors, save_model_dir
from lmlab.tokenizer import Tokenizer

SYSTEM = "你是一个计算器，只回答数字。"


def pref_rows(n: int, seed: int = 0) -> list[dict]:
    """Sums in Chinese: chosen the answer, rejected a refusal; prompts as text or messages
    (some with a system turn), responses as text or an assistant message."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        q = f"{a}+{b}等于几？"
        prompt = q if i % 3 else [{"role": "system", "content": SYSTEM},
                                  {"role": "user", "content": q}]
        chosen = str(a + b) if i % 2 else [{"role": "assistant", "content": str(a + b)}]
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": "我不知道。"})
    return rows


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer_dir, tokenizer):
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=tokenizer.vocab_size, n_layer=2, d_model=64,
                               n_head=4, max_seq_len=96))
    out = tmp_path_factory.mktemp("dpo") / "base"
    save_model_dir(model, out, tokenizer_dir=tokenizer_dir)
    return out


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("prefs") / "prefs.jsonl", pref_rows(80))


def train_cfg(**kw) -> TrainConfig:
    base = dict(batch_size=8, max_steps=30, lr=3e-3, warmup_steps=3, eval_every=10,
                eval_tokens=0, log_every=5, checkpoint_every=0, precision="fp32",
                weight_decay=0.0, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------ the loss


def trl_dpo_loss(pc, pr, rc, rr, beta):
    """TRL's DPOTrainer loss (sigmoid, reverse KL, precomputed reference) on these log-probs.

    `DPOTrainer._compute_loss` takes the policy's log-probs from a model's logits: here a
    stand-in model whose logits over a 2-token vocabulary give each row exactly its number
    at its one completion token (log_softmax([a, 0])[0] = logsigmoid(a))."""
    from trl import DPOTrainer

    logps = torch.cat([pc, pr])  # TRL's batch: the chosen rows, then the rejected ones
    n = len(logps)
    logits = torch.zeros(n, 2, 2)
    logits[:, 0, 0] = logps - torch.log(-torch.expm1(logps))  # logsigmoid(a) = logp
    inputs = {"input_ids": torch.zeros(n, 2, dtype=torch.long),
              "attention_mask": torch.ones(n, 2, dtype=torch.long),
              "completion_mask": torch.tensor([[0, 1]] * n),
              "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    same = lambda t: t  # noqa: E731 — one process: gathering is the identity
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), ref_model=None, args=SimpleNamespace(),
        accelerator=SimpleNamespace(device="cpu", gather=same, gather_for_metrics=same,
                                    unwrap_model=same),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=["sigmoid"], loss_weights=[1.0], beta=beta,
        label_smoothing=0.0, use_weighting=False, _metrics={"train": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1)
    loss = DPOTrainer._compute_loss(trainer, lambda **kw: SimpleNamespace(logits=logits),
                                    inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.slow  # importing trl takes ~7 s
def test_loss_equals_the_formula_and_trl():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-(torch.rand(16, generator=g) * 30 + 0.1) for _ in range(4))
    beta = 0.3
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta)
    # independently: −log σ(β[(π_w − ref_w) − (π_l − ref_l)]) in float64 by math
    for i in range(16):
        z = beta * ((float(pc[i]) - float(rc[i])) - (float(pr[i]) - float(rr[i])))
        assert float(losses[i]) == pytest.approx(-math.log(1 / (1 + math.exp(-z))), rel=1e-5,
                                                 abs=1e-6)
    assert torch.allclose(chosen, beta * (pc - rc)) and torch.allclose(rejected, beta * (pr - rr))
    try:
        theirs, logged = trl_dpo_loss(pc, pr, rc, rr, beta)
    except (ImportError, AttributeError, TypeError, KeyError) as e:
        pytest.skip(f"trl's DPOTrainer._compute_loss cannot run on fixed numbers here ({e!r})")
    assert float(theirs) == pytest.approx(float(losses.mean()), rel=1e-5)
    assert logged["rewards/margins"] == pytest.approx(float((chosen - rejected).mean()), rel=1e-5)
    ours = dpo.reward_sums(torch.stack([pc, pr], 1), torch.stack([rc, rr], 1), beta)
    assert logged["rewards/accuracies"] == pytest.approx(ours["acc_sum"] / 16)  # no ties here
    assert ours["loss_sum"] / 16 == pytest.approx(float(theirs), rel=1e-5)


def test_a_tie_counts_half_so_the_starting_model_scores_one_half():
    ref = torch.tensor([[-3.0, -5.0], [-2.0, -1.0]])
    s = dpo.reward_sums(ref, ref, beta=0.1)
    assert s["acc_sum"] == 1.0 and s["margin_sum"] == 0.0
    assert s["loss_sum"] == pytest.approx(2 * math.log(2))


# ------------------------------------------------------------------ log-probs and data


def test_response_logps_equal_full_logits(base_dir, prefs, tokenizer):
    model = load_model_dir(base_dir).eval()
    records = read_preferences(prefs)[:6]
    pairs, report = encode_pairs(tokenizer, records, seq_len=96)
    assert report == {"pairs": 6, "truncated": 0, "dropped": 0}
    # a response's scored tokens are the answer, its end-of-turn token and ChatML's "\n"
    first = pairs[0].chosen
    scored = [t for t in first.labels if t != -100]
    assert tokenizer.decode(scored) == f"{records[0].chosen[0]['content']}<|im_end|>\n"
    assert first.ids[:len(first.ids) - len(scored)] == dpo.prompt_ids(tokenizer, records[0].prompt)

    ids, targets = pair_batch(pairs, tokenizer.pad_id, max_width=95)
    assert ids.shape[1] % dpo.WIDTH_STEP == 0 or ids.shape[1] == 95
    with torch.no_grad():
        got = pair_logps(model, ids, targets)  # (6, 2), by the loss's row_sum
        logp = F.log_softmax(model(ids).double(), -1)  # the full logits
    counted = targets != -100
    picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    ref = (picked * counted).sum(-1).view(2, -1).t()
    assert torch.allclose(got.double(), ref, atol=1e-4), (got, ref)
    # one pair alone = in the padded batch: padding never reaches a row's score
    alone = reference_logps(model, pairs[2:3], tokenizer.pad_id, 1, torch.device("cpu"))
    assert torch.allclose(alone, got[2:3], atol=1e-5)


def test_overlong_pairs_are_truncated_from_the_prompts_left_or_dropped(tokenizer):
    long_prompt = "很长的问题" * 30
    rows = [{"prompt": long_prompt, "chosen": "5", "rejected": "我不知道。"},
            {"prompt": "1+1?", "chosen": "二" * 80, "rejected": "2"},
            {"prompt": "1+2?", "chosen": "3", "rejected": "4"}]
    records = [dpo.PreferenceRecord(f"x:{i}", dpo._messages(r["prompt"], "x", "prompt", "user"),
                                    dpo._messages(r["chosen"], "x", "chosen", "assistant"),
                                    dpo._messages(r["rejected"], "x", "rejected", "assistant"))
               for i, r in enumerate(rows)]
    pairs, report = encode_pairs(tokenizer, records, seq_len=32)
    assert report == {"pairs": 3, "truncated": 1, "dropped": 1}
    assert pairs[1] is None and pairs[2] is not None
    cut = pairs[0]
    full = dpo.prompt_ids(tokenizer, records[0].prompt)
    longer = max((cut.chosen, cut.rejected), key=lambda s: sum(t != -100 for t in s.labels))
    assert len(longer.ids) == 32  # filled to seq_len exactly, the prompt's right end kept
    n_prompt = sum(t == -100 for t in cut.chosen.labels)
    assert cut.chosen.ids[:n_prompt] == cut.rejected.ids[:n_prompt] == full[-n_prompt:]


# ------------------------------------------------------------------ training


@pytest.mark.slow  # ~5 s: 20 steps, the reference pass and three validations
def test_dpo_raises_held_out_reward_accuracy_with_one_forward_per_step(
        base_dir, prefs, tmp_path, monkeypatch):
    calls = {"grad": 0, "ref": 0}
    forward = Transformer.forward

    def counted(self, *a, **kw):
        calls["grad"] += torch.is_grad_enabled()
        return forward(self, *a, **kw)

    def counted_ref(*a, **kw):
        calls["ref"] += 1
        return reference_logps(*a, **kw)

    monkeypatch.setattr(Transformer, "forward", counted)
    monkeypatch.setattr(dpo, "reference_logps", counted_ref)
    out = tmp_path / "run"
    r = finetune_dpo(DPOConfig(model=str(base_dir), data=prefs, out_dir=str(out), beta=0.1,
                               val_fraction=0.25, train=train_cfg(max_steps=20)))
    # the reference: once, before training; a step: one forward (chosen + rejected together)
    assert calls == {"grad": 20, "ref": 1} and not r.ref_reused
    rep = r.data_report
    assert rep["train"] + rep["val"] == 80 and rep["val"] >= 10 and rep["dropped"] == 0
    assert r.before["val_reward_acc"] == 0.5 and r.before["val_loss"] == pytest.approx(math.log(2))
    assert r.after["val_reward_acc"] >= 0.8 > r.before["val_reward_acc"], r.after
    assert r.after["val_loss"] < math.log(2) and r.after["val_margin"] > 0
    assert r.run.best["metric"] == "val_reward_acc"
    saved = json.loads((out / dpo.REPORT_FILE).read_text())
    assert saved["after"] == r.after and saved["data"] == rep
    # the run directory is a model directory that prefers the chosen answers
    tuned = lmlab.load(out)
    pairs = [p for p in encode_pairs(tuned.tokenizer, read_preferences(prefs), 96)[0]]
    policy = reference_logps(tuned.model, pairs, tuned.tokenizer.pad_id, 16, torch.device("cpu"))
    cache = read_safetensors(out / REF_FILE)["logps"]
    assert dpo.reward_sums(policy, cache, 0.1)["acc_sum"] / 80 >= 0.8


def test_resume_reads_the_reference_back(base_dir, prefs, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = dict(model=str(base_dir), data=prefs, out_dir=str(out), val_fraction=0.25)
    first = finetune_dpo(DPOConfig(**cfg, train=train_cfg(max_steps=4, eval_every=0)))
    saved = read_safetensors(out / REF_FILE)["logps"]
    assert not first.ref_reused and saved.shape == (80, 2)
    calls = []
    monkeypatch.setattr(dpo, "reference_logps", lambda *a, **kw: calls.append(1))
    again = finetune_dpo(DPOConfig(**cfg, resume=True, train=train_cfg(max_steps=6, eval_every=0)))
    assert again.ref_reused and not calls and again.run.fit.step == 6
    assert torch.equal(read_safetensors(out / REF_FILE)["logps"], saved)
    # and the cache is what the starting model gives: recomputing it changes nothing
    monkeypatch.undo()
    model = load_model_dir(base_dir)
    tok = Tokenizer.load(base_dir)
    records = read_preferences(prefs)
    pairs, _ = encode_pairs(tok, records, 96)  # the cache's rows: the pairs in file order
    fresh = reference_logps(model, pairs, tok.pad_id, 8, torch.device("cpu"))
    assert torch.allclose(fresh, saved, atol=1e-5)


def test_with_lora_the_base_stays_and_is_the_reference(base_dir, prefs, tmp_path):
    lora = pytest.importorskip("lmlab.finetune.lora")
    out = tmp_path / "lora"
    r = finetune_dpo(DPOConfig(model=str(base_dir), data=prefs, out_dir=str(out),
                               val_fraction=0.25, lora=LoraSpec(r=4, alpha=8.0),
                               train=train_cfg(lr=1e-2, max_steps=20)))
    assert r.after["val_reward_acc"] > r.before["val_reward_acc"]
    tuned = lmlab.load(out).model
    base = load_model_dir(base_dir)
    tuned_state = tuned.state_dict()
    for k, v in base.state_dict().items():  # every base weight bit-identical
        assert torch.equal(tuned_state[k], v), k
    tok = Tokenizer.load(base_dir)
    pairs, _ = encode_pairs(tok, read_preferences(prefs), 96)
    cache = read_safetensors(out / REF_FILE)["logps"]
    with lora.adapters_disabled(tuned):
        off = reference_logps(tuned, pairs, tok.pad_id, 8, torch.device("cpu"))
    on = reference_logps(tuned, pairs, tok.pad_id, 8, torch.device("cpu"))
    assert torch.allclose(off, cache, atol=1e-5)
    assert not torch.allclose(on, cache, atol=1e-3)


# ------------------------------------------------------------------ bad input


GOOD = {"prompt": "1+1=?", "chosen": "2", "rejected": "3"}


@pytest.mark.parametrize("line, words", [
    ('{"prompt": "1+1=?", "chosen": ', "not JSON"),
    ('[1, 2]', "not an object"),
    ('{"prompt": "1+1=?", "chosen": "2"}', "no field 'rejected'"),
    ('{"prompt": "1+1=?", "chosen": "", "rejected": "3"}', "chosen is empty"),
    ('{"prompt": "1+1=?", "chosen": "2", "rejected": []}', "rejected is empty"),
    ('{"prompt": "1+1=?", "chosen": "2", "rejected": "2"}', "no preference"),
    ('{"prompt": 5, "chosen": "2", "rejected": "3"}', "prompt is a JSON int"),
    ('{"prompt": "  ", "chosen": "2", "rejected": "3"}', "prompt is empty"),
    ('{"prompt": [{"role": "user"}], "chosen": "2", "rejected": "3"}', "prompt: message 1"),
    ('{"prompt": [{"role": "bot", "content": "hi"}], "chosen": "2", "rejected": "3"}',
     "role 'bot'"),
    ('{"prompt": "1+1=?", "chosen": [{"role": "user", "content": "2"}], "rejected": "3"}',
     "chosen has no assistant turn"),
])
def test_a_bad_pair_is_one_line_naming_path_line_and_nothing_is_written(
        base_dir, tmp_path, line, words):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(GOOD) + "\n" + line + "\n", encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(InputError) as e:
        finetune_dpo(DPOConfig(model=str(base_dir), data=str(data), out_dir=str(out),
                               train=train_cfg()))
    msg = str(e.value)
    assert f"{data}:2: " in msg and words in msg and "\n" not in msg, msg
    assert not out.exists()


def test_bad_settings_are_one_line(base_dir, prefs, tmp_path):
    with pytest.raises(ConfigError, match="seq_len 200: the model reads at most 96"):
        finetune_dpo(DPOConfig(model=str(base_dir), data=prefs, seq_len=200,
                               out_dir=str(tmp_path / "o")))
    with pytest.raises(InputError, match="no such file"):
        finetune_dpo(DPOConfig(model=str(base_dir), data=str(tmp_path / "none.jsonl"),
                               out_dir=str(tmp_path / "o")))
    with pytest.raises(ConfigError, match="--model DIR"):
        finetune_dpo(DPOConfig(data=prefs, out_dir=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()
