"""Preloaded by datatrove's fork server (`run._preload_workers`): the server and each worker
it forks die with the lmlab process that started it, and leave Ctrl-C to that process.

The workers of a `data process --workers N` phase are forked by a fork server, so
their parent is the server, not lmlab; and the server lives as long as any process
holds its "alive" pipe, which every worker does. Without this a killed lmlab left
the server waiting for its workers and the workers finishing their tasks. Here:

- the server dies with the lmlab process (`procs.die_with_parent`), and ignores
  Ctrl-C from the start (the server's own main loop would only do so after
  this import, and a worker restores the handlers the server found: SIG_IGN);
- every child it forks dies with it (an at-fork hook), so a kill of lmlab takes
  server and workers down at once; the resource tracker, whose pipe they all held,
  then exits by itself.

Only the fork server acts on this import: lmlab names itself its parent in the
environment (`PARENT_ENV`) while it starts the server (and only then, so no other
child inherits it), and any other importer leaves everything as it was.
"""

from __future__ import annotations

import os

from lmlab import procs

PARENT_ENV = "LMLAB_FORKSERVER_PARENT"

_server: int | None = None  # this process's pid when it is the fork server


def _in_child() -> None:
    global _server
    if _server is not None:  # a worker, just forked by the server (its own forks: its business)
        parent, _server = _server, None
        procs.die_with_parent(parent)


def _setup() -> None:
    global _server
    try:
        parent = int(os.environ.get(PARENT_ENV, ""))
    except ValueError:
        return
    if parent != os.getppid():  # not the fork server lmlab started (or lmlab is gone: the
        return                  # server then exits by itself, its alive pipe being closed)
    procs.ignore_sigint()
    procs.die_with_parent(parent)
    _server = os.getpid()
    os.register_at_fork(after_in_child=_in_child)


_setup()
