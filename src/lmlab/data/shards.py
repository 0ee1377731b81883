"""Token shards: the one on-disk format between data preparation and training.

A shard directory holds

    train_00000.bin, train_00001.bin, ...   flat little-endian uint16 (uint32 if vocab > 65535)
    val_00000.bin, ...
    meta.json                               dtype, vocab size, eos id, tokenizer hash, counts

Each document's tokens are followed by the EOS id, so documents never run into
one another unmarked. Every file is written through `lmlab.fileio` (a temporary
name, fsync, rename), and meta.json is written last: a directory with a
meta.json is complete.

`TokenShardWriter` is the only writer (used by `lmlab data prepare` and by the
`lmlab data process` pipeline); `TokenShards` reads a split with numpy.memmap.
Both writers decide train or val by the one rule here, `split_value` and
`TrainValSplitter` (see its docstring).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from lmlab.errors import InputError
from lmlab.fileio import atomic_file, atomic_write_text

log = logging.getLogger(__name__)

FORMAT = "lmlab.token-shards.v1"
DEFAULT_SHARD_TOKENS = 64 * 1024 * 1024  # 128 MB of uint16 per file


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------ train or val

def text_digest(text: str) -> bytes:
    """128-bit BLAKE2b of the UTF-8 text: a document's identity (exact dedup, the split)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def split_value(digest: bytes, seed: int = 0) -> float:
    """A uniform number in [0, 1) from a document's `text_digest` and `seed`; < val_fraction: val.

    The split is by content, not by position or id:
    - the same whatever the file order, the number of workers or tasks, the
      executor, and from one run to the next;
    - copies of a text land on the same side, so a duplicate that survives
      deduplication cannot put a training document in val (and flatter the
      validation loss); ids cannot promise that: the same page crawled twice
      has two ids, and ids a reader generates depend on how the input was read;
    - `seed` gives another split of the same corpus.
    The text hashed is the text that is tokenized (after the pipeline's
    normalisation and masking, if any).
    """
    h = hashlib.blake2b(digest, digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(h, "big") / 2**64


class TrainValSplitter:
    """The train/val rule of token shards, for `lmlab data prepare` and `lmlab data process` alike.

    1. A document goes to "val" when its `split_value` is below `val_fraction`,
       else to "train".
    2. Neither split is left empty when it can be helped: if val would be empty
       (val_fraction > 0, two or more documents), the train document with the
       smallest value — the one nearest the threshold — moves to val; if train
       would be empty, the val document with the largest value moves to train;
       a lone document goes to train (with a warning: no val split).

    For (2) the document nearest the threshold on each side is held back and
    written by `finish()`, so the outcome never depends on the order of arrival.
    A writer working on part of the corpus (one pipeline task) calls `held()`
    instead of `finish()` and hands its held documents, with their values, to
    the one splitter that sees the whole (`add`); documents already routed are
    counted there with `add_routed`.
    """

    def __init__(self, writer: TokenShardWriter, val_fraction: float):
        self.writer, self.val_fraction = writer, val_fraction
        self._held: dict[str, tuple[float, np.ndarray] | None] = {"train": None, "val": None}
        self.written = {"train": 0, "val": 0}

    def add(self, value: float, ids) -> None:
        split = "val" if value < self.val_fraction else "train"
        held = self._held[split]
        if held is None:
            self._held[split] = (value, ids)
            return
        if (value < held[0]) if split == "train" else (value > held[0]):
            self._held[split] = (value, ids)  # the new one is nearer the threshold: write the old
            value, ids = held
        self.add_routed(split, ids)

    def add_routed(self, split: str, ids) -> None:
        """A document whose split rule (1) has already decided (and which is not held)."""
        self.writer.add(ids, split)
        self.written[split] += 1

    def held(self) -> dict[str, tuple[float, np.ndarray]]:
        """The held documents, {split: (value, ids)}, handed over (this splitter forgets them)."""
        out = {k: v for k, v in self._held.items() if v is not None}
        self._held = {"train": None, "val": None}
        return out

    def finish(self) -> None:
        """Apply rule (2) and write the held documents."""
        train, val = self._held["train"], self._held["val"]
        n_train = self.written["train"] + (train is not None)
        n_val = self.written["val"] + (val is not None)
        if self.val_fraction > 0 and n_val == 0 and n_train >= 2:
            log.info("no document fell in val (val_fraction %g); moving one from train",
                     self.val_fraction)
            self._held = {"train": None, "val": train}
        elif n_train == 0 and n_val >= 2:
            log.info("no document fell in train (val_fraction %g); moving one from val",
                     self.val_fraction)
            self._held = {"train": val, "val": None}
        elif self.val_fraction > 0 and n_train + n_val < 2:
            log.warning("only %d document: no val split (a single text file is one document; "
                        "split it into several files or JSONL records)", n_train + n_val)
            self._held = {"train": train or val, "val": None}  # a lone document is for training
        for split, held in self.held().items():
            self.add_routed(split, held[1])


# ------------------------------------------------------------------ writing and reading

@dataclass
class _Split:
    files: list[str] = field(default_factory=list)
    documents: int = 0
    tokens: int = 0


class TokenShardWriter:
    """Append documents (lists/arrays of token ids) to the train or val split of a shard dir.

    Use as a context manager; `close()` finishes the open shards and writes meta.json.
    """

    def __init__(self, out_dir: str | os.PathLike, vocab_size: int, eos_id: int,
                 tokenizer_hash: str | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                 extra_meta: dict | None = None):
        if eos_id is None:  # an imported tokenizer may name none
            raise InputError("the tokenizer has no EOS token, which separates documents in token "
                             "shards; use a tokenizer whose tokenizer_config.json names an "
                             "eos_token")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.vocab_size, self.eos_id = vocab_size, eos_id
        self.dtype = dtype_for_vocab(vocab_size)
        self.tokenizer_hash = tokenizer_hash
        self.shard_tokens = shard_tokens
        self.extra_meta = extra_meta or {}
        self.splits: dict[str, _Split] = {}
        # split -> (its atomic_file context, the file object, final path, tokens in the file)
        self._open: dict[str, tuple] = {}
        self._eos = np.array([eos_id], dtype=self.dtype)
        self._closed = False

    def _file(self, split: str):
        if split not in self._open:
            s = self.splits.setdefault(split, _Split())
            name = f"{split}_{len(s.files):05d}.bin"
            final = self.out_dir / name
            stack = contextlib.ExitStack()
            f = stack.enter_context(atomic_file(final, mkdir=False))
            self._open[split] = (stack, f, final, 0)
        return self._open[split]

    def _finish(self, split: str) -> None:
        stack, _, final, _ = self._open.pop(split)
        stack.close()  # fsync and rename onto the final name
        self.splits[split].files.append(final.name)

    def add(self, ids: Iterable[int] | np.ndarray, split: str = "train") -> None:
        """Append one document (its token ids; EOS is added here)."""
        arr = np.asarray(ids, dtype=self.dtype)
        if arr.size and int(arr.max()) >= self.vocab_size:
            raise ValueError(f"token id {int(arr.max())} >= vocab_size {self.vocab_size}")
        stack, f, final, n = self._file(split)
        f.write(arr.tobytes())
        f.write(self._eos.tobytes())
        n += arr.size + 1
        s = self.splits[split]
        s.documents += 1
        s.tokens += arr.size + 1
        self._open[split] = (stack, f, final, n)
        if n >= self.shard_tokens:
            self._finish(split)

    def close(self, extra_meta: dict | None = None) -> dict:
        """Finish the open shards and write meta.json (plus `extra_meta`, e.g. final counts)."""
        if self._closed:
            return self.meta
        self.extra_meta.update(extra_meta or {})
        try:
            for split in list(self._open):
                self._finish(split)
        except BaseException as e:
            self._abort(e)
            raise
        self.meta = {
            "format": FORMAT,
            "dtype": self.dtype.name,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "tokenizer_hash": self.tokenizer_hash,
            "documents": sum(s.documents for s in self.splits.values()),
            "tokens": sum(s.tokens for s in self.splits.values()),
            "splits": {k: vars(v) for k, v in sorted(self.splits.items())},
            **self.extra_meta,
        }
        atomic_write_text(self.out_dir / "meta.json", json.dumps(self.meta, indent=2))
        self._closed = True
        return self.meta

    def __enter__(self):
        return self

    def _abort(self, exc: BaseException) -> None:
        """Drop the open shards' temporary files: no half-written shard, no meta.json."""
        for stack, *_ in self._open.values():
            stack.__exit__(type(exc), exc, exc.__traceback__)  # atomic_file unlinks its temp file
        self._open.clear()

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self._abort(exc)


def read_meta(shard_dir: str | os.PathLike) -> dict:
    path = Path(shard_dir) / "meta.json"
    if not path.is_file():
        raise InputError(
            f"{shard_dir}: no meta.json, so not a complete token-shard directory; "
            "create one with `lmlab data prepare --input ... --tokenizer ... --out DIR`"
        )
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise InputError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


class TokenShards:
    """One split of a shard directory as a single flat token array (memory-mapped)."""

    def __init__(self, shard_dir: str | os.PathLike, split: str = "train"):
        self.dir = Path(shard_dir)
        self.meta = read_meta(shard_dir)
        if split not in self.meta["splits"]:
            raise InputError(
                f"{shard_dir}: has no {split!r} split (has {sorted(self.meta['splits'])})"
            )
        self.split = split
        dtype = np.dtype(self.meta["dtype"])
        self.arrays = [np.memmap(self.dir / f, dtype=dtype, mode="r")
                       for f in self.meta["splits"][split]["files"]]
        self.arrays = [a for a in self.arrays if a.size]
        self.offsets = np.cumsum([0] + [a.size for a in self.arrays])
        self.vocab_size = self.meta["vocab_size"]
        self.eos_id = self.meta["eos_id"]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def slice(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) across file boundaries, as int64."""
        if not (0 <= start <= stop <= len(self)):
            raise IndexError(f"slice [{start}, {stop}) outside 0..{len(self)}")
        out = []
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while start < stop:
            a, base = self.arrays[i], int(self.offsets[i])
            take = min(stop, base + a.size) - start
            out.append(a[start - base:start - base + take])
            start += take
            i += 1
        return np.concatenate(out).astype(np.int64) if out else np.zeros(0, dtype=np.int64)
