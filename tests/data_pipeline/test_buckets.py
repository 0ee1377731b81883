"""`BandBuckets` (numpy) finds exactly the pairs datatrove's `MinhashDedupBuckets` finds."""

from __future__ import annotations

import numpy as np
from datatrove.data import Document
from datatrove.pipeline.dedup import MinhashDedupBuckets

from lmlab.data.pipeline.dedup import BandBuckets, DedupSignatures, minhash_config

from .synthetic import planted_corpus


def read_pairs(folder) -> set[tuple[int, ...]]:
    out = set()
    for f in sorted(folder.glob("*.dups")):
        out |= {tuple(r) for r in np.fromfile(f, dtype="<u4").reshape(-1, 4).tolist()}
    return out


def test_band_buckets_equal_datatrove(tmp_path):
    docs = planted_corpus(400, seed=3, zh_fraction=0.3, junk_fraction=0.1,
                          exact_fraction=0.05, near_fraction=0.1)
    bands, rows = 12, 3
    sigs = tmp_path / "sigs"
    for rank in range(3):  # three tasks' signature files per band
        step = DedupSignatures(None, str(sigs), bands=bands, rows=rows, unit="auto")
        mine = (Document(text=d.text, id=d.id) for i, d in enumerate(docs) if i % 3 == rank)
        for _ in step.run(mine, rank=rank, world_size=3):
            pass
    cfg = minhash_config(bands, rows)
    for band in range(bands):
        MinhashDedupBuckets(str(sigs), str(tmp_path / "datatrove"), config=cfg).run(
            None, rank=band, world_size=bands)
    for rank in range(2):  # bands dealt over two tasks
        BandBuckets(str(sigs), str(tmp_path / "ours"), cfg).run(None, rank=rank, world_size=2)
    theirs, ours = read_pairs(tmp_path / "datatrove"), read_pairs(tmp_path / "ours")
    assert len(theirs) > 20  # the planted copies collide
    assert ours == theirs
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == \
        sorted(p.name for p in (tmp_path / "datatrove").iterdir())
