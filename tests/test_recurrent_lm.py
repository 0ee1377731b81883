"""The recurrent language-model kinds (rnn, lstm, gru): incremental decoding equals the full
forward, the loss falls on real text through `pretrain`, and they save, resume, load and
generate through the same code paths as the Transformer."""

import os
import signal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lmlab
from lmlab.config import ModelSpec, PretrainConfig, TrainConfig
from lmlab.errors import ConfigError
from lmlab.infer import generate_ids
from lmlab.model import build_from_spec, build_model
from lmlab.model.recurrent import ElmanRNNLM, LSTMLM
from lmlab.model_io import load_model_dir, save_model_dir
from lmlab.train import checkpoint as ckpt
from lmlab.train.metrics import read_metrics
from lmlab.train.pretrain import pretrain
from tests.conftest import write_shards

KINDS = ["rnn", "lstm", "gru"]


def tiny(kind, **kw):
    return build_from_spec(kind, {"vocab_size": 300, "d_model": 24, "n_layer": 2, **kw}).eval()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("d_embed", [None, 16])
def test_stateful_decoding_equals_the_full_forward(kind, d_embed):
    model = tiny(kind, d_embed=d_embed)
    ids = torch.randint(0, 300, (3, 14))
    with torch.no_grad():
        full = model(ids)
        state = model.new_decode_state(3, 14)
        steps = [model.decode_step(ids[:, :6], state)]
        steps += [model.decode_step(ids[:, t:t + 1], state) for t in range(6, 14)]
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 5:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_left_padded_batch_decodes_as_each_row_alone(kind):
    model = tiny(kind)
    rows = [[5, 6, 7, 8, 9, 10], [11], [12, 13, 14]]
    batched = generate_ids(model, rows, 7, temperature=0, eos_id=None)
    assert batched == [generate_ids(model, r, 7, temperature=0, eos_id=None) for r in rows]


def test_elman_cell_is_the_formula():
    """h_t = tanh(W x_t + U h_{t-1} + b), written out, gives the kind's outputs."""
    model = ElmanRNNLM(50, d_model=8, n_layer=1, tie_embeddings=False).eval()
    ids = torch.randint(0, 50, (2, 9))
    rnn = model.encoder.rnn
    x = model.encoder.embed(ids)
    h = torch.zeros(2, 8)
    hs = []
    for t in range(9):
        h = torch.tanh(x[:, t] @ rnn.weight_ih_l0.T + rnn.bias_ih_l0 + h @ rnn.weight_hh_l0.T
                       + rnn.bias_hh_l0)
        hs.append(h)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), model.lm_head(torch.stack(hs, 1)))


def test_lstm_cell_is_the_formula():
    """The LSTM's gates written out (i, f, g, o in torch's order) give the kind's outputs."""
    model = LSTMLM(50, d_model=8, n_layer=1, tie_embeddings=False).eval()
    ids = torch.randint(0, 50, (2, 9))
    lstm = model.encoder.rnn
    x = model.encoder.embed(ids)
    h, c = torch.zeros(2, 8), torch.zeros(2, 8)
    hs = []
    for t in range(9):
        z = x[:, t] @ lstm.weight_ih_l0.T + lstm.bias_ih_l0 + h @ lstm.weight_hh_l0.T + lstm.bias_hh_l0
        i, f, g, o = z.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        hs.append(h)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), model.lm_head(torch.stack(hs, 1)))


def test_loss_without_logits_equals_cross_entropy_of_logits():
    model = tiny("lstm", d_embed=16)
    ids = torch.randint(0, 300, (2, 10))
    y = ids.roll(-1, 1)
    y[0, :3] = -100
    with torch.no_grad():
        ref = F.cross_entropy(model(ids).flatten(0, 1), y.flatten(), ignore_index=-100)
        torch.testing.assert_close(model(ids, targets=y), ref)


def test_tied_weights_round_trip_and_flops(tmp_path):
    model = tiny("lstm", d_embed=16)
    assert model.lm_head.weight is model.encoder.embed.weight
    save_model_dir(model, tmp_path / "m")
    back = load_model_dir(tmp_path / "m")
    assert type(back) is LSTMLM and back.lm_head.weight is back.encoder.embed.weight
    ids = torch.randint(0, 300, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(back(ids), model(ids))
    # 6 FLOPs per weight of each matmul: LSTM 4 gates of (in + hidden) × hidden, projection, head
    d, e, V = 24, 16, 300
    weights = 4 * d * (e + d) + 4 * d * (d + d) + d * e + V * e
    assert model.flops_per_token() == 6 * weights
    assert isinstance(build_model("rnn", back.config_dict() | {"n_layer": 1}), ElmanRNNLM)


def test_transformer_fields_are_refused_with_one_line():
    with pytest.raises(ConfigError, match="model.n_head does not apply to model kind 'lstm'"):
        build_from_spec("lstm", {"vocab_size": 300, "n_head": 4})


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tokenizer, tokenizer_dir, corpus_texts):
    return write_shards(tmp_path_factory.mktemp("shards"), tokenizer, tokenizer_dir,
                        corpus_texts[:40], val_every=10)


def lm_cfg(kind, shards, out_dir, **train) -> PretrainConfig:
    base = dict(batch_size=8, max_steps=40, lr=3e-2, warmup_steps=3, eval_every=20,
                eval_tokens=2048, log_every=1, checkpoint_every=0, precision="fp32", seed=3)
    base.update(train)
    return PretrainConfig(data=str(shards), out_dir=str(out_dir), seq_len=32,
                          model=ModelSpec(kind=kind, d_model=48, n_layer=1),
                          train=TrainConfig(**base))


def losses(run_dir):
    return [r["train_loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "train_loss" in r]


@pytest.mark.parametrize("kind", KINDS)
def test_loss_falls_on_real_text(kind, shards, tmp_path):
    r = pretrain(lm_cfg(kind, shards, tmp_path / kind))
    ls = losses(tmp_path / kind)
    assert r.kind == kind and sum(ls[-5:]) / 5 < ls[0] - 1.0
    vals = [row["val_bpb"] for row in read_metrics(tmp_path / kind / "metrics.jsonl")
            if "val_bpb" in row]
    assert len(vals) == 2 and vals[-1] < vals[0]


def test_lstm_resumes_exactly_loads_and_generates(shards, tmp_path, tokenizer):
    straight = tmp_path / "straight"
    pretrain(lm_cfg("lstm", shards, straight, max_steps=12, eval_every=6))
    run = tmp_path / "resumed"

    def stop_at_5(event, data):
        if event == "log" and data["step"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    pretrain(lm_cfg("lstm", shards, run, max_steps=12, eval_every=6), callback=stop_at_5)
    assert [c.name for c in ckpt.list_checkpoints(run)] == ["step_000005"]
    cfg = lm_cfg("lstm", shards, run, max_steps=12, eval_every=6)
    cfg.resume = True
    pretrain(cfg)
    assert losses(run) == losses(straight)

    lm = lmlab.load(run)
    assert isinstance(lm.model, LSTMLM) and isinstance(lm.model, nn.Module)
    text = lm.generate("def ", max_new_tokens=10, temperature=0)
    assert isinstance(text, str) and text == lm.generate("def ", max_new_tokens=10, temperature=0)
