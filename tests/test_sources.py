"""lmlab.data.sources: every format read, every kind of bad input reported with its place.

All inputs are built here (WARC with warcio, Parquet with pyarrow); no downloads.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from lmlab.data import sources
from lmlab.data.sources import Document, ReadStats, detect_format, iter_documents
from lmlab.errors import InputError

ZH = "语言模型通过预测下一个词来学习语言的规律。我们从零开始训练一个字节级的分词器。"
EMOJI = "emoji 🙂👍🏽 and a flag 🇨🇳"
ARTICLE_ZH = "这是一篇关于数据清洗的文章。" * 8
ARTICLE_EN = ("Data cleaning removes boilerplate, duplicated pages and spam before a model ever "
              "sees them, which matters more than most architecture choices. ") * 4


def html_page(title: str, body: str) -> str:
    return (f"<html><head><meta charset='utf-8'><title>{title}</title></head><body>"
            f"<nav><a href='/'>Home</a> <a href='/about'>About us menu</a></nav>"
            f"<article><h1>{title}</h1><p>{body}</p><p>{ARTICLE_EN}</p></article>"
            f"<footer>Copyright footer text 2024</footer></body></html>")


def write_jsonl(path: Path, records, opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


def write_zst(path: Path, data: bytes) -> Path:
    path.write_bytes(zstandard.ZstdCompressor().compress(data))
    return path


def write_warc(path: Path, pages: list[tuple[str, str]], gz: bool = True,
               extra: bool = True) -> Path:
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    with open(path, "wb") as f:
        w = WARCWriter(f, gzip=gz)
        if extra:  # a request record and an image response: neither is a document
            w.write_record(w.create_warc_record("http://example.com/", "request",
                                                payload=io.BytesIO(b"GET / HTTP/1.1\r\n\r\n")))
            hdrs = StatusAndHeaders("200 OK", [("Content-Type", "image/png")],
                                    protocol="HTTP/1.1")
            w.write_record(w.create_warc_record("http://example.com/a.png", "response",
                                                payload=io.BytesIO(b"\x89PNG..."),
                                                http_headers=hdrs))
        for url, html in pages:
            hdrs = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")],
                                    protocol="HTTP/1.1")
            w.write_record(w.create_warc_record(url, "response", payload=io.BytesIO(html.encode()),
                                                http_headers=hdrs))
    return path


def read(paths, **kw) -> tuple[list[Document], ReadStats]:
    stats = ReadStats()
    docs = list(iter_documents([str(p) for p in paths], stats=stats, **kw))
    return docs, stats


# ------------------------------------------------------------------ every format

def test_every_format_is_read_with_chinese(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text(f"plain text\n{ZH}\n{EMOJI}\n", encoding="utf-8")
    (d / "b.md").write_text(f"# 标题\n\n{ZH}", encoding="utf-8")
    (d / "c.py").write_text("def f():\n    return '中文'\n", encoding="utf-8")
    (d / "d.rst").write_text("Title\n=====\n\n中文 rst\n", encoding="utf-8")
    write_jsonl(d / "e.jsonl", [{"text": ZH, "id": "e1", "url": "u"}, {"text": "second", "id": 7}])
    write_jsonl(d / "f.jsonl.gz", [{"text": "gz " + ZH}], opener=gzip.open)
    write_zst(d / "g.jsonl.zst", (json.dumps({"text": "zst " + ZH}, ensure_ascii=False) + "\n")
              .encode())
    (d / "h.json").write_text(json.dumps([{"text": "array " + ZH}, {"text": "two"}],
                                         ensure_ascii=False), encoding="utf-8")
    pq.write_table(pa.table({"text": ["parquet " + ZH, "row 2"], "id": ["p1", "p2"],
                             "lang": ["zh", "en"]}), d / "sub" / "i.parquet")
    (d / "sub" / "j.html").write_text(html_page("中文网页", ARTICLE_ZH), encoding="utf-8")
    write_warc(d / "sub" / "k.warc.gz", [
        ("http://example.com/zh", html_page("标题", ARTICLE_ZH)),
        ("http://example.com/en", html_page("English", "An English page."))])
    write_warc(d / "sub" / "l.warc",
               [("http://example.com/plain", html_page("Plain", "Uncompressed WARC."))],
               gz=False, extra=False)
    (d / "sub" / "m.txt.bz2").write_bytes(bz2.compress(f"bz2 {ZH}".encode()))

    docs, stats = read([d])
    by_file = {}
    for doc in docs:
        by_file.setdefault(Path(doc.source).name, []).append(doc)
    assert by_file["a.txt"][0].text == f"plain text\n{ZH}\n{EMOJI}\n"
    assert by_file["a.txt"][0].line is None and by_file["a.txt"][0].id is None
    assert by_file["b.md"][0].text == f"# 标题\n\n{ZH}"
    assert by_file["c.py"][0].text == "def f():\n    return '中文'\n"
    assert by_file["d.rst"][0].text.endswith("中文 rst\n")
    e = by_file["e.jsonl"]
    assert [(x.text, x.id, x.line) for x in e] == [(ZH, "e1", 1), ("second", "7", 2)]
    assert e[0].metadata == {"url": "u"}
    assert by_file["f.jsonl.gz"][0].text == "gz " + ZH
    assert by_file["g.jsonl.zst"][0].text == "zst " + ZH
    assert [(x.text, x.line) for x in by_file["h.json"]] == [("array " + ZH, 1), ("two", 2)]
    p = by_file["i.parquet"]
    assert [(x.text, x.id, x.line, x.metadata) for x in p] == [
        ("parquet " + ZH, "p1", 1, {"lang": "zh"}), ("row 2", "p2", 2, {"lang": "en"})]
    html = by_file["j.html"][0].text
    assert "这是一篇关于数据清洗的文章。" in html
    assert "Copyright footer" not in html and "About us menu" not in html  # boilerplate gone
    k = by_file["k.warc.gz"]
    assert len(k) == 2  # the request and the image response are not documents
    assert "这是一篇关于数据清洗的文章。" in k[0].text and "An English page." in k[1].text
    assert k[0].metadata["url"] == "http://example.com/zh" and k[0].id.startswith("<urn:uuid:")
    assert by_file["l.warc"][0].metadata["url"] == "http://example.com/plain"
    assert by_file["m.txt.bz2"][0].text == f"bz2 {ZH}"
    assert stats.documents == len(docs) == 17
    assert stats.files == 13 and stats.skipped_total == 0 and stats.problems == []
    assert stats.bytes == sum(len(x.text.encode()) for x in docs)


def test_wet_conversion_records_are_plain_text(tmp_path):
    from warcio.warcwriter import WARCWriter

    path = tmp_path / "x.warc.wet.gz"
    with open(path, "wb") as f:
        w = WARCWriter(f, gzip=True)
        w.write_record(w.create_warc_record("http://example.com/", "conversion",
                                            payload=io.BytesIO(ZH.encode()),
                                            warc_content_type="text/plain"))
    docs, _ = read([path])
    assert [d.text for d in docs] == [ZH] and docs[0].metadata["url"] == "http://example.com/"


def test_directory_walk_is_sorted_and_skips_hidden_and_unknown(tmp_path):
    for name in ["b/2.txt", "b/1.txt", "a.txt", "c/z.md", ".git/HEAD.txt", "b/.hidden.txt",
                 "image.png", "notes.unknownsuffix"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(f"doc {name}")
    docs, stats = read([tmp_path])
    names = [str(Path(d.source).relative_to(tmp_path)) for d in docs]
    assert names == ["a.txt", "b/1.txt", "b/2.txt", "c/z.md"]
    assert stats.files_ignored == 2  # image.png, notes.unknownsuffix
    # a file named explicitly is read whatever its suffix
    docs, _ = read([tmp_path / "notes.unknownsuffix"])
    assert docs[0].text == "doc notes.unknownsuffix"
    # extensions narrow the walk
    docs, _ = read([tmp_path], extensions=[".md"])
    assert [Path(d.source).name for d in docs] == ["z.md"]
    # the same file named twice is read once
    docs, _ = read([tmp_path / "a.txt", tmp_path])
    assert [Path(d.source).name for d in docs].count("a.txt") == 1


def test_detect_format():
    assert detect_format("x.jsonl.gz") == ("jsonl", ".gz")
    assert detect_format("x.JSONL.ZST") == ("jsonl", ".zst")
    assert detect_format("CC-MAIN.warc.gz") == ("warc", ".gz")
    assert detect_format("CC-MAIN.warc.wet.gz") == ("warc", ".gz")
    assert detect_format("x.parquet") == ("parquet", None)
    assert detect_format("x.htm") == ("html", None)
    assert detect_format("x.py") == ("text", None)
    assert detect_format("x.bin") == (None, None)


def test_empty_records_are_dropped_not_reported(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("  \n\n")
    write_jsonl(tmp_path / "x.jsonl", [{"text": ""}, "", "   ", {"text": "kept"}])
    docs, stats = read([tmp_path])
    assert [d.text for d in docs] == ["kept"]
    assert stats.empty == 3 and stats.problems == [] and stats.skipped_total == 0


def test_crlf_bom_and_control_characters_survive(tmp_path):
    text = "line one\r\nline\ttwo\x0b\u200b\r\n"
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())
    write_jsonl(tmp_path / "b.jsonl", [{"text": text}])
    (tmp_path / "b.jsonl").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "b.jsonl").read_bytes())
    docs, stats = read([tmp_path])
    assert [d.text for d in docs] == [text, text] and stats.problems == []


# ------------------------------------------------------------------ bad input

GOOD = {"text": "a good record"}


def _gz_truncated(path: Path) -> Path:
    lines = "".join(json.dumps({"text": f"record {i} " * 20}) + "\n" for i in range(2000))
    data = gzip.compress(lines.encode())
    path.write_bytes(data[: len(data) // 2])
    return path


def _zst_truncated(path: Path) -> Path:
    data = zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"text": f"record {i} " * 20}) + "\n" for i in range(2000)).encode())
    path.write_bytes(data[: len(data) // 2])
    return path


def _warc_truncated(path: Path) -> Path:
    pages = [(f"http://example.com/{i}", html_page(f"Page {i}", ARTICLE_ZH)) for i in range(3)]
    write_warc(path, pages, gz=path.suffix == ".gz", extra=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 300])  # inside the third record
    return path


# (name, build(path) -> path, reason, location suffix after the path: ":N" or "")
BAD_INPUTS = [
    ("missing.txt", None, "missing path", ""),
    ("latin1.txt", lambda p: p.write_bytes("ok\ncaf\xe9\n".encode("latin-1")),
     "invalid UTF-8", ":2"),
    ("bad_utf8.jsonl", lambda p: p.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n'),
     "invalid UTF-8", ":2"),
    ("not_json.jsonl", lambda p: write_jsonl(p, [GOOD, '{"text": "unterminated']),
     "not JSON", ":2"),
    ("array_line.jsonl", lambda p: write_jsonl(p, [GOOD, "[1, 2]"]), "not an object", ":2"),
    ("no_field.jsonl", lambda p: write_jsonl(p, [GOOD, {"content": "x"}]), "missing field", ":2"),
    ("number.jsonl", lambda p: write_jsonl(p, [GOOD, {"text": 42}]), "text not a string", ":2"),
    ("null.jsonl", lambda p: write_jsonl(p, [GOOD, {"text": None}]), "text not a string", ":2"),
    ("surrogate.jsonl", lambda p: write_jsonl(p, [GOOD, '{"text": "half an emoji \\ud83d"}']),
     "invalid Unicode", ":2"),
    ("binary.txt", lambda p: p.write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00binary"),
     "binary file", ""),
    ("binary.jsonl", lambda p: p.write_bytes(b"PK\x03\x04\x00\x00 zip file"), "binary file", ""),
    ("nul_later.txt", lambda p: p.write_bytes(b"text\n" * 3000 + b"x\x00y\n"),
     "binary file", ":3001"),
    ("utf16.txt", lambda p: p.write_bytes("中文".encode("utf-16")), "binary file", ""),
    ("gz_unnamed.jsonl", lambda p: p.write_bytes(gzip.compress(b'{"text": "x"}\n')),
     "binary file", ""),
    ("empty.jsonl.gz", lambda p: p.write_bytes(b""), "empty compressed file", ""),
    ("empty.jsonl.zst", lambda p: p.write_bytes(b""), "empty compressed file", ""),
    ("truncated.jsonl.gz", _gz_truncated, "truncated file", ":"),
    ("truncated.jsonl.zst", _zst_truncated, "truncated file", ":"),
    ("not_gzip.jsonl.gz", lambda p: p.write_bytes(b"plain text, not gzip\n"), "corrupt file", ""),
    ("not_zstd.txt.zst", lambda p: p.write_bytes(b"plain text, not zstd\n"), "corrupt file", ""),
    ("not.parquet", lambda p: p.write_bytes(b"not parquet at all"), "corrupt file", ""),
    ("no_column.parquet", lambda p: pq.write_table(pa.table({"body": ["x"]}), p),
     "missing field", ""),
    ("int_column.parquet", lambda p: pq.write_table(pa.table({"text": [1, 2]}), p),
     "text not a string", ""),
    ("null_row.parquet", lambda p: pq.write_table(pa.table({"text": ["ok", None]}), p),
     "text not a string", ":2"),
    ("not_a.warc", lambda p: p.write_bytes(b"hello, this is not a WARC\r\n\r\n"),
     "corrupt file", ":1"),
    ("cut.warc", _warc_truncated, "truncated file", ":3"),
    ("cut.warc.gz", _warc_truncated, "truncated file", ":3"),
    ("empty.warc.gz", lambda p: p.write_bytes(b""), "empty compressed file", ""),
]


@pytest.mark.parametrize("name,build,reason,where", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_reported_with_place_counted_and_skipped(tmp_path, name, build, reason,
                                                              where, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "always readable"}])
    path = tmp_path / name
    if build is not None:
        build(path)
    docs, stats = read([path, good])
    assert "always readable" in [d.text for d in docs] and stats.documents == len(docs)
    assert stats.skipped == {reason: 1}, stats.problems
    [msg] = stats.problems
    assert msg.startswith(f"{path}{where}"), msg
    if where == "":
        assert msg.startswith(f"{path}: ")
    assert " — " in msg and "\n" not in msg  # what is wrong — how to fix it, on one line
    # strict: the same message, as an InputError, at the first problem
    with pytest.raises(InputError) as e:
        list(iter_documents([str(path), str(good)], strict=True))
    assert str(e.value) == msg
    out = capsys.readouterr()
    assert out.out == ""  # library code never prints


def test_bad_lines_do_not_stop_the_file(tmp_path):
    records = [{"text": "one"}, "garbage", {"text": 3}, {"body": "x"}, {"text": "five"}, "[]"]
    path = write_jsonl(tmp_path / "mixed.jsonl", records)
    docs, stats = read([path])
    assert [(d.text, d.line) for d in docs] == [("one", 1), ("five", 5)]
    assert stats.skipped == {"not JSON": 1, "text not a string": 1, "missing field": 1,
                             "not an object": 1}
    assert [m.split(":")[1] for m in stats.problems] == ["2", "3", "4", "6"]


def test_truncated_gz_keeps_the_records_before_the_cut(tmp_path):
    path = _gz_truncated(tmp_path / "t.jsonl.gz")
    docs, stats = read([path])
    assert 100 < len(docs) < 2000
    assert [d.line for d in docs] == list(range(1, len(docs) + 1))
    assert stats.skipped == {"truncated file": 1}
    assert stats.problems[0].startswith(f"{path}:{len(docs) + 1}: ")


def test_empty_corpus_raises(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    write_jsonl(tmp_path / "bad.jsonl", ["not json"])
    with pytest.raises(InputError, match="no documents") as e:
        list(iter_documents([str(tmp_path), str(tmp_path / "missing")]))
    assert "bad.jsonl:1" in str(e.value)
    with pytest.raises(InputError, match="no documents"):
        list(iter_documents([str(tmp_path / "nothing-here")]))


def test_problems_are_logged_when_no_stats_are_kept(tmp_path, caplog):
    path = write_jsonl(tmp_path / "x.jsonl", [GOOD, "bad"])
    with caplog.at_level(logging.WARNING, logger="lmlab.data.sources"):
        docs = list(iter_documents([str(path)]))
    assert len(docs) == 1
    assert any(f"{path}:2: not JSON" in r.getMessage() for r in caplog.records)


def test_problem_list_is_bounded(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [GOOD] + ["bad"] * 50)
    stats = ReadStats(max_problems=10)
    list(iter_documents([str(path)], stats=stats))
    assert len(stats.problems) == 10 and stats.skipped_total == 50
    rows = dict(stats.summary())
    assert rows["documents"] == 1 and rows["skipped: not JSON"] == 50


# ------------------------------------------------------------------ big inputs stream

def test_huge_line_is_skipped_without_loading_it(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MAX_DOCUMENT_BYTES", 1 << 20)
    path = tmp_path / "huge.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps({"text": "before"}) + "\n")
        f.write(json.dumps({"text": "中" * (3 << 20)}, ensure_ascii=False) + "\n")  # 9 MB, one line
        f.write(json.dumps({"text": "after"}) + "\n")
    docs, stats = read([path])
    assert [(d.text, d.line) for d in docs] == [("before", 1), ("after", 3)]
    assert stats.skipped == {"record too long": 1}
    assert stats.problems[0].startswith(f"{path}:2: line longer than 1 MiB")


def test_huge_line_in_compressed_jsonl(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MAX_DOCUMENT_BYTES", 1 << 20)
    lines = [json.dumps({"text": "x" * (2 << 20)}), json.dumps({"text": "small"})]
    write_zst(tmp_path / "h.jsonl.zst", ("\n".join(lines) + "\n").encode())
    docs, stats = read([tmp_path / "h.jsonl.zst"])
    assert [d.text for d in docs] == ["small"] and stats.skipped == {"record too long": 1}


def test_large_text_file_is_read_in_parts_that_join_to_the_original(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MAX_DOCUMENT_BYTES", 1000)
    text = "".join(f"{i} {ZH}\n" for i in range(100)) + "末" * 2000 + "\n" + "tail without newline"
    (tmp_path / "big.txt").write_text(text, encoding="utf-8")
    docs, stats = read([tmp_path / "big.txt"])
    assert len(docs) > 10 and "".join(d.text for d in docs) == text
    assert all(len(d.text.encode()) <= 1000 for d in docs)
    assert docs[0].line == 1 and docs[1].line == 1 + docs[0].text.count("\n")
    assert stats.problems == []
