"""Claiming an output directory: the one check every command makes before it writes.

A command that writes a directory (`tokenizer train --out`, `data prepare --out`,
`data process --out`, `pretrain --out_dir`, `import-hf`, `export-hf`, `quickstart
--out`) first calls `claim_output_dir`. Before any work starts it refuses, with one
line that says what is there and how to proceed:

- an output path that is an existing file;
- an output that is or lies inside a path the command reads (or contains one, when
  it is to be replaced);
- an existing non-empty directory, unless it is the same kind of output of the
  same command with the same inputs (then the command reruns or resumes it), or
  the user passed `--overwrite` (then it is replaced), or `--resume`.

"Same command, same inputs" is not guessed from file names: each output carries a
small marker, `.lmlab-output.json`, naming the command and the inputs that define
it (paths made absolute, and the options that change the result). Litter of an
interrupted write (names holding `fileio.TMP_MARK`) is removed by the claim, so
the next run of the command cleans what a killed one left.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from lmlab.errors import InputError
from lmlab.fileio import TMP_MARK, atomic_write_text

log = logging.getLogger(__name__)

MARKER = ".lmlab-output.json"


@dataclass
class OutputClaim:
    """What `claim_output_dir` found, and the marker to leave once the output is written."""

    path: Path
    command: str
    inputs: dict[str, Any]
    state: str  # "new" (absent or empty), "same" (same command and inputs), "overwrite", "resume"
    previous: dict[str, Any] | None = field(default=None)

    @property
    def replace(self) -> bool:
        """True when the old content must go: the new output replaces the directory whole."""
        return self.state == "overwrite"

    def clear(self) -> None:
        """Empty the directory now (for outputs built in place, e.g. a training run), when the
        user asked to overwrite it; whole-directory writers use `replace` instead."""
        if self.state == "overwrite" and self.path.is_dir():
            for p in self.path.iterdir():
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()

    def record(self) -> None:
        """Leave the marker: this directory is `command`'s output of `inputs`."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / MARKER, json.dumps(
            {"command": self.command, "inputs": self.inputs}, indent=2, ensure_ascii=False))


def read_marker(path: str | os.PathLike) -> dict[str, Any] | None:
    """The marker of an output directory, or None (none, or unreadable: then it proves nothing)."""
    try:
        marker = json.loads((Path(path) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def absolute(path: str | os.PathLike) -> str:
    """A path as inputs are recorded: absolute, symlinks resolved, so that two spellings match."""
    return str(Path(path).expanduser().resolve())


def _is_litter(name: str) -> bool:
    return name.startswith(".") and TMP_MARK in name


def clean_litter(out: Path) -> None:
    """Remove what interrupted atomic writes of `out` left: `.OUT.tmp-*` beside it and
    `.*.tmp-*` inside it (and in its sub-directories). Nothing else is touched."""
    candidates = []
    if out.parent.is_dir():
        candidates += out.parent.glob(f".{out.name}{TMP_MARK}*")
    if out.is_dir():
        candidates += (p for p in out.rglob(f".*{TMP_MARK}*") if _is_litter(p.name))
    for p in candidates:
        log.info("removing %s, left by an interrupted write", p)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def describe(out: Path, marker: dict | None = None) -> str:
    """What a directory holds, in a few words, for the refusal message."""
    kind = _kind(out)
    if marker and isinstance(marker.get("command"), str):
        return f"{kind or 'the output'} of `lmlab {marker['command']}`"
    if kind:
        return kind
    names = sorted(p.name for p in out.iterdir() if p.name != MARKER and not _is_litter(p.name))
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return f"{len(names)} file(s) of something else ({shown})"


def _kind(out: Path) -> str | None:
    """What kind of lmlab directory `out` looks like, from its files (None: none)."""
    ckpts = out / "checkpoints"
    if ckpts.is_dir() and any(ckpts.iterdir()):
        return f"a training run ({len(list(ckpts.iterdir()))} checkpoint(s))"
    config = out / "config.json"
    if config.is_file():
        try:
            raw = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raw = None
        if isinstance(raw, dict) and "lmlab_model" in raw:
            return "an lmlab model directory"
        if isinstance(raw, dict) and "model_type" in raw:
            return f"a Hugging Face model directory ({raw['model_type']})"
    if (out / "meta.json").is_file() and any(out.glob("*.bin")):
        return "token shards"
    if (out / "tokenizer.json").is_file():
        return "a tokenizer"
    return None


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _differences(old: dict, new: dict) -> str:
    """The first few fields that differ, as `key: old → new` (nested keys dotted)."""
    old, new = _flat(old), _flat(new)
    keys = [k for k in sorted(set(old) | set(new), key=lambda k: (k.count("."), k))
            if old.get(k) != new.get(k)]  # the shallowest first: recipe.name before its thresholds
    shown = ", ".join(f"{k}: {_short(old.get(k))} → {_short(new.get(k))}" for k in keys[:3])
    return shown + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def _short(v: Any) -> str:
    s = json.dumps(v, ensure_ascii=False)
    return s if len(s) <= 60 else s[:57] + "..."


def _overlap(out: Path, read: Path) -> str | None:
    if out == read:
        return "is"
    if read in out.parents:
        return "is inside"
    if out in read.parents:
        return "contains"
    return None


def claim_output_dir(out: str | os.PathLike, command: str, inputs: dict[str, Any] | None = None,
                     reads: Iterable[str | os.PathLike] = (), overwrite: bool = False,
                     resume: bool = False, flag: str = "--out",
                     resume_hint: str | None = None,
                     overwrite_flag: str = "--overwrite") -> OutputClaim:
    """Check that `command` may write its output directory `out`, before any work starts.

    `inputs`: what defines the output (JSON values; compare equal for a rerun).
    `reads`: paths the command reads, which `out` must neither be, lie in, nor contain.
    `overwrite`: replace whatever is there. `resume`: the caller continues what is there.
    `flag` and `overwrite_flag` name the options in messages; `resume_hint` is offered
    beside the latter.
    Raises `InputError` (one line: the path, what is there, what to do).
    """
    path = Path(out)
    inputs = json.loads(json.dumps(inputs or {}))  # as the marker will hold them
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: is an existing file, not a directory; give {flag} a "
                         "directory path")
    resolved = path.expanduser().resolve()
    for r in reads:
        if r is None:
            continue
        how = _overlap(resolved, Path(r).expanduser().resolve())
        # an output that holds an input (a quickstart's shards) is fine until it is replaced
        if how and (how != "contains" or overwrite):
            raise InputError(f"{path}: {how} {r}, which this command reads; choose another {flag}")
    if os.environ.get("RANK", "0") == "0":
        # one process cleans: under torchrun another rank's cleaning would remove the
        # temporary file of rank 0's marker while it is being written
        clean_litter(path)
    marker = read_marker(path) if path.is_dir() else None
    contents = ([p for p in path.iterdir() if p.name != MARKER and not _is_litter(p.name)]
                if path.is_dir() else [])
    if not contents:
        state = "new"
    elif resume:
        state = "resume"
    elif marker and marker.get("command") == command and marker.get("inputs") == inputs:
        state = "same"
    elif overwrite:
        state = "overwrite"
    else:
        what = describe(path, marker)
        if marker and marker.get("command") == command and isinstance(marker.get("inputs"), dict):
            what += f" with other inputs ({_differences(marker['inputs'], inputs)})"
        ways = [f"pass {overwrite_flag} to replace it"] + ([resume_hint] if resume_hint else [])
        raise InputError(f"{path}: already holds {what}; {', '.join(ways)}, or choose a new {flag}")
    if state == "overwrite":
        log.warning("%s: replacing %s (--overwrite)", path, describe(path, marker))
    return OutputClaim(path, command, inputs, state, marker)
