"""Tokenization into lmlab token shards, with a deterministic train/val split.

Each task tokenizes its documents (`Tokenizer.encode_batch`) into its own shard
directory with `TokenShardWriter` — the writer `lmlab data prepare` uses — and
`merge_token_shards` then appends every task's documents, in task order, into
the final directory through one more `TokenShardWriter`, which writes the one
meta.json. A document goes to "val" when a hash of its id falls below
`val_fraction`, so the split does not depend on the number of workers.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from lmlab.data.shards import TokenShards, TokenShardWriter, read_meta


def split_of(doc_id: str, val_fraction: float) -> str:
    return "val" if zlib.crc32(doc_id.encode("utf-8")) / 2**32 < val_fraction else "train"


class TokenShardStep(PipelineStep):
    """Pass-through: appends each document's token ids to this task's shard directory."""

    type = "🔢 - TOKENIZER"
    name = "🔢 Token shards"

    def __init__(self, tokenizer_dir: str, out_folder: str, val_fraction: float = 0.005,
                 batch_size: int = 256):
        super().__init__()
        self.tokenizer_dir, self.out_folder = str(tokenizer_dir), str(out_folder)
        self.val_fraction, self.batch_size = val_fraction, batch_size

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from lmlab.tokenizer import Tokenizer

        tok = Tokenizer.load(self.tokenizer_dir)
        with TokenShardWriter(Path(self.out_folder) / f"{rank:05d}", tok.vocab_size, tok.eos_id,
                              tokenizer_hash=tok.hash) as writer:
            batch = []

            def flush():
                with self.track_time("batch"):
                    for d, ids in zip(batch, tok.encode_batch([d.text for d in batch])):
                        writer.add(ids, split_of(d.id, self.val_fraction))
                        self.stat_update("tokens", value=len(ids))
                yield from batch
                batch.clear()

            for doc in data:
                batch.append(doc)
                if len(batch) >= self.batch_size:
                    yield from flush()
            if batch:
                yield from flush()


def merge_token_shards(task_dirs: list[Path], out_dir: Path, extra_meta: dict | None = None) -> dict:
    """Append the documents of each task's shard directory, in order, into one directory."""
    metas = [(d, read_meta(d)) for d in task_dirs if (d / "meta.json").is_file()]
    if not metas:
        return {}
    first = metas[0][1]
    with TokenShardWriter(out_dir, first["vocab_size"], first["eos_id"], first["tokenizer_hash"],
                          extra_meta=extra_meta) as writer:
        for d, meta in metas:
            for split in meta["splits"]:
                shards = TokenShards(d, split)
                for arr in shards.arrays:
                    # every document ends with EOS: split there and add each one back
                    ends = np.flatnonzero(np.asarray(arr) == shards.eos_id)
                    start = 0
                    for end in ends.tolist():
                        writer.add(arr[start:end], split)
                        start = end + 1
    return writer.meta
