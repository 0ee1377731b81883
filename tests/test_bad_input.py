"""Every command through bad input: one line on stderr, exit 2, no traceback, nothing lost.

Table-driven: each row is a command line (with placeholders for the fixtures
below), the words its error must contain, and the paths that must be
byte-identical afterwards (a user's existing output) or must not exist (the
output of a command that should have refused before writing anything).

The rows run the real CLI entry point, `lmlab.cli.main`, in this process
(`tests.conftest.run_cli`), with
stdout and stderr captured as a terminal would see them: an exception that
escaped it is a traceback, and fails the row. (A subprocess per row would spend
most of the minute importing torch; `test_the_entry_point_as_a_process` checks
a few rows through the installed `lmlab` command too.)
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmlab.config import ModelSpec, PretrainConfig, TrainConfig
from lmlab.data.prepare import prepare
from lmlab.interop.hf import export_hf
from lmlab.tokenizer import train_tokenizer
from lmlab.train.pretrain import pretrain
from tests.conftest import CHINESE, run_cli, stdlib_texts


def tree_digest(path: Path) -> str:
    """A hash of every file's name and bytes under `path` (or of the file itself)."""
    h = hashlib.sha256()
    if path.is_file():
        h.update(path.read_bytes())
        return h.hexdigest()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """The fixtures a user would have: a corpus, a tokenizer, shards, a trained run, an HF
    export, a directory of their own, and damaged copies of each kind of file."""
    root = tmp_path_factory.mktemp("bad_input")
    corpus = root / "corpus"
    corpus.mkdir()
    for i, text in enumerate(stdlib_texts(8) + CHINESE):
        (corpus / f"doc{i}.txt").write_text(text, encoding="utf-8")
    tok = root / "tok"
    train_tokenizer((p.read_text(encoding="utf-8") for p in sorted(corpus.iterdir())),
                    vocab_size=320).save(tok)
    shards = root / "shards"
    prepare([str(corpus)], tok, shards, val_fraction=0.2)
    run = root / "run"
    torch.manual_seed(0)
    pretrain(PretrainConfig(
        data=str(shards), tokenizer=str(tok), out_dir=str(run), seq_len=32,
        model=ModelSpec(preset="tiny", n_layer=1, d_model=32, n_head=2, max_seq_len=32),
        train=TrainConfig(batch_size=2, max_steps=2, eval_every=0, eval_tokens=256,
                          checkpoint_every=1, precision="fp32", log_every=1)))
    hf = root / "hf"
    export_hf(run, hf)
    mine = root / "mine"  # a directory of the user's own
    mine.mkdir()
    (mine / "config.json").write_text('{"mine": true}\n')
    (mine / "notes.txt").write_text("do not lose me\n")
    (root / "afile").write_text("a file, not a directory\n")

    def damaged_model(name: str, file: str, content: bytes) -> Path:
        d = root / name
        d.mkdir()
        for p in run.iterdir():
            if p.is_file():
                (d / p.name).write_bytes(p.read_bytes())
        (d / file).write_bytes(content)
        return d

    weights = (run / "model.safetensors").read_bytes()
    damaged_model("m_trunc", "model.safetensors", weights[: len(weights) // 2])
    damaged_model("m_empty", "model.safetensors", b"")
    damaged_model("m_random", "model.safetensors", os.urandom(4096))
    damaged_model("m_badtok", "tokenizer.json", os.urandom(2048))
    damaged_model("m_notutf8", "config.json", b"\xff\xfe{}")
    damaged_model("m_type", "config.json", json.dumps(
        {"kind": "transformer", "lmlab_model": {"n_layer": "two"}}).encode())
    hf_trunc = root / "hf_trunc"
    hf_trunc.mkdir()
    for p in hf.iterdir():
        (hf_trunc / p.name).write_bytes(p.read_bytes())
    hf_w = (hf / "model.safetensors").read_bytes()
    (hf_trunc / "model.safetensors").write_bytes(hf_w[: len(hf_w) // 3])
    hf_pickle = root / "hf_pickle"
    hf_pickle.mkdir()
    (hf_pickle / "config.json").write_bytes((hf / "config.json").read_bytes())
    torch.save({"w": torch.zeros(2), "evil": Path("/etc/passwd")}, hf_pickle / "pytorch_model.bin")
    # a run whose every checkpoint is damaged
    broken = root / "run_broken"
    subprocess.run(["cp", "-r", str(run), str(broken)], check=True)
    for ck in (broken / "checkpoints").iterdir():
        (ck / "trainer_state.pt").write_bytes(b"PK\x03\x04 truncated")
    (root / "badtok").mkdir()
    (root / "badtok" / "tokenizer.json").write_text("{ not json")
    files = {
        "r_notutf8.yaml": b"\xff\xfe\x00quality: {}\n",
        "r_notyaml.yaml": b"quality: [\n",
        "r_type.yaml": b"language:\n  min_score: high\n",
        "r_thresh.yaml": b"quality:\n  gopher_repetition:\n    dup_line_frac: lots\n",
        "c_notutf8.yaml": b"\xff\xfetrain: {}\n",
        "c_type.yaml": b"train:\n  batch_size: high\n",
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


PT = ["pretrain", "--data", "{shards}", "--tokenizer", "{tok}", "--model.preset", "tiny",
      "--seq_len", "32", "--model.max_seq_len", "32"]

# (id, argv, words the one stderr line must hold, paths that must be unchanged,
#  paths that must not exist afterwards)
ROWS = [
    # 1. outputs are never silently replaced
    ("tokenizer-into-model", ["tokenizer", "train", "--input", "{corpus}", "--out", "{run}"],
     ["{run}", "training run", "--overwrite"], ["{run}"], []),
    ("tokenizer-into-input", ["tokenizer", "train", "--input", "{corpus}", "--out", "{corpus}/t"],
     ["which this command reads"], ["{corpus}"], ["{corpus}/t"]),
    ("tokenizer-onto-file", ["tokenizer", "train", "--input", "{corpus}", "--out", "{afile}"],
     ["{afile}", "existing file"], ["{afile}"], []),
    ("prepare-into-tokenizer", ["data", "prepare", "--input", "{corpus}", "--tokenizer", "{tok}",
                                "--out", "{mine}"], ["{mine}", "notes.txt"], ["{mine}"], []),
    ("prepare-other-inputs", ["data", "prepare", "--input", "{corpus}", "--tokenizer", "{tok}",
                              "--out", "{shards}", "--val-fraction", "0.5"],
     ["{shards}", "other inputs", "val_fraction"], ["{shards}"], []),
    ("process-into-mine", ["data", "process", "--recipe", "code", "--input", "{corpus}",
                           "--out", "{mine}"], ["{mine}", "--overwrite"], ["{mine}"], []),
    ("process-into-input", ["data", "process", "--recipe", "code", "--input", "{corpus}",
                            "--out", "{corpus}"], ["which this command reads"], ["{corpus}"], []),
    ("pretrain-into-run", [*PT, "--out_dir", "{run}"], ["{run}", "--resume true"], ["{run}"], []),
    ("pretrain-into-mine", [*PT, "--out_dir", "{mine}"], ["{mine}", "--overwrite true"],
     ["{mine}"], []),
    ("pretrain-into-data", [*PT, "--out_dir", "{shards}/run"], ["which this command reads"],
     ["{shards}"], ["{shards}/run"]),
    ("import-into-run", ["import-hf", "{hf}", "{run}"], ["{run}", "training run"], ["{run}"], []),
    ("export-into-mine", ["export-hf", "{run}", "{mine}"], ["{mine}", "config.json"],
     ["{mine}"], []),
    ("export-into-model", ["export-hf", "{run}", "{run}/hf"], ["inside", "which this command reads"],
     ["{run}"], ["{run}/hf"]),
    ("zh-corpus-into-model", ["data", "zh-corpus", "--out", "{run}"], ["{run}", "--overwrite"],
     ["{run}"], ["{run}/raw"]),
    ("quickstart-into-mine", ["quickstart", "--out", "{mine}", "--minutes", "1"],
     ["{mine}", "--overwrite"], ["{mine}"], []),
    # 2. corrupt or hostile files
    ("generate-truncated-weights", ["generate", "--model", "{m_trunc}"],
     ["{m_trunc}/model.safetensors", "damaged"], ["{m_trunc}"], []),
    ("generate-empty-weights", ["generate", "--model", "{m_empty}"],
     ["{m_empty}/model.safetensors", "0 bytes"], [], []),
    ("generate-random-weights", ["generate", "--model", "{m_random}"],
     ["{m_random}/model.safetensors"], [], []),
    ("generate-random-tokenizer", ["generate", "--model", "{m_badtok}"],
     ["{m_badtok}/tokenizer.json"], [], []),
    ("generate-config-not-utf8", ["generate", "--model", "{m_notutf8}"],
     ["{m_notutf8}/config.json"], [], []),
    ("generate-config-wrong-type", ["generate", "--model", "{m_type}"],
     ["{m_type}/config.json", "n_layer", "'two'"], [], []),
    ("export-truncated-weights", ["export-hf", "{m_trunc}", "{root}/x1"],
     ["{m_trunc}/model.safetensors"], [], ["{root}/x1"]),
    ("import-truncated-weights", ["import-hf", "{hf_trunc}", "{root}/x2"],
     ["{hf_trunc}/model.safetensors"], [], ["{root}/x2"]),
    ("import-pickle", ["import-hf", "{hf_pickle}", "{root}/x3"],
     ["{hf_pickle}/pytorch_model.bin", "refused for safety"], [], ["{root}/x3"]),
    ("resume-damaged", [*PT, "--out_dir", "{run_broken}", "--resume", "true"],
     ["{run_broken}", "no intact checkpoint"], ["{run_broken}/checkpoints"], []),
    ("prepare-bad-tokenizer", ["data", "prepare", "--input", "{corpus}", "--tokenizer",
                               "{badtok}", "--out", "{root}/x4"], ["{badtok}"], [], ["{root}/x4"]),
    ("recipe-not-utf8", ["data", "process", "--recipe", "{r_notutf8.yaml}", "--input", "{corpus}",
                         "--out", "{root}/x5"], ["{r_notutf8.yaml}", "UTF-8"], [], ["{root}/x5"]),
    ("recipe-not-yaml", ["data", "process", "--recipe", "{r_notyaml.yaml}", "--input", "{corpus}",
                         "--out", "{root}/x5"], ["{r_notyaml.yaml}", "YAML", "line 2"], [],
     ["{root}/x5"]),
    ("recipe-wrong-type", ["data", "process", "--recipe", "{r_type.yaml}", "--input", "{corpus}",
                           "--out", "{root}/x5"], ["{r_type.yaml}", "min_score", "not a number"],
     [], ["{root}/x5"]),
    ("recipe-threshold-type", ["data", "process", "--recipe", "{r_thresh.yaml}", "--input",
                               "{corpus}", "--out", "{root}/x5"], ["dup_line_frac", "'lots'"], [],
     ["{root}/x5"]),
    ("config-not-utf8", ["pretrain", "--config", "{c_notutf8.yaml}"], ["{c_notutf8.yaml}", "UTF-8"],
     [], []),
    ("config-wrong-type", ["pretrain", "--config", "{c_type.yaml}"], ["train.batch_size", "high"],
     [], []),
    # 4. every value validated before work starts
    ("batch-size-0", [*PT, "--out_dir", "{root}/x6", "--train.batch_size", "0"],
     ["train.batch_size", ">= 1"], [], ["{root}/x6"]),
    ("max-steps-0", [*PT, "--out_dir", "{root}/x6", "--train.max_steps", "0"],
     ["train.max_steps", ">= 1"], [], ["{root}/x6"]),
    ("lr-negative", [*PT, "--out_dir", "{root}/x6", "--train.lr", "-1"], ["train.lr", "> 0"], [],
     ["{root}/x6"]),
    ("vocab-beyond-tokenizer", [*PT, "--out_dir", "{root}/x6", "--model.vocab_size", "99999"],
     ["model.vocab_size", "99999"], [], ["{root}/x6"]),
    ("dropout-out-of-range", [*PT, "--out_dir", "{root}/x6", "--model.dropout", "1.5"],
     ["model.dropout", "[0,1)"], [], ["{root}/x6"]),
    ("seq-len-beyond-model", [*PT, "--out_dir", "{root}/x6", "--seq_len", "4096"],
     ["seq_len", "max_seq_len"], [], ["{root}/x6"]),
    ("batch-size-wrong-type", [*PT, "--out_dir", "{root}/x6", "--train.batch_size", "abc"],
     ["train.batch_size", "abc"], [], ["{root}/x6"]),
    ("unknown-option", ["generate", "--modle", "{run}"], ["--modle"], [], []),
    ("temperature-negative", ["generate", "--model", "{run}", "--temperature", "-1",
                              "--prompt", "PROMPT-ECHO"], ["temperature"], [], []),
    ("top-p-above-1", ["generate", "--model", "{run}", "--top-p", "2", "--prompt", "PROMPT-ECHO"],
     ["top_p"], [], []),
    ("top-k-0", ["generate", "--model", "{run}", "--top-k", "0"], ["top_k"], [], []),
    ("max-new-tokens-0", ["generate", "--model", "{run}", "--max-new-tokens", "0"],
     ["--max-new-tokens"], [], []),
    ("vocab-size-too-small", ["tokenizer", "train", "--input", "{corpus}", "--vocab-size", "10",
                              "--out", "{root}/x7"], ["--vocab-size", "256"], [], ["{root}/x7"]),
    ("min-frequency-0", ["tokenizer", "train", "--input", "{corpus}", "--min-frequency", "0",
                         "--out", "{root}/x7"], ["--min-frequency"], [], ["{root}/x7"]),
    ("val-fraction-2", ["data", "prepare", "--input", "{corpus}", "--tokenizer", "{tok}",
                        "--out", "{root}/x8", "--val-fraction", "2"], ["--val-fraction"], [],
     ["{root}/x8"]),
    ("process-workers-0", ["data", "process", "--recipe", "code", "--input", "{corpus}",
                           "--out", "{root}/x9", "--workers", "0"], ["workers"], [], ["{root}/x9"]),
    ("quickstart-minutes-0", ["quickstart", "--out", "{root}/x10", "--minutes", "0"],
     ["--minutes"], [], ["{root}/x10"]),
]


def fill(s: str, root: Path) -> str:
    """Expand {name} (a fixture under root) and {root}."""
    import re

    return re.sub(r"\{([\w.]+)\}", lambda m: str(root if m.group(1) == "root"
                                                 else root / m.group(1)), s)


@pytest.mark.parametrize("name, argv, words, unchanged, absent", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input(w, name, argv, words, unchanged, absent):
    keep = {p: tree_digest(Path(fill(p, w))) for p in unchanged}
    rc, out, err = run_cli([fill(a, w) for a in argv])
    assert "Traceback" not in err, err
    assert rc == 2, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for word in words:
        assert fill(word, w) in lines[0], (word, lines[0])
    assert "weights_only=False" not in err
    assert "PROMPT-ECHO" not in out  # a generation error comes before the prompt is echoed
    for p, digest in keep.items():
        assert tree_digest(Path(fill(p, w))) == digest, f"{p} changed"
    for p in absent:
        assert not Path(fill(p, w)).exists(), f"{p} was written"


def test_overwrite_replaces_and_the_same_command_reruns(w, tmp_path):
    """The ways forward the refusals offer work: --overwrite replaces the directory whole
    (nothing of the old one stays); the same command on the same inputs may rerun."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("old")
    argv = ["tokenizer", "train", "--input", w / "corpus", "--vocab-size", 300, "--out", mine]
    assert run_cli(argv)[0] == 2
    rc, _, err = run_cli([*argv, "--overwrite"])
    assert rc == 0, err
    assert (mine / "tokenizer.json").is_file() and not (mine / "notes.txt").exists()
    rc, _, err = run_cli(argv)  # same command, same inputs: a rerun, not a refusal
    assert rc == 0, err
    rc, _, err = run_cli([*argv[:-4], "--vocab-size", 310, "--out", mine])
    assert rc == 2 and "vocab_size: 300 → 310" in err, err


def test_the_entry_point_as_a_process(w):
    """The same promise through the installed console script, in a real process."""
    for argv, word in ((["generate", "--model", w / "m_trunc"], "model.safetensors"),
                       (["pretrain", "--train.batch_size", "0"], "train.batch_size")):
        r = subprocess.run([sys.executable, "-m", "lmlab.cli", *map(str, argv)],
                           capture_output=True, text=True)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and word in r.stderr, r.stderr
