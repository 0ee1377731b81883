"""LoRA adapters: the base stays bit-identical, only adapters train and are saved, a run
directory rebuilds base + adapters, merging and PEFT's loading of the export give the same
logits, and fused projections are adapted per part exactly like separate ones."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
import torch.nn.functional as F

import lmlab
from lmlab.config import LoraSpec, TrainConfig
from lmlab.errors import ConfigError, InputError
from lmlab.finetune.lora import (LoraLinear, adapters, adapters_disabled, apply_lora,
                                 export_peft, lora_report, merge_lora)
from lmlab.model import Transformer, fastpath, preset
from lmlab.model_io import load_model_dir, read_safetensors, save_model_dir
from lmlab.train.metrics import read_metrics
from lmlab.train.optim import build_adamw
from lmlab.train.runner import run_task

VOCAB, SEQ = 96, 16
SMALL = dict(n_layer=2, d_model=64, n_head=4, d_ff=96, max_seq_len=64)


@pytest.fixture(autouse=True)
def plain_paths(monkeypatch):
    """The plain ops throughout: a measured fast path may take either side on its first calls,
    and these tests compare logits bit for bit."""
    monkeypatch.setenv(fastpath.ENV, "plain")
    fastpath.clear()
    yield
    fastpath.clear()


def tiny(name: str = "llama-tiny", seed: int = 0, **kw) -> Transformer:
    """A tiny model with every weight moved off its init (a mapped-wrong norm or bias shows)."""
    torch.manual_seed(seed)
    model = Transformer(preset(name, **{"vocab_size": VOCAB, **SMALL, **kw}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@torch.no_grad()
def randomize_adapters(model, seed: int = 1, scale: float = 0.1) -> None:
    """B starts at 0 (the adapter is then a no-op); a test of the mapping needs B ≠ 0."""
    g = torch.Generator().manual_seed(seed)
    for _, a in adapters(model):
        for b in a.B.values():
            b.copy_(scale * torch.randn(b.shape, generator=g))


def ids(seed: int = 2, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


class RepeatTask:
    """Next-token loss on rows that repeat their first half: batches a pure function of the step."""

    eval_keys = ("nats", "n")

    def _rows(self, seed: int, n: int = 8):
        g = torch.Generator().manual_seed(seed)
        half = torch.randint(5, VOCAB, (n, SEQ // 2 + 1), generator=g)
        w = torch.cat([half, half], 1)
        return w[:, :-1], w[:, 1:]

    def train_batch(self, step, micro, accum, rank, world):
        return self._rows(1000 + (step * accum + micro) * world + rank)

    def loss(self, model, batch):
        x, y = batch
        return model(x, targets=y)

    def val_batches(self, rank, world):
        yield self._rows(7)

    def eval_sums(self, model, batch):
        x, y = batch
        return {"nats": float(model(x, targets=y, reduction="sum")), "n": y.numel()}

    def eval_metrics(self, s):
        return {"val_loss": s["nats"] / s["n"]}

    def tokens_per_step(self, accum, world):
        return 8 * SEQ * accum * world


def train_cfg(**kw) -> TrainConfig:
    base = dict(batch_size=8, max_steps=6, lr=1e-2, warmup_steps=1, eval_every=0, log_every=1,
                checkpoint_every=0, precision="fp32", seed=0, device="cpu", weight_decay=0.0)
    return TrainConfig(**{**base, **kw})


@pytest.fixture
def base_dir(tmp_path, tokenizer_dir):
    save_model_dir(tiny(vocab_size=2048), tmp_path / "base", tokenizer_dir=tokenizer_dir)
    return tmp_path / "base"


def lora_model(base_dir, **spec):
    torch.manual_seed(0)
    return apply_lora(load_model_dir(base_dir), LoraSpec(**{"r": 4, **spec}), base_dir)


# ------------------------------------------------------------------ the layers


def test_starts_as_the_base_and_only_adapters_are_trainable(base_dir):
    base = load_model_dir(base_dir)
    x = ids()
    model = lora_model(base_dir, targets=["all-linear"])
    assert torch.equal(model(x), base(x))  # B = 0: exactly the base at step 0
    cfg, r = model.cfg, 4
    q, kv, ff, d = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.d_ff, cfg.d_model
    # per layer: q k v (in d), o (in q), gate up (in d), down (in ff): r·in for A, out·r for B
    per_layer = r * (3 * d + (q + kv + kv)) + r * (q + d) + r * (2 * d + 2 * ff) + r * (ff + d)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(".lora." in n for n in trainable)
    opt = build_adamw(model, 1e-3, 0.0)
    in_optimizer = [p for g in opt.param_groups for p in g["params"]]
    assert sum(p.numel() for p in in_optimizer) == cfg.n_layer * per_layer
    assert {id(p) for p in in_optimizer} == {id(p) for p in model.parameters() if p.requires_grad}


def test_fused_qkv_and_gate_up_are_adapted_per_part_like_separate_projections(tmp_path):
    model = tiny(qkv_bias=True)
    save_model_dir(model, tmp_path / "base")
    apply_lora(model, LoraSpec(r=3, alpha=6.0, targets=["q", "v", "gate", "up"]),
               tmp_path / "base")
    randomize_adapters(model)
    attn, mlp = model.blocks[1].attn, model.blocks[1].mlp
    x = torch.randn(2, 5, model.cfg.d_model)
    scale = 6.0 / 3
    q, kv = attn.n_head * attn.head_dim, attn.n_kv_head * attn.head_dim
    w, b = attn.qkv.weight, attn.qkv.bias
    wq, wk, wv = w.split([q, kv, kv])
    lo = attn.qkv.lora

    def separate(x, w, bias, part=None, lora=lo):
        y = F.linear(x, w, bias)
        return y if part is None else y + scale * (x @ lora.A[part].T) @ lora.B[part].T

    bq, bk, bv = b.split([q, kv, kv])
    ref = torch.cat([separate(x, wq, bq, "q"), separate(x, wk, bk), separate(x, wv, bv, "v")], -1)
    with torch.no_grad():
        torch.testing.assert_close(attn.qkv(x), ref, rtol=0, atol=1e-6)
        wg, wu = mlp.fc.weight.split(2 * [model.cfg.d_ff])
        ref = torch.cat([separate(x, wg, None, "gate", mlp.fc.lora),
                         separate(x, wu, None, "up", mlp.fc.lora)], -1)
        torch.testing.assert_close(mlp.fc(x), ref, rtol=0, atol=1e-6)
    assert not isinstance(attn.proj, LoraLinear)  # "o" was not asked for


def test_adapters_disabled_gives_the_base_outputs(base_dir):
    base = load_model_dir(base_dir)
    model = lora_model(base_dir, targets=["all-linear", "lm_head"])
    randomize_adapters(model)
    x = ids()
    adapted = model(x)
    assert not torch.allclose(adapted, base(x))
    with adapters_disabled(model):
        assert torch.equal(model(x), base(x))
        assert torch.equal(model(x, targets=x), base(x, targets=x))  # the loss path too
    assert torch.equal(model(x), adapted)


@pytest.mark.parametrize("targets,message", [
    (["gate"], "'gate' matches no layer of this model (a GELU MLP has no gate"),
    (["qproj"], "unknown target 'qproj'"),
])
def test_a_target_that_matches_no_layer_is_one_line(tmp_path, targets, message):
    save_model_dir(tiny("tiny"), tmp_path / "gpt2")
    with pytest.raises(ConfigError) as e:
        apply_lora(load_model_dir(tmp_path / "gpt2"), LoraSpec(r=4, targets=targets),
                   tmp_path / "gpt2")
    assert message in str(e.value) and str(e.value).startswith("lora.targets:")
    assert "\n" not in str(e.value) and "q k v o up down lm_head" in str(e.value)


def test_modules_to_save_train_whole_beside_the_adapters_and_unknown_ones_are_refused(tmp_path):
    save_model_dir(tiny("tiny"), tmp_path / "gpt2")
    model = apply_lora(load_model_dir(tmp_path / "gpt2"),
                       LoraSpec(r=4, modules_to_save=["tok_emb"]), tmp_path / "gpt2")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "tok_emb.weight" in trained and all(".lora." in n for n in trained - {"tok_emb.weight"})
    with pytest.raises(ConfigError, match=r"^lora.modules_to_save: \['embed'\] match no module"):
        apply_lora(load_model_dir(tmp_path / "gpt2"), LoraSpec(r=4, modules_to_save=["embed"]),
                   tmp_path / "gpt2")


# ------------------------------------------------------------------ runs and directories


def test_training_keeps_the_base_bit_identical_and_saves_adapters_only(base_dir, tmp_path):
    model = lora_model(base_dir, targets=["all-linear"])
    run = tmp_path / "run"
    r = run_task(model, RepeatTask(), train_cfg(), run, tokenizer_dir=str(base_dir),
                 trainable_only=True)
    assert r.fit.step == 6
    losses = [m["train_loss"] for m in read_metrics(run / "metrics.jsonl") if "train_loss" in m]
    assert losses[-1] < losses[0]
    base = read_safetensors(base_dir / "model.safetensors")
    ours = model.state_dict()
    for k, v in base.items():
        assert torch.equal(ours[k], v), k  # every frozen tensor bit for bit
    saved = read_safetensors(run / "model.safetensors")
    assert saved and all(".lora." in k for k in saved)
    assert any(bool(v.abs().sum()) for k, v in saved.items() if ".lora.B." in k)  # B trained
    size, base_size = ((d / "model.safetensors").stat().st_size for d in (run, base_dir))
    assert size < base_size / 5
    report = lora_report(run)
    assert report["base"] == str(base_dir.resolve()) and report["r"] == 4
    assert report["saved_params"] == sum(v.numel() for v in saved.values())
    assert report["saved_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora_report(base_dir) is None
    # the run directory rebuilds base + adapters: the same logits, bit for bit
    lm = lmlab.load(run)
    x = ids()
    assert torch.equal(lm.model(x), model.eval()(x))
    assert isinstance(lm.generate("def ", max_new_tokens=5), str)
    # a run on a run: its adapters are folded into the base, new ones trained on top
    again = apply_lora(load_model_dir(run), LoraSpec(r=2, targets=["v"]), run)
    randomize_adapters(again)
    save_model_dir(again, tmp_path / "again")
    torch.testing.assert_close(load_model_dir(tmp_path / "again")(x), again(x), rtol=0, atol=1e-6)


def test_sigterm_then_resume_gives_the_same_losses(base_dir, tmp_path):
    def stop_at(step):
        def callback(event, data):
            if event == "log" and data["step"] == step:
                os.kill(os.getpid(), signal.SIGTERM)
        return callback

    spec = dict(targets=["q", "v", "down"], dropout=0.1)
    run_task(lora_model(base_dir, **spec), RepeatTask(), train_cfg(), tmp_path / "straight",
             trainable_only=True)
    first = run_task(lora_model(base_dir, **spec), RepeatTask(), train_cfg(), tmp_path / "cut",
                     callback=stop_at(3), trainable_only=True)
    assert first.fit.status == "interrupted (SIGTERM)"
    (ckpt,) = (tmp_path / "cut" / "checkpoints").iterdir()
    assert all(".lora." in k for k in read_safetensors(ckpt / "model.safetensors"))
    assert torch.equal(load_model_dir(ckpt)(ids()), load_model_dir(tmp_path / "cut")(ids()))
    run_task(lora_model(base_dir, **spec), RepeatTask(), train_cfg(), tmp_path / "cut",
             resume=True, trainable_only=True)

    def losses(d):
        return [m["train_loss"] for m in read_metrics(d / "metrics.jsonl") if "train_loss" in m]

    assert losses(tmp_path / "cut") == losses(tmp_path / "straight")


def test_a_changed_or_missing_base_is_refused_in_one_line(base_dir, tmp_path):
    model = lora_model(base_dir)
    save_model_dir(model, tmp_path / "run")
    save_model_dir(tiny(vocab_size=2048, seed=5), base_dir)  # same config, other weights
    with pytest.raises(InputError, match=r"has changed since .*model.safetensors differs"):
        load_model_dir(tmp_path / "run")
    for f in base_dir.iterdir():
        f.unlink()
    base_dir.rmdir()
    with pytest.raises(InputError, match="is gone") as e:
        lmlab.load(tmp_path / "run")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name,targets", [("llama-tiny", ["all-linear", "lm_head"]),
                                          ("tiny", ["all-linear", "lm_head"])])
def test_merge_equals_the_unmerged_model(tmp_path, name, targets):
    base = tiny(name)  # "tiny" (GPT-2) ties lm_head to the embedding: merged, they part
    save_model_dir(base, tmp_path / "base")
    model = apply_lora(load_model_dir(tmp_path / "base"), LoraSpec(r=4, targets=targets),
                       tmp_path / "base")
    randomize_adapters(model)
    save_model_dir(model, tmp_path / "run")
    merge_lora(tmp_path / "run", tmp_path / "merged")
    merged = load_model_dir(tmp_path / "merged")
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    assert "adapter" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(merged.tok_emb.weight, base.tok_emb.weight, rtol=0, atol=0)
    with pytest.raises(InputError, match="already holds"):
        merge_lora(tmp_path / "run", tmp_path / "base")
    with pytest.raises(InputError, match="holds no LoRA adapters"):
        merge_lora(tmp_path / "merged", tmp_path / "again")


@pytest.mark.parametrize("name,targets", [
    ("llama-tiny", ["all-linear", "lm_head"]),  # q/k/v_proj, gate/up_proj apart in HF: rank r
    ("tiny", ["q", "v", "o", "up"]),  # GPT-2's fused c_attn: one rank-2r adapter (k rows 0)
])
def test_peft_loads_the_export_on_the_export_hf_base(tmp_path, name, targets):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from lmlab.interop import export_hf

    save_model_dir(tiny(name), tmp_path / "base")
    model = apply_lora(load_model_dir(tmp_path / "base"),
                       LoraSpec(r=4, alpha=8.0, targets=targets), tmp_path / "base")
    randomize_adapters(model)
    save_model_dir(model, tmp_path / "run")
    export_hf(tmp_path / "base", tmp_path / "hf")
    export_peft(tmp_path / "run", tmp_path / "peft", base_model=str(tmp_path / "hf"))
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf",
                                                           attn_implementation="eager")
    tuned = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    x = ids()
    with torch.no_grad():
        diff = (tuned(x).logits - model.eval()(x)).abs().max().item()
        assert diff <= 1e-4, diff
        with tuned.disable_adapter():  # and the adapters are what makes the difference
            assert (tuned(x).logits - model(x)).abs().max().item() > 1e-3


# ------------------------------------------------------------------ classification


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    import random

    rng = random.Random(0)
    rows = []
    for i in range(200):
        label = rng.choice(["pos", "neg"])
        word = rng.choice(["好", "喜欢", "great"] if label == "pos" else ["差", "失望", "bad"])
        rows.append({"text": f"{rng.choice(['这本书', '物流', 'the item'])} {word} #{i}",
                     "label": label})
    path = tmp_path_factory.mktemp("reviews") / "reviews.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("body", ["llama", "bert"])
def test_classify_with_lora_saves_head_and_adapters(reviews, tmp_path, tokenizer_dir, body):
    from lmlab.config import ClassifyConfig
    from lmlab.finetune.classify import finetune_classify
    from lmlab.model.encoder import Encoder

    torch.manual_seed(0)
    sizes = dict(vocab_size=2048, **SMALL)
    model = (Transformer(preset("llama-tiny", **sizes)) if body == "llama"
             else Encoder.from_spec({"preset": "bert-tiny", **sizes}))
    save_model_dir(model, tmp_path / "body", tokenizer_dir=tokenizer_dir)
    out = tmp_path / "clf"
    r = finetune_classify(ClassifyConfig(
        data=str(reviews), model=str(tmp_path / "body"), out_dir=str(out), max_len=16,
        lora=LoraSpec(r=4, alpha=8.0), train=train_cfg(max_steps=20, lr=1e-2, eval_every=10)))
    saved = read_safetensors(out / "model.safetensors")
    assert {k for k in saved if ".lora." not in k} == {"head.weight", "head.bias"}
    assert r.test["n"] > 0
    texts = ["这本书 喜欢", "物流 失望"]
    pred = lmlab.load(out).classify(texts)
    assert [p[0] for p in pred] == ["pos", "neg"] or body == "bert"  # bert: it runs
    merge_lora(out, tmp_path / "merged")  # a plain classifier, the same probabilities
    merged = lmlab.load(tmp_path / "merged").classify(texts)
    for (label, probs), (again, probs2) in zip(pred, merged):
        assert label == again and probs == pytest.approx(probs2, abs=1e-5)
    with pytest.raises(ConfigError, match="lora.targets: 'lm_head' .*classifier"):
        finetune_classify(ClassifyConfig(
            data=str(reviews), model=str(tmp_path / "body"), out_dir=str(tmp_path / "x"),
            lora=LoraSpec(r=4, targets=["lm_head"]), train=train_cfg(max_steps=1)))
    assert not (tmp_path / "x").exists()  # refused before anything is written
