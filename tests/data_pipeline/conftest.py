"""Fixtures for the data pipeline tests: planted corpora written as JSONL, and run helpers.

Every corpus comes from `synthetic.py` beside this file, so each test knows the
truth (which documents are copies of which, which are junk) without downloads.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from .synthetic import planted_corpus


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return path


def read_jsonl_dir(folder: Path) -> list[dict]:
    out = []
    for f in sorted(Path(folder).glob("*.jsonl.gz")):
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            out += [json.loads(line) for line in fh]
    return out


def dedup_only(unit: str = "word", ngram: int = 3) -> dict:
    """A recipe with every stage but deduplication switched off (to measure dedup alone)."""
    off = {"enabled": False}
    return {
        "name": "dedup-only",
        "normalize": off, "language": off, "pii": off,
        "quality": {k: off for k in ("gopher_repetition", "gopher_quality", "c4", "fineweb")},
        "dedup": {"minhash": {"unit": unit, "ngram": ngram}},
    }


@pytest.fixture(scope="session")
def planted(tmp_path_factory):
    """A mixed English/Chinese corpus of 1200 documents with junk and planted copies, as JSONL."""
    docs = planted_corpus(1200, seed=7, zh_fraction=0.5, junk_fraction=0.1,
                          exact_fraction=0.06, near_fraction=0.12)
    path = write_jsonl(tmp_path_factory.mktemp("planted") / "corpus.jsonl", [d.record() for d in docs])
    return docs, path
