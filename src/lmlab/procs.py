"""Worker processes that die with the process that started them, and leave Ctrl-C to it.

lmlab starts workers for `data prepare --workers N` (a ProcessPoolExecutor,
spawned) and `data process --workers N` (datatrove's `multiprocess` pool, forked
by a fork server, beside a Manager process forked from the main one). When the
main process is killed outright (SIGKILL, the OOM killer), no code of it runs to
stop them, and a worker busy with a task would run on, an orphan. So:

- `die_with_parent(pid)`, called in the child: on Linux the kernel kills it the
  moment its parent exits (`prctl(PR_SET_PDEATHSIG, SIGKILL)`, through ctypes:
  no library offers it); elsewhere (macOS has no such call) a daemon thread polls
  `os.getppid()`, which changes when an orphan is re-parented. Either way a
  parent already gone when the call is made is noticed at once.
  Caveat of prctl: "parent" is the *thread* that created the child. lmlab creates
  workers from the thread that runs the command and keeps them no longer than it.
- `init_worker(parent_pid, initializer, *args)`: the initializer to give a pool;
  the worker ignores SIGINT (a terminal's Ctrl-C goes to the whole process group:
  the parent shuts its workers down, and a worker that raised KeyboardInterrupt
  would print a traceback of its own), then dies with its parent, then runs
  `initializer(*args)`.
- `sigint_blocked()`: around starting children, so they are born with SIGINT
  blocked (the signal mask survives fork and exec) until they ignore it: no
  Ctrl-C lands in a child while it is still importing. The parent still gets
  its Ctrl-C: a blocked signal waits, it is not lost.
- `forked_children_die_with_us()`: while active, every child this process forks
  (os.fork: multiprocessing's "fork" start method, e.g. a Manager) dies with it.

A fork server, which forks the workers of a pool, is a process of its own: it
must die with the main process, and its children with it
(`lmlab.data.pipeline.forkserver` does both).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import sys
import threading
import time
from typing import Callable, Iterator

_PR_SET_PDEATHSIG = 1   # from <linux/prctl.h>
_POLL_S = 0.5           # how often the fallback watchdog looks at its parent


@functools.lru_cache(maxsize=1)
def _prctl() -> Callable | None:
    """libc's prctl on Linux, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    fn.restype = ctypes.c_int
    return fn


def _die() -> None:
    if hasattr(signal, "SIGKILL"):
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(1)  # Windows: no SIGKILL


def _watch_parent(parent_pid: int) -> None:
    """Fallback where prctl is missing: a thread that kills this process once it is orphaned."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_POLL_S)
        _die()

    threading.Thread(target=watch, name="lmlab-die-with-parent", daemon=True).start()


def die_with_parent(parent_pid: int | None = None, poll: bool = False) -> None:
    """Make this process die (SIGKILL) as soon as its parent, `parent_pid`, exits.

    `parent_pid` is the parent's pid as the parent knew it when it started this
    process (default: the current parent); a process whose parent is already gone
    dies at once. `poll` uses the watchdog thread even where prctl exists (for a
    child forked by a thread that may exit before the process does).
    """
    expected = os.getppid() if parent_pid is None else parent_pid
    prctl = None if poll else _prctl()
    if prctl is None or prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        _watch_parent(expected)
    if os.getppid() != expected:  # the parent exited before the kernel was told to watch it
        _die()


def ignore_sigint() -> None:
    """Ignore Ctrl-C in this process (a worker: its parent decides), and unblock the signal,
    which `sigint_blocked` held back while this process started (a pending one is dropped)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def init_worker(parent_pid: int, initializer: Callable | None = None, *initargs) -> None:
    """Pool initializer: ignore Ctrl-C, die with `parent_pid`, then `initializer(*initargs)`.

        ProcessPoolExecutor(n, initializer=procs.init_worker,
                            initargs=(os.getpid(), my_init, arg1, arg2))
    """
    ignore_sigint()
    die_with_parent(parent_pid)
    if initializer is not None:
        initializer(*initargs)


@contextlib.contextmanager
def sigint_blocked() -> Iterator[None]:
    """Block SIGINT in this thread for the block: children started in it inherit the mask
    and so take no Ctrl-C before they ignore it (`ignore_sigint`). A SIGINT that arrives
    meanwhile waits and is delivered here when the block ends."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks, no fork either
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


_guard_depth = 0                # > 0 while forked_children_die_with_us is active
_fork_from: tuple[int, bool] = (0, True)  # (pid, from the main thread?) of the forking process
_hooks_registered = False
_hooks_lock = threading.Lock()


def _before_fork() -> None:
    global _fork_from
    _fork_from = (os.getpid(), threading.current_thread() is threading.main_thread())


def _after_fork_in_child() -> None:
    global _guard_depth
    if _guard_depth > 0:
        _guard_depth = 0  # the child's own forks are its own business
        parent, from_main_thread = _fork_from
        die_with_parent(parent, poll=not from_main_thread)


@contextlib.contextmanager
def forked_children_die_with_us() -> Iterator[None]:
    """While active, each child this process forks dies with it (see `die_with_parent`).

    For children started by code that takes no initializer, such as datatrove's
    `multiprocess.Manager()`. Children of spawn or forkserver start methods are
    not forked by this process; give those `init_worker`.
    """
    global _guard_depth, _hooks_registered
    if not hasattr(os, "register_at_fork"):
        yield
        return
    with _hooks_lock:
        if not _hooks_registered:
            os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
            _hooks_registered = True
        _guard_depth += 1
    _prctl()  # looked up here, not in every child
    try:
        yield
    finally:
        with _hooks_lock:
            _guard_depth -= 1
