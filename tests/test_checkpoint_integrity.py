"""Resume checks that a checkpoint is intact: the manifest's sizes and hashes, then loading.

A damaged newest checkpoint (truncated, bytes flipped, manifest gone, a pickled object in the
trainer state) is named in a warning and the run resumes from the newest intact one, with the
same losses and the same metrics.jsonl as a run never interrupted; with none intact, resume
stops with one line. A checkpoint from before manifests resumes when it loads.
"""

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

from lmlab.errors import InputError
from lmlab.train import checkpoint as ckpt
from lmlab.train.metrics import read_metrics
from lmlab.train.runner import run_task
from tests.conftest import write_shards
from tests.test_run_task import RegressionTask, _stop_at, new_model, train_cfg

# checkpoints at 5 and 10, validation at 4, 8, 12: a run stopped at 13 (which saves step 13)
# and resumed from 10 redoes three training rows and one validation row
CFG = dict(checkpoint_every=5, eval_every=4, keep_checkpoints=3, max_steps=20)
STOP = 13
# what two runs of the same steps agree on (the rest is timing)
SAME = ("step", "train_loss", "lr", "grad_norm", "tokens", "val_mse", "val_mae")


def rows(run_dir):
    return [{k: v for k, v in r.items() if k in SAME}
            for r in read_metrics(run_dir / "metrics.jsonl")]


def step_dir(run_dir, step):
    return ckpt.checkpoint_dir(run_dir) / f"step_{step:06d}"


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    run_task(new_model(), RegressionTask(), train_cfg(**CFG), out)
    return out


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A run stopped by SIGTERM after step 13: checkpoints 5, 10, 13, each with a manifest."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    r = run_task(new_model(), RegressionTask(), train_cfg(**CFG), out, callback=_stop_at(STOP))
    assert r.fit.status == "interrupted (SIGTERM)" and r.fit.step == STOP
    assert [c.name for c in ckpt.list_checkpoints(out)] == [
        "step_000005", "step_000010", "step_000013"]
    return out


@pytest.fixture
def run(stopped, tmp_path):
    """A fresh copy of the stopped run to damage."""
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    return out


def resume(run_dir, **cfg):
    return run_task(new_model(), RegressionTask(), train_cfg(**{**CFG, **cfg}), run_dir,
                    resume=True)


def assert_one_run(run_dir, straight):
    """metrics.jsonl reads as one uninterrupted run: unique, increasing steps per kind of row,
    and the very values of the straight run."""
    got = rows(run_dir)
    for key in ("train_loss", "val_mse"):
        steps = [r["step"] for r in got if key in r]
        assert steps == sorted(set(steps)), (key, steps)
    assert got == rows(straight)


# ------------------------------------------------------------ damage, by kind


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_byte(path):
    data = bytearray(path.read_bytes())
    data[-len(data) // 3] ^= 0xFF  # inside the tensor data: the header still parses
    path.write_bytes(bytes(data))


def empty(path):
    path.write_bytes(b"")


def random_bytes(path):
    path.write_bytes(os.urandom(path.stat().st_size))


def legacy(c):
    """Make checkpoint `c` look as lmlab wrote it before manifests: no manifest.json, and a
    trainer state without the flag that says it had one."""
    (c / ckpt.MANIFEST_FILE).unlink()
    state = torch.load(c / ckpt.STATE_FILE, weights_only=True)
    del state["manifest"]
    torch.save(state, c / ckpt.STATE_FILE)


class NotATensor:
    """Stands for anything torch.load(weights_only=True) must not build."""


def pickled_object(path):
    state = torch.load(path, weights_only=True)
    state["extra"] = NotATensor()
    torch.save(state, path)


def test_a_checkpoint_carries_a_manifest_of_its_files(stopped):
    c = step_dir(stopped, STOP)
    manifest = json.loads((c / ckpt.MANIFEST_FILE).read_text())
    files = {p.name for p in c.iterdir()} - {ckpt.MANIFEST_FILE}
    assert set(manifest["files"]) == files >= {"model.safetensors", ckpt.STATE_FILE, "config.json"}
    for name, entry in manifest["files"].items():
        assert entry["size"] == (c / name).stat().st_size and len(entry["sha256"]) == 64
    assert ckpt.verify_manifest(c) is True
    assert ckpt.read_checkpoint(c).verified == "manifest"


DAMAGE = {
    "weights truncated": ("model.safetensors", truncate, "truncated"),
    "weights byte flipped": ("model.safetensors", flip_byte, "sha256"),
    "weights random bytes": ("model.safetensors", random_bytes, "sha256"),
    "state truncated": (ckpt.STATE_FILE, truncate, "truncated"),
    "state byte flipped": (ckpt.STATE_FILE, flip_byte, "sha256"),
    "state empty": (ckpt.STATE_FILE, empty, "truncated"),
    "manifest missing": (ckpt.MANIFEST_FILE, lambda p: p.unlink(), "manifest.json: missing"),
    "manifest not json": (ckpt.MANIFEST_FILE, random_bytes, "unreadable manifest"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_older_one(run, straight, case, caplog):
    name, damage, reason = DAMAGE[case]
    damage(step_dir(run, STOP) / name)
    with caplog.at_level(logging.WARNING, logger="lmlab.train.checkpoint"):
        r = resume(run)
    assert r.fit.step == 20
    warned = [m for m in caplog.messages if "is damaged" in m]
    assert len(warned) == 1 and "step_000013" in warned[0] and reason in warned[0], warned
    assert any("resuming from" in m and "step_000010" in m for m in caplog.messages)
    assert_one_run(run, straight)  # steps 11-13 and the validation at 12 redone, once each


# without a manifest (a checkpoint from before them) damage is found by loading
LOAD_DAMAGE = {
    "weights truncated": ("model.safetensors", truncate, "not a readable safetensors file"),
    "weights empty": ("model.safetensors", empty, "not a readable safetensors file"),
    "weights random bytes": ("model.safetensors", random_bytes, "not a readable safetensors"),
    "state truncated": (ckpt.STATE_FILE, truncate, "truncated or corrupt"),
    "state empty": (ckpt.STATE_FILE, empty, "empty"),
    "state random bytes": (ckpt.STATE_FILE, random_bytes, "corrupt"),
    "state pickled object": (ckpt.STATE_FILE, pickled_object, "refused for safety"),
}


@pytest.mark.parametrize("case", list(LOAD_DAMAGE))
def test_without_manifests_damage_is_found_by_loading(run, straight, case, caplog):
    name, damage, reason = LOAD_DAMAGE[case]
    for c in ckpt.list_checkpoints(run):
        legacy(c)
    damage(step_dir(run, STOP) / name)
    with caplog.at_level(logging.WARNING, logger="lmlab.train.checkpoint"):
        r = resume(run)
    assert r.fit.step == 20
    warned = [m for m in caplog.messages if "is damaged" in m]
    assert len(warned) == 1 and "step_000013" in warned[0] and reason in warned[0], warned
    assert not any("weights_only" in m for m in caplog.messages)
    assert any("step_000010" in m and "no manifest" in m and "verified by loading" in m
               for m in caplog.messages)
    assert_one_run(run, straight)


def test_checkpoints_from_before_manifests_still_resume(run, straight, caplog):
    for c in ckpt.list_checkpoints(run):
        legacy(c)
    with caplog.at_level(logging.WARNING, logger="lmlab.train.checkpoint"):
        resume(run)
    assert not any("is damaged" in m for m in caplog.messages)
    assert any("step_000013" in m and "verified by loading" in m for m in caplog.messages)
    assert_one_run(run, straight)
    # the checkpoints the resumed run wrote have manifests again
    assert ckpt.read_checkpoint(step_dir(run, 20)).verified == "manifest"


# ------------------------------------------------------------ nothing intact


def test_all_checkpoints_damaged_is_one_line(run):
    truncate(step_dir(run, 13) / "model.safetensors")
    flip_byte(step_dir(run, 10) / ckpt.STATE_FILE)
    (step_dir(run, 5) / ckpt.MANIFEST_FILE).unlink()
    before = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(InputError) as e:
        resume(run)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{run}: no intact checkpoint")
    for step in (5, 10, 13):
        assert f"step_{step:06d}" in msg
    assert "--out_dir" in msg and "weights_only" not in msg
    assert (run / "metrics.jsonl").read_bytes() == before  # nothing was redone


@pytest.mark.parametrize("with_manifest", [True, False])
def test_a_pickled_object_is_refused_for_safety(run, with_manifest):
    """torch.load stays weights_only=True: an object in the trainer state is never built, even
    when the manifest vouches for the file (someone rewrote both)."""
    for c in ckpt.list_checkpoints(run)[:-1]:
        shutil.rmtree(c)
    c = step_dir(run, STOP)
    if not with_manifest:
        legacy(c)
    pickled_object(c / ckpt.STATE_FILE)
    if with_manifest:
        ckpt.write_manifest(c, STOP)
        assert ckpt.verify_manifest(c)
    with pytest.raises(InputError) as e:
        resume(run)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{run}: ")
    assert f"step_{STOP:06d}/{ckpt.STATE_FILE}: refused for safety" in msg
    assert "refused for safety" in msg and "arbitrary Python objects" in msg
    assert "weights_only" not in msg


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tokenizer, tokenizer_dir, corpus_texts):
    """A tiny Transformer pretraining run of 4 steps: checkpoints 2 and 4."""
    from lmlab.train.pretrain import pretrain
    from tests.test_train import make_cfg

    root = tmp_path_factory.mktemp("pretrained")
    shards = write_shards(root / "shards", tokenizer, tokenizer_dir, corpus_texts, val_every=25)
    run = root / "run"
    pretrain(make_cfg(shards, run, max_steps=4, checkpoint_every=2))
    assert [c.name for c in ckpt.list_checkpoints(run)] == ["step_000002", "step_000004"]
    return run


def lmlab_resume(run_dir, *extra):
    """`lmlab pretrain --resume true` as a user runs it, with the run's own config."""
    return subprocess.run([sys.executable, "-m", "lmlab.cli", "pretrain", "--config",
                           str(run_dir / "config.yaml"), "--out_dir", str(run_dir),
                           "--resume", "true", *extra], capture_output=True, text=True)


def test_cli_resume_with_every_checkpoint_damaged_is_one_line_exit_2(pretrained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pretrained, run)
    random_bytes(step_dir(run, 4) / "model.safetensors")
    legacy(step_dir(run, 2))
    empty(step_dir(run, 2) / "model.safetensors")
    before = (run / "metrics.jsonl").read_bytes()
    p = lmlab_resume(run)
    assert p.returncode == 2, p.stderr
    err = p.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert str(run) in err and "--out_dir" in err and "weights_only" not in err
    assert "step_000004/model.safetensors" in err and "step_000002/model.safetensors" in err
    assert (run / "metrics.jsonl").read_bytes() == before


def test_cli_resume_falls_back_and_says_so(pretrained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pretrained, run)
    truncate(step_dir(run, 4) / ckpt.STATE_FILE)
    p = lmlab_resume(run, "--train.max_steps", "5")
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    warned = [line for line in p.stderr.splitlines() if "is damaged" in line]
    assert len(warned) == 1 and "step_000004" in warned[0] and "truncated" in warned[0]
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "train_loss" in r]
    assert steps == [1, 2, 3, 4, 5]


# ------------------------------------------------------------ metrics.jsonl


def test_resume_with_no_checkpoint_forgets_the_rows_of_the_lost_steps(straight, tmp_path):
    """A run killed before its first checkpoint left rows (and a half-written line); resuming
    starts again at step 0 and logs every step once."""
    run = tmp_path / "run"
    run.mkdir()
    lost = [{"step": s, "train_loss": 9.0} for s in (1, 2, 3)] + [{"step": 2, "val_mse": 9.0}]
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in lost) + '{"step": 4, "train_lo')
    r = resume(run)
    assert r.fit.step == 20
    assert_one_run(run, straight)


def test_resuming_a_finished_run_adds_no_row(straight, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    before = rows(run)
    r = resume(run)
    assert r.fit.step == 20 and r.fit.val  # the final validation is still reported
    assert rows(run) == before


def test_damaged_later_checkpoints_do_not_push_out_new_ones(run, caplog):
    """After falling back from 13 to 10, keep_checkpoints=1 keeps the newest checkpoint the
    resumed run wrote (11), not only the damaged 13 whose step it has not reached yet."""
    truncate(step_dir(run, 13) / "model.safetensors")
    r = run_task(new_model(), RegressionTask(),
                 train_cfg(**{**CFG, "checkpoint_every": 11, "keep_checkpoints": 1}), run,
                 resume=True, callback=_stop_at(11))
    assert r.fit.step == 11
    assert [c.name for c in ckpt.list_checkpoints(run)] == ["step_000011", "step_000013"]
    with caplog.at_level(logging.WARNING, logger="lmlab.train.checkpoint"):
        assert resume(run).fit.step == 20
    assert any("resuming from" in m and "step_000011" in m for m in caplog.messages)
    # reaching step 13 again replaced the damaged one
    assert ckpt.read_checkpoint(step_dir(run, 20)).verified == "manifest"
