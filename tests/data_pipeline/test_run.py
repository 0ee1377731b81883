"""End to end: run_recipe on planted corpora, checked against the planted truth."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest

from lmlab.data.pipeline import run_recipe
from lmlab.data.shards import TokenShards, read_meta

from .conftest import dedup_only, read_jsonl_dir, write_jsonl
from .synthetic import english_prose, planted_corpus


def dedup_scores(docs, out) -> dict:
    """Recall of exact and near copies, and precision (removed documents that are planted copies)."""
    removed = {r["id"] for name in ("exact_duplicate", "near_duplicate")
               for r in read_jsonl_dir(out / "excluded" / name)}
    planted = {d.id: d for d in docs if d.dup_of}
    exact = [i for i, d in planted.items() if d.kind == "exact_dup"]
    near = [i for i, d in planted.items() if d.kind == "near_dup"]
    return {
        "exact_recall": sum(i in removed for i in exact) / len(exact),
        "near_recall": sum(i in removed for i in near) / len(near),
        "precision": sum(i in planted for i in removed) / max(1, len(removed)),
    }


@pytest.mark.parametrize("lang,unit", [("en", "word"), ("zh", "char")])
def test_planted_duplicates_found(tmp_path, lang, unit):
    docs = planted_corpus(800, seed=11, zh_fraction=1.0 if lang == "zh" else 0.0,
                          junk_fraction=0.0, exact_fraction=0.08, near_fraction=0.15)
    src = write_jsonl(tmp_path / "in.jsonl", [d.record() for d in docs])
    out = tmp_path / "out"
    rep = run_recipe(dedup_only(unit), [str(src)], str(out))
    s = dedup_scores(docs, out)
    assert s["exact_recall"] == 1.0
    assert s["near_recall"] >= 0.95, s
    assert s["precision"] >= 0.99, s
    kept = {r["id"] for r in read_jsonl_dir(out / "documents")}
    assert all(d.id in kept for d in docs if d.kind == "prose")  # one per cluster: the original
    assert rep["duplicates"]["removed_exact"] == sum(d.kind == "exact_dup" for d in docs)


def test_web_en_end_to_end(tmp_path, planted, tokenizer_dir):
    docs, src = planted
    out = tmp_path / "out"
    events = []
    rep = run_recipe("web-en", [str(src)], str(out), tokenizer_dir=str(tokenizer_dir),
                     progress=events.append)
    # report files
    assert (out / "report.json").is_file() and (out / "report.html").is_file()
    assert list((out / "charts").glob("*.png"))
    assert json.loads((out / "report.json").read_text())["documents_out"] == rep["documents_out"]
    stages = [s["stage"] for s in rep["stages"]]
    assert stages[0] == "read" and stages[-1] == "output" and "language" in stages and "dedup" in stages
    assert rep["stages"][0]["documents_out"] == len(docs)
    # kept documents: English, ids preserved, metadata carried
    kept = read_jsonl_dir(out / "documents")
    truth = {d.id: d for d in docs}
    assert len(kept) == rep["documents_out"] > 0
    assert all(r["id"] in truth and truth[r["id"]].lang == "en" for r in kept)
    assert all(r["metadata"]["language"] == "en" for r in kept)
    assert not any(truth[r["id"]].kind.startswith("junk") for r in kept)
    # exclusions per filter, each record says why
    lang_removed = read_jsonl_dir(out / "excluded" / "language")
    assert lang_removed and all(r["metadata"]["filter_reason"].startswith("language") for r in lang_removed)
    assert rep["removals"] and rep["samples"]
    # token shards: one directory, train and val, one document per kept document
    meta = read_meta(out / "tokens")
    assert meta["documents"] == len(kept)
    assert set(meta["splits"]) <= {"train", "val"}
    train = TokenShards(out / "tokens", "train")
    assert int(np.sum(train.slice(0, len(train)) == train.eos_id)) == meta["splits"]["train"]["documents"]
    assert events and "stages" in events[-1]


def test_resume_skips_finished_tasks(tmp_path):
    docs = planted_corpus(200, seed=2, zh_fraction=0.0)
    src = write_jsonl(tmp_path / "in.jsonl", [d.record() for d in docs])
    out = tmp_path / "out"
    first = run_recipe("web-en", [str(src)], str(out))
    marker = out / "work" / "filtered" / "00000.jsonl"
    before = marker.stat().st_mtime_ns
    os.remove(out / "report.json")
    second = run_recipe("web-en", [str(src)], str(out))
    assert marker.stat().st_mtime_ns == before  # the filter phase was not run again
    assert second["documents_out"] == first["documents_out"]
    assert (out / "report.json").is_file()


def test_decontamination(tmp_path):
    eval_text = english_prose(__import__("random").Random(99), (1, 1))
    clean = planted_corpus(60, seed=3, zh_fraction=0.0, junk_fraction=0, exact_fraction=0, near_fraction=0)
    words = eval_text.split()
    leaked = {"id": "leak", "text": clean[0].text + "\n\n" + " ".join(words[5:20]) + " " + clean[1].text}
    src = write_jsonl(tmp_path / "in.jsonl", [d.record() for d in clean[2:]] + [leaked])
    ev = write_jsonl(tmp_path / "eval.jsonl", [{"text": eval_text}])
    recipe = dedup_only()
    recipe["decontamination"] = {"enabled": True, "eval_files": [str(ev)]}
    out = tmp_path / "out"
    run_recipe(recipe, [str(src)], str(out))
    assert [r["id"] for r in read_jsonl_dir(out / "excluded" / "decontamination")] == ["leak"]
    assert len(read_jsonl_dir(out / "documents")) == len(clean) - 2


def test_malformed_records_reported_and_skipped(tmp_path):
    d = tmp_path / "in"
    good = [{"id": f"g{i}", "text": english_prose(__import__("random").Random(i))} for i in range(5)]
    write_jsonl(d / "good.jsonl", good)
    with open(d / "bad.jsonl", "w", encoding="utf-8") as f:
        f.write('{"id": "ok1", "text": "fine"}\n{not json\n{"id": 3, "text": 12}\n')
        f.write('{"id": "big", "text": "' + "a" * (50 * 1024 * 1024) + '"}\n')
        f.write('{"id": "ok2", "text": "also fine"}\n')
    (d / "junk.jsonl").write_bytes(b"\x00\xff\xfe binary \x89PNG\r\n\x1a\n")
    (d / "empty.jsonl.gz").write_bytes(b"")
    full = gzip.compress(b'{"id": "t", "text": "truncated file"}\n' * 100)
    (d / "truncated.jsonl.gz").write_bytes(full[: len(full) // 2])
    out = tmp_path / "out"
    rep = run_recipe(dedup_only(), [str(d)], str(out))
    problems = "\n".join(rep["read"]["problems"])
    assert rep["read"]["skipped_records"] >= 4
    assert "bad.jsonl:2" in problems and "bad.jsonl:3" in problems
    kept = {r["id"] for r in read_jsonl_dir(out / "documents")}
    assert {"g0", "ok1", "ok2"} <= kept


@pytest.mark.slow
def test_two_workers_same_result_as_one(tmp_path, planted):
    _, src = planted
    # two input files so that two tasks have work
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.jsonl").write_text("".join(lines[::2]), encoding="utf-8")
    (d / "b.jsonl").write_text("".join(lines[1::2]), encoding="utf-8")
    r1 = run_recipe("web-en", [str(d)], str(tmp_path / "one"), workers=1)
    r2 = run_recipe("web-en", [str(d)], str(tmp_path / "two"), workers=2)
    assert r1["documents_out"] == r2["documents_out"]
    assert sorted(r["id"] for r in read_jsonl_dir(tmp_path / "one" / "documents")) == \
        sorted(r["id"] for r in read_jsonl_dir(tmp_path / "two" / "documents"))


@pytest.mark.slow
def test_ray_executor(tmp_path):
    pytest.importorskip("ray")
    import ray

    docs = planted_corpus(150, seed=4, zh_fraction=0.0)
    src = write_jsonl(tmp_path / "in.jsonl", [d.record() for d in docs])
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    try:
        ray_rep = run_recipe("web-en", [str(src)], str(tmp_path / "ray"), workers=2, executor="ray")
    finally:
        ray.shutdown()
    local = run_recipe("web-en", [str(src)], str(tmp_path / "local"))
    assert ray_rep["documents_out"] == local["documents_out"] > 0
