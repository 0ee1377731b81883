"""FSDP2 and the memory levers, on CPU with gloo: two processes under torchrun train what one
process trains with the same global batch (fp32, 1e-5) — pretraining with DDP, FSDP, FSDP with
activation checkpointing and no reshard after forward; SFT, DPO and classification with LoRA
(the frozen base sharded, the adapters trained) — and a validation split that only rank 0 has
does not hang a sharded model. Activation checkpointing alone gives the same loss and
gradients as without. The GPU path's choices (TF32, pinned non-blocking transfer, batches
built ahead, fused AdamW, SDPA off the CPU) are exercised where a CPU can.

All two-process runs share one torchrun launch: this file is also its worker
(`python -m torch.distributed.run ... -m tests.test_fsdp JOBS.json`), which runs each job's
`lmlab` command line in turn, in the one process group the first run joins. The launch has a
hard time limit (the process group killed, each rank's stack printed by faulthandler first);
`LMLAB_TEST_JOBS=fsdp,sft` runs only those jobs when chasing a failure.
"""

from __future__ import annotations

import faulthandler
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmlab.model import Transformer, preset
from lmlab.model_io import load_model_dir, read_safetensors, save_model_dir
from lmlab.train.metrics import read_metrics
from tests.conftest import free_port, run_cli, write_shards

QA = [("1加1等于几？", "2"), ("天空是什么颜色？", "蓝色"), ("What is 2+2?", "4"),
      ("中国的首都是哪里？", "北京"), ("Say hi.", "hi"), ("你好吗？", "很好")]
POS, NEG = ["好", "棒", "喜欢", "great", "love"], ["差", "烂", "失望", "bad", "awful"]
FILLER = ["这本书", "质量", "物流", "价格", "the item", "quality", "shipping"]


def pretrain_args(shards, out, batch, *extra):
    return ["pretrain", "--data", shards, "--out_dir", out, "--seq_len", 64,
            "--model.preset", "tiny", "--model.n_layer", 2, "--model.d_model", 64,
            "--model.n_head", 4, "--model.max_seq_len", 64, "--train.batch_size", batch,
            "--train.max_steps", 6, "--train.lr", 3e-3, "--train.warmup_steps", 3,
            "--train.eval_every", 3, "--train.eval_tokens", 4096, "--train.log_every", 1,
            "--train.checkpoint_every", 0, "--train.precision", "fp32", "--train.seed", 7,
            "--train.device", "cpu", *extra]


def lora_args(cmd, base, data, out, batch, *extra):
    return ["finetune", cmd, "--model", base, "--data", data, "--out_dir", out, "--lora.r", 4,
            "--train.max_steps", 3, "--train.batch_size", batch, "--train.device", "cpu",
            "--train.precision", "fp32", "--train.warmup_steps", 0, "--train.eval_every", 0,
            *extra]


def classify_args(base, data, out, batch, *extra):
    return ["finetune", "classify", "--model", base, "--data", data, "--out_dir", out,
            "--lora.r", 4, "--max_len", 16, "--train.max_steps", 4, "--train.batch_size", batch,
            "--head.dropout", 0,  # dropout masks drawn per process cannot match one process's
            "--train.eval_every", 2, "--train.checkpoint_every", 0, "--train.device", "cpu",
            "--train.precision", "fp32", "--train.warmup_steps", 0, *extra]


def torchrun(module_args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 ...` with a hard limit: on a hang the whole process group
    (torchrun and its workers, which hold the output pipes) is killed and the test fails with
    the output so far, where each worker's faulthandler has printed the stack it sat in."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd(),
           "LMLAB_TEST_DUMP_AFTER": str(max(30, timeout - 30))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), *module_args]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"torchrun ran past {timeout} s (killed):\n{out[-3000:]}\n{err[-6000:]}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def train_losses(run_dir):
    return [r["train_loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl")
            if "train_loss" in r]


def val_rows(run_dir, key):
    return [r[key] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if key in r]


def assert_same_weights(a_dir, b_dir, atol=1e-5):
    a, b = read_safetensors(Path(a_dir) / "model.safetensors"), \
        read_safetensors(Path(b_dir) / "model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=atol, msg=k)


# ------------------------------------------------------------------ the two-process launch

@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tokenizer, tokenizer_dir, corpus_texts):
    root = tmp_path_factory.mktemp("fsdp-inputs")
    shards = write_shards(root / "shards", tokenizer, tokenizer_dir, corpus_texts, val_every=25)
    torch.manual_seed(0)
    base = root / "base"  # GPT-2 style: lm_head tied to the embedding, two blocks
    save_model_dir(Transformer(preset("tiny", vocab_size=tokenizer.vocab_size, n_layer=2,
                                      d_model=32, n_head=2, max_seq_len=64)),
                   base, tokenizer_dir=tokenizer_dir)
    chats = root / "chat.jsonl"
    chats.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": q}, {"role": "assistant", "content": a}]},
        ensure_ascii=False) + "\n" for q, a in QA * 4), encoding="utf-8")
    prefs = root / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": q, "chosen": a, "rejected": "不知道"},
                                        ensure_ascii=False) + "\n" for q, a in QA * 4),
                     encoding="utf-8")
    rng, rows = random.Random(0), []
    for i in range(90):
        label = rng.choice(["pos", "neg"])
        words = rng.sample(FILLER, 2) + [rng.choice(POS if label == "pos" else NEG)]
        rows.append({"text": " ".join(words) + f" #{i}", "label": label})
    labelled = root / "labelled.jsonl"
    labelled.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                        encoding="utf-8")
    return {"shards": shards, "base": base, "chats": chats, "prefs": prefs,
            "labelled": labelled}


def jobs_for(i, out: Path) -> dict[str, dict]:
    """Every two-process run: its name → {"argv": the lmlab command, or "regression": out}."""
    sh, base = i["shards"], i["base"]
    sft_extra = ["--lora.targets", "[all-linear,lm_head]", "--eval_rows", 0,
                 "--val_fraction", 0.2, "--train.strategy", "fsdp"]
    return {
        "ddp": {"argv": pretrain_args(sh, out / "ddp", 2)},
        # with a checkpoint at step 3, which the resume jobs below start from
        "fsdp": {"argv": pretrain_args(sh, out / "fsdp", 2, "--train.strategy", "fsdp",
                                       "--train.checkpoint_every", 3)},
        "fsdp-ac": {"argv": pretrain_args(sh, out / "fsdp-ac", 2, "--train.strategy", "fsdp",
                                          "--train.activation_checkpointing", "true",
                                          "--train.reshard_after_forward", "false")},
        "ddp-ckpt": {"argv": pretrain_args(sh, out / "ddp-ckpt", 2, "--train.max_steps", 2)},
        "fsdp-on-ddp": {"argv": pretrain_args(sh, out / "ddp-ckpt", 2, "--train.max_steps", 2,
                                              "--train.strategy", "fsdp", "--resume", "true")},
        "sft": {"argv": lora_args("sft", base, i["chats"], out / "sft", 2, *sft_extra)},
        "dpo": {"argv": lora_args("dpo", base, i["prefs"], out / "dpo", 2,
                                  "--val_fraction", 0.2, "--train.strategy", "fsdp")},
        "classify": {"argv": classify_args(base, i["labelled"], out / "classify", 4,
                                           "--train.strategy", "fsdp")},
        "regression": {"regression": str(out / "regression")},
        # resume from fsdp's step 3 with 2 processes here, with 1 in the test
        "from-step-3": {"copy_from_step": [str(out / "fsdp"), 3,
                                           str(out / "resume-2"), str(out / "resume-1")]},
        "resume-2": {"argv": pretrain_args(sh, out / "resume-2", 2, "--train.strategy", "fsdp",
                                           "--train.checkpoint_every", 3, "--resume", "true")},
    }


def copy_from_step(src: str, step: int, *dsts: str) -> None:
    """Copies of run `src` that hold only its checkpoints up to `step` (resume starts there)."""
    import shutil

    from lmlab.train import checkpoint as ckpt

    for dst in dsts:
        shutil.copytree(src, dst)
        for c in ckpt.list_checkpoints(dst):
            if ckpt.checkpoint_step(c) > step:
                shutil.rmtree(c)


@pytest.fixture(scope="module")
def two(inputs, tmp_path_factory):
    """The two-process runs (one torchrun launch) and each job's exit code and output."""
    out = tmp_path_factory.mktemp("fsdp-two")
    jobs = jobs_for(inputs, out)
    spec = out / "jobs.json"
    spec.write_text(json.dumps({name: {k: [str(a) for a in v] if k == "argv" else v
                                       for k, v in job.items()} for name, job in jobs.items()}))
    p = torchrun(["-m", "tests.test_fsdp", str(spec)])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-4000:]
    return out, json.loads((out / "results.json").read_text())


def _worker(spec: str) -> None:
    """Run each job of `spec` (JSON) in this torchrun process; rank 0 writes results.json."""
    from lmlab.train.runner import run_task
    from tests.test_run_task import RegressionTask, new_model, train_cfg

    after = float(os.environ.get("LMLAB_TEST_DUMP_AFTER", "0"))
    if after:  # a hang shows where each rank sits before the launcher kills it
        faulthandler.dump_traceback_later(after, exit=True)
    jobs, results = json.loads(Path(spec).read_text()), {}
    only = os.environ.get("LMLAB_TEST_JOBS")
    for name, job in jobs.items():
        if only and name not in only.split(","):
            continue
        print(f"rank {os.environ.get('RANK')}: job {name}", file=sys.stderr, flush=True)
        if "copy_from_step" in job:  # rank 0 copies, the other waits for it
            if os.environ.get("RANK") == "0":
                copy_from_step(*job["copy_from_step"])
            torch.distributed.barrier()
            results[name] = {"rc": 0}
        elif "regression" in job:  # only rank 0 has validation batches
            run_task(new_model(), RegressionTask(val_on_rank0_only=True),
                     train_cfg(strategy="fsdp", max_steps=6, eval_every=3), job["regression"])
            results[name] = {"rc": 0}
        else:
            rc, out, err = run_cli(job["argv"])
            results[name] = {"rc": rc, "out": out[-2000:], "err": err[-2000:]}
            print(f"rank {os.environ.get('RANK')}: job {name} exit {rc}\n{err[-1500:]}",
                  file=sys.stderr, flush=True)
    if os.environ.get("RANK") == "0":
        (Path(spec).parent / "results.json").write_text(json.dumps(results))


def one_process(argv, name):
    rc, out, err = run_cli(argv)
    assert rc == 0, (name, out[-1500:], err[-3000:])


@pytest.mark.slow
def test_ddp_and_fsdp_equal_one_process_with_the_same_global_batch(two, inputs, tmp_path):
    out, results = two
    for name in ("ddp", "fsdp", "fsdp-ac"):
        assert results[name]["rc"] == 0, (name, results[name])
    one = tmp_path / "one"
    one_process(pretrain_args(inputs["shards"], one, 4), "one")
    expected = train_losses(one)
    assert len(expected) == 6 and expected[-1] < expected[0]
    for name in ("ddp", "fsdp", "fsdp-ac"):
        assert train_losses(out / name) == pytest.approx(expected, rel=1e-5, abs=1e-5), name
        assert val_rows(out / name, "val_loss") == pytest.approx(val_rows(one, "val_loss"),
                                                                 rel=1e-5)
        # the run directory is the plain model directory every command reads
        assert_same_weights(one, out / name)
        assert json.loads((one / "config.json").read_text()) == \
            json.loads((out / name / "config.json").read_text())


@pytest.mark.slow
def test_lora_finetuning_under_fsdp_trains_what_one_process_does(two, inputs, tmp_path):
    """The frozen base is sharded with the rest; the adapters (lm_head's a parametrization of a
    weight tied to the embedding) and a classifier's new head come out as one process's."""
    out, results = two
    for name in ("sft", "dpo", "classify"):
        assert results[name]["rc"] == 0, (name, results[name])
    i = inputs
    runs = {"sft": lora_args("sft", i["base"], i["chats"], tmp_path / "sft", 4,
                             "--lora.targets", "[all-linear,lm_head]", "--eval_rows", 0,
                             "--val_fraction", 0.2),
            "dpo": lora_args("dpo", i["base"], i["prefs"], tmp_path / "dpo", 4,
                             "--val_fraction", 0.2),
            "classify": classify_args(i["base"], i["labelled"], tmp_path / "classify", 8)}
    for name, argv in runs.items():
        one_process(argv, name)
        saved = read_safetensors(out / name / "model.safetensors")
        assert saved and all(".lora." in k or "parametrizations" in k or k.startswith("head.")
                             for k in saved), sorted(saved)
        assert_same_weights(tmp_path / name, out / name, atol=1e-6)
        assert train_losses(out / name) == pytest.approx(train_losses(tmp_path / name),
                                                         rel=1e-5, abs=1e-6)
    assert val_rows(out / "classify", "val_macro_f1") == \
        pytest.approx(val_rows(tmp_path / "classify", "val_macro_f1"))
    assert (out / "sft" / "config.json").is_file()
    load_model_dir(out / "sft")  # an adapter run directory, as every command reads it


@pytest.mark.slow
def test_validation_only_rank_0_has_does_not_hang_a_sharded_model(two):
    """Rank 1 has no validation batch: it repeats rank 0's first (result dropped) so that both
    run each sharded forward pass; the figures are those of rank 0's batches alone."""
    from tests.test_run_task import RegressionTask

    out, results = two
    assert results["regression"]["rc"] == 0
    model = load_model_dir(out / "regression")
    task = RegressionTask(val_on_rank0_only=True)
    sums = dict.fromkeys(task.eval_keys, 0.0)
    with torch.no_grad():
        for batch in task.val_batches(0, 2):
            for k, v in task.eval_sums(model, batch).items():
                sums[k] += v
    assert val_rows(out / "regression", "val_mse")[-1] == \
        pytest.approx(task.eval_metrics(sums)["val_mse"], rel=1e-5)


@pytest.mark.slow
def test_fsdp_refuses_to_resume_a_ddp_checkpoint_in_one_line(two):
    _, results = two
    assert results["ddp-ckpt"]["rc"] == 0
    r = results["fsdp-on-ddp"]
    assert r["rc"] == 2, r
    text = r["out"] + r["err"]
    assert "written by --train.strategy ddp" in text and "Traceback" not in text


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_at_another_world_size_with_the_same_next_losses(
        two, inputs):
    """Saved at step 3 by 2 processes (each rank its shards, nobody gathering the model);
    resumed by 2 processes and by 1 (batch 4: the same global batch), steps 4..6 give the
    losses of the run that went straight through."""
    out, results = two
    for name in ("fsdp", "from-step-3", "resume-2"):
        assert results[name]["rc"] == 0, (name, results[name])
    step3 = out / "resume-1" / "checkpoints" / "step_000003"
    assert sorted(p.name for p in step3.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (step3 / "model.safetensors").exists()
    one_process(pretrain_args(inputs["shards"], out / "resume-1", 4, "--train.strategy", "fsdp",
                              "--train.checkpoint_every", 3, "--resume", "true"), "resume-1")
    straight = train_losses(out / "fsdp")
    assert len(straight) == 6
    for name in ("resume-2", "resume-1"):
        got = train_losses(out / name)
        assert got[:3] == straight[:3]  # the rows before the checkpoint, kept
        assert got[3:] == pytest.approx(straight[3:], rel=1e-5, abs=1e-5), name
        assert_same_weights(out / "fsdp", out / name)


def test_export_writes_the_plain_model_directory_of_a_sharded_checkpoint(two, tmp_path):
    """`lmlab export` of the 2-process run's final checkpoint: the weights of its model
    directory, a directory every --model takes (here generate and eval); a LoRA run's
    checkpoint becomes an adapter run directory."""
    out, results = two
    ckpt = out / "fsdp" / "checkpoints" / "step_000006"
    rc, text, err = run_cli(["export", ckpt, tmp_path / "exported"])
    assert rc == 0, text + err
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= \
        {p.name for p in (tmp_path / "exported").iterdir()}
    assert_same_weights(out / "fsdp", tmp_path / "exported", atol=0)
    rc, text, err = run_cli(["generate", "--model", tmp_path / "exported", "--prompt", "天空",
                             "--max-new-tokens", 4, "--temperature", 0])
    assert rc == 0, text + err
    assert results["sft"]["rc"] == 0
    sft_ckpt = ckpt_of(out / "sft")
    rc, text, err = run_cli(["export", sft_ckpt, tmp_path / "sft-exported"])
    assert rc == 0, text + err
    assert_same_weights(out / "sft", tmp_path / "sft-exported", atol=0)
    load_model_dir(tmp_path / "sft-exported")


def ckpt_of(run_dir):
    from lmlab.train import checkpoint as ckpt

    return ckpt.list_checkpoints(run_dir)[-1]


def test_export_of_what_is_not_a_sharded_checkpoint_is_one_line(two, tmp_path):
    out, _ = two
    for bad, needle in [(out / "ddp" / "checkpoints" / "step_000006", "not a sharded checkpoint"),
                        (tmp_path / "nowhere", "not a training checkpoint")]:
        rc, text, err = run_cli(["export", bad, tmp_path / "x"])
        line = (text + err).strip()
        assert rc == 2 and needle in line and len(line.splitlines()) == 1, line


def test_export_has_help_with_an_example():
    rc, text, err = run_cli(["export", "--help"])
    assert rc == 0 and "example: lmlab export" in text.replace("\n", " ")


KILL_SCRIPT = """
import os, signal, sys
import torch.distributed.checkpoint as dcp
from tests.conftest import run_cli
from tests.test_fsdp import pretrain_args

real_save = dcp.save
def save_then_die(state, checkpoint_id=None, **kw):
    real_save(state, checkpoint_id=checkpoint_id, **kw)  # the shards are on disk, then:
    if ".step_000004" in str(checkpoint_id):  # the second checkpoint, before its manifest
        os.kill(os.getpid(), signal.SIGKILL)  # and rename
dcp.save = save_then_die
sys.exit(run_cli(pretrain_args(sys.argv[1], sys.argv[2], 4, *sys.argv[3:]))[0])
"""


@pytest.mark.slow
def test_sigkill_while_writing_a_sharded_checkpoint_resumes_from_the_previous_one(
        small_shards, tmp_path):
    run, extra = tmp_path / "run", ["--train.strategy", "fsdp", "--train.checkpoint_every", 2,
                                    "--train.keep_checkpoints", 5,
                                    "--train.eval_every", 0]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    p = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(small_shards), str(run),
                        *map(str, extra)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    from lmlab.train import checkpoint as ckpt

    half = list((run / "checkpoints").glob(".step_000004.tmp-*"))
    assert len(half) == 1 and list(half[0].glob("*.distcp"))  # shards written, not renamed
    assert [c.name for c in ckpt.list_checkpoints(run)] == ["step_000002"]
    one_process(pretrain_args(small_shards, run, 4, *extra, "--resume", "true"), "resume")
    assert not half[0].exists()
    assert [c.name for c in ckpt.list_checkpoints(run)] == ["step_000002", "step_000004",
                                                            "step_000006"]
    straight = tmp_path / "straight"
    one_process(pretrain_args(small_shards, straight, 4, *extra), "straight")
    assert train_losses(run) == pytest.approx(train_losses(straight), rel=1e-6)


# ------------------------------------------------------------------ one process

def tiny_lm(**kw):
    torch.manual_seed(0)
    return Transformer(preset("tiny", vocab_size=256, n_layer=3, d_model=32, n_head=2,
                              max_seq_len=32, **kw))


def loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(ids[:, :-1], targets=ids[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(dropout):
    """Each block's forward is recomputed in backward (its RNG state replayed, so dropout
    draws the same mask); nothing but memory changes, and releasing it restores the model."""
    from lmlab.train.distributed import blocks, checkpoint_blocks, release_checkpointing

    plain, ac = tiny_lm(dropout=dropout), tiny_lm(dropout=dropout)
    assert checkpoint_blocks(ac) == 3
    calls = []
    hook = blocks(ac)[0].attn.register_forward_pre_hook(lambda *a: calls.append(1))
    for seed, T in [(1, 33), (2, 33), (3, 17)]:  # a new length: its first call runs plain
        ids = torch.randint(0, 256, (2, T), generator=torch.Generator().manual_seed(seed))
        torch.manual_seed(5)
        ref_loss, ref = loss_and_grads(plain, ids)
        torch.manual_seed(5)
        calls.clear()
        loss, got = loss_and_grads(ac, ids)
        assert torch.equal(loss, ref_loss)
        for n in ref:
            torch.testing.assert_close(got[n], ref[n], rtol=0, atol=0, msg=n)
        # the recomputation is real: backward runs a checkpointed block's forward again (not
        # the first call with a length, when lmlab's CPU fast paths are timed outside it)
        assert len(calls) == (1 if seed in (1, 3) else 2)
    release_checkpointing(ac)
    calls.clear()
    loss_and_grads(ac, ids)
    hook.remove()
    assert len(calls) == 1 and all("forward" not in vars(b) for b in blocks(ac))


def test_fsdp_options_are_checked_in_one_line():
    for argv, needle in [(["--train.reshard_after_forward", "false"], "train.reshard_after_forward"),
                         (["--train.fsdp_param_dtype", "bf16"], "train.fsdp_param_dtype"),
                         (["--train.strategy", "fsdp", "--train.precision", "fp16"],
                          "train.precision"),
                         (["--train.strategy", "zero3"], "strategy")]:
        rc, out, err = run_cli(["pretrain", "--data", "nowhere", *argv])
        text = (out + err).strip()
        assert rc == 2 and needle in text and len(text.splitlines()) == 1, (argv, text)


def test_one_process_fsdp_is_the_plain_model_and_two_shard_it():
    from lmlab.config import TrainConfig
    from lmlab.train.distributed import DDPStrategy, Dist, FSDPStrategy, make_strategy

    one = make_strategy(Dist(), TrainConfig(strategy="fsdp"))
    assert isinstance(one, FSDPStrategy) and one.sharded and not one.lockstep
    model = tiny_lm()
    raw, runner = one.wrap(model)
    assert raw is model and runner is model  # nothing to shard in one process
    assert type(make_strategy(Dist(), TrainConfig())) is DDPStrategy
    assert FSDPStrategy(Dist(world=2), TrainConfig(strategy="fsdp")).lockstep


# ------------------------------------------------------------------ the GPU path, on a CPU

def test_gpu_choices():
    from lmlab.train.distributed import configure_device, pin_batch, to_device, transfer_plan

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert transfer_plan(cuda) == (True, True) and transfer_plan(cpu) == (False, False)
    before = torch.backends.cuda.matmul.fp32_precision
    assert configure_device(cpu) is False
    assert torch.backends.cuda.matmul.fp32_precision == before  # a CPU run changes nothing
    batch = {"ids": torch.arange(6).view(2, 3), "n": 3, "pair": (torch.ones(2), "x")}
    assert to_device(batch, cpu) is batch
    if torch.cuda.is_available():  # where a GPU is at hand: pinned, then copied without blocking
        pinned = pin_batch(batch)
        assert pinned["ids"].is_pinned() and pinned["n"] == 3
        moved = to_device(pinned, cuda, pin=True)
        assert moved["ids"].device.type == "cuda" and moved["pair"][1] == "x"


def test_fused_adamw_where_torch_has_it():
    from lmlab.train.optim import build_adamw

    opt = build_adamw(tiny_lm(), 1e-3, 0.1)
    assert opt.defaults.get("fused") is True  # torch >= 2.4 fuses AdamW on CPU and CUDA


def test_attention_off_the_cpu_is_torch_sdpa_never_the_blocked_path(monkeypatch):
    """The blocked attention is chosen only for CPU tensors: on another device (here meta,
    which has no data and runs no kernel) the model goes through SDPA, which on CUDA picks
    the flash or memory-efficient kernel itself."""
    import lmlab.model.transformer as tr

    def refuse(*a, **k):
        raise AssertionError("the blocked CPU attention ran off the CPU")

    monkeypatch.setattr(tr, "causal_attention_blocked", refuse)
    monkeypatch.setattr(tr, "_blocked_attention_wins", refuse)
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(tr.F, "scaled_dot_product_attention",
                        lambda *a, **k: seen.append(a[0].device.type) or real(*a, **k))
    with torch.device("meta"):
        model = Transformer(preset("llama-tiny", vocab_size=64, n_layer=2, d_model=32,
                                   n_head=2, max_seq_len=16))
        ids = torch.zeros(2, 16, dtype=torch.long)
    model.train()
    model(ids).float().logsumexp(-1).mean().backward()  # a training step's forward and backward
    assert seen == ["meta", "meta"]


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory, tokenizer, tokenizer_dir, corpus_texts):
    return write_shards(tmp_path_factory.mktemp("shards"), tokenizer, tokenizer_dir,
                        corpus_texts, val_every=25)


def test_batches_built_ahead_are_the_batches_of_each_step(small_shards, tmp_path, monkeypatch):
    """The GPU feed (the next batch built in a thread while this one computes) run on a CPU
    without pinning: the same losses as building each batch when it is needed."""
    from lmlab.train import trainer

    one = tmp_path / "plain"
    one_process(pretrain_args(small_shards, one, 2, "--train.max_steps", 4,
                              "--train.grad_accum", 2), "plain")
    built = []
    monkeypatch.setattr(trainer, "transfer_plan", lambda dev: (False, True))
    real = trainer.Trainer._build
    monkeypatch.setattr(trainer.Trainer, "_build",
                        lambda self, step, micro: built.append((step, micro)) or
                        real(self, step, micro))
    ahead = tmp_path / "ahead"
    one_process(pretrain_args(small_shards, ahead, 2, "--train.max_steps", 4,
                              "--train.grad_accum", 2), "ahead")
    assert train_losses(ahead) == train_losses(one)
    # each micro-batch built once, in order, the last step's successor built ahead and unused
    assert built == [(s, m) for s in range(4) for m in range(2)] + [(4, 0)]


if __name__ == "__main__":
    _worker(sys.argv[1])
