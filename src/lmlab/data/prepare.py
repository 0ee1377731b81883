"""`lmlab data prepare`: documents in, token shards out (read → dedup → split → tokenize → write).

    prepare(["corpus/"], "tok/", "shards/")

1. Read every input with `lmlab.data.sources.iter_documents` (bad records are
   skipped and reported in `result.stats`).
2. Drop exact duplicates: a 128-bit BLAKE2b digest of each document's UTF-8 text;
   the first copy is kept. Copies in a corpus cost training steps and, worse,
   put the same text in train and val, which flatters the validation loss.
3. Split by content, not by position, with the one rule of token shards
   (`lmlab.data.shards.TrainValSplitter`, which `lmlab data process` uses too):
   a document goes to "val" when a seeded hash of its digest falls below
   `val_fraction`. The split is therefore the same whatever the file order or
   number of workers, and a document's copies can never straddle the split. If
   that leaves val empty (tiny corpora), the document with the smallest hash —
   the one closest to the threshold — moves to val, so with val_fraction > 0 and
   two or more documents val is never empty (and, symmetrically, train never
   is); a lone document goes to train.
4. Tokenize in batches. `workers=None` or 1 tokenizes in this process:
   `Tokenizer.encode_batch` releases the GIL and spreads a batch over all cores
   in Rust, and it runs in a background thread while this one reads the next
   batch and writes the last. `workers=N>1` uses N single-threaded processes
   instead (spawned, so a script calling prepare with workers > 1 needs the
   usual `if __name__ == "__main__":` guard). Measured on 10 MB of Python source
   on a 2-core machine, the pool was ~30% slower and used ~60% more CPU in all,
   so it is not the default; it may pay on many cores when reading is the slow
   part. Order is kept either way, so the shards are byte-identical for any
   `workers`. The worker processes ignore Ctrl-C (this process stops them) and
   die with this process, even when it is killed outright (`lmlab.procs`).
5. Write with `TokenShardWriter` into a temporary directory beside `out_dir`
   and rename it into place at the end: an interrupted run leaves the old output
   (or nothing), never a half-written one. An existing `out_dir` is replaced only
   if it is itself a token-shard directory.

Library code: no printing; `progress(n_docs, n_bytes)` is called after each batch.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from lmlab import procs
from lmlab.data.shards import (
    TokenShardWriter,
    TrainValSplitter,
    dtype_for_vocab,
    split_value,
    text_digest,
)
from lmlab.data.sources import (
    MAX_LINE_BYTES,
    Document,
    ReadStats,
    check_max_line_bytes,
    iter_documents,
)
from lmlab.errors import ConfigError
from lmlab.fileio import write_dir_atomically
from lmlab.outputs import absolute, claim_output_dir
from lmlab.tokenizer import Tokenizer

log = logging.getLogger(__name__)

BATCH_DOCS = 512            # documents per tokenizer batch ...
BATCH_BYTES = 2 * 1024**2   # ... or this much text, whichever comes first


@dataclass
class PrepareResult:
    out_dir: str
    stats: ReadStats                     # what reading saw (documents, bytes, skipped records)
    documents: dict[str, int] = field(default_factory=dict)  # split -> documents written
    tokens: dict[str, int] = field(default_factory=dict)     # split -> tokens (EOS included)
    duplicates: int = 0                  # exact copies dropped
    seconds: float = 0.0
    workers: int = 1                     # tokenizer processes (1: this process, Rust threads)

    def summary_rows(self) -> list[tuple[str, object]]:
        rows: list[tuple[str, object]] = [("documents read", self.stats.documents),
                                          ("duplicates dropped", self.duplicates)]
        for split in sorted(self.documents):
            rows += [(f"{split} documents", self.documents[split]),
                     (f"{split} tokens", self.tokens[split])]
        mb = self.stats.bytes / 1e6
        rows += [("MB of text", f"{mb:,.1f}"),
                 ("skipped records", self.stats.skipped_total),
                 ("seconds", f"{self.seconds:.1f}"),
                 ("MB/s", f"{mb / max(self.seconds, 1e-9):.2f}"),
                 ("output", self.out_dir)]
        return rows


# ------------------------------------------------------------------ tokenization

_worker_tok: Tokenizer | None = None
_worker_dtype = None


def _worker_init(tokenizer_dir: str, dtype: str) -> None:
    global _worker_tok, _worker_dtype
    # one thread per process: N processes × N Rust threads would oversubscribe the cores
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tok, _worker_dtype = Tokenizer.load(tokenizer_dir), np.dtype(dtype)


def _encode(tok: Tokenizer, texts: list[str], dtype) -> list[np.ndarray]:
    return [np.asarray(ids, dtype=dtype) for ids in tok.encode_batch(texts)]


def _worker_encode(texts: list[str]) -> list[np.ndarray]:
    return _encode(_worker_tok, texts, _worker_dtype)


def _noop() -> None:
    pass


def _encode_in_order(tok: Tokenizer, tokenizer_dir: str, batches: Iterable, workers: int,
                     dtype) -> Iterator[tuple[object, list[np.ndarray]]]:
    """(batch, token arrays) for each (batch, texts), in order, at most 2×workers batches ahead.

    workers <= 1: one background thread calls encode_batch (which releases the GIL and
    spreads the batch over all cores in Rust) while this thread reads the next batch
    and writes the last, so reading hides behind tokenizing. workers > 1: that many
    single-threaded processes.
    """
    if workers <= 1:
        pool = ThreadPoolExecutor(1)
        encode = partial(_encode, tok, dtype=dtype)
    else:
        # spawn, not fork: forking after the Rust thread pool has started can deadlock.
        # Each worker ignores Ctrl-C and dies with this process (lmlab.procs.init_worker).
        pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"),
                                   initializer=procs.init_worker,
                                   initargs=(os.getpid(), _worker_init, tokenizer_dir, dtype.str))
        encode = _worker_encode
        # all started now, with SIGINT blocked, so that none takes a Ctrl-C while it imports
        # (the executor starts one process per submit while none is idle)
        with procs.sigint_blocked():
            for _ in range(workers):
                pool.submit(_noop)
    with pool:
        pending: deque[tuple[object, Future]] = deque()
        try:
            for batch, texts in batches:
                pending.append((batch, pool.submit(encode, texts)))
                if len(pending) >= 2 * max(1, workers):
                    b, fut = pending.popleft()
                    yield b, fut.result()
            while pending:
                b, fut = pending.popleft()
                yield b, fut.result()
        except BaseException:  # Ctrl-C, an error, or the consumer gone: drop the queued batches
            pool.shutdown(wait=True, cancel_futures=True)
            raise


@dataclass
class _Batch:
    values: list[float]     # split values, one per document
    docs_read: int          # documents read when the batch closed (for progress)
    bytes_read: int


def _unique_batches(docs: Iterator[Document], stats: ReadStats, seed: int,
                    counts: dict) -> Iterator[tuple[_Batch, list[str]]]:
    """Batches of first-seen documents; counts["duplicates"] grows as copies are dropped."""
    seen: set[bytes] = set()
    texts: list[str] = []
    values: list[float] = []
    size = 0
    for doc in docs:
        digest = text_digest(doc.text)
        if digest in seen:
            counts["duplicates"] += 1
            continue
        seen.add(digest)
        texts.append(doc.text)
        values.append(split_value(digest, seed))
        size += len(doc.text)
        if len(texts) >= BATCH_DOCS or size >= BATCH_BYTES:
            yield _Batch(values, stats.documents, stats.bytes), texts
            texts, values, size = [], [], 0
    if texts:
        yield _Batch(values, stats.documents, stats.bytes), texts


# ------------------------------------------------------------------ prepare

def prepare(inputs: list[str], tokenizer_dir: str | os.PathLike, out_dir: str | os.PathLike,
            val_fraction: float = 0.005, workers: int | None = None, text_field: str = "text",
            strict: bool = False, seed: int = 0,
            progress: Callable[[int, int], None] | None = None,
            overwrite: bool = False, max_line_bytes: int = MAX_LINE_BYTES) -> PrepareResult:
    """Read, deduplicate, split and tokenize `inputs` into a token-shard directory `out_dir`.

    An existing `out_dir` is replaced only if it holds this command's shards of the same
    inputs, or with `overwrite` (`lmlab.outputs.claim_output_dir`)."""
    t0 = time.perf_counter()
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"--val-fraction {val_fraction}: must be at least 0 and below 1")
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers {workers}: must be at least 1")
    check_max_line_bytes(max_line_bytes)
    inputs = [str(inputs)] if isinstance(inputs, (str, os.PathLike)) else [str(p) for p in inputs]
    n_workers = workers or 1
    claim = claim_output_dir(out_dir, "data prepare", reads=[*inputs, tokenizer_dir],
                             overwrite=overwrite, inputs={
                                 "input": [absolute(p) for p in inputs],
                                 "tokenizer": absolute(tokenizer_dir), "val_fraction": val_fraction,
                                 "seed": seed, "text_field": text_field,
                                 "max_line_bytes": max_line_bytes})
    tok = Tokenizer.load(tokenizer_dir)
    dtype = dtype_for_vocab(tok.vocab_size)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)

    stats = ReadStats()
    counts = {"duplicates": 0}
    extra = {"sources": [str(p) for p in inputs], "val_fraction": val_fraction, "seed": seed,
             "text_field": text_field}
    written: dict = {}

    def write_shards(tmp: Path) -> None:
        with TokenShardWriter(tmp, tok.vocab_size, tok.eos_id, tokenizer_hash=tok.hash,
                              extra_meta=extra) as writer:
            splitter = TrainValSplitter(writer, val_fraction)
            docs = iter_documents(inputs, text_field=text_field, strict=strict, stats=stats,
                                  max_line_bytes=max_line_bytes)
            batches = _unique_batches(docs, stats, seed, counts)
            encoded = _encode_in_order(tok, str(tokenizer_dir), batches, n_workers, dtype)
            for batch, arrays in encoded:
                for value, ids in zip(batch.values, arrays):
                    splitter.add(value, ids)
                if progress is not None:
                    progress(batch.docs_read, batch.bytes_read)
            splitter.finish()
            written["meta"] = writer.close({"duplicates_dropped": counts["duplicates"]})

    # a shard directory is replaced whole: the old output stays whole until the new one is
    # complete, and no old shard survives beside new ones
    write_dir_atomically(out, write_shards, last=None, replace=True)
    claim.record()
    meta = written["meta"]
    if progress is not None:
        progress(stats.documents, stats.bytes)
    splits = meta["splits"]
    result = PrepareResult(
        out_dir=str(out), stats=stats,
        documents={k: v["documents"] for k, v in splits.items()},
        tokens={k: v["tokens"] for k, v in splits.items()},
        duplicates=counts["duplicates"], seconds=time.perf_counter() - t0, workers=n_workers)
    log.info("prepared %s: %s", out, result.documents)
    return result
