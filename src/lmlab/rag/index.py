"""Your documents as passages, and BM25 over them: what `lmlab ask` and `lmlab serve --docs` search.

Reading
-------
`DocIndex.build(docs_dir)` reads every .txt, .md, .markdown, .rst and .pdf file under
the folder, recursively, in sorted order (hidden files and folders are skipped). A PDF
is read page by page with `pypdf`, and each page keeps its number. A file that cannot
be read (not UTF-8, a damaged or encrypted PDF, a PDF with no text layer, no text at
all) is skipped with a warning naming it; a folder with no readable file is an
`InputError`. Nothing is ever written into the documents' folder.

Chunking
--------
A text is cut into paragraphs: a paragraph starts at a non-blank line after a blank
one, or at a heading (Markdown `# Title`, or a line underlined `=====` as in
Markdown and reST, outside fenced code); blank lines belong to the paragraph before
them, so the paragraphs tile the text. Consecutive paragraphs are packed into one
passage while it holds at most `chunk_chars` characters; a heading always starts a
new passage, so it stays with its section. A paragraph longer than `chunk_chars` is cut
at the last sentence end in the window, else the last line end, else the last space
(else hard). Every character of a document is in exactly one passage's *core*; with
`overlap`, a passage also repeats up to that many characters of the one before it
(from a word or clause start; never across a heading or a page). `where` is the
page of a PDF, else the passage's line range.

Terms
-----
Text is split into runs of Han characters and runs of other letters and digits.
Other words are lowercased and split at anything else (snake_case and `json.dumps`
give "json", "dumps"), and the English stopwords of bm25s's `STOPWORDS_EN_PLUS`
(NLTK's list) dropped; no stemming. A Han run is cut into words by
`jieba.cut_for_search` (words and the shorter words inside them: 火车站 → 火车, 车站,
火车站), or, with `chinese="chars"`, into single characters; `ZH_STOPWORDS` (的, 是,
什么, ...) are dropped. jieba is the default: on the shipped QA set (`lmlab.rag.qa`,
150 questions) it measured recall@1 0.967 and recall@4 1.000 against 0.953 and 0.993
for characters (docs/theory/retrieval.md). Mixed text works: "`textwrap.wrap` 的参数"
gives textwrap, wrap, 参数. A passage's section heading is indexed with it.

Scoring
-------
BM25 as Lucene computes it (bm25s's default `method="lucene"`): for a query of terms
q_1 … q_n and a passage D of |D| terms, in a collection of N passages of average
length avgdl, where n(q) passages hold q and f(q, D) is its count in D,

    score(D, Q) = Σ_i IDF(q_i) · f(q_i, D) / (f(q_i, D) + k1 · (1 − b + b · |D| / avgdl))
    IDF(q)      = ln(1 + (N − n(q) + 0.5) / (n(q) + 0.5))

with k1 = 1.5 and b = 0.75 (Lucene's and bm25s's defaults). A query term no passage
holds scores nothing; passages scoring 0 are never returned.

Cache
-----
With `cache_dir`, the index (passages and BM25 matrix) is kept in
`cache_dir/<hash of the folder's path>/`, reused while every file's path, size and
modification time and the settings are the same, and rebuilt whole otherwise.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import importlib
import json
import logging
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from lmlab.errors import ConfigError, InputError
from lmlab.eval.metrics import HAN_RE
from lmlab.fileio import atomic_write_text, write_dir_atomically
from lmlab.outputs import absolute

if TYPE_CHECKING:
    import bm25s

log = logging.getLogger(__name__)

SUFFIXES = (".txt", ".md", ".markdown", ".rst", ".pdf")
CHINESE = ("jieba", "chars")
K1, B = 1.5, 0.75
# function and question words a query holds but passages do not answer with
ZH_STOPWORDS = frozenset("的 了 是 在 和 与 及 或 吗 呢 吧 啊 么 什么 哪 哪个 哪些 怎么 怎样 如何 "
                         "为什么 谁 多少 几 这 那 这个 那个 请 问 一个 有 也 都 就 而 把 被 给 对 从"
                         .split())
FORMAT = "lmlab.rag-index.v1"

_HAN_RUN = re.compile(f"({HAN_RE.pattern}+)")
_WORD = re.compile(r"[^\W_]+")
_HEADING = re.compile(r" {0,3}#{1,6}(\s|$)")             # a Markdown ATX heading line
_UNDERLINE = re.compile(r"([=\-~^\"'`#*+])\1{2,}\s*$")   # a setext / reST title's underline
_FENCE = re.compile(r" {0,3}(```|~~~)")
_CUTS = (re.compile(r"[.!?;:](?:\s+|$)|[。！？；]\s*"),   # where a long paragraph is cut, best first
         re.compile(r"\n\s*"), re.compile(r"\s+"))
_WORD_START = re.compile(r"[\s。！？；，、]+")           # where an overlap may begin


@dataclass(frozen=True)
class Passage:
    """A piece of a document: its text (exactly as in the file), the file's path relative to
    the documents' folder, where in it ("page 3", "lines 10-24"), and a search's score."""

    text: str
    source: str
    where: str
    score: float = 0.0


# ------------------------------------------------------------------ chunking

def _blocks(text: str) -> list[list]:
    """Paragraphs as [start, end, title] spans that tile `text` (title: a heading's text, or
    None); see the module docstring."""
    blocks: list[list] = []
    lines: list[str] = []  # the current paragraph's lines
    pos, blank_before, fence = 0, True, False
    for line in text.splitlines(keepends=True):
        blank = not line.strip()
        heading = not fence and _HEADING.match(line)
        if _FENCE.match(line):
            fence = not fence
        if not blocks or (not blank and (blank_before or heading)):
            title = line.strip().strip("#").strip() if heading else None
            blocks.append([pos, pos + len(line), title])
            lines = [line]
        else:
            blocks[-1][1] = pos + len(line)
            if not blank:
                lines.append(line)
            if len(lines) == 2 and not blank and blocks[-1][2] is None:
                first, second = (s.strip() for s in lines)
                if _UNDERLINE.match(second) and not _UNDERLINE.match(first):
                    blocks[-1][2] = first            # Title / =====
                elif _UNDERLINE.match(first) and not _UNDERLINE.match(second):
                    blocks[-1][2] = second           # ===== / Title / ===== (reST overline)
        pos += len(line)
        blank_before = blank
    return blocks


def _cut(text: str, pos: int, room: int) -> int:
    """How many characters from `pos` to put in a passage with `room` left: up to the best
    boundary of `_CUTS` in that window (one in its first quarter is too early), else `room`."""
    window = text[pos:pos + room]
    for pattern in _CUTS:
        ends = [m.end() for m in pattern.finditer(window) if m.end() > room // 4]
        if ends:
            return ends[-1]
    return room


def chunk_spans(text: str, chunk_chars: int = 800, overlap: int = 0
                ) -> list[tuple[int, int, int, str]]:
    """(start, core, end, section title) of each passage of `text`: text[start:end] is the
    passage, text[core:end] its core (the cores tile `text`, each at most `chunk_chars`
    long), and core − start ≤ `overlap`. A paragraph that does not fit in the passage being
    filled starts the next one; only one longer than `chunk_chars` is cut."""
    chunks: list[list] = []  # [start, core, end, title]
    section = ""
    for b_start, b_end, title in _blocks(text):
        if title is not None:
            section = title
        pos, new, heading = b_start, True, title is not None
        if chunks and not heading:
            new = False  # try the passage being filled first
        while pos < b_end:
            if new:
                begin = pos
                if chunks and overlap and not (heading and pos == b_start):
                    begin = max(chunks[-1][1], pos - overlap)  # the previous passage's tail,
                    if begin > chunks[-1][1]:                  # from a word or clause start
                        m = _WORD_START.search(text, begin, pos)
                        begin = m.end() if m else pos
                chunks.append([begin, pos, pos, section])
                new = False
            room = chunk_chars - (pos - chunks[-1][1])
            if b_end - pos <= room:
                chunks[-1][2] = b_end
                break
            if pos > chunks[-1][1] and (b_end - pos <= chunk_chars or room < chunk_chars // 4):
                new = True  # a paragraph that fits a passage of its own, or too little room
                continue
            pos += _cut(text, pos, room)
            chunks[-1][2] = pos
            new = True
    return [tuple(c) for c in chunks]


def _line_range(newlines: list[int], text: str, start: int, end: int) -> str:
    """"lines A-B" (1-based) of text[start:end], trailing blank lines not counted."""
    last = start + len(text[start:end].rstrip()) - 1
    a, b = bisect.bisect_right(newlines, start - 1) + 1, bisect.bisect_right(newlines, last - 1) + 1
    return f"line {a}" if a == b else f"lines {a}-{b}"


# ------------------------------------------------------------------ terms

def _extra(name: str):
    """An optional package of `lmlab[rag]`, or a ConfigError saying how to install it."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError:
        raise ConfigError(f"answers from documents need {name}, which is not installed: "
                          "pip install 'lmlab[rag]'") from None


def _bm25s():
    bm25s = _extra("bm25s")
    logging.getLogger("bm25s").setLevel(logging.WARNING)  # it sets DEBUG on itself at import
    return bm25s


@functools.cache
def _jieba():
    jieba = _extra("jieba")
    jieba.setLogLevel(logging.WARNING)  # not its "Building prefix dict..." on every start
    return jieba


@functools.cache
def _english_stopwords() -> frozenset[str]:
    return frozenset(_bm25s().stopwords.STOPWORDS_EN_PLUS)


def terms(text: str, chinese: str = "jieba") -> list[str]:
    """The BM25 terms of `text` (see the module docstring): lowercased words and Chinese
    words (`chinese="jieba"`) or characters (`"chars"`), stopwords dropped."""
    stop = _english_stopwords()
    out: list[str] = []
    for k, run in enumerate(_HAN_RUN.split(text)):
        if k % 2:  # a Han run
            words = _jieba().cut_for_search(run) if chinese == "jieba" else run
            out += [w for w in words if w not in ZH_STOPWORDS]
        else:
            out += [w for w in _WORD.findall(run.lower()) if w not in stop]
    return out


# ------------------------------------------------------------------ reading

class _Unreadable(Exception):
    """Why a document file is skipped."""


def doc_files(root: Path) -> list[Path]:
    """The document files of `root` (or `root` itself, one such file), sorted by path; an
    InputError when there are none."""
    kinds = ", ".join(SUFFIXES)
    if root.is_file():
        if root.suffix.lower() not in SUFFIXES:
            raise InputError(f"{root}: not a document file; give a folder of {kinds} files")
        return [root]
    if not root.is_dir():
        raise InputError(f"{root}: no such folder; give a folder of {kinds} files")
    found = sorted((p for p in root.rglob("*")
                    if p.is_file() and not any(part.startswith(".")
                                               for part in p.relative_to(root).parts)),
                   key=lambda p: p.relative_to(root).as_posix())
    files = [p for p in found if p.suffix.lower() in SUFFIXES]
    if not files:
        others = f" (only {len(found)} other file(s))" if found else " (it is empty)"
        raise InputError(f"{root}: no {kinds} files{others}; give the folder of your documents")
    return files


def _pdf_pages(path: Path) -> list[tuple[str, str]]:
    pypdf = _extra("pypdf")
    try:
        reader = pypdf.PdfReader(path)
        if reader.is_encrypted and not reader.decrypt(""):
            raise _Unreadable("encrypted PDF; decrypt it first")
        pages = [(f"page {n}", page.extract_text() or "") for n, page in enumerate(reader.pages, 1)]
    except _Unreadable:
        raise
    except Exception as e:  # pypdf raises many kinds on a damaged file
        raise _Unreadable(f"unreadable PDF ({type(e).__name__}: {e})") from None
    pages = [(where, text) for where, text in pages if text.strip()]
    if not pages:
        raise _Unreadable("no text layer (scanned pages?); run OCR on it first")
    return pages


def read_document(path: Path) -> list[tuple[str | None, str]]:
    """(page or None, text) of each part of a document file: a PDF's pages with text, or the
    whole text of a text file; raises `_Unreadable` saying why it cannot be used."""
    if path.suffix.lower() == ".pdf":
        return _pdf_pages(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise _Unreadable(f"unreadable ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _Unreadable(f"not UTF-8 (byte {e.start}); convert it to UTF-8") from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise _Unreadable("no text")
    return [(None, text)]


# ------------------------------------------------------------------ the index

def _check_settings(chunk_chars, overlap, chinese) -> None:
    if isinstance(chunk_chars, bool) or not isinstance(chunk_chars, int) or chunk_chars < 50:
        raise ConfigError(f"chunk_chars {chunk_chars!r}: must be an integer >= 50 (characters "
                          "per passage)")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < chunk_chars:
        raise ConfigError(f"overlap {overlap!r}: must be an integer in [0, chunk_chars="
                          f"{chunk_chars})")
    if chinese not in CHINESE:
        raise ConfigError(f"chinese {chinese!r}: choose one of {', '.join(CHINESE)}")


def _bm25(corpus_terms: list[list[str]]) -> "bm25s.BM25":
    retriever = _bm25s().BM25(k1=K1, b=B, method="lucene")
    retriever.index(corpus_terms, show_progress=False)
    return retriever


@dataclass
class DocIndex:
    """Passages of a documents' folder and the BM25 index over them (see the module docstring)."""

    passages: list[Passage]
    retriever: "bm25s.BM25"
    chinese: str = "jieba"
    skipped: list[str] = field(default_factory=list)  # "file: why" for each file left out

    def __len__(self) -> int:
        return len(self.passages)

    @property
    def sources(self) -> list[str]:
        """The files that gave passages, in order."""
        return list(dict.fromkeys(p.source for p in self.passages))

    @classmethod
    def build(cls, docs_dir: str | os.PathLike, *, chunk_chars: int = 800, overlap: int = 0,
              chinese: str = "jieba", cache_dir: str | os.PathLike | None = None) -> "DocIndex":
        """Read, chunk and index `docs_dir` (a folder, or one document file)."""
        _check_settings(chunk_chars, overlap, chinese)
        root = Path(docs_dir)
        files = doc_files(root)
        base = root if root.is_dir() else root.parent
        rels = [p.relative_to(base).as_posix() for p in files]
        stats = [p.stat() for p in files]
        settings = {"format": FORMAT, "chunk_chars": chunk_chars, "overlap": overlap,
                    "chinese": chinese, "k1": K1, "b": B,
                    "files": [[r, st.st_size, st.st_mtime_ns] for r, st in zip(rels, stats)]}
        entry = None
        if cache_dir is not None:
            key = hashlib.sha256(absolute(root).encode()).hexdigest()[:16]
            entry = Path(cache_dir) / key
            cached = cls._load(entry, settings)
            if cached is not None:
                return cached
        passages, titles, skipped = [], [], []
        for path, rel in zip(files, rels):
            try:
                parts = read_document(path)
            except _Unreadable as e:
                log.warning("%s: %s; skipped", path, e)
                skipped.append(f"{rel}: {e}")
                continue
            for page, text in parts:
                newlines = [m.start() for m in re.finditer("\n", text)]
                for start, _, end, title in chunk_spans(text, chunk_chars, overlap):
                    if text[start:end].strip():
                        where = page or _line_range(newlines, text, start, end)
                        passages.append(Passage(text[start:end], rel, where))
                        titles.append(title)
        if not passages:
            raise InputError(f"{root}: none of its {len(files)} document file(s) could be read "
                             f"(first: {skipped[0]}); give files with text")
        corpus = [terms(p.text if not t or t in p.text else f"{t}\n{p.text}", chinese)
                  for p, t in zip(passages, titles)]
        index = cls(passages, _bm25(corpus), chinese, skipped)
        if entry is not None:
            index._save(entry, settings)
        log.info("%s: %d passages from %d file(s) (%d skipped)", root, len(passages),
                 len(files) - len(skipped), len(skipped))
        return index

    def _save(self, entry: Path, settings: dict) -> None:
        def write(tmp: Path) -> None:
            self.retriever.save(tmp, show_progress=False)
            atomic_write_text(tmp / "index.json", json.dumps(
                {**settings, "skipped": self.skipped,
                 "passages": [[p.text, p.source, p.where] for p in self.passages]},
                ensure_ascii=False))

        write_dir_atomically(entry, write, last="index.json", replace=True)

    @classmethod
    def _load(cls, entry: Path, settings: dict) -> "DocIndex | None":
        """The cached index in `entry` if it was built from the same files and settings."""
        try:
            saved = json.loads((entry / "index.json").read_text(encoding="utf-8"))
            if {k: saved.get(k) for k in settings} != settings:
                return None
            retriever = _bm25s().BM25.load(entry, show_progress=False)
            passages = [Passage(t, s, w) for t, s, w in saved["passages"]]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # absent or damaged: rebuilt
        for why in saved["skipped"]:
            log.warning("%s; skipped", why)
        return cls(passages, retriever, settings["chinese"], saved["skipped"])

    def search(self, query: str, k: int = 4) -> list[Passage]:
        """The `k` passages of highest BM25 score for `query` (those scoring 0 left out)."""
        import numpy as np

        if not isinstance(query, str):
            raise InputError(f"query: must be a string, got {type(query).__name__}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"k {k!r}: must be an integer >= 1 (passages to retrieve)")
        ids = self.retriever.get_tokens_ids(terms(query, self.chinese))
        if not ids:
            return []
        scores = self.retriever.get_scores(ids)
        best = np.argsort(-scores, kind="stable")[:k]
        return [replace(self.passages[i], score=float(scores[i])) for i in best if scores[i] > 0]

    def augment(self, messages: list[dict], k: int = 4, *, tokenizer=None,
                max_prompt_tokens: int | None = None) -> tuple[list[dict], list[dict]]:
        """`messages` with the top `k` passages for the last user turn in the prompt, and
        those passages as JSON-able sources; see `lmlab.rag.answer.augment`."""
        from lmlab.rag.answer import augment

        return augment(self, messages, k, tokenizer=tokenizer,
                       max_prompt_tokens=max_prompt_tokens)
