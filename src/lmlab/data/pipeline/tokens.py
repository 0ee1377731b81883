"""Tokenization into lmlab token shards, with the train/val split of `lmlab data prepare`.

Each task tokenizes its documents (`Tokenizer.encode_batch`) into its own shard
directory with `TokenShardWriter` — the writer `lmlab data prepare` uses — and
`merge_token_shards` then appends every task's documents, in task order, into
the final directory through one more `TokenShardWriter`, which writes the one
meta.json.

Train or val is decided by the one rule of token shards,
`lmlab.data.shards.TrainValSplitter`: by a seeded hash of the document's text
(not its id), so the split does not depend on the number of workers and is the
split `lmlab data prepare` makes of the same documents. Its second part (the
document nearest the threshold moves over when a split would be empty) needs
the whole corpus: each task keeps its nearest document on each side apart
(splits `held_train`, `held_val`, their values in meta.json), and the merge
hands them to one splitter that sees every task.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from lmlab.data.shards import (
    TokenShards,
    TokenShardWriter,
    TrainValSplitter,
    read_meta,
    split_value,
    text_digest,
)

HELD = "held_"  # prefix of a task's held-back splits (never in the merged directory)


class TokenShardStep(PipelineStep):
    """Pass-through: appends each document's token ids to this task's shard directory."""

    type = "🔢 - TOKENIZER"
    name = "🔢 Token shards"

    def __init__(self, tokenizer_dir: str, out_folder: str, val_fraction: float = 0.005,
                 batch_size: int = 256, seed: int = 0):
        super().__init__()
        self.tokenizer_dir, self.out_folder = str(tokenizer_dir), str(out_folder)
        self.val_fraction, self.batch_size, self.seed = val_fraction, batch_size, seed

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from lmlab.tokenizer import Tokenizer

        tok = Tokenizer.load(self.tokenizer_dir)
        with TokenShardWriter(Path(self.out_folder) / f"{rank:05d}", tok.vocab_size, tok.eos_id,
                              tokenizer_hash=tok.hash) as writer:
            splitter = TrainValSplitter(writer, self.val_fraction)
            batch = []

            def flush():
                with self.track_time("batch"):
                    for d, ids in zip(batch, tok.encode_batch([d.text for d in batch])):
                        splitter.add(split_value(text_digest(d.text), self.seed), ids)
                        self.stat_update("tokens", value=len(ids))
                yield from batch
                batch.clear()

            for doc in data:
                batch.append(doc)
                if len(batch) >= self.batch_size:
                    yield from flush()
            if batch:
                yield from flush()
            held = splitter.held()
            for split, (_, ids) in held.items():
                writer.add(ids, HELD + split)
            writer.close({"val_fraction": self.val_fraction, "seed": self.seed,
                          "held_values": {HELD + k: v for k, (v, _) in held.items()}})


def _documents(shard_dir: Path, split: str) -> Iterator[np.ndarray]:
    """The documents of one split, each without its EOS."""
    shards = TokenShards(shard_dir, split)
    for arr in shards.arrays:
        ends = np.flatnonzero(np.asarray(arr) == shards.eos_id)
        start = 0
        for end in ends.tolist():
            yield arr[start:end]
            start = end + 1


def merge_token_shards(task_dirs: list[Path], out_dir: Path, extra_meta: dict | None = None) -> dict:
    """Append the documents of each task's shard directory, in order, into one directory."""
    metas = [(d, read_meta(d)) for d in task_dirs if (d / "meta.json").is_file()]
    if not metas:
        return {}
    first = metas[0][1]
    val_fraction = first["val_fraction"]
    extra = {"val_fraction": val_fraction, "seed": first["seed"], **(extra_meta or {})}
    with TokenShardWriter(out_dir, first["vocab_size"], first["eos_id"], first["tokenizer_hash"],
                          extra_meta=extra) as writer:
        splitter = TrainValSplitter(writer, val_fraction)
        for d, meta in metas:
            held = meta["held_values"]
            for split in meta["splits"]:
                for ids in _documents(d, split):
                    if split in held:  # a task's nearest to the threshold: the whole corpus decides
                        splitter.add(held[split], ids)
                    else:
                        splitter.add_routed(split, ids)
        splitter.finish()
    return writer.meta
