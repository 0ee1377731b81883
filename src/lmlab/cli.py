"""The `lmlab` command: parse arguments, call the library, show progress and a summary.

Thin on purpose: every command is a few lines that call a library function, so
everything the CLI does can be done from Python too. The CLI owns the terminal
(progress bars, tables); the library only logs. Errors a user caused
(`LmlabError`) are printed as one line and exit with status 2, no traceback.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Callable

from argparse import RawDescriptionHelpFormatter

from jsonargparse import ArgumentParser as _ArgumentParser
from jsonargparse import DefaultHelpFormatter
from rich.console import Console
from rich.table import Table

from lmlab.errors import LmlabError

console = Console(stderr=True, highlight=False)
out = Console(highlight=False)

COMMANDS: dict[str, Callable] = {}


class _Formatter(DefaultHelpFormatter, RawDescriptionHelpFormatter):
    """Keep the line breaks of descriptions, so examples print as written."""


def ArgumentParser(**kw) -> _ArgumentParser:
    return _ArgumentParser(formatter_class=_Formatter, **kw)


def command(name: str):
    def register(fn):
        COMMANDS[name] = fn
        return fn
    return register


def progress_bar(total=None, unit="docs"):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn,
                               TextColumn, TimeElapsedColumn, TimeRemainingColumn)
    cols = [TextColumn("[bold]{task.description}"), BarColumn()]
    cols += [MofNCompleteColumn(), TaskProgressColumn()] if total else []
    cols += [TextColumn("{task.fields[info]}"), TimeElapsedColumn()]
    cols += [TimeRemainingColumn()] if total else []
    return Progress(*cols, console=console, transient=False)


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
    from lmlab.tokenizer import train_tokenizer

    stats = ReadStats()
    t0 = time.time()
    with progress_bar() as bar:
        task = bar.add_task("reading + training", total=None, info="")

        def texts():
            for i, doc in enumerate(iter_documents(a.input, text_field=a.text_field,
                                                   strict=a.strict, stats=stats)):
                if i % 200 == 0:
                    bar.update(task, completed=i, info=f"{stats.bytes / 1e6:.1f} MB")
                yield doc.text

        tok = train_tokenizer(texts(), a.vocab_size, min_frequency=a.min_frequency)
    tok.save(a.out)
    _print_read_problems(stats)
    out.print(summary_table(f"tokenizer → {a.out}", [
        ("documents", stats.documents),
        ("bytes", stats.bytes),
        ("vocab size", tok.vocab_size),
        ("special tokens", " ".join(_special_tokens())),
        ("seconds", f"{time.time() - t0:.1f}"),
    ]))
    return 0


def _special_tokens():
    from lmlab.tokenizer import SPECIAL_TOKENS
    return SPECIAL_TOKENS


def _print_read_problems(stats) -> None:
    for msg in stats.problems[:20]:
        console.print(f"[yellow]skipped[/yellow] {msg}", markup=True, highlight=False)
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
                    text_field=a.text_field, strict=a.strict, seed=a.seed, progress=on_progress)
    _print_read_problems(r.stats)
    out.print(summary_table(f"token shards → {a.out}", r.summary_rows()))
    return 0


# ------------------------------------------------------------------ Hugging Face

@command("export-hf")
def cmd_export_hf(a) -> int:
    from lmlab.interop.hf import export_hf

    arch = export_hf(a.model, a.out)
    out.print(f"wrote {arch} to {a.out}; load it with "
              f"transformers.AutoModelForCausalLM.from_pretrained({str(a.out)!r})")
    return 0


@command("import-hf")
def cmd_import_hf(a) -> int:
    from lmlab.interop.hf import import_hf

    model = import_hf(a.hf_dir, a.out)
    out.print(f"wrote lmlab model ({model.num_params():,} parameters) to {a.out}")
    return 0


# ------------------------------------------------------------------ parser

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
    t.add_argument("--input", type=str, required=True, nargs="+",
                   help="files or directories (.txt .md .py .jsonl[.gz|.zst] .parquet ...)")
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--out", type=str, required=True, help="output directory")
    t.add_argument("--min-frequency", type=int, default=2)
    t.add_argument("--text-field", type=str, default="text", help="JSONL/Parquet text field")
    t.add_argument("--strict", action="store_true", help="stop at the first bad record")
    tok_sub.add_subcommand("train", t, help="train a byte-level BPE tokenizer")

    # lmlab data prepare
    data = ArgumentParser(description="Corpus preparation.")
    sub.add_subcommand("data", data, help="prepare a corpus")
    data_sub = data.add_subcommands(dest="data_command")
    d = ArgumentParser(
        description="Read, deduplicate and tokenize documents into token shards.\n\n"
                    "example: lmlab data prepare --input corpus/ --tokenizer tok/ --out shards/")
    d.add_argument("--input", type=str, required=True, nargs="+")
    d.add_argument("--tokenizer", type=str, required=True, help="tokenizer directory")
    d.add_argument("--out", type=str, required=True)
    d.add_argument("--val-fraction", type=float, default=0.005)
    d.add_argument("--workers", type=int | None, default=None, help="default: all cores")
    d.add_argument("--text-field", type=str, default="text")
    d.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    d.add_argument("--strict", action="store_true", help="stop at the first bad record")
    data_sub.add_subcommand("prepare", d, help="read, deduplicate, tokenize into shards")

    e = ArgumentParser(description="Write a Hugging Face transformers directory.\n\n"
                                   "example: lmlab export-hf runs/quickstart hf-model/")
    e.add_argument("model", type=str, help="lmlab model directory")
    e.add_argument("out", type=str)
    sub.add_subcommand("export-hf", e, help="write a Hugging Face transformers directory")

    i = ArgumentParser(description="Convert a local Hugging Face GPT-2/LLaMA/Qwen2/Mistral "
                                   "directory to an lmlab model directory.\n\n"
                                   "example: lmlab import-hf ~/models/Qwen2-0.5B qwen2/")
    i.add_argument("hf_dir", type=str)
    i.add_argument("out", type=str)
    sub.add_subcommand("import-hf", i, help="convert a Hugging Face directory to lmlab")
    return p


def _command_name(cfg) -> str:
    name = cfg.command
    inner = cfg.get(name)
    for key in ("tokenizer_command", "data_command"):
        if inner is not None and inner.get(key):
            return f"{name}.{inner[key]}"
    return name


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    cfg = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if cfg.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    name = _command_name(cfg)
    args = cfg[name.split(".")[0]]
    if "." in name:
        args = args[name.split(".")[1]]
    try:
        return COMMANDS[name](args) or 0
    except LmlabError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        return e.exit_code
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
