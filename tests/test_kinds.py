"""Model kinds: a second kind, defined here, goes through the same code paths as the
Transformer — pretrain, checkpoint, resume, `lmlab.load`, generate — and old model
directories without a kind still load."""

import json
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lmlab
from lmlab.config import ModelSpec, PretrainConfig, TrainConfig
from lmlab.errors import ConfigError, InputError
from lmlab.infer import generate_ids
from lmlab.model import build_model, model_kinds, preset, register_kind, Transformer
from lmlab.model_io import load_model_dir, read_model_config, save_model_dir
from lmlab.train import checkpoint as ckpt
from lmlab.train.metrics import read_metrics
from lmlab.train.pretrain import pretrain
from tests.conftest import write_shards


class GRUState:
    def __init__(self, h, pad):
        self.h, self.pad, self.t = h, pad, 0


@register_kind("test-gru")
class TinyGRU(nn.Module):
    """A one-layer GRU language model: no context limit, its decode state is the hidden state."""

    max_seq_len = None

    def __init__(self, vocab_size: int, d_model: int = 32):
        super().__init__()
        self.vocab_size, self.d_model = vocab_size, d_model
        self.emb = nn.Embedding(vocab_size, d_model)
        self.cell = nn.GRUCell(d_model, d_model)
        self.out = nn.Linear(d_model, vocab_size)

    @classmethod
    def from_config_dict(cls, d):
        return cls(**d)

    @classmethod
    def from_spec(cls, fields):
        return cls(fields["vocab_size"], fields.get("d_model", 32))

    def config_dict(self):
        return {"vocab_size": self.vocab_size, "d_model": self.d_model}

    def _run(self, ids, h, pad=None, t0=0):
        outs = []
        for t in range(ids.shape[1]):
            new = self.cell(self.emb(ids[:, t]), h)
            # a left-padding slot leaves the state as it was
            h = new if pad is None else torch.where((t0 + t >= pad)[:, None], new, h)
            outs.append(h)
        return torch.stack(outs, 1), h

    def forward(self, ids, targets=None, reduction="mean"):
        hs, _ = self._run(ids, ids.new_zeros(()).float().expand(ids.shape[0], self.d_model))
        logits = self.out(hs)
        if targets is None:
            return logits
        nats = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none",
                               ignore_index=-100).view(targets.shape)
        if reduction == "none":
            return nats
        return nats.sum() / (targets != -100).sum() if reduction == "mean" else nats.sum()

    def new_decode_state(self, batch_size, max_len, pad=None):
        return GRUState(torch.zeros(batch_size, self.d_model, device=self.emb.weight.device), pad)

    def decode_step(self, ids, state):
        hs, state.h = self._run(ids, state.h, state.pad, state.t)
        state.t += ids.shape[1]
        return self.out(state.h)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tokenizer, tokenizer_dir, corpus_texts):
    return write_shards(tmp_path_factory.mktemp("shards"), tokenizer, tokenizer_dir,
                        corpus_texts[:40], val_every=10)


def gru_cfg(shards, out_dir, **train) -> PretrainConfig:
    base = dict(batch_size=8, max_steps=16, lr=3e-2, warmup_steps=2, eval_every=8,
                eval_tokens=1024, log_every=1, checkpoint_every=0, precision="fp32", seed=5)
    base.update(train)
    return PretrainConfig(data=str(shards), out_dir=str(out_dir), seq_len=32,
                          model=ModelSpec(kind="test-gru", preset=None, d_model=32),
                          train=TrainConfig(**base))


def losses(run_dir):
    return [r["train_loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "train_loss" in r]


def test_a_second_kind_pretrains_resumes_loads_and_generates(shards, tmp_path, tokenizer):
    assert {"transformer", "test-gru"} <= set(model_kinds())
    straight = tmp_path / "straight"
    r = pretrain(gru_cfg(shards, straight))
    assert r.kind == "test-gru" and r.fit.step == 16
    ls = losses(straight)
    assert sum(ls[-3:]) / 3 < ls[0] - 1.0
    assert 0 < r.fit.val["val_bpb"] < 16

    run = tmp_path / "resumed"

    def stop_at_4(event, data):
        if event == "log" and data["step"] == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    r1 = pretrain(gru_cfg(shards, run), callback=stop_at_4)
    assert r1.fit.status == "interrupted (SIGTERM)"
    assert [c.name for c in ckpt.list_checkpoints(run)] == ["step_000004"]
    assert read_model_config(ckpt.list_checkpoints(run)[0]) [0] == "test-gru"
    cfg = gru_cfg(shards, run)
    cfg.resume = True
    pretrain(cfg)
    assert losses(run) == losses(straight)

    lm = lmlab.load(run)
    assert isinstance(lm.model, TinyGRU)
    text = lm.generate("def ", max_new_tokens=12, temperature=0)
    assert isinstance(text, str) and text == lm.generate("def ", max_new_tokens=12, temperature=0)
    # batched (left-padded) decoding equals one prompt at a time, through the kind's state
    prompts = [tokenizer.encode("import os\n"), tokenizer.encode("x"),
               tokenizer.encode("def f(a, b):")]
    batched = generate_ids(lm.model, prompts, 8, temperature=0, eos_id=None)
    alone = [generate_ids(lm.model, p, 8, temperature=0, eos_id=None) for p in prompts]
    assert batched == alone
    # and decoding equals the full forward's argmax, step by step
    ids = prompts[0] + alone[0][:-1]
    with torch.no_grad():
        full = lm.model(torch.tensor([ids]))[0].argmax(-1).tolist()
    assert full[len(prompts[0]) - 1:] == alone[0]


def test_old_directory_without_kind_loads_as_transformer(tmp_path):
    model = Transformer(preset("tiny", vocab_size=300))
    save_model_dir(model, tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    raw = json.loads(cfg_path.read_text())
    assert raw["kind"] == "transformer"
    cfg_path.write_text(json.dumps({"lmlab_model": raw["lmlab_model"]}))  # as lmlab 0.1 wrote it
    back = load_model_dir(tmp_path / "m")
    assert isinstance(back, Transformer)
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


def test_unknown_kind_is_one_clear_error(tmp_path):
    save_model_dir(TinyGRU(50), tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    raw = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**raw, "kind": "mamba-9000"}))
    with pytest.raises(InputError, match="unknown model kind 'mamba-9000'"):
        load_model_dir(tmp_path / "m")
    with pytest.raises(ConfigError, match="known kinds"):
        build_model("mamba-9000", {})


def test_tied_weights_are_stored_once_and_come_back_tied(tmp_path):
    model = Transformer(preset("tiny", vocab_size=300))
    save_model_dir(model, tmp_path / "m")
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert "tok_emb.weight" in stored and "lm_head.weight" not in stored
    back = load_model_dir(tmp_path / "m")
    assert back.lm_head.weight.data_ptr() == back.tok_emb.weight.data_ptr()
