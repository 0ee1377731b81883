"""One task runner for every task: a regression task that is not a language model goes
through `run_task` with validation, checkpoints, SIGTERM-resume and trainable-only saving."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lmlab.config import TrainConfig
from lmlab.model import register_kind
from lmlab.model_io import load_model_dir
from lmlab.train import checkpoint as ckpt
from lmlab.train.metrics import read_metrics
from lmlab.train.runner import run_task
from tests.conftest import free_port

D_IN = 4


@register_kind("test-regressor")
class Regressor(nn.Module):
    """y = head(tanh(base x)); `freeze_base` leaves only the head trainable."""

    def __init__(self, hidden: int = 8, freeze_base: bool = False):
        super().__init__()
        self.hidden, self.freeze_base = hidden, freeze_base
        self.base = nn.Linear(D_IN, hidden)
        self.head = nn.Linear(hidden, 1)
        self.base.requires_grad_(not freeze_base)

    @classmethod
    def from_config_dict(cls, d):
        return cls(**d)

    @classmethod
    def from_spec(cls, fields):
        return cls(hidden=fields.get("hidden", 8))

    def config_dict(self):
        return {"hidden": self.hidden, "freeze_base": self.freeze_base}

    def forward(self, x):
        return self.head(torch.tanh(self.base(x))).squeeze(-1)


W_TRUE = torch.tensor([1.5, -2.0, 0.5, 1.0])


def _batch(seed: int, n: int = 16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=g)
    return x, x @ W_TRUE + 0.3


class RegressionTask:
    """Batches are a pure function of the step (as the Trainer requires for exact resume)."""

    eval_keys = ("sq_err", "abs_err", "n")

    def __init__(self, val_on_rank0_only: bool = False):
        self.val_on_rank0_only = val_on_rank0_only

    def train_batch(self, step, micro, accum, rank, world):
        return _batch(1000 + (step * accum + micro) * world + rank)

    def loss(self, model, batch):
        x, y = batch
        return nn.functional.mse_loss(model(x), y)

    def tokens_per_step(self, accum, world):
        return 16 * accum * world

    def val_batches(self, rank, world):
        if self.val_on_rank0_only and rank != 0:
            return  # a validation split too small to give every rank a batch
        for i in range(rank, 4, world):
            yield _batch(i)

    def eval_sums(self, model, batch):
        x, y = batch
        err = model(x) - y
        return {"sq_err": float((err ** 2).sum()), "abs_err": float(err.abs().sum()),
                "n": y.numel()}

    def eval_metrics(self, s):
        return {"val_mse": s["sq_err"] / s["n"], "val_mae": s["abs_err"] / s["n"]}


def train_cfg(**kw) -> TrainConfig:
    base = dict(batch_size=16, max_steps=30, lr=5e-2, warmup_steps=2, eval_every=15,
                log_every=1, checkpoint_every=0, precision="fp32", seed=3, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def losses(run_dir):
    return [r["train_loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "train_loss" in r]


def new_model(**kw):
    torch.manual_seed(0)
    return Regressor(**kw)


def test_regression_learns_and_saves_a_model_directory(tmp_path):
    r = run_task(new_model(), RegressionTask(), train_cfg(), tmp_path / "run")
    assert r.fit.status == "finished" and r.fit.step == 30 and r.kind == "test-regressor"
    ls = losses(tmp_path / "run")
    assert sum(ls[-3:]) / 3 < ls[0] / 4
    vals = [row["val_mse"] for row in read_metrics(tmp_path / "run" / "metrics.jsonl")
            if "val_mse" in row]
    assert len(vals) == 2 and vals[-1] < vals[0] and r.fit.val["val_mse"] == vals[-1]
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["kind"] == "test-regressor" and cfg["lmlab_model"]["hidden"] == 8
    back = load_model_dir(tmp_path / "run")
    assert isinstance(back, Regressor)
    x, y = _batch(0)
    with torch.no_grad():
        mse = float(((back(x) - y) ** 2).mean())
        fresh = float(((Regressor()(x) - y) ** 2).mean())
    assert mse < fresh / 4  # the trained weights, not a fresh model's


def _stop_at(step):
    def callback(event, data):
        if event == "log" and data["step"] == step:
            os.kill(os.getpid(), signal.SIGTERM)
    return callback


@pytest.mark.parametrize("trainable_only", [False, True])
def test_sigterm_then_resume_gives_identical_losses(tmp_path, trainable_only):
    kw = dict(freeze_base=trainable_only)
    straight = tmp_path / "straight"
    run_task(new_model(**kw), RegressionTask(), train_cfg(), straight,
             trainable_only=trainable_only)

    run = tmp_path / "resumed"
    r1 = run_task(new_model(**kw), RegressionTask(), train_cfg(), run, callback=_stop_at(6),
                  trainable_only=trainable_only)
    assert r1.fit.status == "interrupted (SIGTERM)" and r1.fit.step == 6
    (c,) = ckpt.list_checkpoints(run)
    saved = set(load_file(str(c / "model.safetensors")))
    assert saved == ({"head.weight", "head.bias"} if trainable_only
                     else {"base.weight", "base.bias", "head.weight", "head.bias"})

    # a new process would rebuild the model from scratch: the frozen base comes from the task
    r2 = run_task(new_model(**kw), RegressionTask(), train_cfg(), run, resume=True,
                  trainable_only=trainable_only)
    assert r2.fit.step == 30
    assert losses(run) == losses(straight)  # bit-identical, step for step
    last_val = [row for row in read_metrics(straight / "metrics.jsonl") if "val_mse" in row][-1]
    assert r2.fit.val["val_mse"] == last_val["val_mse"]


def test_refuses_checkpoints_without_resume(tmp_path):
    from lmlab.errors import ConfigError

    run_task(new_model(), RegressionTask(), train_cfg(max_steps=2), tmp_path / "run")
    with pytest.raises(ConfigError, match="--resume"):
        run_task(new_model(), RegressionTask(), train_cfg(max_steps=2), tmp_path / "run")


def test_eval_sums_must_return_the_tasks_keys(tmp_path):
    class Sloppy(RegressionTask):
        def eval_sums(self, model, batch):
            return {"sq_err": 1.0, "n": 1}

    with pytest.raises(ValueError, match="eval_keys"):
        run_task(new_model(), Sloppy(), train_cfg(max_steps=2), tmp_path / "run")


DDP_SCRIPT = textwrap.dedent("""
    import sys
    from tests.test_run_task import RegressionTask, new_model, train_cfg
    from lmlab.train.runner import run_task

    r = run_task(new_model(), RegressionTask(val_on_rank0_only=True), train_cfg(max_steps=4),
                 sys.argv[1])
    print("VAL", r.fit.val)
""")


@pytest.mark.slow
def test_ddp_ranks_without_validation_batches_reduce_the_same_keys(tmp_path):
    """Rank 1 gets no validation batch: it must still all-reduce the task's three sums
    (it used to fall back to two keys, a mismatched all-reduce under DDP)."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), str(script), str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    single = run_task(new_model(), RegressionTask(), train_cfg(max_steps=4, batch_size=16),
                      tmp_path / "single")
    # rank 0's four batches are the whole validation set: the same metrics as one process
    # that evaluates all of them (the weights differ: the global batch is twice as large)
    val_line = [line for line in p.stdout.splitlines() if line.startswith("VAL")][0]
    assert "val_mse" in val_line and "val_mae" in val_line
    assert set(single.fit.val) == {"val_mse", "val_mae"}
