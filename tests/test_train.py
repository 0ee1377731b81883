"""The training loop: learning, exact resume, crash safety, non-finite handling, DDP."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from lmlab.config import ModelSpec, PretrainConfig, TrainConfig
from lmlab.train import checkpoint as ckpt
from lmlab.train.metrics import read_metrics
from lmlab.train.optim import cosine_with_warmup, param_groups
from lmlab.train.pretrain import pretrain
from lmlab.train.trainer import NonFiniteError
from tests.conftest import free_port, write_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tokenizer, tokenizer_dir, corpus_texts):
    return write_shards(tmp_path_factory.mktemp("shards"), tokenizer, tokenizer_dir,
                        corpus_texts, val_every=25)


def make_cfg(shards, out_dir, **train) -> PretrainConfig:
    base = dict(batch_size=4, max_steps=12, lr=3e-3, warmup_steps=3, eval_every=0,
                eval_tokens=4096, log_every=1, checkpoint_every=0, precision="fp32", seed=7)
    base.update(train)
    return PretrainConfig(data=str(shards), out_dir=str(out_dir), seq_len=64,
                          model=ModelSpec(preset="tiny", n_layer=2, d_model=64, n_head=4,
                                          max_seq_len=64),
                          train=TrainConfig(**base))


def losses(run_dir):
    return [r["train_loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "train_loss" in r]


def test_schedule_shape():
    lrs = [cosine_with_warmup(s, 10, s / 100, 0.1) for s in range(101)]
    assert lrs[0] < lrs[5] < lrs[9] < lrs[10] and lrs[10] > 0.97  # warmup rises to ~the peak
    assert abs(lrs[50] - 0.55) < 1e-9  # halfway: midpoint between peak and floor
    assert abs(lrs[100] - 0.1) < 1e-9  # ends at the min ratio
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then decays monotonically


def test_no_decay_for_biases_and_norms():
    from lmlab.model import Transformer, preset

    model = Transformer(preset("tiny", vocab_size=100))
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and no_decay["weight_decay"] == 0
    assert all(p.dim() == 1 for p in no_decay["params"])
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == model.num_params()  # tied weight counted once


def test_loss_falls_and_outputs_written(shards, tmp_path):
    r = pretrain(make_cfg(shards, tmp_path / "run", max_steps=40, eval_every=20, batch_size=16))
    ls = losses(tmp_path / "run")
    assert sum(ls[-5:]) / 5 < ls[0] - 0.8
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert {"step", "train_loss", "lr", "grad_norm", "tokens_per_sec", "mfu"} <= set(rows[0])
    vals = [row["val_loss"] for row in rows if "val_loss" in row]
    assert len(vals) == 2 and vals[-1] < vals[0]
    assert 0 < r.fit.val["val_bpb"] < 8 and r.fit.val["val_ppl"] > 1
    for f in ("config.json", "model.safetensors", "tokenizer.json", "config.yaml", "loss.png"):
        assert (tmp_path / "run" / f).is_file(), f
    assert any((tmp_path / "run" / "tensorboard").iterdir())


def test_resume_gives_identical_losses(shards, tmp_path):
    straight = tmp_path / "straight"
    pretrain(make_cfg(shards, straight))

    # the same run, stopped by SIGTERM after step 6, then resumed
    resumed = tmp_path / "resumed"

    def stop_at_6(event, data):
        if event == "log" and data["step"] == 6:
            os.kill(os.getpid(), signal.SIGTERM)

    r1 = pretrain(make_cfg(shards, resumed), callback=stop_at_6)
    assert r1.fit.status == "interrupted (SIGTERM)" and r1.fit.step == 6
    assert [p.name for p in ckpt.list_checkpoints(resumed)] == ["step_000006"]
    cfg = make_cfg(shards, resumed)
    cfg.resume = True
    r2 = pretrain(cfg)
    assert r2.fit.step == 12
    assert losses(resumed) == losses(straight)  # bit-identical, step for step
    assert r2.fit.val == pytest.approx(pretrain_val(straight))


def pretrain_val(run_dir):
    return {k: v for r in read_metrics(run_dir / "metrics.jsonl") for k, v in r.items()
            if k.startswith("val_")}


def test_refuses_to_overwrite_a_run_without_resume(shards, tmp_path):
    pretrain(make_cfg(shards, tmp_path / "run", max_steps=2))
    from lmlab.errors import ConfigError

    with pytest.raises(ConfigError, match="--resume"):
        pretrain(make_cfg(shards, tmp_path / "run", max_steps=2))


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch
    from lmlab.train import checkpoint
    from tests.test_train import make_cfg
    from lmlab.train.pretrain import pretrain

    real_save = torch.save
    def save_then_die(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("step") == 8:  # the second checkpoint
            real_save(obj, f, *a, **k)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)  # dies after the state file, before the rename
        return real_save(obj, f, *a, **k)
    checkpoint.torch.save = save_then_die
    pretrain(make_cfg(sys.argv[1], sys.argv[2], checkpoint_every=4, keep_checkpoints=5))
""")


def test_sigkill_while_writing_a_checkpoint(shards, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    p = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(shards), str(run)], env=env,
                       capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL, p.stderr
    half = list((run / "checkpoints").glob(".step_000008.tmp-*"))
    assert len(half) == 1 and half[0].is_dir()  # the half-written one
    assert [c.name for c in ckpt.list_checkpoints(run)] == ["step_000004"]

    cfg = make_cfg(shards, run, checkpoint_every=4, keep_checkpoints=5)
    cfg.resume = True
    r = pretrain(cfg)
    assert r.fit.step == 12
    assert not half[0].exists()
    assert [c.name for c in ckpt.list_checkpoints(run)] == ["step_000004", "step_000008",
                                                            "step_000012"]
    straight = tmp_path / "straight"
    pretrain(make_cfg(shards, straight))
    assert losses(run) == losses(straight)


class PoisonAt:
    """Wraps the LM task so that one step's loss is NaN."""

    def __init__(self, step):
        self.step = step

    def __call__(self, monkeypatch):
        from lmlab.train import pretrain as pt

        real = pt.LanguageModelingTask.train_batch
        bad = self.step

        def train_batch(task, step, *a):
            x, y = real(task, step, *a)
            task._poison = step == bad
            return x, y

        real_loss = pt.LanguageModelingTask.loss

        def loss(task, model, batch):
            value = real_loss(task, model, batch)
            return value * float("nan") if getattr(task, "_poison", False) else value

        monkeypatch.setattr(pt.LanguageModelingTask, "train_batch", train_batch)
        monkeypatch.setattr(pt.LanguageModelingTask, "loss", loss)


def test_nonfinite_stops_and_keeps_good_checkpoint(shards, tmp_path, monkeypatch):
    PoisonAt(5)(monkeypatch)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError, match="step 5") as e:
        pretrain(make_cfg(shards, run, checkpoint_every=4))
    assert "step_000004" in str(e.value)
    assert [c.name for c in ckpt.list_checkpoints(run)] == ["step_000004"]
    from lmlab.model_io import load_model_dir

    model = load_model_dir(run / "checkpoints" / "step_000004")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_skip(shards, tmp_path, monkeypatch):
    PoisonAt(5)(monkeypatch)  # the batch of step index 5: logged as step 6
    run = tmp_path / "run"
    r = pretrain(make_cfg(shards, run, nonfinite="skip", max_steps=8, checkpoint_every=1,
                          keep_checkpoints=20))
    assert r.fit.status == "finished" and r.fit.step == 8 and r.fit.skipped_steps == 1
    ls = losses(run)
    assert len(ls) == 8 and math.isnan(ls[5])  # the poisoned step, and only it
    assert all(math.isfinite(v) for v in ls[:5] + ls[6:])  # before and after it
    assert math.isfinite(r.fit.last_train_loss) and math.isfinite(r.fit.val["val_loss"])

    def weights(step):
        return load_file(str(run / "checkpoints" / f"step_{step:06d}" / "model.safetensors"))

    def moments(step):
        state = ckpt.load_trainer_state(run / "checkpoints" / f"step_{step:06d}")["optimizer"]
        return {(i, k): v for i, s in state["state"].items() for k, v in s.items()}

    def changed(a, b):  # the names of the tensors that differ
        assert a.keys() == b.keys()
        return [k for k in a if not torch.equal(a[k], b[k])]

    # the skipped step changed no weight and no optimizer moment; its neighbours did
    assert changed(weights(5), weights(6)) == [] and changed(moments(5), moments(6)) == []
    assert changed(weights(4), weights(5)) and changed(weights(6), weights(7))
    assert changed(moments(6), moments(7))
    assert all(torch.isfinite(t).all() for t in weights(8).values())


def test_grad_accum_equals_the_larger_batch(shards, tmp_path):
    """batch 4 x 2 micro-steps: the same rows, loss and updates as batch 8 in one step."""
    pretrain(make_cfg(shards, tmp_path / "big", batch_size=8, grad_accum=1, max_steps=8))
    r = pretrain(make_cfg(shards, tmp_path / "accum", batch_size=4, grad_accum=2, max_steps=8))
    assert losses(tmp_path / "accum") == pytest.approx(losses(tmp_path / "big"), rel=1e-5, abs=1e-5)
    assert len(losses(tmp_path / "accum")) == 8
    assert r.fit.val == pytest.approx(pretrain_val(tmp_path / "big"), rel=1e-5, abs=1e-5)


def test_max_minutes_stops_with_time_limit_and_a_checkpoint(shards, tmp_path):
    import lmlab

    run = tmp_path / "run"
    r = pretrain(make_cfg(shards, run, max_steps=1_000_000, max_minutes=0.02, log_every=1000))
    assert r.fit.status == "time limit"
    assert 1 <= r.fit.step < 1_000_000 and r.fit.seconds >= 0.02 * 60
    cks = ckpt.list_checkpoints(run)
    assert [c.name for c in cks] == [f"step_{r.fit.step:06d}"]
    assert r.fit.checkpoint == str(cks[-1])
    lm = lmlab.load(run)  # the run dir is a model dir, holding the last step's weights
    saved = load_file(str(cks[-1] / "model.safetensors"))
    state = lm.model.state_dict()
    assert saved and all(torch.equal(state[k], v) for k, v in saved.items())
    assert isinstance(lm.generate("def ", max_new_tokens=4, temperature=0), str)


def test_bf16_autocast_trains(shards, tmp_path, monkeypatch):
    # measuring the bf16 peak (a 2048x2048 bf16 matmul) takes minutes on a CPU without native
    # bf16, before the first step; MFU is not under test here
    from lmlab.train import trainer

    monkeypatch.setattr(trainer, "measured_peak_flops", lambda *a, **k: 1e12)
    fp32 = losses_of(pretrain(make_cfg(shards, tmp_path / "fp32", batch_size=8)))
    bf16 = losses_of(pretrain(make_cfg(shards, tmp_path / "bf16", batch_size=8, precision="bf16")))
    assert len(bf16) == 12 and all(math.isfinite(v) for v in bf16)
    assert sum(bf16[-3:]) / 3 < bf16[0] - 0.4  # it learns
    assert bf16[0] == pytest.approx(fp32[0], abs=2e-2)  # the same model, within bf16's precision
    assert bf16 == pytest.approx(fp32, abs=2e-2)  # and the same run
    assert bf16[0] != fp32[0]  # autocast did run: bf16 rounding shows


def losses_of(result):
    return losses(result.run_dir)


@pytest.mark.slow
def test_ddp_two_processes_match_single_process(shards, tmp_path):
    """2 processes × batch 2 see the same global batches as 1 process × batch 4."""
    single = tmp_path / "single"
    pretrain(make_cfg(shards, single, batch_size=4, max_steps=6))
    ddp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), "-m", "lmlab.cli", "pretrain", "--data", str(shards),
           "--out_dir", str(ddp), "--seq_len", "64", "--model.preset", "tiny",
           "--model.n_layer", "2", "--model.d_model", "64", "--model.n_head", "4",
           "--model.max_seq_len", "64", "--train.batch_size", "2", "--train.max_steps", "6",
           "--train.lr", "3e-3", "--train.warmup_steps", "3", "--train.eval_every", "0",
           "--train.eval_tokens", "4096", "--train.log_every", "1",
           "--train.checkpoint_every", "0", "--train.precision", "fp32", "--train.seed", "7"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert losses(ddp) == pytest.approx(losses(single), rel=1e-5, abs=1e-5)
    a = json.loads((single / "config.json").read_text())
    assert a == json.loads((ddp / "config.json").read_text())
