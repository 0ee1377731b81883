"""Token shards: the one on-disk format between data preparation and training.

A shard directory holds

    train_00000.bin, train_00001.bin, ...   flat little-endian uint16 (uint32 if vocab > 65535)
    val_00000.bin, ...
    meta.json                               dtype, vocab size, eos id, tokenizer hash, counts

Each document's tokens are followed by the EOS id, so documents never run into
one another unmarked. Files are written under a temporary name and renamed into
place, and meta.json is written last: a directory with a meta.json is complete.

`TokenShardWriter` is the only writer (used by `lmlab data prepare` and by the
`lmlab data process` pipeline); `TokenShards` reads a split with numpy.memmap.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from lmlab.errors import InputError

FORMAT = "lmlab.token-shards.v1"
DEFAULT_SHARD_TOKENS = 64 * 1024 * 1024  # 128 MB of uint16 per file


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file so that readers see the old or the new content, never a half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.vocab_size, self.eos_id = vocab_size, eos_id
        self.dtype = dtype_for_vocab(vocab_size)
        self.tokenizer_hash = tokenizer_hash
        self.shard_tokens = shard_tokens
        self.extra_meta = extra_meta or {}
        self.splits: dict[str, _Split] = {}
        self._open: dict[str, tuple] = {}  # split -> (file object, tmp path, final path, tokens in file)
        self._eos = np.array([eos_id], dtype=self.dtype)
        self._closed = False

    def _file(self, split: str):
        if split not in self._open:
            s = self.splits.setdefault(split, _Split())
            name = f"{split}_{len(s.files):05d}.bin"
            final = self.out_dir / name
            tmp = self.out_dir / f".{name}.tmp"
            self._open[split] = (open(tmp, "wb"), tmp, final, 0)
        return self._open[split]

    def _finish(self, split: str) -> None:
        f, tmp, final, _ = self._open.pop(split)
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, final)
        self.splits[split].files.append(final.name)

    def add(self, ids: Iterable[int] | np.ndarray, split: str = "train") -> None:
        """Append one document (its token ids; EOS is added here)."""
        arr = np.asarray(ids, dtype=self.dtype)
        if arr.size and int(arr.max()) >= self.vocab_size:
            raise ValueError(f"token id {int(arr.max())} >= vocab_size {self.vocab_size}")
        f, tmp, final, n = self._file(split)
        f.write(arr.tobytes())
        f.write(self._eos.tobytes())
        n += arr.size + 1
        s = self.splits[split]
        s.documents += 1
        s.tokens += arr.size + 1
        self._open[split] = (f, tmp, final, n)
        if n >= self.shard_tokens:
            self._finish(split)

    def close(self, extra_meta: dict | None = None) -> dict:
        """Finish the open shards and write meta.json (plus `extra_meta`, e.g. final counts)."""
        if self._closed:
            return self.meta
        self.extra_meta.update(extra_meta or {})
        for split in list(self._open):
            self._finish(split)
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

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:  # leave no half-written shards and no meta.json that claims completeness
            for f, tmp, _, _ in self._open.values():
                f.close()
                tmp.unlink(missing_ok=True)
            self._open.clear()


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
