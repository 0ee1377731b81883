"""Atomic writes: a reader sees the old content or the new, permissions follow the umask."""

import os

import pytest

from lmlab.fileio import TMP_MARK, atomic_file, atomic_write_text, write_dir_atomically


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "summary.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as f:
            f.write(b"half of the new")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_new_files_and_directories_get_the_umask_permissions(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "x")
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~_umask()
    out = write_dir_atomically(tmp_path / "model", lambda d: (d / "config.json").write_text("{}"))
    assert out.stat().st_mode & 0o777 == 0o777 & ~_umask()


def test_into_an_existing_directory_others_survive_and_last_comes_last(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "metrics.jsonl").write_text("{}\n")
    order = []
    real_replace = os.replace

    def spy(src, dst):
        order.append(os.path.basename(dst))
        real_replace(src, dst)

    def write(d):
        (d / "config.json").write_text("{}")
        (d / "model.safetensors").write_bytes(b"w")

    os.replace = spy
    try:
        write_dir_atomically(out, write, last="config.json")
    finally:
        os.replace = real_replace
    assert order == ["model.safetensors", "config.json"]
    assert (out / "metrics.jsonl").read_text() == "{}\n" and (out / "checkpoints").is_dir()
    assert not [p for p in out.iterdir() if TMP_MARK in p.name]


def test_replace_swaps_a_directory_whole_and_keeps_the_old_one_on_failure(tmp_path):
    out = tmp_path / "shards"
    out.mkdir()
    (out / "train_00001.bin").write_bytes(b"old extra shard")
    (out / "meta.json").write_text("old")

    def fail(d):
        (d / "meta.json").write_text("new")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_dir_atomically(out, fail, last=None, replace=True)
    assert (out / "meta.json").read_text() == "old" and (out / "train_00001.bin").exists()
    write_dir_atomically(out, lambda d: (d / "meta.json").write_text("new"), last=None,
                         replace=True)
    assert [p.name for p in out.iterdir()] == ["meta.json"]
    assert (out / "meta.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]  # no litter
