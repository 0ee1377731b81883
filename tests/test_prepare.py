"""lmlab.data.prepare: dedup, a deterministic disjoint split, lossless shards, atomic output."""

from __future__ import annotations

import filecmp
import json
import os
import sysconfig
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmlab.data.prepare import PrepareResult, prepare
from lmlab.data.shards import TokenShards, read_meta, split_value, text_digest
from lmlab.errors import ConfigError, InputError
from lmlab.tokenizer import Tokenizer

CHINESE = [
    "语言模型通过预测下一个词来学习语言的规律。",
    "我们从零开始训练一个字节级的分词器，它可以无损地编码任何文本。",
    "注意力机制让每个位置都能看到前面所有的位置，这就是因果掩码的作用。",
    "数据的质量决定了模型的上限，清洗和去重是预训练中最重要的步骤之一。",
]
ODD = ["emoji 🙂👍🏽🇨🇳 and ZWJ 👩‍💻", "tabs\tand\r\nCRLF\r\n", "control \x01\x7f chars",
       "  leading spaces", "combining e\u0301 and \u200b zero width"]


@pytest.fixture(scope="session")
def prep_tokenizer_dir(tmp_path_factory) -> Path:
    """A small byte-level BPE trained once on a few stdlib modules and Chinese prose."""
    from lmlab.tokenizer import train_tokenizer

    root = Path(sysconfig.get_paths()["stdlib"])
    names = ("textwrap.py", "heapq.py", "bisect.py")
    texts = [(root / f).read_text(encoding="utf-8") for f in names]
    out = tmp_path_factory.mktemp("prep-tokenizer")
    train_tokenizer(texts + CHINESE * 50, vocab_size=600).save(out)
    return out


def corpus_texts() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    names = ("colorsys.py", "keyword.py", "this.py")
    code = [(root / f).read_text(encoding="utf-8") for f in names]
    sentences = [f"第{i}句：{CHINESE[i % 4]} number {i}" for i in range(40)]
    return code + sentences + CHINESE + ODD


def write_corpus(d: Path, texts: list[str]) -> Path:
    """The texts spread over .txt, .jsonl and .parquet files."""
    d.mkdir(parents=True, exist_ok=True)
    n = len(texts)
    a, b = texts[: n // 3], texts[n // 3: 2 * n // 3]
    for i, t in enumerate(a):
        (d / f"doc{i:03d}.txt").write_bytes(t.encode("utf-8"))
    with open(d / "records.jsonl", "w", encoding="utf-8") as f:
        for i, t in enumerate(b):
            f.write(json.dumps({"id": f"r{i}", "text": t}, ensure_ascii=False) + "\n")
    pq.write_table(pa.table({"text": texts[2 * n // 3:]}), d / "rows.parquet")
    return d


def decode_split(shard_dir: Path, split: str, tok: Tokenizer) -> list[str]:
    shards = TokenShards(shard_dir, split)
    tokens = shards.slice(0, len(shards))
    assert tokens[-1] == tok.eos_id
    ends = np.flatnonzero(tokens == tok.eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tok.decode(tokens[s:e].tolist()) for s, e in zip(starts, ends)]


def test_shards_decode_to_the_original_documents(tmp_path, prep_tokenizer_dir):
    texts = corpus_texts()
    src = write_corpus(tmp_path / "corpus", texts)
    r = prepare([str(src)], prep_tokenizer_dir, tmp_path / "shards", val_fraction=0.2)
    assert isinstance(r, PrepareResult)
    tok = Tokenizer.load(prep_tokenizer_dir)
    train = decode_split(tmp_path / "shards", "train", tok)
    val = decode_split(tmp_path / "shards", "val", tok)
    assert Counter(train + val) == Counter(texts)  # lossless: Chinese, emoji, CRLF, control chars
    assert not set(train) & set(val)
    assert r.documents == {"train": len(train), "val": len(val)} and r.duplicates == 0
    meta = read_meta(tmp_path / "shards")
    assert meta["dtype"] == "uint16"
    assert TokenShards(tmp_path / "shards").arrays[0].dtype == np.uint16
    assert meta["tokenizer_hash"] == tok.hash and meta["vocab_size"] == tok.vocab_size
    assert meta["sources"] == [str(src)] and meta["val_fraction"] == 0.2
    assert meta["documents"] == len(texts) and meta["duplicates_dropped"] == 0
    assert r.tokens["train"] + r.tokens["val"] == meta["tokens"]
    rows = dict(r.summary_rows())
    assert rows["documents read"] == len(texts) and rows["val documents"] == len(val)


def test_exact_duplicates_are_dropped_keeping_the_first(tmp_path, prep_tokenizer_dir):
    texts = corpus_texts()
    d = write_corpus(tmp_path / "corpus", texts)
    # the same documents again, in other formats and files; one near-copy is not a duplicate
    with open(d / "zz_again.jsonl", "w", encoding="utf-8") as f:
        again = texts[:5] + [texts[0], texts[0] + " "]
        f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in again)
    r = prepare([str(d)], prep_tokenizer_dir, tmp_path / "shards", val_fraction=0.1)
    assert r.duplicates == 6 and r.stats.documents == len(texts) + 7
    assert sum(r.documents.values()) == len(texts) + 1
    tok = Tokenizer.load(prep_tokenizer_dir)
    out = [t for split in ("train", "val") for t in decode_split(tmp_path / "shards", split, tok)]
    assert Counter(out) == Counter(texts + [texts[0] + " "])
    assert read_meta(tmp_path / "shards")["duplicates_dropped"] == 6


def _val_docs(shard_dir: Path, tok: Tokenizer) -> set[str]:
    return set(decode_split(shard_dir, "val", tok))


def test_split_is_deterministic_whatever_the_file_order_and_workers(tmp_path, prep_tokenizer_dir):
    texts = corpus_texts()
    tok = Tokenizer.load(prep_tokenizer_dir)
    a = write_corpus(tmp_path / "a", texts)
    b = write_corpus(tmp_path / "b", texts[::-1])  # other files, other order
    r1 = prepare([str(a)], prep_tokenizer_dir, tmp_path / "s1", val_fraction=0.25, workers=1)
    r2 = prepare([str(b)], prep_tokenizer_dir, tmp_path / "s2", val_fraction=0.25, workers=2)
    prepare([str(a)], prep_tokenizer_dir, tmp_path / "s3", val_fraction=0.25, workers=2)
    assert r2.workers == 2
    val = _val_docs(tmp_path / "s1", tok)
    assert 0 < len(val) < len(texts)
    assert _val_docs(tmp_path / "s2", tok) == val
    expected = {t for t in texts if split_value(text_digest(t), 0) < 0.25}
    assert val == expected
    # same inputs in the same order: byte-identical shards for any number of workers
    for f in ("train_00000.bin", "val_00000.bin"):
        assert filecmp.cmp(tmp_path / "s1" / f, tmp_path / "s3" / f, shallow=False)
    # another seed, another split
    prepare([str(a)], prep_tokenizer_dir, tmp_path / "s4", val_fraction=0.25, seed=1)
    assert _val_docs(tmp_path / "s4", tok) != val
    assert r1.documents == r2.documents


def test_val_gets_a_document_even_from_a_tiny_corpus(tmp_path, prep_tokenizer_dir, caplog):
    tok = Tokenizer.load(prep_tokenizer_dir)
    src = tmp_path / "corpus"
    src.mkdir()
    files = [src / f"{i}.txt" for i in range(3)]
    for f, t in zip(files, CHINESE):
        f.write_text(t, encoding="utf-8")
    r = prepare([str(f) for f in files], prep_tokenizer_dir, tmp_path / "s", val_fraction=1e-9)
    assert r.documents == {"train": 2, "val": 1}
    # the one moved is the one nearest the threshold, whatever the order of the inputs
    nearest = min(CHINESE[:3], key=lambda t: split_value(text_digest(t)))
    assert decode_split(tmp_path / "s", "val", tok) == [nearest]
    prepare([str(f) for f in files[::-1]], prep_tokenizer_dir, tmp_path / "s", val_fraction=1e-9,
            overwrite=True)  # another order of the inputs is another output
    assert decode_split(tmp_path / "s", "val", tok) == [nearest]
    # val_fraction 0: no val split at all
    r = prepare([str(src)], prep_tokenizer_dir, tmp_path / "s0", val_fraction=0)
    assert r.documents == {"train": 3}
    # and train is never left empty either
    r = prepare([str(src)], prep_tokenizer_dir, tmp_path / "s9", val_fraction=0.999999)
    assert r.documents["train"] >= 1 and sum(r.documents.values()) == 3
    # one document cannot be split: said in a warning, not silently
    r = prepare([str(files[0])], prep_tokenizer_dir, tmp_path / "s1")
    assert r.documents == {"train": 1}
    assert any("no val split" in rec.getMessage() for rec in caplog.records)


def test_bad_records_are_reported_and_strict_stops(tmp_path, prep_tokenizer_dir):
    d = write_corpus(tmp_path / "corpus", corpus_texts())
    (d / "broken.jsonl").write_text('{"text": "fine"}\nnot json\n{"body": 1}\n', encoding="utf-8")
    r = prepare([str(d)], prep_tokenizer_dir, tmp_path / "shards")
    assert r.stats.skipped_total == 2
    broken = d / "broken.jsonl"
    assert [m.split(": ")[0] for m in r.stats.problems] == [f"{broken}:2", f"{broken}:3"]
    with pytest.raises(InputError, match=r"broken\.jsonl:2: not JSON"):
        prepare([str(d)], prep_tokenizer_dir, tmp_path / "strict", strict=True)
    assert not (tmp_path / "strict").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dir left


def test_output_replaces_a_shard_dir_atomically_and_refuses_others(tmp_path, prep_tokenizer_dir):
    d = write_corpus(tmp_path / "corpus", corpus_texts())
    out = tmp_path / "shards"
    prepare([str(d)], prep_tokenizer_dir, out)
    first = read_meta(out)
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not a private temp dir's 0700
    # other inputs are another output: refused without overwrite, the old one untouched
    with pytest.raises(InputError, match="other inputs"):
        prepare([str(d / "records.jsonl")], prep_tokenizer_dir, out)
    assert read_meta(out) == first
    # a failed run leaves the previous output whole, even with overwrite
    with pytest.raises(InputError):
        prepare([str(tmp_path / "missing")], prep_tokenizer_dir, out, overwrite=True)
    assert read_meta(out) == first
    # a successful one replaces it
    prepare([str(d / "records.jsonl")], prep_tokenizer_dir, out, overwrite=True)
    assert read_meta(out)["documents"] < first["documents"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "shards"]
    # a directory holding anything else is never replaced
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="already holds 1 file"):
        prepare([str(d)], prep_tokenizer_dir, other)
    assert (other / "notes.txt").read_text() == "keep me"


def test_progress_and_arguments(tmp_path, prep_tokenizer_dir, monkeypatch):
    import lmlab.data.prepare as P

    monkeypatch.setattr(P, "BATCH_DOCS", 8)
    d = write_corpus(tmp_path / "corpus", corpus_texts())
    calls = []
    r = prepare([str(d)], prep_tokenizer_dir, tmp_path / "s",
                progress=lambda n, b: calls.append((n, b)))
    assert len(calls) > 3 and calls == sorted(calls)
    assert calls[-1] == (r.stats.documents, r.stats.bytes)
    with pytest.raises(ConfigError):
        prepare([str(d)], prep_tokenizer_dir, tmp_path / "x", val_fraction=1.0)
    with pytest.raises(ConfigError):
        prepare([str(d)], prep_tokenizer_dir, tmp_path / "x", workers=0)
    with pytest.raises(InputError, match="tokenizer.json"):
        prepare([str(d)], tmp_path / "no-tokenizer", tmp_path / "x")
    with pytest.raises(InputError, match="no documents"):
        (tmp_path / "empty").mkdir()
        prepare([str(tmp_path / "empty")], prep_tokenizer_dir, tmp_path / "x")
    assert not (tmp_path / "x").exists()
