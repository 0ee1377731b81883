"""One report card for any model: held-out text, tasks, lm-eval tasks, and a second model beside it.

`report_card(model_dir, ...)` measures

- **held-out text**: loss (nats per token), perplexity and bits per byte, by the
  same code that validates pretraining (`lmlab.train.pretrain.LanguageModelingTask`:
  consecutive windows, special tokens carry no bytes), beside xz -9e, bzip2 -9 and
  zlib -9 on the same bytes (`lmlab.eval.baselines`). The text is a token-shard
  directory's val split (decoded, so a model with another tokenizer reads the same
  text), or raw files in any format `lmlab.data.sources` reads; by default the val
  split of the shards a training run directory was trained on (its config.yaml);
- **tasks** (`lmlab.eval.tasks`): multiple choice, generation and classification;
- **lm-eval tasks** (`harness_tasks`): local lm-eval YAMLs through
  `lmlab.eval.harness.run_harness`;
- with `compare=DIR2`, the second model on the same text and rows, the deltas
  (compare − model) and McNemar's exact test on every task whose rows both
  models were scored right or wrong on.

and writes, into `out_dir` (claimed by `lmlab.outputs.claim_output_dir` as
command "eval"; files written by `lmlab.fileio`), report.json (everything,
per-row predictions included; strict JSON: a non-finite number is null),
report.md and report.html (self-contained: the PNG charts are embedded) and
the charts as PNG files: tasks.png (each task's headline score), bpb.png
(bits per byte beside the compressors) and confusion-TASK.png per
classification task.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from lmlab.errors import ConfigError, InputError, LmlabError

log = logging.getLogger(__name__)

FORMAT = "lmlab.report.v1"
# the score each task type is charted by (chrF on 0-100, the rest in [0, 1])
HEADLINE = {"multiple_choice": "acc", "generation": "chrf", "classification": "macro_f1"}
# the metrics the tables show, in order (report.json holds them all)
SHOWN = {"multiple_choice": ("acc", "acc_norm", "acc_centered", "acc_norm_centered", "chance"),
         "generation": ("exact_match", "bleu", "chrf", "rouge1", "rouge2", "rougeL"),
         "classification": ("accuracy", "macro_precision", "macro_recall", "macro_f1",
                            "micro_f1")}
TEXT_KEYS = ("loss", "ppl", "bpb")

Progress = Callable[[str, int, int], None]  # (stage, done, total)


# ------------------------------------------------------------------ held-out text

class TokenStream:
    """A token array with the two things evaluation windows read of token shards."""

    split = "held-out"

    def __init__(self, tokens, where: str):
        import numpy as np

        self.tokens = np.asarray(tokens, dtype=np.int64)
        self.dir = where

    def __len__(self) -> int:
        return len(self.tokens)

    def slice(self, start: int, stop: int):
        return self.tokens[start:stop]


def run_data_dir(model_dir: str | os.PathLike) -> Path | None:
    """The token shards a training run directory was trained on (its config.yaml's `data`)."""
    import yaml

    cfg_path = Path(model_dir) / "config.yaml"
    if not cfg_path.is_file():
        return None
    try:
        cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    data = cfg.get("data") if isinstance(cfg, dict) else None
    if not isinstance(data, str):
        return None
    p = Path(data)
    return p if (p / "meta.json").is_file() else None


def _shard_documents(shard_dir: Path, tokenizers: Sequence) -> list[str]:
    """The val split's documents as text, decoded with whichever tokenizer made the shards."""
    from lmlab.data.shards import TokenShards, read_meta
    from lmlab.tokenizer import Tokenizer

    meta = read_meta(shard_dir)
    if not meta.get("splits", {}).get("val", {}).get("tokens"):
        raise InputError(f"{shard_dir}: the shards have no val split to evaluate on; give "
                         "held-out text files with --text")
    want = meta.get("tokenizer_hash")
    candidates = list(tokenizers)
    if (shard_dir / "tokenizer" / "tokenizer.json").is_file():
        candidates.append(Tokenizer.load(shard_dir / "tokenizer"))
    tok = next((t for t in candidates if want in (None, t.hash)), None)
    if tok is None:
        raise InputError(f"{shard_dir}: the shards were made with a tokenizer that neither "
                         "model has (hash differs), so they cannot be read back as text; "
                         "give the held-out text files with --text")
    shards = TokenShards(shard_dir, "val")
    tokens = shards.slice(0, len(shards)).tolist()
    docs, start = [], 0
    for i, t in enumerate(tokens):
        if t == meta.get("eos_id", tok.eos_id):
            docs.append(tok.decode(tokens[start:i]))
            start = i + 1
    if start < len(tokens):
        docs.append(tok.decode(tokens[start:]))
    return docs


def held_out_text(text: str | os.PathLike | Sequence[str | os.PathLike] | None, model_dir,
                  tokenizers: Sequence) -> tuple[list[str], str] | None:
    """(documents, where they came from) of the held-out text, or None when there is none.

    `text`: a token-shard directory (its val split), or files / directories of raw
    text; None: the val split of the run's own shards, if `model_dir` is a run."""
    if text is None:
        shard_dir = run_data_dir(model_dir)
        if shard_dir is None:
            return None
        return _shard_documents(shard_dir, tokenizers), f"{shard_dir} (val split, the run's data)"
    paths = [text] if isinstance(text, (str, os.PathLike)) else list(text)
    if not paths:
        return None
    if len(paths) == 1 and (Path(paths[0]) / "meta.json").is_file():
        return _shard_documents(Path(paths[0]), tokenizers), f"{paths[0]} (val split)"
    from lmlab.data.sources import iter_documents

    docs = [d.text for d in iter_documents([str(p) for p in paths])]
    return docs, ", ".join(map(str, paths))


def text_metrics(lm, docs: Sequence[str], max_tokens: int | None = None,
                 batch_size: int = 8) -> dict[str, float]:
    """Loss, perplexity and bits per byte of `lm` on `docs` (each followed by EOS, as in shards)."""
    import torch

    from lmlab.train.pretrain import LanguageModelingTask

    tok = lm.tokenizer
    ids: list[int] = []
    for doc in docs:
        ids += tok.encode(doc)
        if tok.eos_id is not None:
            ids.append(tok.eos_id)
    if len(ids) < 2:
        raise InputError("the held-out text has fewer than two tokens; give more text")
    stream = TokenStream(ids, "held-out text")
    seq = min(getattr(lm.model, "max_seq_len", None) or 1024, len(stream) - 1)
    task = LanguageModelingTask(stream, stream, seq, batch_size, tok.token_byte_lengths(),
                                seed=0, eval_tokens=max_tokens)
    device = next(lm.model.parameters()).device
    sums: dict[str, float] = {}
    lm.model.eval()
    with torch.no_grad():
        for x, y in task.val_batches(0, 1):
            for k, v in task.eval_sums(lm.model, (x.to(device), y.to(device))).items():
                sums[k] = sums.get(k, 0) + v
    m = task.eval_metrics(sums)
    return {"tokens": int(sums["tokens"]), "loss": m["val_loss"], "ppl": m["val_ppl"],
            "bpb": m["val_bpb"]}


# ------------------------------------------------------------------ one model

def model_info(lm, path) -> dict:
    from lmlab.model_io import read_model_config

    kind, _ = read_model_config(path)
    params = {id(p): p.numel() for p in lm.model.parameters()}
    return {"path": str(path), "kind": kind, "params": sum(params.values()),
            "vocab_size": getattr(lm.model, "vocab_size", None),
            "max_seq_len": getattr(lm.model, "max_seq_len", None),
            "tokenizer_hash": lm.tokenizer.hash}


def _classifier_of(lm, label: str) -> Callable | None:
    """The loaded model's classify(), if it is a classifier (probed on one text), else None."""
    fn = getattr(lm, "classify", None)
    if fn is None:
        return None
    try:
        fn(["probe"])
    except LmlabError as e:
        log.info("%s: no classifier (%s)", label, e)
        return None
    return fn


def evaluate_model(lm, path, tasks, docs: list[str] | None, *, classify=None, limit=None,
                   max_text_tokens=None, harness_tasks=None, device="cpu",
                   notes: list[str], label: str, progress: Progress | None = None,
                   docs_qa=None) -> dict:
    """One model's part of the report: {"model", "text", "tasks", "harness", "docs_qa"}.
    `docs_qa`: (DocIndex, questions, k) — answers from documents (`lmlab.rag.qa`)."""
    from lmlab.eval.tasks import evaluate_task, is_language_model

    out: dict[str, Any] = {"model": model_info(lm, path)}
    if docs is None:
        out["text"] = {"skipped": "no held-out text (pass --text shards/ or text files)"}
    elif not is_language_model(lm.model):
        out["text"] = {"skipped": "the model does not predict tokens"}
    else:
        if progress:
            progress(f"{label}: held-out text", 0, 1)
        out["text"] = text_metrics(lm, docs, max_text_tokens)
        if progress:
            progress(f"{label}: held-out text", 1, 1)
    if classify is None and any(t.type == "classification" for t in tasks):
        classify = _classifier_of(lm, label)
    out["tasks"] = {}
    for t in tasks:
        tick = (lambda name, done, total: progress(f"{label}: {name}", done, total)) \
            if progress else None
        r = evaluate_task(t, lm=lm, classify=classify, limit=limit, progress=tick)
        if "skipped" in r:
            notes.append(f"{label}: task {t.name} skipped: {r['skipped']}")
        out["tasks"][t.name] = r
    if harness_tasks:
        try:  # lm-eval is an extra: imported when asked
            from lmlab.eval.harness import run_harness
        except ModuleNotFoundError as e:
            raise ConfigError(f"--harness-tasks: lm-eval tasks cannot run here ({e}); install "
                              "them with pip install 'lmlab[harness]'") from None
        if progress:
            progress(f"{label}: lm-eval tasks", 0, 1)
        out["harness"] = run_harness(str(path), [str(h) for h in harness_tasks], limit=limit,
                                     device=device)
        if progress:
            progress(f"{label}: lm-eval tasks", 1, 1)
    else:
        out["harness"] = {"skipped": "no lm-eval tasks given (--harness-tasks)"}
    if docs_qa is not None:
        from lmlab.rag.qa import score_docs_qa

        index, questions, k = docs_qa
        if progress:
            progress(f"{label}: answers from documents", 0, 1)
        out["docs_qa"] = score_docs_qa(lm, index, questions[:limit] if limit else questions, k)
        if progress:
            progress(f"{label}: answers from documents", 1, 1)
    return out


# ------------------------------------------------------------------ comparison

def _numeric(d: dict) -> dict[str, float]:
    return {k: float(v) for k, v in d.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "n"}


def deltas(a: dict, b: dict) -> dict:
    """compare − model for every number both parts have: text, each task, each lm-eval task."""
    from lmlab.eval.metrics import mcnemar

    out: dict[str, Any] = {"text": {}, "tasks": {}, "harness": {}}
    if "skipped" not in a["text"] and "skipped" not in b["text"]:
        out["text"] = {k: b["text"][k] - a["text"][k] for k in TEXT_KEYS}
    mc = {}
    for name, ra in a["tasks"].items():
        rb = b["tasks"].get(name, {})
        if "metrics" not in ra or "metrics" not in rb:
            continue
        ma, mb = _numeric(ra["metrics"]), _numeric(rb["metrics"])
        out["tasks"][name] = {k: mb[k] - ma[k] for k in ma if k in mb and k != "chance"}
        if ra.get("rows") and rb.get("rows") and len(ra["rows"]) == len(rb["rows"]):
            mc[name] = mcnemar([r["correct"] for r in ra["rows"]],
                               [r["correct"] for r in rb["rows"]])
    for name, ma in a["harness"].items():
        mb = b["harness"].get(name)
        if isinstance(ma, dict) and isinstance(mb, dict):
            na, nb = _numeric(ma), _numeric(mb)
            out["harness"][name] = {k: nb[k] - na[k] for k in na if k in nb}
    if a.get("docs_qa") and b.get("docs_qa"):
        na, nb = _numeric(a["docs_qa"]), _numeric(b["docs_qa"])
        out["docs_qa"] = {k: nb[k] - na[k] for k in na if k in nb and k != "k"}
    return {"deltas": out, "mcnemar": mc}


# ------------------------------------------------------------------ the report card

def _as_list(x) -> list[str]:
    if x is None:
        return []
    return [str(x)] if isinstance(x, (str, os.PathLike)) else [str(p) for p in x]


def report_card(model_dir: str | os.PathLike, tasks: Sequence[str] | None = None,
                text: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                out_dir: str | os.PathLike | None = None, compare: str | os.PathLike | None = None,
                device: str = "cpu", limit: int | None = None,
                harness_tasks: Sequence[str] | None = None,
                classify: Callable[[list[str]], Sequence] | None = None,
                max_text_tokens: int | None = None, overwrite: bool = False,
                progress: Progress | None = None,
                docs_qa: str | os.PathLike | None = None, docs: str | os.PathLike | None = None,
                docs_k: int = 4) -> dict:
    """Measure `model_dir` (and `compare`) as the module docstring says; return the report.

    `tasks`: task files or shipped names (None: every shipped task); `text`: held-out
    text (None: the run's own val split, if any); `limit`: the first N rows of each
    task (and lm-eval's limit); `classify`: a callable for classification tasks in
    place of the model's own `classify()`; `max_text_tokens`: held-out tokens read at
    most; `docs_qa` (a questions JSONL of `lmlab data docs-qa`) with `docs` (the folder its
    answers lie in): retrieval recall@1 / recall@`docs_k` and the answers' exact match. With `out_dir`, the report files are written there (refused, before any
    work, if it holds something else, unless `overwrite`).
    """
    import lmlab
    from lmlab.eval.baselines import baselines
    from lmlab.eval.tasks import resolve_tasks
    from lmlab.outputs import absolute, claim_output_dir
    from lmlab.train.distributed import pick_device

    t0 = time.time()
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit}: must be at least 1")
    if max_text_tokens is not None and max_text_tokens < 2:
        raise ConfigError(f"--max-text-tokens {max_text_tokens}: must be at least 2")
    task_list = resolve_tasks(tasks)  # every task file checked before anything runs
    text_paths, harness = _as_list(text), _as_list(harness_tasks)
    for p in text_paths + harness:
        if not Path(p).exists():
            raise InputError(f"{p}: no such file or directory")
    qa = None
    if (docs_qa is None) != (docs is None):
        raise ConfigError("--docs-qa and --docs go together: the questions and the folder "
                          "their answers lie in")
    if docs_qa is not None:
        from lmlab.rag import DocIndex
        from lmlab.rag.qa import load_docs_qa

        qa = (DocIndex.build(docs), load_docs_qa(docs_qa), docs_k)
    claim = None
    if out_dir is not None:
        reads = [model_dir, compare, *text_paths, *harness, *(t.path for t in task_list),
                 docs_qa, docs]
        claim = claim_output_dir(out_dir, "eval", reads=[r for r in reads if r is not None],
                                 overwrite=overwrite, inputs={
                                     "model": absolute(model_dir),
                                     "compare": absolute(compare) if compare else None,
                                     "tasks": [absolute(t.path) for t in task_list],
                                     "text": [absolute(p) for p in text_paths] or "auto",
                                     "harness_tasks": [absolute(p) for p in harness],
                                     "limit": limit, "max_text_tokens": max_text_tokens,
                                     "docs_qa": absolute(docs_qa) if docs_qa else None,
                                     "docs": absolute(docs) if docs else None, "docs_k": docs_k})
    dev = str(pick_device(device))
    lm_a = lmlab.load(model_dir, device=dev)
    lm_b = lmlab.load(compare, device=dev) if compare is not None else None
    from lmlab.model import require_causal_lm

    for path, lm in ((model_dir, lm_a), (compare, lm_b)):
        if lm is not None:
            require_causal_lm(lm.model, f"lmlab eval {path}")
    notes: list[str] = []
    if lm_b is not None and lm_b.tokenizer.hash != lm_a.tokenizer.hash:
        notes.append("the two models have different tokenizers: their perplexities are per "
                     "different tokens; bits per byte is the figure to compare")
    found = held_out_text(text_paths or None, model_dir,
                          [lm_a.tokenizer] + ([lm_b.tokenizer] if lm_b else []))
    docs = found[0] if found else None
    text_info: dict[str, Any] = {}
    if found:
        data = "".join(docs).encode("utf-8")
        text_info = {"source": found[1], "documents": len(docs), "bytes": len(data),
                     "baselines": baselines(data)}
    if max_text_tokens:
        notes.append(f"held-out text: the first {max_text_tokens:,} tokens per model; the "
                     "compressors read all of it")

    common = dict(limit=limit, max_text_tokens=max_text_tokens, harness_tasks=harness,
                  device=dev, notes=notes, progress=progress, docs_qa=qa)
    a = evaluate_model(lm_a, model_dir, task_list, docs, classify=classify, label="model",
                       **common)
    report: dict[str, Any] = {
        "format": FORMAT,
        "model": a["model"],
        "text": {**text_info, **a["text"]} if found else a["text"],
        "tasks": a["tasks"],
        "harness": a["harness"],
        "docs_qa": a.get("docs_qa"),
        "compare": None,
        "notes": notes,
        "settings": {"device": dev, "limit": limit, "max_text_tokens": max_text_tokens,
                     "tasks": [str(t.path) for t in task_list], "text": text_paths or "auto",
                     "harness_tasks": harness},
    }
    if lm_b is not None:
        del lm_a  # one model in memory at a time
        b = evaluate_model(lm_b, compare, task_list, docs, label="compare", **common)
        report["compare"] = {**b, **deltas(a, b)}
    report["seconds"] = time.time() - t0
    if claim is not None:
        report["files"] = write_report(report, out_dir, replace=claim.replace)
        claim.record()
    return report


# ------------------------------------------------------------------ tables

def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.1f}"
    return str(v)


def _delta(v) -> str:
    return "" if v is None else ("+" if v > 0 else "") + _fmt(v)


def tables(report: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """The report's tables, (title, header, rows) each, for the Markdown, the HTML and the CLI."""
    cmp = report.get("compare")
    cols = ["model"] + (["compare", "Δ"] if cmp else [])
    out = []
    text = report["text"]
    if "skipped" not in text:
        ct, dt = (cmp["text"], cmp["deltas"]["text"]) if cmp else ({}, {})
        names = {"loss": "loss (nats/token)", "ppl": "perplexity", "bpb": "bits per byte"}
        rows = [[names[k], _fmt(text[k])] + ([_fmt(ct.get(k)), _delta(dt.get(k))] if cmp else [])
                for k in TEXT_KEYS]
        rows.append(["tokens", _fmt(text["tokens"])]
                    + ([_fmt(ct.get("tokens")), ""] if cmp else []))
        for name, label in (("xz", "xz -9e"), ("bz2", "bzip2 -9"), ("zlib", "zlib -9")):
            rows.append([f"{label} bits per byte", _fmt(text["baselines"][name])]
                        + (["", ""] if cmp else []))
        out.append((f"Held-out text: {text['source']} ({text['documents']:,} documents, "
                    f"{text['bytes']:,} bytes)", [""] + cols, rows))
    rows = []
    for name, r in report["tasks"].items():
        if "skipped" in r:
            rows.append([name, r["type"], "", "skipped"] + [""] * len(cols) + ([""] if cmp else []))
            continue
        rb = cmp["tasks"].get(name, {}) if cmp else {}
        d = cmp["deltas"]["tasks"].get(name, {}) if cmp else {}
        mc = cmp["mcnemar"].get(name) if cmp else None
        for i, k in enumerate(SHOWN[r["type"]]):
            row = [name if i == 0 else "", r["type"] if i == 0 else "",
                   _fmt(r["n"]) if i == 0 else "", k, _fmt(r["metrics"].get(k))]
            if cmp:
                row += [_fmt(rb.get("metrics", {}).get(k)), _delta(d.get(k)),
                        f"b={mc['b']} c={mc['c']} p={mc['p_value']:.3g}" if mc and i == 0 else ""]
            rows.append(row)
    if rows:
        head = ["task", "type", "n", "metric"] + cols + (["McNemar (exact)"] if cmp else [])
        out.append(("Tasks", head, rows))
    for name, r in report["tasks"].items():
        if r.get("type") == "classification" and "metrics" in r:
            pc = r["metrics"]["per_class"]
            out.append((f"{name}: per class (model)", ["label", "precision", "recall", "F1",
                                                       "support"],
                        [[lab, _fmt(v["precision"]), _fmt(v["recall"]), _fmt(v["f1"]),
                          _fmt(v["support"])] for lab, v in pc.items()]))
    harness = report["harness"]
    if "skipped" not in harness:
        hb = cmp["harness"] if cmp else {}
        rows = []
        for task, metrics in harness.items():
            for i, (k, v) in enumerate(sorted(metrics.items())):
                row = [task if i == 0 else "", k, _fmt(v)]
                if cmp:
                    vb = hb.get(task, {}).get(k)
                    row += [_fmt(vb), _delta(cmp["deltas"]["harness"].get(task, {}).get(k))]
                rows.append(row)
        out.append(("lm-eval tasks", ["task", "metric"] + cols, rows))
    qa = report.get("docs_qa")
    if qa:
        qb, dq = (cmp.get("docs_qa") or {}, cmp["deltas"].get("docs_qa", {})) if cmp else ({}, {})
        at_k = f"recall@{qa['k']}"
        rows = []
        for part, r, rb in [("all", qa, qb)] + [(lang, v, qb.get("by_lang", {}).get(lang, {}))
                                                for lang, v in qa["by_lang"].items()]:
            for i, key in enumerate(("recall@1", at_k, "exact_match")):
                row = [part if i == 0 else "", _fmt(r["n"]) if i == 0 else "", key, _fmt(r[key])]
                if cmp:
                    row += [_fmt(rb.get(key)), _delta(dq.get(key)) if part == "all" else ""]
                rows.append(row)
        out.append((f"Answers from documents: {qa['n']} questions, {qa['passages']:,} passages "
                    f"(BM25, Chinese by {qa['chinese']})", ["questions", "n", "metric"] + cols,
                    rows))
    return out


def summary(report: dict) -> tuple[list[str], list[list[str]]]:
    """A short table for a terminal: bits per byte and each task's headline score."""
    cmp = report.get("compare")
    head = ["", "n", "model"] + (["compare", "Δ", "McNemar p"] if cmp else [])
    rows = []
    text = report["text"]
    if "skipped" not in text:
        ct, dt = (cmp["text"], cmp["deltas"]["text"]) if cmp else ({}, {})
        for k, label in (("ppl", "perplexity"), ("bpb", "bits per byte")):
            rows.append([f"held-out {label}", f"{text['tokens']:,} tok", _fmt(text[k])]
                        + ([_fmt(ct.get(k)), _delta(dt.get(k)), ""] if cmp else []))
        rows.append(["xz -9e bits per byte", f"{text['bytes']:,} B", _fmt(text["baselines"]["xz"])]
                    + (["", "", ""] if cmp else []))
    for name, r in report["tasks"].items():
        if "skipped" in r:
            rows.append([name, "", "skipped"] + (["", "", ""] if cmp else []))
            continue
        k = HEADLINE[r["type"]]
        row = [f"{name} ({k})", _fmt(r["n"]), _fmt(r["metrics"][k])]
        if cmp:
            mb = cmp["tasks"].get(name, {}).get("metrics", {})
            mc = cmp["mcnemar"].get(name)
            row += [_fmt(mb.get(k)), _delta(cmp["deltas"]["tasks"].get(name, {}).get(k)),
                    f"{mc['p_value']:.3g}" if mc else ""]
        rows.append(row)
    qa = report.get("docs_qa")
    if qa:
        qb = (cmp.get("docs_qa") or {}) if cmp else {}
        for key in (f"recall@{qa['k']}", "exact_match"):
            rows.append([f"docs-qa ({key})", _fmt(qa["n"]), _fmt(qa[key])]
                        + ([_fmt(qb.get(key)), _delta(cmp["deltas"].get("docs_qa", {}).get(key)),
                            ""] if cmp else []))
    return head, rows


# ------------------------------------------------------------------ charts

def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name)


def _png(fig) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def charts(report: dict) -> dict[str, bytes]:
    """{file name: PNG bytes}: tasks.png, bpb.png, confusion-TASK[-compare].png."""
    from matplotlib.figure import Figure

    cmp = report.get("compare")
    out: dict[str, bytes] = {}
    scored = [(n, r) for n, r in report["tasks"].items() if "metrics" in r]
    if scored:
        fig = Figure(figsize=(7, 0.5 + 0.45 * len(scored) * (2 if cmp else 1)))
        ax = fig.subplots()
        h = 0.4 if cmp else 0.7
        parts = [(report, "model")] + ([(cmp, "compare")] if cmp else [])
        for j, (part, label) in enumerate(parts):
            vals = []
            for name, _ in scored:
                r = part["tasks"].get(name, {})
                k = HEADLINE[r.get("type", "multiple_choice")]
                v = r.get("metrics", {}).get(k, 0.0)
                vals.append(v / 100 if k == "chrf" else v)
            ys = [i + (j - 0.5) * h if cmp else i for i in range(len(scored))]
            ax.barh(ys, vals, height=h, label=f"{label}: {Path(part['model']['path']).name}")
        for i, (name, r) in enumerate(scored):
            if r["type"] == "multiple_choice":
                ax.plot([r["metrics"]["chance"]] * 2, [i - 0.45, i + 0.45], "k:", lw=1)
        ax.set_yticks(range(len(scored)),
                      [f"{n} ({HEADLINE[r['type']]})" for n, r in scored])
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("score (chrF / 100; dotted: chance)")
        ax.legend(loc="lower right", fontsize=8)
        out["tasks.png"] = _png(fig)
    text = report["text"]
    if "skipped" not in text:
        bars = [(f"model\n{Path(report['model']['path']).name}", text["bpb"])]
        if cmp and "skipped" not in cmp["text"]:
            bars.append((f"compare\n{Path(cmp['model']['path']).name}", cmp["text"]["bpb"]))
        bars += [("xz -9e", text["baselines"]["xz"]), ("bzip2 -9", text["baselines"]["bz2"]),
                 ("zlib -9", text["baselines"]["zlib"])]
        fig = Figure(figsize=(6, 3))
        ax = fig.subplots()
        colors = ["C0", "C1"][:len(bars) - 3] + ["0.6"] * 3
        ax.bar(range(len(bars)), [v for _, v in bars], color=colors)
        ax.set_xticks(range(len(bars)), [n for n, _ in bars], fontsize=8)
        ax.set_ylabel("bits per byte (lower is better)")
        for i, (_, v) in enumerate(bars):
            ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
        out["bpb.png"] = _png(fig)
    for part, suffix in [(report, "")] + ([(cmp, "-compare")] if cmp else []):
        for name, r in part["tasks"].items():
            if r.get("type") != "classification" or "metrics" not in r:
                continue
            conf = r["metrics"]["confusion"]
            out[f"confusion-{_safe(name)}{suffix}.png"] = confusion_png(
                conf["labels"], conf["matrix"], f"{name}{suffix}")
    return out


def confusion_png(labels: Sequence[str], matrix: Sequence[Sequence[int]], title: str) -> bytes:
    """A confusion matrix as PNG bytes: rows true labels, columns predictions, counts shown."""
    from matplotlib.figure import Figure

    m = [list(row) for row in matrix]
    fig = Figure(figsize=(1.2 + 0.6 * len(labels), 1 + 0.6 * len(labels)))
    ax = fig.subplots()
    im = ax.imshow(m, cmap="Blues")
    top = max((max(row) for row in m), default=0)
    for i, row in enumerate(m):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:,}", ha="center", va="center",
                    color="white" if v > top / 2 else "black", fontsize=8)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _png(fig)


# ------------------------------------------------------------------ files

def _title(report: dict) -> str:
    t = f"Report card: {report['model']['path']}"
    if report.get("compare"):
        t += f" vs {report['compare']['model']['path']}"
    return t


def _models_line(report: dict) -> list[tuple[str, dict]]:
    parts = [("model", report["model"])]
    if report.get("compare"):
        parts.append(("compare", report["compare"]["model"]))
    return parts


def to_markdown(report: dict, images: Sequence[str]) -> str:
    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    lines = [f"# {_title(report)}", ""]
    for label, m in _models_line(report):
        lines.append(f"- **{label}**: `{m['path']}` — kind {m['kind']}, {m['params']:,} "
                     f"parameters")
    if report.get("compare"):
        lines.append("- Δ = compare − model (lower is better for loss, perplexity and bits "
                     "per byte); McNemar: b = rows only the model got right, c = rows only "
                     "the compare model got right")
    lines.append("")
    for title, head, rows in tables(report):
        lines += [f"## {title}", "", "| " + " | ".join(map(cell, head)) + " |",
                  "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
        lines.append("")
    if images:
        lines += ["## Charts", ""] + [f"![{name}]({name})" for name in images] + [""]
    if report["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    lines.append(f"_{report['seconds']:.1f} s on {report['settings']['device']}; every row's "
                 "prediction is in report.json._")
    return "\n".join(lines) + "\n"


def to_html(report: dict, images: dict[str, bytes]) -> str:
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(_title(report))}"
             "</title><style>body{font-family:system-ui,sans-serif;max-width:60em;margin:2em "
             "auto;padding:0 1em}table{border-collapse:collapse;margin:1em 0}td,th{border:1px "
             "solid #ccc;padding:.25em .6em;text-align:right}td:first-child,th:first-child"
             "{text-align:left}img{max-width:100%}</style></head><body>",
             f"<h1>{e(_title(report))}</h1><ul>"]
    for label, m in _models_line(report):
        parts.append(f"<li><b>{e(label)}</b>: <code>{e(m['path'])}</code> — kind "
                     f"{e(str(m['kind']))}, {m['params']:,} parameters</li>")
    if report.get("compare"):
        parts.append("<li>Δ = compare − model; McNemar: b = rows only the model got right, "
                     "c = rows only the compare model got right</li>")
    parts.append("</ul>")
    for title, head, rows in tables(report):
        parts.append(f"<h2>{e(title)}</h2><table><tr>"
                     + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
    for name, png in images.items():
        parts.append(f"<h3>{e(name)}</h3><img alt='{e(name)}' src='data:image/png;base64,"
                     f"{base64.b64encode(png).decode('ascii')}'>")
    if report["notes"]:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in report["notes"])
                     + "</ul>")
    parts.append(f"<p><i>{report['seconds']:.1f} s on {e(report['settings']['device'])}; "
                 "every row's prediction is in report.json.</i></p></body></html>")
    return "\n".join(parts) + "\n"


def write_report(report: dict, out_dir: str | os.PathLike, replace: bool = False) -> dict:
    """Write report.json, report.md, report.html and the charts into `out_dir`; their paths."""
    from lmlab.fileio import write_dir_atomically

    out = Path(out_dir)
    images = charts(report)
    files = {"json": str(out / "report.json"), "markdown": str(out / "report.md"),
             "html": str(out / "report.html"), "charts": [str(out / n) for n in images]}
    report["files"] = files

    def write(d: Path) -> None:
        for name, png in images.items():
            (d / name).write_bytes(png)
        (d / "report.md").write_text(to_markdown(report, list(images)), encoding="utf-8")
        (d / "report.html").write_text(to_html(report, images), encoding="utf-8")
        (d / "report.json").write_text(json.dumps(_finite(report), indent=1, ensure_ascii=False,
                                                  allow_nan=False, default=_json_default),
                                       encoding="utf-8")

    write_dir_atomically(out, write, last="report.json", replace=replace)
    return files


def _finite(o):
    """The report as strict JSON holds it: NaN and infinities (a diverged model's
    perplexity) become null."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def _json_default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:
        pass
    return str(o)
