"""Token shards from the pipeline follow the one train/val rule of `lmlab.data.shards`."""

from __future__ import annotations

import random

import numpy as np
import pytest

from lmlab.data.pipeline import run_recipe
from lmlab.data.prepare import prepare
from lmlab.data.shards import TokenShards, split_value, text_digest
from lmlab.tokenizer import Tokenizer

from .conftest import write_jsonl
from .synthetic import english_prose

OFF = {"enabled": False}


def tokens_only(val_fraction: float, seed: int = 0) -> dict:
    """A recipe that changes nothing and drops nothing: documents straight to token shards."""
    return {"name": "tokens-only", "normalize": OFF, "language": OFF, "pii": OFF,
            "quality": {k: OFF for k in ("gopher_repetition", "gopher_quality", "c4", "fineweb")},
            "dedup": {"exact": OFF, "minhash": OFF},
            "output": {"tokens": {"val_fraction": val_fraction, "seed": seed}}}


def split_texts(shard_dir, tok: Tokenizer) -> dict[str, list[str]]:
    out = {}
    for split in ("train", "val"):
        try:
            shards = TokenShards(shard_dir, split)
        except Exception:
            continue
        tokens = shards.slice(0, len(shards))
        ends = np.flatnonzero(tokens == tok.eos_id)
        starts = np.concatenate([[0], ends[:-1] + 1])
        out[split] = [tok.decode(tokens[s:e].tolist()) for s, e in zip(starts, ends)]
    return out


def both_ways(tmp_path, texts, tokenizer_dir, val_fraction, seed=0, files=2):
    """The same documents through `lmlab data prepare` and through `run_recipe` with 2 workers."""
    rng = random.Random(0)
    paths = [write_jsonl(tmp_path / "in" / f"part{i}.jsonl",
                         [{"id": f"{i}-{rng.random()}", "text": t} for t in texts[i::files]])
             for i in range(files)]
    prepare([str(p) for p in paths], tokenizer_dir, tmp_path / "prepared",
            val_fraction=val_fraction, seed=seed)
    run_recipe(tokens_only(val_fraction, seed), [str(p) for p in paths], str(tmp_path / "run"),
               workers=2, tokenizer_dir=str(tokenizer_dir))
    tok = Tokenizer.load(tokenizer_dir)
    return (split_texts(tmp_path / "prepared", tok), split_texts(tmp_path / "run" / "tokens", tok))


def as_sets(splits: dict) -> dict:
    return {k: set(v) for k, v in splits.items()}


@pytest.mark.parametrize("seed", [0, 3])
def test_prepare_and_the_pipeline_split_alike(tmp_path, tokenizer_dir, seed):
    rng = random.Random(1)
    texts = [english_prose(rng) for _ in range(60)]
    prepared, piped = both_ways(tmp_path, texts, tokenizer_dir, 0.25, seed)
    assert as_sets(piped) == as_sets(prepared)
    expected = {t for t in texts if split_value(text_digest(t), seed) < 0.25}
    assert set(piped["val"]) == expected and 0 < len(expected) < len(texts)


def test_a_tiny_corpus_gets_the_same_one_val_document(tmp_path, tokenizer_dir):
    rng = random.Random(2)
    texts = [english_prose(rng) for _ in range(3)]
    # no document falls below the threshold: the one nearest it moves to val, in both
    prepared, piped = both_ways(tmp_path, texts, tokenizer_dir, 1e-9, files=3)
    nearest = min(texts, key=lambda t: split_value(text_digest(t)))
    assert prepared["val"] == piped["val"] == [nearest]
    assert as_sets(piped) == as_sets(prepared)
