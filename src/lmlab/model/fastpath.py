"""Fast paths chosen by measurement on the machine at hand, never slower than the plain op.

A fast path tuned on one CPU can lose on another: `Linear`'s blocked
matrix-vector product streams weights at 2-3x the rate of `F.linear` on a
2-core AMD EPYC, and at a third to a half of it on an Intel Xeon with AMX. So
each CPU-specific fast path is one candidate beside the plain op it replaces,
and the choice is made here, by timing both on first use for a key (shape,
dtype, grad mode ... as the caller names it, plus torch's thread count) and
keeping the winner for the life of the process. The plain op is kept unless
the fast one's median time is at least `MARGIN` (5 %) lower: a tie, or noise,
keeps the plain op.

Two ways to time:

- `choose(name, key, candidates, *args)` runs every candidate now, a warm-up
  call each and then 3-5 interleaved rounds (order alternating, so neither
  always runs on the warmer cache), and returns the winner's name. For ops
  whose cost is forward plus backward (attention, the loss), timed on the
  call's own inputs, detached.
- `run(name, key, candidates, *args)` measures in place: while a key is
  undecided each call runs the next candidate of the same interleaved
  schedule on its real inputs, timed, and returns its result; then it runs the
  winner. For decoding's matrix-vector products, whose speed depends on the
  weights streaming from memory as they do inside the model; timing one layer
  alone would find a small weight in cache. It costs nothing extra: every
  timed call does real work.

Candidates must compute the same thing (tests hold them equal); with "auto"
which one runs depends on timing, so results are equal only up to float
rounding between machines or runs. `LMLAB_FASTPATH` fixes the choice:
"auto" (default), "plain" or "fast" for every path, or per path, e.g.
"linear_matvec=plain,attention=fast" (a bare mode sets the rest); it is
read on first use (and after `clear()`). Off the
CPU, and while `torch.compile` traces, callers keep their fixed rules and
nothing is measured. `decisions()` / `report()` say what was picked and why;
the benchmarks print them. The state is this process's only (no files), and
each process of a distributed run decides for itself.
"""

from __future__ import annotations

import functools
import os
import statistics
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

ENV = "LMLAB_FASTPATH"
PLAIN = "plain"
MARGIN = 0.05  # the fast candidate must be this much faster (median) to be used
MODES = ("auto", "plain", "fast")


@dataclass(frozen=True)
class Decision:
    name: str
    key: tuple
    threads: int
    choice: str
    how: str  # "measured", "forced by LMLAB_FASTPATH=...", or the rule that decided
    seconds: dict[str, float] = field(default_factory=dict)  # median time per candidate
    fields: tuple[str, ...] | None = None  # names for the key's items, for describe()

    def describe(self) -> str:
        names = self.fields or getattr(self.key, "_fields", None)
        key = (", ".join(f"{k}={_fmt(v)}" for k, v in zip(names, self.key)) if names
               else ", ".join(map(_fmt, self.key)))
        times = ""
        if self.seconds:
            times = " (" + ", ".join(f"{c} {t * 1e3:.3g} ms" for c, t in self.seconds.items())
            plain, best = self.seconds.get(PLAIN), self.seconds.get(self.choice)
            if plain and best and self.choice != PLAIN:
                times += f"; {plain / best:.2f}x"
            times += ")"
        return f"{self.name} [{key}; {self.threads} threads]: {self.choice}{times}, {self.how}"


def _fmt(v: Any) -> str:
    return str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else str(v)


_decided: dict[tuple, Decision] = {}  # (name, key, threads) -> measured or rule decision
_forced: dict[tuple, Decision] = {}  # the same for choices LMLAB_FASTPATH fixed
_trials: dict[tuple, _Trial] = {}  # run(): keys still being measured in place


_modes: dict[str, str] | None = None  # LMLAB_FASTPATH, parsed on first use
_spec = ""  # ... as it was then


def _parse(spec: str) -> dict[str, str]:
    modes: dict[str, str] = {}
    for token in filter(None, (t.strip() for t in spec.split(","))):
        name, _, value = token.rpartition("=")
        if value not in MODES:
            raise ValueError(f"{ENV}={spec!r}: {value!r} is not one of {', '.join(MODES)}")
        modes[name.strip() or "*"] = value
    return modes


def mode(name: str) -> str:
    """'auto', 'plain' or 'fast' for the path `name`, from LMLAB_FASTPATH.

    The variable is read on first use and again after `clear()` (reading the
    environment costs microseconds, and decoding asks once per matrix product).
    """
    global _modes, _spec
    if _modes is None:
        _spec = os.environ.get(ENV, "")
        _modes = _parse(_spec)
    return _modes.get(name) or _modes.get("*", "auto")


def _full_key(name: str, key: tuple) -> tuple:
    return name, key, torch.get_num_threads()


def _forced_choice(name: str, key: tuple, names, forced: str, fields=None) -> str:
    choice = PLAIN if forced == PLAIN else next(n for n in names if n != PLAIN)
    full = _full_key(name, key) + (choice,)
    if full not in _forced:
        _forced[full] = Decision(name, key, full[2], choice,
                                 f"forced by {ENV}={_spec}", fields=fields)
    return choice


def _decide(full: tuple, samples: Mapping[str, list[float]], margin: float,
            fields=None) -> Decision:
    med = {n: statistics.median(s) for n, s in samples.items()}
    fast = min((t, n) for n, t in med.items() if n != PLAIN)
    choice = fast[1] if fast[0] <= (1 - margin) * med[PLAIN] else PLAIN
    d = Decision(full[0], full[1], full[2], choice, "measured", med, fields)
    _decided[full] = d
    return d


def choose(name: str, key: tuple, candidates: Mapping[str, Callable[..., Any]], *args: Any,
           margin: float = MARGIN, repeats: int = 5, min_repeats: int = 3,
           budget_s: float = 0.25, sync: Callable[[], Any] | None = None) -> str:
    """The name of the candidate to use for `key`, timing `candidates[n](*args)` on first use.

    `candidates` holds PLAIN and at least one other. After one warm-up call
    each, the rounds fit `budget_s` (at least `min_repeats`, at most
    `repeats`). `sync` (e.g. torch.cuda.synchronize) is called around each
    timed call on asynchronous devices. Never call it while torch.compile is
    tracing: it returns PLAIN there without measuring.
    """
    forced = mode(name)
    if forced != "auto":
        return _forced_choice(name, key, candidates, forced)
    full = _full_key(name, key)
    d = _decided.get(full)
    if d is not None:
        return d.choice
    if torch.compiler.is_compiling():
        return PLAIN

    def timed(n: str) -> float:
        if sync is not None:
            sync()
        t0 = time.perf_counter()
        candidates[n](*args)
        if sync is not None:
            sync()
        return time.perf_counter() - t0

    names = list(candidates)
    warm = sum(timed(n) for n in names)
    rounds = max(min_repeats, min(repeats, int(budget_s / max(warm, 1e-9))))
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names if r % 2 else names[::-1]:
            samples[n].append(timed(n))
    return _decide(full, samples, margin).choice


class _Trial:
    """run()'s schedule for one key: a warm-up call per candidate, then interleaved rounds."""

    def __init__(self, names: list[str], repeats: int):
        rounds = [names if r % 2 else names[::-1] for r in range(repeats)]
        self.order = names + [n for rnd in rounds for n in rnd]
        self.started = self.finished = 0
        self.samples: dict[str, list[float]] = {n: [] for n in names}


_trial_lock = threading.Lock()  # run() may be called from several threads


def run(name: str, key: tuple, candidates: Mapping[str, Callable[..., Any]], *args: Any,
        margin: float = MARGIN, repeats: int = 5, fields: tuple[str, ...] | None = None) -> Any:
    """`candidates[choice](*args)`, the choice measured in place over the first calls with `key`.

    While undecided, each call runs the next candidate of an interleaved
    schedule (a warm-up call each, then `repeats` rounds), timed; after the
    last one the winner is kept. Once decided it costs a dict lookup (a plain
    tuple `key` with `fields` naming its items is cheaper to build than a
    NamedTuple, for callers on a hot path). Never call it while torch.compile
    is tracing (it would run PLAIN).
    """
    forced = mode(name)
    if forced != "auto":
        return candidates[_forced_choice(name, key, candidates, forced, fields)](*args)
    full = (name, key, torch.get_num_threads())
    d = _decided.get(full)
    if d is not None:
        return candidates[d.choice](*args)
    if torch.compiler.is_compiling():
        return candidates[PLAIN](*args)
    with _trial_lock:
        trial = _trials.get(full)
        if trial is None:
            trial = _trials[full] = _Trial(list(candidates), repeats)
        step = trial.started
        trial.started += 1
    if step >= len(trial.order):  # the schedule is out; another thread is finishing it
        return candidates[PLAIN](*args)
    n = trial.order[step]
    t0 = time.perf_counter()
    out = candidates[n](*args)
    dt = time.perf_counter() - t0
    with _trial_lock:
        if step >= len(candidates):  # past the warm-up calls
            trial.samples[n].append(dt)
        trial.finished += 1
        if trial.finished == len(trial.order):
            _decide(full, trial.samples, margin, fields)
            _trials.pop(full, None)
    return out


def record(name: str, key: tuple, choice: str, how: str) -> None:
    """Note a choice made by a rule rather than a measurement, for `decisions()`."""
    full = _full_key(name, key)
    if full not in _decided:
        _decided[full] = Decision(name, key, full[2], choice, how)


def decisions() -> list[Decision]:
    """Every choice made so far in this process: measured, by rule, or forced."""
    return list(_decided.values()) + list(_forced.values())


def report(indent: str = "  ") -> str:
    """decisions(), one line each (what the benchmarks print)."""
    lines = [indent + d.describe() for d in decisions()]
    return "\n".join(lines) if lines else indent + "(no fast path was considered)"


def _encode(v: Any) -> Any:
    return {"dtype": _fmt(v)} if isinstance(v, torch.dtype) else v


def _decode(v: Any) -> Any:
    if isinstance(v, dict) and set(v) == {"dtype"}:
        return getattr(torch, v["dtype"])
    return v


def export_decisions() -> list[dict]:
    """The measured and rule decisions as plain data (ints, strings, lists), for a
    checkpoint: a resumed run adopts them, so it computes with the same paths as
    the run it continues, bit for bit, instead of timing anew."""
    return [{"name": d.name, "key": [_encode(v) for v in d.key], "threads": d.threads,
             "choice": d.choice} for d in _decided.values()]


def adopt_decisions(saved: list[dict]) -> int:
    """Take the decisions `export_decisions` gave (they replace this process's own for the
    same keys); returns how many were adopted. Forced choices (LMLAB_FASTPATH) still win."""
    n = 0
    for e in saved:
        key = tuple(_decode(v) for v in e["key"])
        full = (e["name"], key, int(e["threads"]))
        _decided[full] = Decision(e["name"], key, full[2], e["choice"], "adopted from a checkpoint")
        n += 1
    return n


def clear() -> None:
    """Forget every decision and measurement, and read LMLAB_FASTPATH again (tests)."""
    global _modes
    _modes = None
    _decided.clear()
    _forced.clear()
    _trials.clear()


def synchronizer(device: torch.device) -> Callable[[], Any] | None:
    """What `choose(sync=...)` needs to time work on `device` (None on a CPU)."""
    if device.type == "cuda":
        return functools.partial(torch.cuda.synchronize, device)
    if device.type == "mps":
        return torch.mps.synchronize
    return None
