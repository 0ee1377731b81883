"""The data-side writers put files on disk through `lmlab.fileio`: whole, or not at all.

Each writer is made to fail at its last step (the rename onto the final name,
as a full disk or a kill would): the previous file must be intact and nothing
may be left beside it, no temporary file and no half of the new one.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import lmlab.fileio
from lmlab.data import shards
from lmlab.data.pipeline.dedup import BandBuckets, minhash_config
from lmlab.data.pipeline.meter import write_json
from lmlab.data.shards import TokenShardWriter


@pytest.fixture
def renames_fail(monkeypatch):
    def replace(src, dst):
        raise OSError(28, "No space left on device (test)")

    monkeypatch.setattr(os, "replace", replace)


def listing(d) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_meter_json_is_whole_or_untouched(tmp_path, renames_fail):
    path = tmp_path / "meters" / "00_read" / "00000.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"documents": 1}')
    with pytest.raises(OSError, match="No space"):
        write_json(path, {"documents": 2})
    assert json.loads(path.read_text()) == {"documents": 1}
    assert listing(path.parent) == ["00000.json"]


def test_shard_writer_leaves_nothing_when_its_last_rename_fails(tmp_path, renames_fail):
    out = tmp_path / "shards"
    with pytest.raises(OSError, match="No space"):
        with TokenShardWriter(out, vocab_size=100, eos_id=0, shard_tokens=8) as w:
            for i in range(5):
                w.add([1, 2, 3, 4, 5], "val" if i == 2 else "train")
    assert listing(out) == []  # no shard, no temporary file, no meta.json claiming completeness


def test_shard_writer_cleans_up_after_an_error_in_the_caller(tmp_path):
    out = tmp_path / "shards"
    with pytest.raises(RuntimeError):
        with TokenShardWriter(out, vocab_size=100, eos_id=0, shard_tokens=8) as w:
            for _ in range(3):
                w.add([1, 2, 3, 4, 5])
            raise RuntimeError("the tokenizer died")
    # the shard finished before the error stays (its own rename is done), nothing else
    assert listing(out) == ["train_00000.bin"]


def test_minhash_pair_files_are_whole_or_absent(tmp_path, renames_fail):
    step = BandBuckets(str(tmp_path / "sigs"), str(tmp_path / "pairs"), minhash_config(2, 2))
    with pytest.raises(OSError, match="No space"):
        step.run(None, rank=0, world_size=1)
    assert listing(tmp_path / "pairs") == []


def test_shards_have_the_permissions_the_umask_asks_for(tmp_path):
    # a shared data directory must be readable by whoever the umask lets read it, as
    # before the writers moved onto lmlab.fileio
    umask = os.umask(0)
    os.umask(umask)
    with TokenShardWriter(tmp_path, vocab_size=100, eos_id=0) as w:
        w.add(np.arange(10))
    for name in ("train_00000.bin", "meta.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
