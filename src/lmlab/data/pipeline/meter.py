"""Meters: pass-through steps that count what flows between stages.

A `Meter` sits after each stage of a phase. It counts documents and UTF-8 bytes,
optionally a histogram of document length, and writes its counts to
`<work>/meters/<phase>/<stage>/<rank>.json` every couple of seconds and when the
stream ends. The report sums the final files (documents and bytes in/out per
stage); while a phase runs, `run_recipe` reads the same files from the main
process to drive the progress callback, so progress works for any number of
worker processes without sending anything between them.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from lmlab.fileio import atomic_write_text

# document length histogram: bin i holds lengths in [2**i, 2**(i+1)) bytes
LENGTH_BINS = 28


def write_json(path: str | os.PathLike, data) -> None:
    """Write JSON atomically (readers in another process never see half a file)."""
    atomic_write_text(path, json.dumps(data))


class Meter(PipelineStep):
    type = "📏 - METER"

    def __init__(self, folder: str, stage: str, order: int, histogram: bool = False,
                 every_s: float = 2.0):
        super().__init__()
        self.folder, self.stage, self.order = str(folder), stage, order
        self.name = stage
        self.histogram = histogram
        self.every_s = every_s

    def _save(self, rank: int, docs: int, nbytes: int, hist: list[int], done: bool) -> None:
        write_json(Path(self.folder) / f"{self.order:02d}_{self.stage}" / f"{rank:05d}.json",
                   {"stage": self.stage, "order": self.order, "documents": docs, "bytes": nbytes,
                    "length_hist": hist, "done": done, "time": time.time()})

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        docs = nbytes = 0
        hist = [0] * LENGTH_BINS if self.histogram else []
        last = time.monotonic()
        self._save(rank, 0, 0, hist, False)
        for doc in data:
            n = len(doc.text.encode("utf-8", "surrogatepass"))
            docs += 1
            nbytes += n
            if self.histogram:
                hist[min(int(math.log2(n)) if n else 0, LENGTH_BINS - 1)] += 1
            if docs % 256 == 0 and time.monotonic() - last > self.every_s:
                self._save(rank, docs, nbytes, hist, False)
                last = time.monotonic()
            yield doc
        self._save(rank, docs, nbytes, hist, True)
