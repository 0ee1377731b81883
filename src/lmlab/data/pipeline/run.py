"""`run_recipe`: turn a recipe into datatrove pipelines and run them.

A run is up to four datatrove phases, each an executor whose tasks a re-run
skips once they are complete (datatrove's `completions/` markers under
`<out>/work/logs/<phase>`), so a crashed run resumes where it stopped:

    filter    T tasks   read → normalise → language → quality → PII → decontaminate
                        → dedup signatures → intermediate JSONL          (no dedup: → outputs)
    buckets   W tasks   BandBuckets: colliding pairs per band, bands dealt over the workers
    clusters  1 task    union-find over MinHash pairs + exact hashes      (any dedup on)
    final     T tasks   intermediate JSONL → drop duplicates → outputs

"outputs" are: kept documents as JSONL (`documents/`), token shards (`tokens/`).
After the phases, per-task token shards are merged and the report written.
Output layout under `out_dir`:

    documents/*.jsonl.gz   kept documents: {"id", "text", "metadata"}
    tokens/                lmlab token shards (train/val), when enabled
    excluded/<filter>/     removed documents, per filter, with metadata.filter_reason
    report.json, report.html, charts/*.png
    recipe.yaml            the resolved recipe
    work/                  intermediate files, logs, per-task counters
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import yaml
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.writers import JsonlWriter

from lmlab import procs
from lmlab.data.pipeline.decontam import DecontaminationFilter
from lmlab.data.pipeline.dedup import (
    BandBuckets,
    DedupSignatures,
    DuplicateClusters,
    DuplicateFilter,
    minhash_config,
)
from lmlab.data.pipeline.language import LanguageFilter
from lmlab.data.pipeline.meter import Meter
from lmlab.data.pipeline.normalize import Normalizer
from lmlab.data.pipeline.pii import PIIMasker
from lmlab.data.pipeline.quality import build_quality_filters
from lmlab.data.pipeline.read import RankJsonlReader, SourceReader, expand_inputs
from lmlab.data.pipeline.recipe import load_recipe
from lmlab.data.pipeline.tokens import TokenShardStep, merge_token_shards
from lmlab.errors import ConfigError, InputError
from lmlab.fileio import atomic_write_text
from lmlab.outputs import absolute, claim_output_dir

log = logging.getLogger(__name__)

EXECUTORS = ("local", "ray", "slurm")


def _cheap_task_loggers() -> None:
    """Make datatrove's per-task logger setup cost microseconds instead of ~20 ms.

    datatrove's executor removes and re-adds its loguru sinks at the start of
    every task, and each `logger.add` makes a loguru ExceptionFormatter, which
    recomputes the interpreter's library directories from `sysconfig` (~6.5 ms,
    three sinks per task). A MinHash run has one task per band, so on a small
    corpus that setup was a fifth of the whole run. The directories cannot
    change within a process: remember them. (Guarded: a loguru without this
    method is left as it is.)
    """
    import functools

    try:
        from loguru._better_exceptions import ExceptionFormatter
    except ImportError:
        return
    get = ExceptionFormatter.__dict__.get("_get_lib_dirs")
    if isinstance(get, staticmethod) and not hasattr(get.__func__, "cache_info"):
        ExceptionFormatter._get_lib_dirs = staticmethod(functools.lru_cache(maxsize=1)(get.__func__))


class _Layout:
    def __init__(self, out: Path):
        self.out = out
        self.work = out / "work"
        self.meters = self.work / "meters"
        self.logs = self.work / "logs"
        self.read = self.work / "read"
        self.language = self.work / "language"
        self.filtered = self.work / "filtered"
        self.exact = self.work / "dedup" / "exact"
        self.sigs = self.work / "dedup" / "minhash_sigs"
        self.pairs = self.work / "dedup" / "minhash_pairs"
        self.clusters = self.work / "dedup" / "clusters"
        self.paragraphs = self.work / "dedup" / "paragraphs"
        self.task_tokens = self.work / "tokens"
        self.documents = out / "documents"
        self.tokens = out / "tokens"
        self.excluded = out / "excluded"


def _jsonl(folder: Path, compression: str | None = "gzip") -> JsonlWriter:
    return JsonlWriter(str(folder), output_filename="${rank}.jsonl", compression=compression)


class _Builder:
    """Collects the steps of a phase, putting a Meter after each stage."""

    def __init__(self, layout: _Layout, recipe: dict):
        self.L, self.r = layout, recipe
        self.order = 0
        self.exclusions = recipe["output"]["exclusions"]

    def excluded(self, name: str) -> JsonlWriter | None:
        return _jsonl(self.L.excluded / name) if self.exclusions else None

    def metered(self, steps: list, stage: str, step, histogram: bool = False) -> None:
        if step is not None:
            steps.append(step)
        steps.append(Meter(str(self.L.meters), stage, self.order, histogram=histogram))
        self.order += 1

    def filter_steps(self, files: list[str]) -> list:
        r, L, steps = self.r, self.L, []
        inp = r["input"]
        self.metered(steps, "read", SourceReader(files, str(L.read), inp["text_field"], inp["id_field"],
                                                 inp["strict"], inp["max_line_bytes"]),
                     histogram=True)
        n = r["normalize"]
        if n["enabled"]:
            self.metered(steps, "normalize", Normalizer(
                n["nfkc"], n["whitespace"], n["control_chars"], n["traditional_to_simplified"],
                exclusion_writer=self.excluded("normalize")))
        lang = r["language"]
        if lang["enabled"]:
            self.metered(steps, "language", LanguageFilter(
                lang["keep"], lang["min_score"], lang["model"], lang["max_chars"],
                report_folder=str(L.language), exclusion_writer=self.excluded("language")))
        for f in build_quality_filters(r["quality"], self.excluded):
            self.metered(steps, f.lmlab_name, f)
        p = r["pii"]
        if p["enabled"]:
            kinds = {k: p["replacements"].get(k, f"<{k.upper()}>")
                     for k in ("email", "ip", "phone", "cn_id", "bank_card") if p[k]}
            self.metered(steps, "pii", PIIMasker(kinds, p["max_hits"], exclusion_writer=self.excluded("pii")))
        d = r["decontamination"]
        if d["enabled"]:
            self.metered(steps, "decontamination", DecontaminationFilter(
                d["eval_files"], d["ngram"], d["unit"], inp["text_field"],
                exclusion_writer=self.excluded("decontamination")))
        return steps

    def output_steps(self, tokenizer_dir: str | None) -> list:
        o, steps = self.r["output"], []
        if o["tokens"]["enabled"]:
            steps.append(TokenShardStep(tokenizer_dir, str(self.L.task_tokens),
                                        o["tokens"]["val_fraction"], o["tokens"]["batch_size"],
                                        o["tokens"]["seed"]))
        if o["documents"]:
            steps.append(_jsonl(self.L.documents))
        self.metered(steps, "output", None, histogram=True)
        return steps


def _preload_workers() -> None:
    """Import the pipeline's modules once in datatrove's fork server, not in every worker.

    The local executor starts a fresh pool of worker processes for each phase
    from a fork server (safe with threads, unlike a plain fork). Each worker
    then unpickles the pipeline, importing lmlab, datatrove and numpy anew:
    about a second per phase on 2 cores, paid four times per run. Modules
    preloaded in the fork server are inherited by every worker instead. Only
    takes effect before the server's first start (once per process).
    """
    try:
        import multiprocess.forkserver as fs
    except ImportError:
        return
    from lmlab.data.pipeline import forkserver

    # the server and its workers die with this process and ignore Ctrl-C (forkserver.py);
    # started here, with SIGINT blocked, so that no Ctrl-C reaches it while it imports. The
    # variable naming this process is set for the start only: no later child inherits it
    fs.set_forkserver_preload(["lmlab.data.pipeline.forkserver", "lmlab.data.pipeline.run"])
    old = os.environ.get(forkserver.PARENT_ENV)
    os.environ[forkserver.PARENT_ENV] = str(os.getpid())
    try:
        with procs.sigint_blocked():
            fs.ensure_running()
    finally:
        if old is None:
            del os.environ[forkserver.PARENT_ENV]
        else:
            os.environ[forkserver.PARENT_ENV] = old


def _loguru_enabled(module: str) -> bool:
    """Whether loguru lets records of `module` through in this process: off after
    `logger.disable(module)` (the CLI's way of hiding datatrove's lines without --verbose).

    loguru has no public getter for this, so its activation list is read the way loguru
    reads it (most specific prefix first); a loguru without one counts as enabled.
    """
    from loguru import logger

    name = module + "."
    for prefix, enabled in getattr(getattr(logger, "_core", None), "activation_list", None) or ():
        if name[: len(prefix)] == prefix:
            return bool(enabled)
    return True


class _LocalExecutor(LocalPipelineExecutor):
    """datatrove's local executor, whose tasks keep datatrove's log lines off in the worker
    processes too when they are off here (`datatrove_logs=False`): a worker is a fresh
    interpreter (forked by the fork server), where loguru starts with everything on."""

    def __init__(self, *args, datatrove_logs: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.datatrove_logs = datatrove_logs

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
        if not self.datatrove_logs:  # before the task's logger setup logs its first line
            from loguru import logger

            logger.disable("datatrove")
        return super()._run_for_rank(rank, local_rank, node_rank)


def _executor(kind: str, recipe: dict, pipeline: list, tasks: int, workers: int, logs: Path,
              name: str, depends=None):
    if kind == "local":
        if workers > 1 and tasks > 1:
            _preload_workers()
        return _LocalExecutor(pipeline, tasks=tasks, workers=max(1, min(workers, tasks)),
                              logging_dir=str(logs / name), depends=depends,
                              datatrove_logs=_loguru_enabled("datatrove"))
    if kind == "ray":
        from datatrove.executor import RayPipelineExecutor

        ray_cfg = recipe["executor"]["ray"]
        return RayPipelineExecutor(pipeline, tasks=tasks, workers=max(1, min(workers, tasks)),
                                   logging_dir=str(logs / name), depends=depends, **ray_cfg)
    if kind == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        s = dict(recipe["executor"]["slurm"])
        if not s.get("partition"):
            raise ConfigError("executor slurm: set executor.slurm.partition in the recipe")
        return SlurmPipelineExecutor(pipeline, tasks=tasks, workers=workers if workers > 1 else -1,
                                     logging_dir=str(logs / name), depends=depends,
                                     job_name=f"lmlab-{name}", **{k: v for k, v in s.items() if v is not None})
    raise ConfigError(f"executor {kind!r}: choose one of {', '.join(EXECUTORS)}")


class _Finalize:
    """Last step of a run (a 1-task phase on Slurm, a call elsewhere): merge shards, write report."""

    def __init__(self, out: str, recipe: dict, tokens: bool):
        self.out, self.recipe, self.tokens = out, recipe, tokens
        self.seconds: dict[str, float] = {}

    def __call__(self, data=None, rank: int = 0, world_size: int = 1):
        from lmlab.data.pipeline.report import write_report

        L = _Layout(Path(self.out))
        meta = {}
        if self.tokens:
            meta = merge_token_shards(sorted(p for p in L.task_tokens.glob("*") if p.is_dir()), L.tokens,
                                      extra_meta={"recipe": self.recipe["name"]})
        self.report = write_report(L.out, self.recipe, token_meta=meta, seconds=self.seconds)
        return iter(())


def _watch(layout: _Layout, phase: str, progress: Callable, stop: threading.Event) -> None:
    """Main-process thread: sums the meters' files and calls progress(event) about once a second."""
    import json

    t0 = time.time()
    while True:
        stopped = stop.wait(1.0)  # one last report after the phase ends: the final counts
        stages: dict[str, dict] = {}
        for f in layout.meters.glob("*/*.json"):
            try:
                m = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            s = stages.setdefault(m["stage"], {"order": m["order"], "documents": 0, "bytes": 0})
            s["documents"] += m["documents"]
            s["bytes"] += m["bytes"]
        try:
            progress({"phase": phase, "elapsed": time.time() - t0,
                      "stages": dict(sorted(stages.items(), key=lambda kv: kv[1]["order"]))})
        except Exception:  # a broken progress display must not stop the run
            log.exception("progress callback failed")
        if stopped:
            return


def run_recipe(recipe_path_or_dict, inputs: list[str], out_dir: str, workers: int = 1,
               executor: str = "local", tokenizer_dir: str | None = None,
               progress: Callable[[dict], None] | None = None, overwrite: bool = False) -> dict:
    """Run a data recipe over the input files; returns the report (also written to out_dir).

    progress, if given, is called from a background thread of this process about
    once a second with {"phase", "elapsed", "stages": {stage: {"order", "documents",
    "bytes"}}} — cumulative counts over all tasks, from which a caller shows
    documents/s per stage. With executor "slurm" the jobs are submitted and this
    returns {"submitted": [...]}: the last job writes the report.

    Rerunning the same recipe on the same inputs into the same `out_dir` resumes it
    (finished tasks are kept); an `out_dir` holding anything else is refused unless
    `overwrite` (`lmlab.outputs.claim_output_dir`).
    """
    recipe = load_recipe(recipe_path_or_dict)
    _cheap_task_loggers()
    if executor not in EXECUTORS:
        raise ConfigError(f"executor {executor!r}: choose one of {', '.join(EXECUTORS)}")
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    tok = recipe["output"]["tokens"]
    tokenizer_dir = tokenizer_dir or tok["tokenizer"]
    if tok["enabled"] and not tokenizer_dir:
        raise ConfigError("recipe: output.tokens is enabled but no tokenizer was given "
                          "(output.tokens.tokenizer, or the tokenizer_dir argument)")
    if tokenizer_dir:
        from lmlab.tokenizer import Tokenizer

        Tokenizer.load(tokenizer_dir)  # fail now, not in a worker
        tok["tokenizer"] = str(tokenizer_dir)
        tok["enabled"] = True

    files = expand_inputs(inputs)
    tasks = recipe["executor"]["tasks"] or workers
    tasks = max(1, min(int(tasks), len(files)))
    # the same recipe, files and task count resume; anything else is another output
    claim = claim_output_dir(out_dir, "data process", reads=[*inputs, tokenizer_dir],
                             overwrite=overwrite, inputs={
                                 "recipe": recipe, "input": [absolute(f) for f in files],
                                 "tasks": tasks})
    claim.clear()
    claim.record()
    L = _Layout(Path(out_dir).resolve())
    L.work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(L.out / "recipe.yaml",
                      yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True))

    b = _Builder(L, recipe)
    exact_on = recipe["dedup"]["exact"]["enabled"]
    mh = recipe["dedup"]["minhash"]
    para_on = recipe["dedup"]["paragraph"]["enabled"]
    dedup_on = exact_on or mh["enabled"] or para_on
    phases: list[tuple[str, list, int]] = []
    first = b.filter_steps(files)
    if dedup_on:
        first.append(DedupSignatures(str(L.exact) if exact_on else None,
                                     str(L.sigs) if mh["enabled"] else None,
                                     mh["bands"], mh["rows"], mh["ngram"], mh["unit"], mh["seed"],
                                     paragraph_folder=str(L.paragraphs) if para_on else None))
        first.append(_jsonl(L.filtered, compression=None))  # read back once: not worth compressing
        phases.append(("filter", first, tasks))
        if mh["enabled"]:
            phases.append(("buckets", [BandBuckets(
                str(L.sigs), str(L.pairs), minhash_config(mh["bands"], mh["rows"], mh["seed"], mh["ngram"]))],
                min(mh["bands"], workers)))
        phases.append(("clusters", [DuplicateClusters(str(L.exact) if exact_on else None,
                                                      str(L.pairs) if mh["enabled"] else None,
                                                      str(L.clusters), str(L.sigs) if mh["enabled"] else None,
                                                      mh["min_similarity"],
                                                      str(L.paragraphs) if para_on else None)], 1))
        final = [RankJsonlReader(str(L.filtered), add_file_path=False)]
        b.metered(final, "dedup", DuplicateFilter(str(L.clusters), {
            "exact_duplicate": b.excluded("exact_duplicate"),
            "near_duplicate": b.excluded("near_duplicate"),
            "paragraph_duplicate": b.excluded("paragraph_duplicate") if para_on else None}))
        final += b.output_steps(tokenizer_dir)
        phases.append(("final", final, tasks))
    else:
        phases.append(("filter", first + b.output_steps(tokenizer_dir), tasks))

    finalize = _Finalize(str(L.out), recipe, tok["enabled"])
    if executor == "slurm":
        prev = None
        for name, steps, n in phases + [("report", [finalize], 1)]:
            prev = _executor("slurm", recipe, steps, n, workers, L.logs, name, depends=prev)
        prev.run()
        return {"submitted": [name for name, _, _ in phases] + ["report"], "out_dir": str(L.out)}

    for name, steps, n in phases:
        log.info("phase %s: %d task(s)", name, n)
        stop = threading.Event()
        watcher = None
        if progress is not None:
            watcher = threading.Thread(target=_watch, args=(L, name, progress, stop), daemon=True)
            watcher.start()
        t0 = time.perf_counter()
        try:
            # datatrove's Manager process is forked from this one: it must die with it too
            with procs.forked_children_die_with_us():
                _executor(executor, recipe, steps, n, workers, L.logs, name).run()
            finalize.seconds[name] = round(time.perf_counter() - t0, 3)
        finally:
            stop.set()
            if watcher is not None:
                watcher.join()
    finalize()
    if finalize.report["documents_in"] == 0:
        problems = finalize.report["read"]["problems"]
        raise InputError(f"no documents read from {', '.join(inputs)}"
                         + (f"; first problem: {problems[0]}" if problems else "")
                         + f" (see {L.out / 'report.json'})")
    return finalize.report
