"""`lmlab experiment history`: every contender trains on the same shards for the same budget,
and the table, plot and JSON agree with the runs they summarise; a rerun keeps finished models."""

import json
import sysconfig
from pathlib import Path

import pytest

from lmlab.train.metrics import read_metrics
from tests.conftest import run_cli

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.mark.slow
def test_history_trains_each_kind_on_one_corpus_and_reports(tmp_path):
    out = tmp_path / "hist"
    argv = ["experiment", "history", "--corpus", str(STDLIB / "json"), str(STDLIB / "html"),
            "--minutes_per_model", "0.03", "--kinds", "rnn", "gpt2", "--out", str(out),
            "--device", "cpu"]
    code, stdout, stderr = run_cli(argv)
    assert code == 0, stderr
    report = json.loads((out / "history.json").read_text())
    assert [m["name"] for m in report["models"]] == ["rnn", "gpt2"]
    assert set(report["compressors"]) == {"xz", "bz2", "zlib"}
    for m in report["models"]:
        run = Path(m["run_dir"])
        config = json.loads((run / "config.json").read_text())
        assert config["kind"] == m["kind"]
        evals = [r for r in read_metrics(run / "metrics.jsonl") if "val_bpb" in r]
        assert m["val_bpb"] == evals[-1]["val_bpb"] and 0 < m["val_bpb"] < 16
        assert m["train_flops"] == m["flops_per_token"] * m["tokens_seen"] > 0
        # every model read the same shards with the same tokenizer
        resolved = (run / "config.yaml").read_text()
        assert str(out / "shards") in resolved and str(out / "tokenizer") in resolved
    table = (out / "history.md").read_text()
    assert "Elman RNN" in table and "xz -9e" in table
    assert (out / "history.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "gradient_reach.png").read_bytes()[:4] == b"\x89PNG"
    for m in report["models"]:  # one gradient norm per input position, all finite and >= 0
        assert len(m["gradient_reach"]) == report["seq_len"]
        assert all(g >= 0 for g in m["gradient_reach"]) and m["gradient_reach"][0] > 0
    assert "the seeds' history" in stdout

    # again, with one more kind: the finished ones are kept as they were
    before = {m["name"]: m for m in report["models"]}
    code, _, stderr = run_cli([a for a in argv if a != "gpt2"] + ["--kinds", "rnn", "gpt2", "lstm"])
    assert code == 0, stderr
    again = json.loads((out / "history.json").read_text())
    assert [m["name"] for m in again["models"]] == ["rnn", "gpt2", "lstm"]
    assert again["models"][0] == before["rnn"] and again["models"][1] == before["gpt2"]
    # another budget into the same directory would mix budgets in one table: refused
    code, _, stderr = run_cli([a if a != "0.03" else "1" for a in argv])
    assert code == 2 and "minutes_per_model" in stderr


def test_history_refuses_unknown_kinds(tmp_path):
    code, _, stderr = run_cli(["experiment", "history", "--kinds", "mamba", "--out",
                               str(tmp_path / "h")])
    assert code == 2 and "--kinds: unknown ['mamba']" in stderr
