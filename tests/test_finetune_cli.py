"""`lmlab finetune sft|dpo`, `lmlab lora export|merge`, `generate --chat` as a user runs them:
a tiny model through the real CLI, and bad input as one line with exit code 2, nothing written."""

import json
import subprocess
import sys

import pytest

from lmlab.model import Transformer, preset
from lmlab.model_io import save_model_dir
from tests.conftest import free_port

QA = [("1加1等于几？", "2"), ("天空是什么颜色？", "蓝色"), ("What is 2+2?", "4"),
      ("中国的首都是哪里？", "北京"), ("Say hi.", "hi")]


def lmlab(*args):
    return subprocess.run([sys.executable, "-m", "lmlab.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer_dir, tokenizer):
    out = tmp_path_factory.mktemp("base") / "m"
    model = Transformer(preset("llama-tiny", vocab_size=tokenizer.vocab_size, n_layer=1,
                               d_model=32, n_head=2, n_kv_head=1, d_ff=64, max_seq_len=64))
    save_model_dir(model, out, tokenizer_dir=tokenizer_dir)
    return out


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    return write_jsonl(path, [{"messages": [{"role": "user", "content": q},
                                            {"role": "assistant", "content": a}]}
                              for q, a in QA * 4])


def one_line_error(r, *needles):
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr


@pytest.mark.parametrize("cmd", [["finetune", "sft"], ["finetune", "dpo"], ["lora", "export"],
                                 ["lora", "merge"], ["data", "make-sft"]])
def test_the_commands_have_help_with_an_example(cmd):
    r = lmlab(*cmd, "--help")
    assert r.returncode == 0 and "example: lmlab" in r.stdout.replace("\n", " ")


@pytest.mark.slow
def test_sft_with_lora_then_chat_merge_export_and_dpo(tmp_path, base, chats):
    run = tmp_path / "sft"
    r = lmlab("finetune", "sft", "--model", base, "--data", chats, "--out_dir", run,
              "--lora.r", 4, "--train.max_steps", 3, "--train.batch_size", 2, "--eval_rows", 2,
              "--max_new_tokens", 4, "--val_fraction", 0.2, "--train.device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "finetune sft" in r.stdout and "held-out answers before" in r.stdout
    assert (run / "sft_eval.json").is_file()
    r = lmlab("generate", "--chat", "--model", run, "--prompt", "你好", "--system", "简短回答。",
              "--max-new-tokens", 4, "--seed", 0)
    assert r.returncode == 0 and r.stdout.startswith("你好"), r.stderr
    r = lmlab("lora", "merge", run, tmp_path / "merged")
    assert r.returncode == 0 and (tmp_path / "merged" / "model.safetensors").is_file(), r.stderr
    r = lmlab("lora", "export", run, tmp_path / "peft", "--base-model", "hf-base")
    assert r.returncode == 0, r.stderr
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    r = lmlab("lora", "merge", run, tmp_path / "peft")  # another command's output: refused
    one_line_error(r, "peft")

    prefs = write_jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": q, "chosen": a, "rejected": "不知道"} for q, a in QA * 4])
    r = lmlab("finetune", "dpo", "--model", tmp_path / "merged", "--data", prefs, "--out_dir",
              tmp_path / "dpo", "--train.max_steps", 2, "--train.batch_size", 2,
              "--train.device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "val reward accuracy before" in r.stdout and "50.0 %" in r.stdout


@pytest.mark.parametrize("records, needle", [
    ([{"messages": [{"role": "user", "content": "hi"}]}], "assistant"),
    ([{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}],
     "robot"),
    ([{"question": "hi", "answer": "x"}], "messages"),
])
def test_sft_bad_records_are_one_line_naming_path_and_line(tmp_path, base, records, needle):
    good = {"prompt": "hi", "response": "hello"}
    data = write_jsonl(tmp_path / "bad.jsonl", [good, *records])
    r = lmlab("finetune", "sft", "--model", base, "--data", data, "--out_dir", tmp_path / "out")
    one_line_error(r, "bad.jsonl:2", needle)
    assert not (tmp_path / "out").exists()


def test_dpo_empty_response_and_unmatched_lora_target_are_one_line(tmp_path, base, chats):
    data = write_jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": "hi", "chosen": "hello", "rejected": "go away"},
        {"prompt": "hi", "chosen": "", "rejected": "go away"}])
    r = lmlab("finetune", "dpo", "--model", base, "--data", data, "--out_dir", tmp_path / "out")
    one_line_error(r, "prefs.jsonl:2", "chosen")
    r = lmlab("finetune", "sft", "--model", base, "--data", chats, "--out_dir", tmp_path / "out",
              "--lora.r", 4, "--lora.targets", "[q,nope]")
    one_line_error(r, "lora.targets", "nope")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_sft_with_lora_under_torchrun_equals_one_process(tmp_path, base, chats):
    """Two DDP ranks of 2 rows each train what one process does with the same 4 rows: the
    token-weighted loss and the gradient all-reduce give the same adapters (fp32)."""
    import os

    import torch

    from lmlab.model_io import read_safetensors

    common = ["finetune", "sft", "--model", base, "--data", chats, "--lora.r", 4,
              "--train.max_steps", 3, "--eval_rows", 0, "--val_fraction", 0.2,
              "--train.device", "cpu", "--train.precision", "fp32", "--train.warmup_steps", 0]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(free_port()), "-m", "lmlab.cli", *map(str, common),
                          "--train.batch_size", "2", "--out_dir", str(tmp_path / "ddp")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert ddp.returncode == 0, ddp.stdout[-2000:] + ddp.stderr[-3000:]
    one = lmlab(*common, "--train.batch_size", 4, "--out_dir", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    a = read_safetensors(tmp_path / "ddp" / "model.safetensors")
    b = read_safetensors(tmp_path / "one" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(".lora." in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
