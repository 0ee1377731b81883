"""The main job: raw text to a trained, measured model in one bounded run.

    corpus ─► tokenizer (byte-level BPE) ─► token shards (2 % held out) ─► pretrain (M minutes)
           ─► held-out loss and bits per byte, beside what `xz -9e` (and bzip2 -9, zlib -9)
              achieve on the same bytes (`lmlab.eval.baselines`)

The default corpus is on every machine that runs lmlab: the running Python's
standard library source (~11 MB of real code, docstrings and prose), without
its test suites. Bits per byte is the honest yardstick here: a model that
predicts the next byte better than xz's dictionary coder has learned something
about code beyond repetition.
"""

from __future__ import annotations

import json
import logging
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmlab.config import ModelSpec, PretrainConfig, TrainConfig
from lmlab.data.shards import TokenShards, read_meta
from lmlab.errors import ConfigError, InputError
from lmlab.eval import baselines
from lmlab.fileio import atomic_write_text
from lmlab.outputs import absolute, claim_output_dir, read_marker
from lmlab.tokenizer import Tokenizer
from lmlab.train.distributed import pick_device

log = logging.getLogger(__name__)

SAMPLE_PROMPTS = ["def ", "import os\n\n\nclass ", "    def __init__(self"]


def corpus_prompts(held_out: str, n: int = 3, chars: int = 8) -> list[str]:
    """Sample prompts for a user's corpus: the first `chars` characters of `n` held-out lines
    spread through the split (a Chinese corpus gets Chinese prompts, not Python)."""
    lines = [line.strip() for line in held_out.splitlines() if len(line.strip()) >= chars]
    if not lines:
        return SAMPLE_PROMPTS[:1]
    picks = sorted({round(i * (len(lines) - 1) / max(1, n - 1)) for i in range(n)})
    return [lines[i][:chars] for i in picks]
_TEST_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def stdlib_files() -> list[str]:
    """The standard library's .py files, leaving out its test suites."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for p in sorted(root.rglob("*.py")):
        parts = p.relative_to(root).parts
        if _TEST_DIRS & set(parts[:-1]) or parts[-1].startswith("test_"):
            continue
        files.append(str(p))
    return files


def split_text_bytes(shard_dir: str | Path, tokenizer: Tokenizer, split: str = "val") -> bytes:
    """The UTF-8 text of a split's documents (EOS separators dropped): what bpb is measured on."""
    shards = TokenShards(shard_dir, split)
    tokens = shards.slice(0, len(shards))
    eos = np.flatnonzero(tokens == tokenizer.eos_id)
    docs, start = [], 0
    for end in eos:
        docs.append(tokenizer.decode(tokens[start:end].tolist()))
        start = end + 1
    return "".join(docs).encode("utf-8")


@dataclass
class QuickstartPlan:
    """Sizes for the device at hand: a small model on CPU, a larger one on a GPU."""

    vocab_size: int
    model: ModelSpec
    batch_size: int
    grad_accum: int
    lr: float
    seq_len: int


def plan_for(device: torch.device) -> QuickstartPlan:
    if device.type == "cuda":
        return QuickstartPlan(8192, ModelSpec(preset="gpt2-124m", vocab_size=8192, max_seq_len=512),
                              batch_size=32, grad_accum=1, lr=1.5e-3, seq_len=512)
    # 2 CPU cores do 4-20k tokens/s on this 1.4M-parameter model (4.3k on a 2-core AVX2 EPYC,
    # quiet, 30 minutes of the zh recipe): at this budget a small, fast
    # model that sees ~3 epochs beats a larger one that sees fewer tokens (measured again after
    # the faster training step: 2-minute runs gave val bpb 1.77 for d=128×4 layers, 1.90 for
    # 192×4 and 1.90 for 128×6)
    return QuickstartPlan(4096, ModelSpec(preset="small", d_model=128, n_head=2, n_layer=4,
                                          max_seq_len=256),
                          batch_size=16, grad_accum=1, lr=1e-2, seq_len=256)


def corpus_shards(inputs: list[str], out_dir: Path, vocab_size: int, workers: int | None = None,
                  callback=None) -> tuple[Path, Path, Tokenizer, dict]:
    """OUT/tokenizer (trained on `inputs` unless there) and OUT/shards (2 % held out, unless made
    with that tokenizer already): (tokenizer dir, shard dir, tokenizer, shard meta)."""
    from lmlab.data.prepare import prepare
    from lmlab.data.sources import iter_documents
    from lmlab.tokenizer import train_tokenizer

    cb = callback or (lambda event, data: None)
    tok_dir, shard_dir = out_dir / "tokenizer", out_dir / "shards"
    cb("stage", {"name": "tokenizer", "inputs": len(inputs)})
    if not (tok_dir / "tokenizer.json").is_file():
        texts = (d.text for d in iter_documents(inputs))
        train_tokenizer(texts, vocab_size).save(tok_dir)
    tokenizer = Tokenizer.load(tok_dir)

    cb("stage", {"name": "shards"})
    if not (shard_dir / "meta.json").is_file() or read_meta(shard_dir)["tokenizer_hash"] != tokenizer.hash:
        prepare(inputs, tok_dir, shard_dir, val_fraction=0.02, workers=workers)
    meta = read_meta(shard_dir)
    if not meta["splits"].get("val", {}).get("documents"):
        # bits per byte and the compressors are measured on held-out text: stop before training
        raise InputError(f"{shard_dir}: the corpus gave no held-out documents "
                         f"({meta['documents']} document(s) in all); give a corpus of at least "
                         "two documents, e.g. a directory of text files")
    return tok_dir, shard_dir, tokenizer, meta


# seconds kept back from the budget for the final evaluation, the compressors and the samples
FINISH_RESERVE_S = 20.0


def quickstart(corpus: list[str] | None = None, minutes: float = 10.0, out: str = "runs/quickstart",
               device: str = "auto", workers: int | None = None, callback=None,
               overwrite: bool = False) -> dict:
    """Run the whole pipeline within `minutes` (all stages); return and write OUT/summary.json.

    Run again into the same `out` on the same corpus, it continues there (the tokenizer
    and shards are kept, training resumes); an `out` holding anything else is refused
    unless `overwrite`."""
    from lmlab.infer.generate import generate_text
    from lmlab.train.pretrain import pretrain

    cb = callback or (lambda event, data: None)
    if not minutes > 0:
        raise ConfigError(f"--minutes {minutes}: must be above 0")
    out_dir = Path(out)
    # a quickstart directory written before outputs carried a marker continues as before
    legacy = (read_marker(out_dir) is None and (out_dir / "tokenizer" / "tokenizer.json").is_file()
              and (out_dir / "shards" / "meta.json").is_file())
    claim = claim_output_dir(out_dir, "quickstart", reads=corpus or (), overwrite=overwrite,
                             resume=legacy and not overwrite, inputs={
                                 "corpus": [absolute(p) for p in corpus] if corpus else "stdlib"})
    claim.clear()  # only with --overwrite
    claim.record()
    inputs = corpus or stdlib_files()
    plan = plan_for(pick_device(device))
    t_start = time.time()

    tok_dir, shard_dir, tokenizer, meta = corpus_shards(inputs, out_dir, plan.vocab_size,
                                                        workers, cb)
    spent = (time.time() - t_start) / 60
    train_minutes = max(0.2, minutes - spent - FINISH_RESERVE_S / 60)
    cfg = PretrainConfig(
        data=str(shard_dir), tokenizer=str(tok_dir), out_dir=str(out_dir),
        seq_len=plan.seq_len, model=plan.model,
        train=TrainConfig(batch_size=plan.batch_size, grad_accum=plan.grad_accum,
                          max_steps=1_000_000, max_minutes=train_minutes, lr=plan.lr,
                          warmup_steps=100, eval_every=250, eval_tokens=0, log_every=10,
                          checkpoint_every=0, keep_checkpoints=1, device=device),
    )
    model_dir = out_dir  # the output directory is itself a model directory
    if (model_dir / "checkpoints").is_dir():  # a finished or interrupted earlier quickstart
        cfg.resume = True
    cb("stage", {"name": f"pretrain ({train_minutes:.1f} min)", "minutes": train_minutes,
                 "data_minutes": spent})
    result = pretrain(cfg, callback=callback, claim=claim)

    val_bytes = split_text_bytes(shard_dir, tokenizer, "val")
    cb("stage", {"name": "compressors", "bytes": len(val_bytes)})
    compressed = baselines(val_bytes)  # bits per byte of xz -9e, bzip2 -9, zlib -9
    # the standard library's own prompts for it; a user's corpus is prompted with its own text
    prompts = SAMPLE_PROMPTS if corpus is None else corpus_prompts(
        val_bytes.decode("utf-8", errors="replace"))

    from lmlab.model_io import load_model_dir

    model = load_model_dir(model_dir).eval()
    samples = [p + generate_text(model, tokenizer, p, max_new_tokens=80, temperature=0.8,
                                 top_k=50, seed=i) for i, p in enumerate(prompts)]
    fit = result.fit
    summary = {
        "params": result.params,
        "tokens_seen": fit.tokens_seen,
        "tokens_per_sec": fit.tokens_per_sec,  # steady state, the same window as the MFU
        "mfu": fit.mfu,
        "val_loss": fit.val.get("val_loss"),
        "val_bpb": fit.val.get("val_bpb"),
        "xz_bpb": compressed["xz"],
        "bz2_bpb": compressed["bz2"],
        "zlib_bpb": compressed["zlib"],
        "train_loss": fit.last_train_loss,
        "steps": fit.step,
        "status": fit.status,
        "train_seconds": fit.seconds,
        "total_seconds": time.time() - t_start,
        "device": str(pick_device(device)),
        "corpus_documents": meta["documents"],
        "corpus_tokens": meta["tokens"],
        "val_bytes": len(val_bytes),
        "model_dir": str(model_dir),
        "samples": samples,
        "prompts": prompts,
    }
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False))
    return summary
