"""The `lmlab` command as a user runs it: every command's --help, round trips, clear errors."""

import subprocess
import sys

import pytest
import torch

from lmlab.model import Transformer, preset
from lmlab.model_io import load_model_dir, save_model_dir


def lmlab(*args, **kw):
    return subprocess.run([sys.executable, "-m", "lmlab.cli", *map(str, args)],
                          capture_output=True, text=True, **kw)


@pytest.mark.parametrize("cmd", [["tokenizer", "train"], ["data", "prepare"], ["data", "process"],
                                 ["pretrain"], ["generate"], ["quickstart"], ["export-hf"],
                                 ["import-hf"], ["eval"], ["finetune", "classify"],
                                 ["classify"], ["data", "zh-corpus"]])
def test_every_command_has_help_with_an_example(cmd):
    r = lmlab(*cmd, "--help")
    assert r.returncode == 0 and "example: lmlab" in r.stdout.replace("\n", " ")


def test_export_import_generate_round_trip(tmp_path, tokenizer_dir, tokenizer):
    model = Transformer(preset("llama-tiny", vocab_size=tokenizer.vocab_size))
    save_model_dir(model, tmp_path / "m", tokenizer_dir=tokenizer_dir)
    r = lmlab("export-hf", tmp_path / "m", tmp_path / "hf")
    assert r.returncode == 0 and "LlamaForCausalLM" in r.stdout, r.stderr
    r = lmlab("import-hf", tmp_path / "hf", tmp_path / "back")
    assert r.returncode == 0 and "lmlab generate" in r.stdout, r.stderr
    back = load_model_dir(tmp_path / "back")
    want, got = model.state_dict(), back.state_dict()
    assert sorted(got) == sorted(want)  # the same tensors, none missing or extra
    for k, a in want.items():
        assert got[k].dtype == a.dtype and torch.equal(got[k], a), k
    r = lmlab("generate", "--model", tmp_path / "back", "--prompt", "你好", "--max-new-tokens", 8,
              "--seed", 0)
    assert r.returncode == 0 and r.stdout.startswith("你好"), r.stderr


@pytest.mark.parametrize("args, needle", [
    (["pretrain", "--data", "/no/such/shards", "--tokenizer", "/no/such/tok"], "/no/such/tok"),
    (["generate", "--model", "/no/such/model"], "/no/such/model"),
    (["data", "prepare", "--input", "/no/such.txt", "--tokenizer", "/no/tok", "--out", "x"], "/no/tok"),
])
def test_bad_input_is_one_line_and_exit_2(args, needle):
    r = lmlab(*args)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and needle in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
