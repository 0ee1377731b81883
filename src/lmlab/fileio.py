"""Atomic writes: the one way lmlab puts a file or a directory on disk.

A reader (another process, or the next run after a crash) sees either the old
content or the new one, never half of it. Every writer in lmlab goes through
these three:

- `atomic_file(path)`: a context manager yielding a binary file object; the data
  goes to a temporary name beside `path` (`.NAME.tmp-` and a random suffix), is fsynced, and is
  renamed onto `path` only if the block finishes without an exception.
- `atomic_write_text(path, text)` / `atomic_write_bytes(path, data)`: the same for
  content already in memory.
- `write_dir_atomically(out_dir, write_files)`: a directory written whole. A new
  directory appears in one rename; an existing one (a training run, which also
  holds checkpoints and metrics that must survive) gets each file renamed into
  place, `last` after the others; with `replace=True` it is replaced whole.

Temporary names all start with "." and contain ".tmp-", so a later run can tell
litter from output (`TMP_MARK`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from lmlab.errors import InputError

TMP_MARK = ".tmp-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _open_tmp(path: Path) -> tuple[int, Path]:
    """A new temporary file beside `path`, with the permissions the umask gives a new file
    (mkstemp's 0600 would make shared outputs unreadable to others)."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}{TMP_MARK}{os.urandom(4).hex()}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path}: could not create a temporary file beside it")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mkdir: bool = True) -> Iterator[BinaryIO]:
    """Open `path` for binary writing; it appears, complete, only when the block succeeds."""
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        raise InputError(f"{path}: is a directory; choose a file path")
    fd, tmp = _open_tmp(path)
    try:
        with open(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a UTF-8 text file so that readers see the old or the new content, never a half."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_dir_atomically(out_dir: str | os.PathLike, write_files: Callable[[Path], None],
                         last: str | None = "config.json", replace: bool = False) -> Path:
    """Run `write_files(tmp_dir)` and move what it wrote to `out_dir` by renames.

    A new `out_dir` appears in one rename. An existing one keeps what it holds
    beyond the files written (a run's checkpoints and metrics); each written
    file is renamed into place, `last` after the others (the config after the
    weights, so a config never describes weights that are not there yet).
    With `replace`, an existing `out_dir` is instead replaced whole, by two
    renames (a token-shard directory must not keep an old run's extra shards):
    the old output stays whole until the new one is complete.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory; choose another output path")
    whole = replace or not out.exists()
    stage_parent = out.parent if whole else out
    stage_parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_MARK}", dir=stage_parent))
    os.chmod(tmp, 0o777 & ~_umask())  # a new directory as mkdir would make it, not mkdtemp's 0700
    try:
        write_files(tmp)
        if whole and out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_MARK}old-", dir=out.parent))
            os.replace(out, old)  # onto the empty placeholder
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        elif whole:
            os.replace(tmp, out)
        else:
            for name in sorted((p.name for p in tmp.iterdir()), key=lambda n: n == last):
                target = out / name
                if target.is_dir():  # a sub-directory is replaced whole
                    shutil.rmtree(target)
                os.replace(tmp / name, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a no-op once renamed away
    return out
