"""The CLI of serving: `lmlab data docs-qa`, `lmlab ask`, `lmlab eval --docs-qa`, bad input."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli


@pytest.fixture(scope="module")
def docs_qa(tmp_path_factory):
    out = tmp_path_factory.mktemp("dq") / "set"
    rc, stdout, err = run_cli(["data", "docs-qa", "--out", out, "--per-kind", "4"])
    assert rc == 0, err
    assert "12 questions" in stdout
    return out


def test_ask_cites_the_retrieved_passages(chat_model_dir, docs_qa):
    q = json.loads((docs_qa / "qa.jsonl").read_text().splitlines()[1])
    rc, stdout, err = run_cli(["ask", "--model", chat_model_dir, "--docs", docs_qa / "docs",
                               q["question"], "--max-tokens", "8", "--device", "cpu"])
    assert rc == 0, err
    assert "Sources:" in stdout and q["source"] in stdout


def test_eval_scores_retrieval_and_answers_on_the_report_card(chat_model_dir, docs_qa, tmp_path):
    rc, stdout, err = run_cli(["eval", "--model", chat_model_dir, "--tasks", "none",
                               "--docs-qa", docs_qa / "qa.jsonl", "--docs", docs_qa / "docs",
                               "--out", tmp_path / "rep", "--device", "cpu"])
    assert rc == 0, err
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    qa = report["docs_qa"]
    assert qa["n"] == 12 and qa["recall@4"] >= 0.9 and qa["exact_match"] is not None
    assert len(qa["rows"]) == 12 and all(r["answer"] is not None for r in qa["rows"])
    assert "docs-qa (recall@4)" in stdout
    assert "Answers from documents" in (tmp_path / "rep" / "report.md").read_text()


@pytest.mark.parametrize("argv, words", [
    (["eval", "--tasks", "none", "--docs-qa", "qa.jsonl"], "--docs-qa and --docs go together"),
    (["chat", "--temperature", "-1"], "temperature"),
    (["ask", "--docs", "nowhere", "q"], "nowhere"),
    (["serve", "--max-batch", "0"], "--max-batch 0"),
    (["serve", "--docs", "nowhere"], "--docs nowhere"),
])
def test_bad_serving_input_is_one_line_exit_2(chat_model_dir, tmp_path, argv, words):
    rc, stdout, err = run_cli([argv[0], "--model", chat_model_dir, *argv[1:]])
    assert rc == 2 and words in err and "Traceback" not in err, err
