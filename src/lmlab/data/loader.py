"""Batches of token windows for language-model training, deterministic and resumable.

The token stream of a split is cut into windows of `seq_len + 1` tokens (the
input and, shifted by one, its targets) with stride `seq_len`. Each epoch visits
the windows in a seeded random order. The windows of training step `s` are a
pure function of `s`, so

- resuming needs only the step number (no iterator state to save), and
- under data parallelism each rank takes its own slice of the same global
  batch: with W ranks, micro-batch B and A accumulation steps, step `s` uses
  global windows [s·A·W·B, (s+1)·A·W·B), micro-step m of rank r the B windows
  starting at s·A·W·B + (m·W + r)·B. One process with W·B windows per step
  therefore sees exactly the same data as W processes with B each.
"""

from __future__ import annotations

import numpy as np
import torch

from lmlab.data.shards import TokenShards
from lmlab.errors import InputError


class WindowBatches:
    def __init__(self, shards: TokenShards, seq_len: int, batch_size: int, seed: int = 0):
        self.shards, self.seq_len, self.batch_size, self.seed = shards, seq_len, batch_size, seed
        self.n_windows = (len(shards) - 1) // seq_len
        if self.n_windows < 1:
            raise InputError(
                f"{shards.dir}: the {shards.split!r} split has {len(shards)} tokens, fewer than one "
                f"window of {seq_len + 1}; use more text or a smaller seq_len"
            )
        self._epoch, self._perm = -1, None

    def _window_start(self, g: int) -> int:
        epoch, pos = divmod(g, self.n_windows)
        if epoch != self._epoch:
            self._perm = np.random.default_rng(self.seed + epoch).permutation(self.n_windows)
            self._epoch = epoch
        return int(self._perm[pos]) * self.seq_len

    def epoch_of(self, g: int) -> float:
        return g / self.n_windows

    def get(self, step: int, micro: int, accum: int, rank: int = 0, world: int = 1):
        """(inputs, targets), each (batch_size, seq_len) int64, for one micro-step of one rank."""
        B, T = self.batch_size, self.seq_len
        first = step * accum * world * B + (micro * world + rank) * B
        rows = [self.shards.slice(s, s + T + 1) for s in map(self._window_start, range(first, first + B))]
        xy = torch.from_numpy(np.stack(rows))
        return xy[:, :-1], xy[:, 1:]


def eval_windows(shards: TokenShards, seq_len: int, batch_size: int, max_tokens: int | None,
                 rank: int = 0, world: int = 1):
    """Consecutive non-overlapping windows of a split (its first `max_tokens`), this rank's share."""
    n = (len(shards) - 1) // seq_len
    if max_tokens:
        n = min(n, max(1, max_tokens // seq_len))
    mine = list(range(rank, n, world))
    for i in range(0, len(mine), batch_size):
        rows = [shards.slice(w * seq_len, w * seq_len + seq_len + 1) for w in mine[i:i + batch_size]]
        xy = torch.from_numpy(np.stack(rows))
        yield xy[:, :-1], xy[:, 1:]
