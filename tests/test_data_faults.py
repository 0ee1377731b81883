"""Faults of the data commands, as a user meets them: the real CLI, killed or interrupted.

- SIGKILL of `data process --workers 2` / `data prepare --workers 2` mid-run leaves no
  process of its tree alive (workers, fork server, Manager, resource tracker), and
  the next run of the same command removes the litter (`.tmp-` names) and completes;
- Ctrl-C (SIGINT to the process group, as a terminal sends it) ends with exit 130
  and the one line "interrupted": no traceback from any child;
- a 50 MB line is skipped quickly, with bounded memory and one English message;
- datatrove's log lines stay off without --verbose, in the workers too (stderr is a
  pipe here, not a terminal).

Runs stay mid-task without sleeps or timing guesses: the inputs are named pipes
(FIFOs), so a worker reading one waits, inside its task, until the test writes.
Processes are found through /proc (Linux only).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(),
                                reason="needs /proc to see the processes of a run")

RECIPE = """\
name: faults
normalize: {enabled: false}
language: {enabled: false}
pii: {enabled: false}
quality:
  gopher_repetition: {enabled: false}
  gopher_quality: {enabled: false}
  c4: {enabled: false}
  fineweb: {enabled: false}
dedup:
  exact: {enabled: false}
  minhash: {enabled: false}
output:
  exclusions: false
  tokens: {batch_size: 1}
"""


def lmlab(*args) -> list[str]:
    return [sys.executable, "-m", "lmlab.cli", *map(str, args)]


def records(name: str, n: int) -> bytes:
    return "".join(json.dumps({"text": f"document {i} of {name}: a few plain words to keep"})
                   + "\n" for i in range(n)).encode()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    from lmlab.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("faults-tokenizer")
    texts = [f"document {i} of a.jsonl: a few plain words to keep" for i in range(50)]
    train_tokenizer(texts * 4, vocab_size=300).save(out)
    return out


# ------------------------------------------------------------------ processes, through /proc

def _stat(pid: int) -> tuple[int, str, int] | None:
    """(ppid, state, start time) of a process, or None when there is none."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # the name, in parentheses, may hold spaces
    return int(fields[1]), fields[0], int(fields[19])


def descendants(pid: int) -> dict[int, int]:
    """{pid: start time} of every process below `pid`."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            children.setdefault(st[0], []).append(int(entry))
            starts[int(entry)] = st[2]
    found, todo = {}, list(children.get(pid, []))
    while todo:
        p = todo.pop()
        found[p] = starts[p]
        todo += children.get(p, [])
    return found


def living(procs: dict[int, int]) -> list[int]:
    """The processes among `procs` still running (a zombie has exited; a reused pid is another)."""
    out = []
    for pid, start in procs.items():
        st = _stat(pid)
        if st is not None and st[2] == start and st[1] not in "ZX":
            out.append(pid)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:150]
    except OSError:
        return "?"


def ignores_sigint(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    ignored = int(next(line.split()[1] for line in status.splitlines()
                       if line.startswith("SigIgn:")), 16)
    return bool(ignored & (1 << (signal.SIGINT - 1)))


def workers(pid: int, initialised: bool = False) -> list[int]:
    """The spawned pool workers below `pid` (those past their initializer, if `initialised`)."""
    return [q for q in descendants(pid) if "spawn_main" in cmdline(q)
            and (not initialised or ignores_sigint(q))]


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def assert_all_gone(procs: dict[int, int], timeout: float = 10.0) -> None:
    try:
        wait_for(lambda: not living(procs), timeout, "the run's processes to exit")
    except AssertionError:
        alive = living(procs)
        for pid in alive:
            os.kill(pid, signal.SIGKILL)
        raise AssertionError("still running after the run ended: "
                             + "; ".join(f"{p} {cmdline(p)}" for p in alive)) from None


# ------------------------------------------------------------------ named pipes

def open_writer(fifo: Path, timeout: float = 60.0) -> int:
    """The write end of `fifo`, once a reader has it open (the reader is then inside its task)."""
    def attempt():
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: nobody reads it yet
                raise
            return None

    fd = wait_for(attempt, timeout, f"a reader of {fifo.name}")
    os.set_blocking(fd, True)
    return fd


def feed(fifos: list[Path], data: dict[str, bytes], errors: list) -> threading.Thread:
    """Write each FIFO's data and close it (end of file), in a thread, as readers come."""
    def run():
        for f in fifos:
            try:
                fd = open_writer(f)
                os.write(fd, data[f.name])
                os.close(fd)
            except BaseException as e:  # noqa: BLE001 — reported by the test
                errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def start(cmd: list[str]) -> subprocess.Popen:
    # a session of its own, as a terminal's job is (and a process group to signal);
    # stderr a pipe: not a terminal. SIGINT as a terminal's job has it: a suite started in
    # the background by a shell without job control (`make test &`) ignores SIGINT, and
    # an ignored signal stays ignored across exec, so the Ctrl-C would never arrive
    return subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
    p.communicate()


def litter(out: Path) -> list[Path]:
    beside = list(out.parent.glob(f".{out.name}.tmp-*"))
    inside = [p for p in out.rglob(".*") if ".tmp-" in p.name] if out.is_dir() else []
    return beside + inside


def plant_litter(out: Path) -> tuple[list[Path], list[Path]]:
    """Litter an interrupted write of `out` leaves, and look-alikes that are not its litter."""
    (out / "work").mkdir(parents=True, exist_ok=True)
    ours = [out / "work" / ".x.json.tmp-dead", out.parent / f".{out.name}.tmp-dead"]
    ours[0].write_text("half")
    ours[1].mkdir()
    (ours[1] / "part").write_text("half")
    others = [out / "work" / "notes.tmp-keep", out / "work" / ".keep",
              out.parent / ".another.tmp-keep"]
    for p in others:
        p.write_text("keep")
    return ours, others


# ------------------------------------------------------------------ SIGKILL, then rerun

def test_sigkill_of_data_process_leaves_no_process_and_the_rerun_cleans_up(tmp_path, tok_dir):
    inp = tmp_path / "in"
    inp.mkdir()
    fifos = [inp / "a.jsonl", inp / "b.jsonl"]  # two files: two tasks, one per worker
    for f in fifos:
        os.mkfifo(f)
    recipe = tmp_path / "faults.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "out"
    cmd = lmlab("data", "process", "--recipe", recipe, "--input", inp, "--out", out,
                "--workers", 2, "--tokenizer", tok_dir)

    p = start(cmd)
    writers = []
    try:
        writers = [open_writer(f) for f in fifos]  # both workers are inside their tasks
        for f, fd in zip(fifos, writers):
            os.write(fd, records(f.name, 5))  # some documents, then the readers wait for more
        tree = descendants(p.pid)
        names = [cmdline(q) for q in tree]
        assert sum("forkserver" in n for n in names) >= 3, names  # the server and two workers
        assert any("resource_tracker" in n for n in names), names
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=10)
        assert_all_gone(tree)
    finally:
        for fd in writers:
            os.close(fd)
        stop(p)

    ours, others = plant_litter(out)
    errors: list = []
    feeder = feed(fifos, {f.name: records(f.name, 20) for f in fifos}, errors)
    p = start(cmd)
    try:
        stdout, stderr = p.communicate(timeout=120)
    finally:
        stop(p)
    feeder.join(timeout=5)
    assert p.returncode == 0 and not errors, (stderr, errors)
    assert "Traceback" not in stderr
    # datatrove's own lines ("... | INFO | datatrove...") stay off without --verbose
    assert "datatrove" not in stderr and "| INFO" not in stderr, stderr
    assert litter(out) == [] and not any(path.exists() for path in ours)
    assert all(path.exists() for path in others)  # look-alikes that are not its litter stay
    report = json.loads((out / "report.json").read_text())
    assert report["documents_out"] == 40


def test_sigkill_of_data_prepare_leaves_no_process_and_the_rerun_cleans_up(tmp_path, tok_dir):
    inp = tmp_path / "in"
    inp.mkdir()
    fifo = inp / "a.jsonl"
    os.mkfifo(fifo)
    out = tmp_path / "shards"
    cmd = lmlab("data", "prepare", "--input", inp, "--tokenizer", tok_dir, "--out", out,
                "--workers", 2)

    p = start(cmd)
    fd = None
    try:
        fd = open_writer(fifo)  # reading has begun: the pool is started
        os.write(fd, records("a", 5))
        # initialised: the initializer has run (it makes them ignore SIGINT)
        wait_for(lambda: len(workers(p.pid, initialised=True)) >= 2, 30, "two workers")
        tree = descendants(p.pid)
        assert any("resource_tracker" in cmdline(q) for q in tree)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=10)
        assert_all_gone(tree)
    finally:
        if fd is not None:
            os.close(fd)
        stop(p)
    assert litter(out), "the killed run wrote into a temporary directory beside --out"

    errors: list = []
    feeder = feed([fifo], {fifo.name: records("a", 30)}, errors)
    p = start(cmd)
    try:
        stdout, stderr = p.communicate(timeout=60)
    finally:
        stop(p)
    feeder.join(timeout=5)
    assert p.returncode == 0 and not errors, (stderr, errors)
    assert "Traceback" not in stderr
    assert litter(out) == []
    assert json.loads((out / "meta.json").read_text())["documents"] == 30


# ------------------------------------------------------------------ Ctrl-C

def test_ctrl_c_of_data_process_is_one_line_and_exit_130(tmp_path, tok_dir):
    inp = tmp_path / "in"
    inp.mkdir()
    fifos = [inp / "a.jsonl", inp / "b.jsonl"]
    for f in fifos:
        os.mkfifo(f)
    recipe = tmp_path / "faults.yaml"
    recipe.write_text(RECIPE)
    p = start(lmlab("data", "process", "--recipe", recipe, "--input", inp,
                    "--out", tmp_path / "out", "--workers", 2))
    writers = []
    try:
        writers = [open_writer(f) for f in fifos]
        for f, fd in zip(fifos, writers):
            os.write(fd, records(f.name, 5))
        tree = descendants(p.pid)
        os.killpg(p.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        stdout, stderr = p.communicate(timeout=30)
    finally:
        for fd in writers:
            os.close(fd)
        stop(p)
    assert p.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["interrupted"], stderr
    assert_all_gone(tree)


def test_ctrl_c_of_data_prepare_is_one_line_and_exit_130(tmp_path, tok_dir):
    inp = tmp_path / "in"
    inp.mkdir()
    fifo = inp / "a.jsonl"
    os.mkfifo(fifo)
    out = tmp_path / "shards"
    p = start(lmlab("data", "prepare", "--input", inp, "--tokenizer", tok_dir, "--out", out,
                    "--workers", 2))
    fd = None
    try:
        fd = open_writer(fifo)
        os.write(fd, records("a", 5))
        # the workers may still be starting: they must not take the Ctrl-C either
        wait_for(lambda: len(workers(p.pid)) >= 2, 30, "two workers")
        tree = descendants(p.pid)
        os.killpg(p.pid, signal.SIGINT)
        stdout, stderr = p.communicate(timeout=30)
    finally:
        if fd is not None:
            os.close(fd)
        stop(p)
    assert p.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["interrupted"], stderr
    assert_all_gone(tree)
    assert litter(out) == [] and not (out / "meta.json").exists()


# ------------------------------------------------------------------ a 50 MB line

def test_a_50_mb_line_is_skipped_quickly_with_bounded_memory(tmp_path, tok_dir):
    inp = tmp_path / "in"
    inp.mkdir()
    huge = "x" * (50 * 1000 * 1000)
    (inp / "big.txt").write_text(f"intro line\n{huge}\noutro line\n")
    (inp / "big.jsonl").write_text(json.dumps({"text": "before"}) + "\n"
                                   + json.dumps({"text": huge}) + "\n"
                                   + json.dumps({"text": "after"}) + "\n")
    del huge
    out = tmp_path / "shards"
    # peak memory of the command alone: measured by a parent that has no other children
    probe = ("import json, resource, subprocess, sys, time\n"
             "t = time.monotonic()\n"
             "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
             "print(json.dumps({'rc': r.returncode, 'stderr': r.stderr, "
             "'seconds': time.monotonic() - t, "
             "'peak_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))\n")
    r = subprocess.run([sys.executable, "-c", probe,
                        *lmlab("data", "prepare", "--input", inp, "--tokenizer", tok_dir,
                               "--out", out)], capture_output=True, text=True, timeout=120)
    m = json.loads(r.stdout)
    assert m["rc"] == 0, m["stderr"]
    assert m["peak_mb"] < 500, m  # the line read and tokenized took 8.6 GB
    assert m["seconds"] < 30, m
    lines = [line for line in m["stderr"].splitlines() if line.strip()]
    skipped = [line for line in lines if line.startswith("skipped")]
    assert len(skipped) == 2, lines
    jsonl_line = len(json.dumps({"text": "x"})) - 1 + 50 * 1000 * 1000
    for name, n, line in (("big.jsonl", jsonl_line, skipped[0]),
                          ("big.txt", 50 * 1000 * 1000, skipped[1])):
        assert line.startswith(f"skipped {inp / name}:2: line longer than 4 MiB "
                               f"({n:,} bytes) — "), line
    assert "Traceback" not in m["stderr"]
    assert json.loads((out / "meta.json").read_text())["documents"] == 3


def test_skip_messages_read_as_english(tmp_path):
    from lmlab.data.sources import ReadStats, iter_documents

    path = tmp_path / "x.jsonl"
    path.write_text('{"text": [1]}\n{"text": {"a": 1}}\n[1]\n{"text": 3}\nnull\n{"text": "ok"}\n')
    stats = ReadStats()
    list(iter_documents([str(path)], stats=stats))
    whats = [m.split(": ", 1)[1].split(" — ")[0] for m in stats.problems]
    assert whats == ["field 'text' is an array, not a string",
                     "field 'text' is an object, not a string",
                     "a JSON array, not an object",
                     "field 'text' is a number, not a string",
                     "null, not an object"]


def test_long_lines_are_dropped_exactly_whatever_the_chunks():
    """The line filter against the obvious (whole-file) rule, on random lines near the limit."""
    import io
    import random

    from lmlab.data.sources import _LongLinesDropped

    rng = random.Random(0)
    for _ in range(2000):
        limit = rng.randint(1, 40)
        lines = [b"ab" * rng.choice([0, 1, limit // 2, (limit + 1) // 2, limit, 2 * limit])
                 for _ in range(rng.randint(0, 10))]
        data = b"\n".join(lines) + rng.choice([b"", b"\n"])
        skipped: list = []
        stream = _LongLinesDropped(io.BytesIO(data), limit,
                                   lambda n, size: skipped.append((n, size)))
        out = b""
        while piece := stream.read(rng.randint(1, 50)):
            out += piece
        parts = data.split(b"\n")
        assert out == b"\n".join(p if len(p) <= limit else b"" for p in parts)
        assert skipped == [(i, len(p)) for i, p in enumerate(parts, 1) if len(p) > limit]


def test_the_line_limit_is_checked_before_any_reading(tmp_path):
    from lmlab.data.pipeline.recipe import load_recipe
    from lmlab.data.sources import iter_documents
    from lmlab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^--max-line-bytes 0: must be a whole number"):
        iter_documents([str(tmp_path / "missing")], max_line_bytes=0)  # raises at the call
    with pytest.raises(ConfigError, match="input.max_line_bytes"):
        load_recipe({"input": {"max_line_bytes": -1}})
    (tmp_path / "a.txt").write_text("short\n" + "y" * 50 + "\nend\n")
    from lmlab.data.sources import ReadStats

    stats = ReadStats()
    [doc] = iter_documents([str(tmp_path / "a.txt")], stats=stats, max_line_bytes=10)
    assert doc.text == "short\n\nend\n"  # the long line is gone, its place (line 2) kept
    assert stats.problems == [f"{tmp_path / 'a.txt'}:2: line longer than 10 bytes (50 bytes) — "
                              "split it, or raise the limit (--max-line-bytes; in a recipe "
                              "input.max_line_bytes)"]


@pytest.mark.parametrize("poll", [False, True], ids=["prctl", "watchdog"])
def test_a_child_dies_with_its_parent(poll):
    """`procs.die_with_parent`: by the kernel (Linux), or by the watchdog thread (elsewhere)."""
    child = ("import sys, time; from lmlab import procs; "
             f"procs.die_with_parent(int(sys.argv[1]), poll={poll}); print('ready', flush=True); "
             "time.sleep(60)")
    parent = ("import os, subprocess, sys; "
              f"c = subprocess.Popen([sys.executable, '-c', {child!r}, str(os.getpid())], "
              "stdout=subprocess.PIPE, text=True); "
              "c.stdout.readline(); print(c.pid, flush=True); "
              "import time; time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        pid = int(p.stdout.readline())
        tree = descendants(p.pid)
        assert pid in tree
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        assert_all_gone(tree, timeout=5)
    finally:
        stop(p)
