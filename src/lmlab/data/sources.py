"""Document readers: every input format lmlab understands, behind one iterator.

`iter_documents(paths)` turns files and directories into a stream of
`Document`s. The format follows the file name:

    .txt .md .rst .py ... (plain text)   one document per file
    .jsonl .ndjson .json                 one document per line (a field, "text" by default);
                                         a .json file that starts with "[" is one array of records
    .parquet                             one document per row (a column, "text" by default)
    .warc .warc.gz .wet.gz               one document per HTML response (main text by trafilatura)
                                         or per WET "conversion" record (already plain text)
    .html .htm                           one document per file (main text by trafilatura)

Text and JSONL may be compressed: .gz, .zst, .bz2, .xz. Directories are walked
recursively in sorted order, skipping hidden files and directories; files named
explicitly are always read (as plain text if the suffix is unknown).

Why the care about bad input: a corpus is gigabytes assembled by someone else,
and one bad line must not cost a run, nor vanish silently. Every malformed
record is skipped, counted by reason in `ReadStats`, and reported as
"path:line: what is wrong — fix" (line = 1-based line, row or record number).
With `strict=True` the first problem raises `InputError` with that message
instead. Reading streams: JSONL line by line, Parquet by row batch, large text
files in parts, so memory stays bounded whatever the input.

Over-long lines are skipped: a JSONL line, a line of a text file, or the text of
a Parquet row or JSON-array record longer than `max_line_bytes` (default
`MAX_LINE_BYTES`, 4 MiB; `--max-line-bytes` on the CLI, `input.max_line_bytes`
in a recipe) is reported as "path:line: line longer than ..." and skipped. A
line is read in chunks and dropped as soon as it passes the limit, so it is
never held whole, however long; a skipped line of a text file leaves an empty
line in its document (the line numbers of the rest stay right). Why 4 MiB: the
tokenizer takes about 200 bytes of memory per byte of one document (a 4 MB line
~0.9 GB, a 50 MB line 8.6 GB), and prose lines are far shorter.

Problems go to the caller's `ReadStats` (the CLI prints them); when no stats
object is given they are logged as warnings instead, so none is ever lost.
"""

from __future__ import annotations

import bz2
import gzip
import io
import itertools
import json
import logging
import lzma
import os
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from lmlab.errors import ConfigError, InputError

log = logging.getLogger(__name__)

# The longest single document (JSONL line, HTML page, WARC record) read whole.
# Longer records are reported and skipped; plain-text files longer than this are
# split at line boundaries into several documents, so a 10 GB .txt still streams.
MAX_DOCUMENT_BYTES = 64 * 1024 * 1024
# The longest line (JSONL record, line of a text file, Parquet row) read by default; see above.
MAX_LINE_BYTES = 4 * 1024 * 1024

TEXT_SUFFIXES = frozenset({
    ".txt", ".text", ".md", ".markdown", ".rst", ".tex", ".org", ".adoc",
    ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".cu", ".rs", ".go", ".java",
    ".kt", ".scala", ".js", ".ts", ".jsx", ".tsx", ".rb", ".php", ".lua", ".swift", ".sh",
    ".sql", ".r", ".jl", ".hs", ".ml", ".css", ".toml", ".yaml", ".yml", ".ini", ".cfg",
})
JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson", ".json"})
HTML_SUFFIXES = frozenset({".html", ".htm", ".xhtml"})
WARC_SUFFIXES = frozenset({".warc", ".wet"})  # warcio reads .warc.gz itself, record by record
COMPRESSED_SUFFIXES = frozenset({".gz", ".zst", ".zstd", ".bz2", ".xz"})

_MAGIC = {b"\x1f\x8b": ".gz", b"\x28\xb5\x2f\xfd": ".zst", b"BZh": ".bz2", b"\xfd7zXZ": ".xz"}
_UTF8_BOM = b"\xef\xbb\xbf"
NL = b"\n"


@dataclass
class Document:
    text: str
    id: str | None
    source: str            # the file it came from
    line: int | None       # 1-based line / row / record number; None for a whole file
    metadata: dict = field(default_factory=dict)


@dataclass
class ReadStats:
    """What a read saw: documents and bytes delivered, files opened, records skipped and why."""

    documents: int = 0
    bytes: int = 0                 # UTF-8 bytes of the text of the documents delivered
    files: int = 0                 # files opened
    files_ignored: int = 0         # files under a directory with a suffix no reader knows
    empty: int = 0                 # records with no text (or only whitespace): dropped, no problem
    skipped: Counter = field(default_factory=Counter)  # reason -> records (or files) skipped
    problems: list[str] = field(default_factory=list)  # "path:line: what — fix", up to max_problems
    max_problems: int = 1000

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def add_problem(self, reason: str, message: str) -> None:
        self.skipped[reason] += 1
        if len(self.problems) < self.max_problems:
            self.problems.append(message)

    def summary(self) -> list[tuple[str, object]]:
        """(label, value) rows for a table: the counts, then one row per skip reason."""
        rows: list[tuple[str, object]] = [
            ("files read", self.files),
            ("documents", self.documents),
            ("MB of text", f"{self.bytes / 1e6:,.1f}"),
        ]
        if self.files_ignored:
            rows.append(("files ignored (unknown type)", self.files_ignored))
        if self.empty:
            rows.append(("empty documents dropped", self.empty))
        rows += [(f"skipped: {reason}", n) for reason, n in sorted(self.skipped.items())]
        return rows


# ------------------------------------------------------------------ paths and formats

def _strip_compression(name: str) -> tuple[str, str | None]:
    stem, suffix = os.path.splitext(name)
    if suffix.lower() in COMPRESSED_SUFFIXES:
        return stem, suffix.lower()
    return name, None


def detect_format(path: str | os.PathLike) -> tuple[str | None, str | None]:
    """(format, compression) from the file name; format None when no reader knows the suffix."""
    name = os.path.basename(str(path))
    stem, comp = _strip_compression(name)
    suffix = os.path.splitext(stem)[1].lower()
    if suffix in WARC_SUFFIXES and comp in (None, ".gz"):
        return "warc", comp
    if suffix == ".parquet" and comp is None:
        return "parquet", None
    if suffix in JSONL_SUFFIXES:
        return "jsonl", comp
    if suffix in HTML_SUFFIXES:
        return "html", comp
    if suffix in TEXT_SUFFIXES:
        return "text", comp
    return None, comp


def _normalise_extensions(extensions: Iterable[str] | None) -> tuple[str, ...] | None:
    if extensions is None:
        return None
    if isinstance(extensions, str):
        extensions = [extensions]
    return tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)


def _walk(root: Path) -> Iterator[Path]:
    """Files under root, depth first in sorted order, without hidden files or directories."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


# ------------------------------------------------------------------ reading

class _Skip(Exception):
    """Internal: a problem was recorded; stop reading the current file."""


class _Reader:
    """Reads one call's inputs; holds the stats and the strictness that every format shares."""

    def __init__(self, text_field: str, id_field: str, strict: bool, stats: ReadStats | None,
                 max_line_bytes: int = MAX_LINE_BYTES):
        self.text_field, self.id_field, self.strict = text_field, id_field, strict
        self.max_line_bytes = max_line_bytes
        self.own_stats = stats is None
        self.stats = stats if stats is not None else ReadStats()

    # -- reporting

    def problem(self, reason: str, where: str, what: str, fix: str) -> None:
        message = f"{where}: {what} — {fix}"
        if self.strict:
            raise InputError(message)
        self.stats.add_problem(reason, message)
        log.log(logging.WARNING if self.own_stats else logging.DEBUG, "skipped %s", message)

    def line_too_long(self, reason: str, where: str, limit: int, n_bytes: int) -> None:
        self.problem(reason, where, f"line longer than {_size(limit)} ({n_bytes:,} bytes)",
                     "split it, or raise the limit (--max-line-bytes; in a recipe "
                     "input.max_line_bytes)")

    def document(self, text, source: str, line: int | None, doc_id=None,
                 metadata: dict | None = None, max_bytes: int | None = None) -> Document | None:
        """A Document for `text`, or None (recorded) when it is empty, not a string, or longer
        than `max_bytes` (UTF-8)."""
        where = f"{source}:{line}" if line is not None else source
        if not isinstance(text, str):
            kind = "null" if text is None else _a(_json_type(text))
            self.problem("text not a string", where,
                         f"field {self.text_field!r} is {kind}, not a string",
                         "give every record its text as a string")
            return None
        if not text or text.isspace():
            self.stats.empty += 1
            return None
        try:
            n_bytes = len(text.encode("utf-8"))
        except UnicodeEncodeError as e:  # JSON may hold escaped lone surrogates ("\ud800")
            self.problem("invalid Unicode", where,
                         f"text holds a lone surrogate {text[e.start]!r} at character {e.start}",
                         "fix the program that wrote this record (it split an emoji or CJK pair)")
            return None
        if max_bytes is not None and n_bytes > max_bytes:
            self.line_too_long("record too long", where, max_bytes, n_bytes)
            return None
        self.stats.documents += 1
        self.stats.bytes += n_bytes
        return Document(text=text, id=None if doc_id is None else str(doc_id), source=source,
                        line=line, metadata=metadata or {})

    # -- dispatch

    def read_file(self, path: Path, fmt: str | None, comp: str | None) -> Iterator[Document]:
        src = str(path)
        self.stats.files += 1
        try:
            if comp is not None and path.stat().st_size == 0:
                self.problem("empty compressed file", src,
                             f"empty file (0 bytes), not valid {comp} data",
                             "re-create or remove it")
                return
            if fmt == "jsonl":
                yield from self.read_jsonl(path, comp)
            elif fmt == "parquet":
                yield from self.read_parquet(path)
            elif fmt == "warc":
                yield from self.read_warc(path, comp)
            elif fmt == "html":
                yield from self.read_html(path, comp)
            else:
                yield from self.read_text(path, comp)
        except _Skip:
            pass
        except OSError as e:  # unreadable: permissions, a directory race, I/O error
            self.problem("unreadable file", src, f"cannot read ({e.strerror or e})",
                         "check the file")

    # -- shared byte-level checks

    def check_binary(self, head: bytes, where: str, comp: str | None) -> None:
        """Raise _Skip (after reporting) when the first bytes show this is not text."""
        if comp is None:
            for magic, suffix in _MAGIC.items():
                if head.startswith(magic):
                    self.problem("binary file", where,
                                 f"{suffix} compressed data in a file not named {suffix}",
                                 f"rename it to end in {suffix}")
                    raise _Skip
        if head.startswith((b"\xff\xfe", b"\xfe\xff")):
            self.problem("binary file", where, "UTF-16 text, not UTF-8",
                         "re-encode it: iconv -f UTF-16 -t UTF-8")
            raise _Skip
        nul = head.find(b"\x00")
        if nul >= 0:
            self.problem("binary file", where, f"binary data (NUL byte at offset {nul})",
                         "give text, JSONL, Parquet, WARC or HTML files")
            raise _Skip

    def decode_error(self, where: str, data: bytes, e: UnicodeDecodeError,
                     first_line: int | None = None) -> None:
        """Report invalid UTF-8: in a whole file (first_line given) or in one record."""
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        bad = data[e.start:e.start + 1].hex().upper()
        if first_line is not None:
            where = f"{where}:{first_line + data.count(NL, 0, e.start)}"
        what = f"invalid UTF-8 (byte 0x{bad} at column {col})"
        self.problem("invalid UTF-8", where, what,
                     "re-encode the file as UTF-8, e.g. iconv -f LATIN1 -t UTF-8")

    def stream_error(self, where: str, e: Exception, comp: str | None, kept: str) -> None:
        if isinstance(e, EOFError):
            self.problem("truncated file", where,
                         f"{comp or 'compressed'} data ends early (read {kept} before it)",
                         "the file is truncated: download or compress it again")
        else:
            kind = f"corrupt {comp} data" if comp else "corrupt data"
            self.problem("corrupt file", where, f"{kind} ({type(e).__name__}: {e})",
                         "download or compress the file again")

    # -- plain text

    def read_text(self, path: Path, comp: str | None) -> Iterator[Document]:
        src = str(path)
        with _open_binary(path, comp) as f:
            lines = _LongLinesDropped(f, self.max_line_bytes, lambda line, n: self.line_too_long(
                "line too long", f"{src}:{line}", self.max_line_bytes, n))
            parts = _Parts(lines, MAX_DOCUMENT_BYTES)
            whole = True  # a file that fits in one part is one document with line None
            for i in itertools.count():
                try:
                    part = next(parts, None)
                    if i == 0 and part is not None:
                        whole = parts.at_end()
                except _STREAM_ERRORS as e:
                    self.stream_error(src, e, comp, "nothing" if i == 0 else _count(i, "part"))
                    return
                if part is None:
                    if i == 0:  # an empty file: nothing to read, nothing wrong
                        self.stats.empty += 1
                    return
                line, data = part
                if i == 0:
                    self.check_binary(data[:8192], src, comp)
                    if data.startswith(_UTF8_BOM):
                        data = data[3:]
                    if not whole:
                        log.info("%s: larger than %d MiB, read as several documents cut at "
                                 "line ends", src, MAX_DOCUMENT_BYTES >> 20)
                nul = data.find(b"\x00")
                if nul >= 0:
                    self.problem("binary file", f"{src}:{line + data.count(NL, 0, nul)}",
                                 "binary data (NUL byte)", "give a text file")
                    return
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError as e:
                    self.decode_error(src, data, e, first_line=line)
                    return
                doc = self.document(text, src, None if whole else line)
                if doc is not None:
                    yield doc

    # -- JSON lines

    def read_jsonl(self, path: Path, comp: str | None) -> Iterator[Document]:
        src = str(path)
        with _open_binary(path, comp) as f:
            try:
                head = f.peek(8192)[:8192]
            except _STREAM_ERRORS as e:
                self.stream_error(src, e, comp, "nothing")
                return
            self.check_binary(head, src, comp)
            if path.name.lower().split(".")[-1 if comp is None else -2] == "json" and \
                    head.lstrip(_UTF8_BOM + b" \t\r\n").startswith(b"["):
                yield from self.read_json_array(f, src)
                return
            limit = min(self.max_line_bytes, MAX_DOCUMENT_BYTES)
            n = 0
            while True:
                try:
                    raw = f.readline(limit + 1)
                except _STREAM_ERRORS as e:
                    self.stream_error(f"{src}:{n + 1}", e, comp, _count(n, "line"))
                    return
                if not raw:
                    return
                n += 1
                if len(raw) > limit and not raw.endswith(NL):  # more than `limit` before "\n"
                    length = len(raw)
                    try:  # skip the rest of the line without holding it
                        while raw and not raw.endswith(NL):
                            raw = f.readline(1 << 20)
                            length += len(raw)
                    except _STREAM_ERRORS as e:
                        self.stream_error(f"{src}:{n}", e, comp, _count(n - 1, "line"))
                        return
                    self.line_too_long("record too long", f"{src}:{n}", limit,
                                       length - raw.endswith(NL))
                    continue
                if n == 1 and raw.startswith(_UTF8_BOM):
                    raw = raw[3:]
                if raw.isspace() or not raw:
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    self.decode_error(f"{src}:{n}", raw, e)
                    continue
                try:
                    record = json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as e:
                    self.problem("not JSON", f"{src}:{n}", f"not JSON ({_json_error(e)})",
                                 "each line must be one JSON object")
                    continue
                doc = self.record(record, src, n)
                if doc is not None:
                    yield doc

    def read_json_array(self, f: BinaryIO, src: str) -> Iterator[Document]:
        """A .json file holding one array of records (read whole: such files are small)."""
        try:
            data = f.read(MAX_DOCUMENT_BYTES + 1)
            if len(data) > MAX_DOCUMENT_BYTES:
                self.problem("record too long", src,
                             f"JSON array file larger than {_size(MAX_DOCUMENT_BYTES)}",
                             "write it as JSON lines (.jsonl): one record per line")
                return
            records = json.loads(data.decode("utf-8-sig"))
        except UnicodeDecodeError as e:
            self.decode_error(src, data, e, first_line=1)
            return
        except json.JSONDecodeError as e:
            self.problem("not JSON", f"{src}:{e.lineno}", f"not JSON ({_json_error(e)})",
                         "a .json file must be one JSON array of objects, or JSON lines")
            return
        except _STREAM_ERRORS as e:
            self.stream_error(src, e, None, "nothing")
            return
        if not isinstance(records, list):
            records = [records]
        for i, record in enumerate(records, 1):
            doc = self.record(record, src, i, max_bytes=self.max_line_bytes)
            if doc is not None:
                yield doc

    def record(self, record, src: str, n: int, max_bytes: int | None = None) -> Document | None:
        where = f"{src}:{n}"
        if not isinstance(record, dict):
            kind = "null" if record is None else _a(f"JSON {_json_type(record)}")
            self.problem("not an object", where, f"{kind}, not an object",
                         f'each record must be an object like {{"{self.text_field}": "..."}}')
            return None
        if self.text_field not in record:
            fields = ", ".join(repr(k) for k in list(record)[:8]) or "none"
            self.problem("missing field", where, f"no field {self.text_field!r} (fields: {fields})",
                         "name the text field with --text-field")
            return None
        text = record[self.text_field]
        doc_id = record.get(self.id_field)
        meta = {k: v for k, v in record.items() if k != self.text_field and k != self.id_field}
        return self.document(text, src, n, doc_id, meta, max_bytes)

    # -- Parquet

    def read_parquet(self, path: Path) -> Iterator[Document]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        src = str(path)
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            self.problem("corrupt file", src, f"not a readable Parquet file ({e})",
                         "check that the file is complete Parquet")
            return
        with pf:
            schema = pf.schema_arrow
            if self.text_field not in schema.names:
                columns = ", ".join(schema.names[:8])
                self.problem("missing field", src,
                             f"no column {self.text_field!r} (columns: {columns})",
                             "name the text column with --text-field")
                return
            t = schema.field(self.text_field).type
            if pa.types.is_dictionary(t):
                t = t.value_type
            if not (pa.types.is_string(t) or pa.types.is_large_string(t)
                    or (hasattr(pa.types, "is_string_view") and pa.types.is_string_view(t))):
                self.problem("text not a string", src,
                             f"column {self.text_field!r} has type {t}, not string",
                             "name a string column with --text-field")
                return
            row = 0
            batches = pf.iter_batches(batch_size=256)
            while True:
                try:  # row groups decode lazily, so corruption shows up here, mid-file
                    batch = next(batches, None)
                    if batch is None:
                        return
                    columns = batch.to_pydict()
                except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
                    self.problem("corrupt file", f"{src}:{row + 1}", f"unreadable row group ({e})",
                                 "check that the file is complete Parquet")
                    return
                texts = columns.pop(self.text_field)
                ids = columns.pop(self.id_field, None)
                for i, text in enumerate(texts):
                    meta = {k: v[i] for k, v in columns.items()}
                    doc_id = None if ids is None else ids[i]
                    doc = self.document(text, src, row + i + 1, doc_id, meta,
                                        max_bytes=self.max_line_bytes)
                    if doc is not None:
                        yield doc
                row += len(texts)

    # -- WARC and HTML

    def read_html(self, path: Path, comp: str | None) -> Iterator[Document]:
        src = str(path)
        with _open_binary(path, comp) as f:
            try:
                data = f.read(MAX_DOCUMENT_BYTES + 1)
            except _STREAM_ERRORS as e:
                self.stream_error(src, e, comp, "nothing")
                return
        if len(data) > MAX_DOCUMENT_BYTES:
            self.problem("record too long", src,
                         f"HTML file larger than {MAX_DOCUMENT_BYTES >> 20} MiB",
                         "split the page or convert it to text first")
            return
        self.check_binary(data[:8192], src, comp)
        doc = self.document(_html_to_text(data) or "", src, None)
        if doc is not None:
            yield doc

    def read_warc(self, path: Path, comp: str | None) -> Iterator[Document]:
        try:
            from warcio.archiveiterator import ArchiveIterator
        except ImportError:
            raise InputError(f"{path}: reading WARC needs warcio: "
                             "pip install 'lmlab[data]'") from None
        src = str(path)
        with open(path, "rb") as raw:
            # warcio stops quietly where a .warc.gz is cut off; inflating the same bytes
            # alongside it tells whether the last gzip member really ended
            fh = _GzipTail(raw) if comp == ".gz" else raw
            records = ArchiveIterator(fh)
            n = 0
            while True:
                try:  # warcio raises assorted exception types on malformed archives
                    record = next(records, None)
                except Exception as e:  # noqa: BLE001
                    if isinstance(fh, _GzipTail) and not fh.complete():
                        break  # a cut-off file, reported below, explains the garbled record
                    self.problem("corrupt file", f"{src}:{n + 1}",
                                 f"unreadable WARC record ({type(e).__name__}: {e})",
                                 "check that the file is a complete WARC")
                    return
                if record is None:
                    break
                n += 1
                if not record.format.startswith("warc"):  # warcio falls back to the old ARC format
                    self.problem("corrupt file", f"{src}:{n}",
                                 "not a WARC record (no WARC/1.x header)",
                                 "check that the file is a WARC")
                    return
                payload = self.warc_payload(record, f"{src}:{n}")
                if not self.warc_record_complete(record, f"{src}:{n}"):
                    return  # checked before extraction, so a cut-off page never becomes a document
                if payload is not None:
                    doc = self.warc_document(record, *payload, src, n)
                    if doc is not None:
                        yield doc
            if isinstance(fh, _GzipTail) and not fh.complete():
                self.problem("truncated file", f"{src}:{n + 1}",
                             f"gzip data ends inside a record (read {_count(n, 'record')} "
                             "before it)",
                             "the file is truncated: download it again")

    def warc_record_complete(self, record, where: str) -> bool:
        """Read the rest of a record; False (reported) when it stops short of its length."""
        stream = record.raw_stream
        try:
            while stream.read(1 << 16):
                pass
        except Exception as e:  # noqa: BLE001
            self.problem("corrupt file", where,
                         f"unreadable record content ({type(e).__name__}: {e})",
                         "check that the file is a complete WARC")
            return False
        # warcio wraps every record that has a Content-Length in a LimitReader; what it did not
        # deliver of that length, or a record without one, means the file was cut off here
        if getattr(stream, "limit", None) != 0:
            self.problem("truncated file", where, "WARC record cut off before its end",
                         "the file is truncated: download it again")
            return False
        return True

    def warc_payload(self, record, where: str) -> tuple[str, bytes] | None:
        """("html" | "text", content) of a record that holds a document, else None."""
        ctype = (record.http_headers.get_header("Content-Type") if record.http_headers else None) \
            or record.rec_headers.get_header("Content-Type") or ""
        if record.rec_type == "conversion":  # WET: text already extracted
            kind = "text"
        elif record.rec_type in ("response", "resource") and "html" in ctype.lower():
            status = record.http_headers.get_statuscode() if record.http_headers else "200"
            if not str(status).startswith("2"):
                return None  # redirects and errors are not documents
            kind = "html"
        else:
            return None
        try:
            data = record.content_stream().read(MAX_DOCUMENT_BYTES + 1)
        except Exception as e:  # noqa: BLE001 — content decoding (chunked, gzip) of a bad record
            self.problem("corrupt file", where,
                         f"unreadable record content ({type(e).__name__}: {e})",
                         "check that the file is a complete WARC")
            return None
        if len(data) > MAX_DOCUMENT_BYTES:
            self.problem("record too long", where,
                         f"record larger than {MAX_DOCUMENT_BYTES >> 20} MiB",
                         "nothing to fix unless you need this page")
            return None
        return kind, data

    def warc_document(self, record, kind: str, data: bytes, src: str, n: int) -> Document | None:
        if kind == "html":
            text = _html_to_text(data) or ""
        else:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                self.decode_error(f"{src}:{n}", data, e)
                return None
        h = record.rec_headers
        meta = {"url": h.get_header("WARC-Target-URI"), "date": h.get_header("WARC-Date")}
        return self.document(text, src, n, h.get_header("WARC-Record-ID"), meta)


def _html_to_text(data: bytes) -> str | None:
    """Main text of an HTML page (trafilatura: drops navigation, footers, boilerplate)."""
    try:
        import trafilatura
    except ImportError:
        raise InputError("reading HTML needs trafilatura: pip install 'lmlab[data]'") from None
    # comments under articles are mostly noise for pretraining; tables often carry real content
    return trafilatura.extract(data, include_comments=False, include_tables=True, deduplicate=False)


def _json_error(e: json.JSONDecodeError) -> str:
    msg = e.msg.removesuffix(" at")  # "Invalid control character at"
    return f"{msg} at column {e.colno}"


def _json_type(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def _a(noun: str) -> str:
    """The noun with its indefinite article: "an array", "a string"."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def _count(n: int, noun: str) -> str:
    """"1 line", "2 lines", "0 lines"."""
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _size(n: int) -> str:
    """A byte count as written in messages: "4 MiB", "512 KiB", "1,000 bytes"."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return _count(n, "byte")


# ------------------------------------------------------------------ streams

def _zstd_errors() -> tuple[type[BaseException], ...]:
    try:
        import zstandard
        return (zstandard.ZstdError,)
    except ImportError:
        return ()


# what a damaged compressed stream raises (bz2 raises a bare OSError on corrupt data)
_STREAM_ERRORS = (EOFError, OSError, zlib.error, lzma.LZMAError) + _zstd_errors()


class _ZstdRaw(io.RawIOBase):
    """A zstd stream that, unlike zstandard's stream_reader, notices a cut-off last frame.

    zstandard's reader returns end-of-file quietly when the data stops mid-frame;
    here that raises EOFError, as gzip, bz2 and lzma do. Concatenated frames are read in turn.
    """

    def __init__(self, fh: BinaryIO):
        import zstandard

        self._fh, self._new = fh, zstandard.ZstdDecompressor().decompressobj
        self._d, self._fed, self._out, self._pending = self._new(), False, bytearray(), b""

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._out:
            if self._d.eof:  # frame complete: what follows starts the next one
                self._pending = self._d.unused_data + self._pending
                self._d, self._fed = self._new(), False
            data, self._pending = (self._pending or self._fh.read(1 << 16)), b""
            if not data:
                if self._fed and not self._d.eof:
                    raise EOFError("zstd data ends inside a frame")
                return 0
            self._fed = True
            self._out += self._d.decompress(data)
        n = min(len(b), len(self._out))
        b[:n] = self._out[:n]
        del self._out[:n]
        return n

    def close(self) -> None:
        self._fh.close()
        super().close()


class _GzipTail:
    """A read-only file that inflates what passes through, to tell if the last gzip member ended."""

    def __init__(self, fh: BinaryIO):
        self.fh = fh
        self._d = zlib.decompressobj(31)
        self._inside = False   # bytes of a member seen, its end not yet
        self._error = False

    def read(self, n: int = -1) -> bytes:
        chunk = data = self.fh.read(n)
        while data and not self._error:
            try:
                self._d.decompress(data)  # the output is warcio's business; only the state matters
            except zlib.error:
                self._error = True
                break
            self._inside = True
            if not self._d.eof:
                break
            data, self._d, self._inside = self._d.unused_data, zlib.decompressobj(31), False
        return chunk

    def tell(self) -> int:
        return self.fh.tell()

    def complete(self) -> bool:
        while self.read(1 << 16):  # whatever warcio left unread counts too
            pass
        return not self._inside and not self._error


def _open_binary(path: Path, comp: str | None) -> io.BufferedIOBase:
    if comp == ".gz":
        return gzip.open(path, "rb")
    if comp in (".zst", ".zstd"):
        try:
            return io.BufferedReader(_ZstdRaw(open(path, "rb")), buffer_size=1 << 16)
        except ImportError:
            raise InputError(f"{path}: reading .zst needs zstandard: "
                             "pip install zstandard") from None
    if comp == ".bz2":
        return bz2.open(path, "rb")
    if comp == ".xz":
        return lzma.open(path, "rb")
    return open(path, "rb", buffering=1 << 16)


class _LongLinesDropped:
    """A binary stream read through, each line longer than `limit` bytes (before its "\n")
    emptied: its bytes are dropped, its newline kept, so later line numbers stay right, and
    `skipped(line number, its length)` is called. Memory: at most `limit` bytes of one line
    plus a chunk, however long the line. Only `read(n)`, as `_Parts` uses it.

    Hand-written: no library drops over-long lines of a stream without holding them. Reads
    chunks of at most `limit` bytes, so a line that starts and ends inside one chunk is never
    too long: only the line spanning chunks is measured.
    """

    def __init__(self, f: BinaryIO, limit: int, skipped: Callable[[int, int], None]):
        self.f, self.limit, self.skipped = f, limit, skipped
        self.chunk = max(1, min(limit, 1 << 20))
        self.line = 1             # number of the line that `held` begins
        self.held = bytearray()   # that line so far (its newline not yet read)
        self.dropping = 0         # > 0: that line is too long; bytes of it seen so far
        self.out = bytearray()    # read, checked, not yet returned
        self.eof = False

    def read(self, n: int = -1) -> bytes:
        while (n < 0 or len(self.out) < n) and not self.eof:
            self._pump()
        if n < 0 or n >= len(self.out):
            data, self.out = bytes(self.out), bytearray()
        else:
            data = bytes(memoryview(self.out)[:n])
            del self.out[:n]
        return data

    def _pump(self) -> None:
        chunk = self.f.read(self.chunk)
        if not chunk:  # the last line has no newline
            self.eof = True
            self._end_line(b"")
            return
        first = chunk.find(NL)
        if first < 0:  # the current line goes on
            if self.dropping:
                self.dropping += len(chunk)
            elif len(self.held) + len(chunk) > self.limit:
                self.dropping, self.held = len(self.held) + len(chunk), bytearray()
            else:
                self.held += chunk
            return
        view = memoryview(chunk)
        self._end_line(view[:first])
        last = chunk.rfind(NL)
        self.out += view[first:last + 1]  # its newline and whole lines (each < chunk <= limit)
        self.line += chunk.count(NL, first, last + 1)
        self.held = bytearray(chunk[last + 1:])

    def _end_line(self, rest) -> None:
        """The current line ends with `rest` (then its newline, or the end of the stream)."""
        length = self.dropping + len(self.held) + len(rest)
        if self.dropping or length > self.limit:
            self.skipped(self.line, length)
        else:
            self.out += self.held
            self.out += rest
        self.dropping, self.held = 0, bytearray()


class _Parts:
    """Pieces of at most `limit` bytes of a stream, cut after a newline where one exists.

    Yields (first line number, bytes). A file no larger than `limit` is one piece.
    """

    def __init__(self, f: BinaryIO, limit: int):
        self.f, self.limit, self.line = f, limit, 1
        self.buf: bytes | None = None
        self.eof = False

    def __iter__(self):
        return self

    def _fill(self) -> None:
        if self.buf is None:
            self.buf = self.f.read(self.limit + 1)
        elif len(self.buf) <= self.limit and not self.eof:
            more = self.f.read(self.limit + 1 - len(self.buf))
            self.buf += more
        if len(self.buf) <= self.limit:
            self.eof = True

    def __next__(self) -> tuple[int, bytes]:
        self._fill()
        if not self.buf:
            raise StopIteration
        if len(self.buf) <= self.limit:
            piece, self.buf = self.buf, b""
        else:
            cut = self.buf.rfind(b"\n", 0, self.limit) + 1 or _utf8_cut(self.buf, self.limit)
            piece, self.buf = self.buf[:cut], self.buf[cut:]
        line = self.line
        self.line += piece.count(b"\n")
        return line, piece

    def at_end(self) -> bool:
        """True when nothing follows the piece just returned."""
        self._fill()
        return not self.buf


def _utf8_cut(buf: bytes, limit: int) -> int:
    """An index <= limit that does not split a UTF-8 character (a line with no newline for MiBs)."""
    i = limit
    while i > limit - 4 and i > 0 and (buf[i] & 0xC0) == 0x80:
        i -= 1
    return i if i > 0 else limit


# ------------------------------------------------------------------ the iterator

def check_max_line_bytes(value, name: str = "--max-line-bytes") -> None:
    """Raise ConfigError unless `value` is a usable line limit (a whole number of bytes >= 1);
    `name` is the option as the user wrote it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} {value!r}: must be a whole number of bytes, at least 1 "
                          f"(default {MAX_LINE_BYTES:,}, that is {_size(MAX_LINE_BYTES)})")


def iter_documents(paths: list[str], text_field: str = "text", id_field: str = "id",
                   strict: bool = False, stats: ReadStats | None = None,
                   extensions: Iterable[str] | None = None,
                   max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[Document]:
    """Documents from files and directories (recursive, sorted), in a deterministic order.

    `extensions` (e.g. [".py", ".md"]) limits which files under directories are read;
    files named explicitly are always read. Bad records are skipped and recorded in
    `stats` ("path:line: what — fix"), or raise InputError at the first with strict=True;
    so are lines (JSONL records, lines of text, Parquet rows) longer than `max_line_bytes`.
    Raises InputError at the end when no document at all was read (and ConfigError at
    once, before any reading, for a `max_line_bytes` below 1).
    """
    check_max_line_bytes(max_line_bytes)
    reader = _Reader(text_field, id_field, strict, stats, max_line_bytes)
    return _documents(reader, paths, extensions)


def _documents(reader: _Reader, paths, extensions) -> Iterator[Document]:
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    exts = _normalise_extensions(extensions)
    before = reader.stats.documents  # a caller may reuse one ReadStats across calls
    seen: set[str] = set()
    for p in paths:
        path = Path(p)
        if path.is_dir():
            files = []
            for f in _walk(path):
                fmt, comp = detect_format(f)
                name = f.name.lower()
                if (exts is not None and not name.endswith(exts)) or (exts is None and fmt is None):
                    reader.stats.files_ignored += 1
                    log.debug("%s: no reader for this file type, ignored", f)
                    continue
                files.append((f, fmt, comp))
        elif path.exists():
            files = [(path, *detect_format(path))]
        else:
            reader.problem("missing path", str(p), "no such file or directory", "check the path")
            continue
        for f, fmt, comp in files:
            key = os.path.realpath(f)
            if key in seen:  # named twice (a file and its directory): read once
                continue
            seen.add(key)
            yield from reader.read_file(f, fmt, comp)
    s = reader.stats
    if s.documents == before:
        names = ", ".join(str(p) for p in list(paths)[:3]) + (" ..." if len(paths) > 3 else "")
        first = f"; first problem: {s.problems[0]}" if s.problems else ""
        raise InputError(
            f"no documents in {names or 'the inputs'} ({_count(s.files, 'file')} read, "
            f"{s.skipped_total} skipped, {s.empty} empty, {s.files_ignored} of unknown type) "
            f"— give text, JSONL, Parquet, WARC or HTML files{first}")
    if reader.own_stats and s.skipped_total:
        log.warning("skipped %d bad records or files (%s)", s.skipped_total,
                    ", ".join(f"{k}: {v}" for k, v in sorted(s.skipped.items())))
