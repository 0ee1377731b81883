"""`lmlab experiment history`: the seeds' history of language modelling, measured.

The seeds teach language modelling as a history — n-gram counts, Elman's RNN,
the LSTM, then the Transformer (GPT-2, and LLaMA's variant of it). This runs
that history as one controlled experiment: the same corpus (default: the
quickstart's standard-library source), the same tokenizer and token shards,
the same held-out bytes, and the same wall-clock training budget for every
model on this machine. Each contender is an ordinary `lmlab pretrain` run of
its kind in OUT/runs/NAME; the n-gram model counts instead of descending a
gradient, in the same harness.

What comes out:

- `history.json`: per model its kind, parameters, tokens seen, training FLOPs
  (tokens seen × the kind's `flops_per_token`), steady tokens/s, held-out bits
  per byte, and its validation curve (training seconds, tokens, bpb);
- `history.md`: that table, with xz / bzip2 / zlib on the same held-out bytes;
- `history.png`: val bits per byte against training seconds and against
  training FLOPs;
- `gradient_reach.png`: how strongly each trained model's last prediction
  depends on the tokens behind it, ‖∂ log p(x_T | x_<T) / ∂e_t‖ against the
  distance T − t — the vanishing gradient of recurrence, measured.

Bits per byte is the yardstick because it does not depend on the tokenizer and
puts the models on the compressors' scale. Run again into the same OUT, it
keeps the finished models and continues an interrupted one.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lmlab.config import ModelSpec, PretrainConfig, TrainConfig
from lmlab.errors import ConfigError
from lmlab.eval import baselines
from lmlab.fileio import atomic_file, atomic_write_text
from lmlab.data.shards import TokenShards
from lmlab.model import build_model
from lmlab.model_io import load_model_dir
from lmlab.outputs import absolute, claim_output_dir
from lmlab.quickstart import corpus_shards, plan_for, split_text_bytes, stdlib_files
from lmlab.train.distributed import pick_device
from lmlab.train.metrics import read_metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Contender:
    """One model of the history: a row of the table, a line of the plot."""

    name: str
    what: str  # what it is, for the table
    model: ModelSpec
    lr: float


def lineup(device) -> dict[str, Contender]:
    """The contenders, in the history's order, sized for `device` (see docs/theory/recurrent.md
    for how the sizes were chosen: each a model a practitioner would train in a few minutes)."""
    plan = plan_for(device)
    d = plan.model.d_model
    gpt2 = plan.model
    llama = ModelSpec(preset="llama-small", d_model=d, n_head=gpt2.n_head, n_kv_head=gpt2.n_head,
                      n_layer=gpt2.n_layer, max_seq_len=gpt2.max_seq_len)
    return {c.name: c for c in [
        Contender("ngram", "4-gram, interpolated Kneser–Ney", ModelSpec(kind="ngram", order=4),
                  lr=0.0),
        Contender("rnn", "Elman RNN", ModelSpec(kind="rnn", d_model=2 * d, n_layer=1), lr=3e-3),
        Contender("lstm", "LSTM (the seeds' model)", ModelSpec(kind="lstm", d_model=2 * d,
                                                               n_layer=2), lr=3e-3),
        Contender("gpt2", "Transformer, GPT-2 style", gpt2, lr=plan.lr),
        Contender("llama", "Transformer, LLaMA style", llama, lr=plan.lr),
    ]}


def gradient_reach(model, windows) -> list[float]:
    """Mean over `windows` (N, T+1) of ‖∂ log p(x_T | x_<T) / ∂e_t‖ for the input embedding e_t
    of each position t < T, listed by distance T − 1 − t (0 = the last input token)."""
    emb = next(m for m in model.modules() if isinstance(m, torch.nn.Embedding))
    grabbed = []

    def grab(module, inputs, out):  # returns None: the output goes on unchanged
        out.retain_grad()
        grabbed.append(out)

    hook = emb.register_forward_hook(grab)
    try:
        model.eval()
        x, y = windows[:, :-1], windows[:, -1]
        logits = model(x)[:, -1].float()
        logp = torch.log_softmax(logits, -1).gather(1, y[:, None]).sum()
        logp.backward()
    finally:
        hook.remove()
    norms = grabbed[0].grad.norm(dim=-1).mean(0)  # (T,)
    model.zero_grad(set_to_none=True)
    return norms.flip(0).tolist()


def _row(c: Contender, run_dir: Path, result, seq_len: int) -> dict:
    fit = result.fit
    model = build_model(result.kind, result.model_config)
    per_token = model.flops_per_token(seq_len) if hasattr(model, "flops_per_token") else None
    curve = [{"seconds": r["elapsed"], "tokens": r["tokens"], "val_bpb": r["val_bpb"]}
             for r in read_metrics(run_dir / "metrics.jsonl")
             if "val_bpb" in r and "elapsed" in r]
    return {"name": c.name, "what": c.what, "kind": result.kind, "params": result.params,
            "tokens_seen": fit.tokens_seen, "train_seconds": fit.seconds,
            # the average over the whole budget (warm-up included): what the budget bought
            "tokens_per_sec": fit.tokens_seen / fit.seconds if fit.seconds else None,
            "flops_per_token": per_token,
            "train_flops": per_token * fit.tokens_seen if per_token is not None else None,
            "val_bpb": fit.val.get("val_bpb"), "status": fit.status, "curve": curve,
            "run_dir": str(run_dir)}


def history(corpus: list[str] | None = None, minutes_per_model: float = 5.0,
            out: str = "runs/history", kinds: list[str] | None = None, device: str = "auto",
            workers: int | None = None, callback=None, overwrite: bool = False) -> dict:
    """Train each contender (`kinds`: a subset of `lineup`'s names, in any order) for
    `minutes_per_model` of training time on one corpus; write and return the history."""
    from lmlab.train.pretrain import pretrain

    cb = callback or (lambda event, data: None)
    if not minutes_per_model > 0:
        raise ConfigError(f"--minutes_per_model {minutes_per_model}: must be above 0")
    dev = pick_device(device)
    contenders = lineup(dev)
    names = list(dict.fromkeys(kinds)) if kinds else list(contenders)
    unknown = [n for n in names if n not in contenders]
    if unknown:
        raise ConfigError(f"--kinds: unknown {unknown}; choose from {list(contenders)}")
    out_dir = Path(out)
    claim = claim_output_dir(out_dir, "experiment history", reads=corpus or (),
                             overwrite=overwrite, flag="--out", inputs={
                                 "corpus": [absolute(p) for p in corpus] if corpus else "stdlib",
                                 "minutes_per_model": minutes_per_model})
    claim.clear()  # only with --overwrite
    claim.record()
    plan = plan_for(dev)
    inputs = corpus or stdlib_files()
    tok_dir, shard_dir, tokenizer, meta = corpus_shards(inputs, out_dir, plan.vocab_size,
                                                        workers, cb)
    val_bytes = split_text_bytes(shard_dir, tokenizer, "val")
    val = TokenShards(shard_dir, "val")
    n = min(8, (len(val) - 1) // (plan.seq_len + 1))
    windows = torch.from_numpy(val.slice(0, n * (plan.seq_len + 1)).astype("int64")).view(
        n, plan.seq_len + 1)  # the first held-out windows, for gradient_reach
    report_path = out_dir / "history.json"
    done = {}
    if report_path.is_file():  # an earlier run of the same experiment: keep what it finished
        done = {r["name"]: r for r in json.loads(report_path.read_text())["models"]}
    report = {"corpus": "stdlib" if corpus is None else [absolute(p) for p in corpus],
              "device": str(dev), "minutes_per_model": minutes_per_model,
              "corpus_tokens": meta["tokens"], "val_bytes": len(val_bytes),
              "vocab_size": tokenizer.vocab_size, "seq_len": plan.seq_len,
              "compressors": baselines(val_bytes), "models": []}

    for name in names:
        c = contenders[name]
        run_dir = out_dir / "runs" / name
        if name in done and not done[name]["status"].startswith("interrupted"):
            report["models"].append(done[name])
            continue
        cfg = PretrainConfig(
            data=str(shard_dir), tokenizer=str(tok_dir), out_dir=str(run_dir),
            seq_len=plan.seq_len, model=c.model,
            resume=(run_dir / "checkpoints").is_dir(),
            train=TrainConfig(batch_size=plan.batch_size, grad_accum=plan.grad_accum,
                              max_steps=10_000_000, max_minutes=minutes_per_model,
                              lr=c.lr or plan.lr, warmup_steps=100, eval_every=100,
                              eval_tokens=0, log_every=10, checkpoint_every=500,
                              keep_checkpoints=1, device=device))
        cb("stage", {"name": f"{name}: {c.what} ({minutes_per_model:g} min)"})
        t0 = time.time()
        result = pretrain(cfg, callback=callback)
        row = _row(c, run_dir, result, plan.seq_len)
        row["wall_seconds"] = time.time() - t0
        model = load_model_dir(run_dir)
        if any(isinstance(m, torch.nn.Embedding) for m in model.modules()):  # not the n-gram
            row["gradient_reach"] = gradient_reach(model, windows)
        report["models"].append(row)
        write_history(out_dir, report)
        if result.fit.status.startswith("interrupted"):
            break
    write_history(out_dir, report)
    return report


def fmt_number(n, digits: int = 3) -> str:
    if n is None:
        return "—"
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.{digits}g}{unit}"
    return f"{n:.{digits}g}"


def history_table(report: dict) -> str:
    """The Markdown table of `report`: one row per model, then the compressors."""
    lines = ["| model | kind | parameters | tokens seen | training FLOPs | tokens/s | val bits/byte |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in report["models"]:
        bpb = f"{r['val_bpb']:.3f}" if r["val_bpb"] is not None else "—"
        lines.append(f"| {r['what']} | `{r['kind']}` | {fmt_number(r['params'])} | "
                     f"{fmt_number(r['tokens_seen'])} | {fmt_number(r['train_flops'])} | "
                     f"{fmt_number(r['tokens_per_sec'])} | {bpb} |")
    names = {"xz": "xz -9e", "bz2": "bzip2 -9", "zlib": "zlib -9"}
    for k, v in report["compressors"].items():
        lines.append(f"| {names.get(k, k)} (same held-out bytes) | — | — | — | — | — | {v:.3f} |")
    lines += ["", f"Same corpus, tokenizer ({report['vocab_size']:,} tokens) and held-out bytes "
              f"({report['val_bytes']:,}); {report['minutes_per_model']:g} training minutes per "
              f"model on {report['device']}. The n-gram model is counted, not trained: its "
              "parameters are its stored n-grams, its FLOPs are not matrix products (—)."]
    return "\n".join(lines) + "\n"


def plot_history(report: dict, out_png: Path) -> Path | None:
    """Val bits per byte against training seconds and against training FLOPs (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed; no history PNG")
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, r in enumerate(report["models"]):
        pts = [p for p in r["curve"] if p["val_bpb"] is not None]
        if not pts:
            continue
        secs = [max(p["seconds"], 1e-2) for p in pts]
        bpb = [p["val_bpb"] for p in pts]
        style = dict(marker="o" if len(pts) == 1 else None, label=f"{r['name']} ({r['what']})",
                     color=f"C{i}")  # a model has one colour in every plot
        axes[0].plot(secs, bpb, **style)
        if r["flops_per_token"]:
            axes[1].plot([p["tokens"] * r["flops_per_token"] for p in pts], bpb, **style)
    for ax, xlabel in zip(axes, ("training seconds", "training FLOPs")):
        for k, v in report["compressors"].items():
            ax.axhline(v, color="grey", linestyle=":", linewidth=1)
            ax.annotate(k, (1, v), xycoords=("axes fraction", "data"), ha="right",
                        va="bottom", fontsize=8, color="grey")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("val bits per byte")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"the same corpus, tokenizer and {report['minutes_per_model']:g} training "
                 f"minutes per model ({report['device']})")
    fig.tight_layout()
    with atomic_file(out_png) as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
    return out_png


def plot_gradient_reach(report: dict, out_png: Path) -> Path | None:
    """Each model's `gradient_reach`, divided by its value at distance 0, on a log scale."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not any(r.get("gradient_reach") for r in report["models"]):
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(report["models"]):
        g = r.get("gradient_reach")
        if g:
            ax.plot(range(len(g)), [v / g[0] if g[0] else v for v in g],
                    label=f"{r['name']} ({r['what']})", color=f"C{i}")
    ax.set_yscale("log")
    ax.set_xlabel("distance back from the predicted token (tokens)")
    ax.set_ylabel("‖∂ log p(next) / ∂ embedding‖, ÷ at distance 0")
    ax.set_title("how far back each trained model's prediction reaches")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(out_png) as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
    return out_png


def write_history(out_dir: Path, report: dict) -> None:
    atomic_write_text(out_dir / "history.json", json.dumps(report, indent=2))
    atomic_write_text(out_dir / "history.md", history_table(report))
    plot_history(report, out_dir / "history.png")
    plot_gradient_reach(report, out_dir / "gradient_reach.png")


__all__ = ["history", "lineup", "Contender", "history_table", "plot_history"]
