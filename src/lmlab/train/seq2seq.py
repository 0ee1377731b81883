"""`lmlab seq2seq train`: an encoder–decoder (kind "seq2seq") through the one training loop.

    pairs ─► split by source hash (train / val / test, no source in two)
          ─► token ids (given tokenizers, or trained on the train split: one shared, or two)
          ─► Seq2SeqTask + the model ─► train.run_task (checkpoints, resume, metrics)
          ─► the test split decoded by beam search ─► BLEU, chrF, ROUGE-1/2/L, exact match,
             beside a trivial baseline (the source, or its first line, copied)

**Teacher forcing.** The decoder reads the reference target shifted right —
the start token, then y₁ … y_{n−1} — and at every position is scored on the
next reference token, all positions in one pass:

    loss = −(1/N) Σ_t log p(y_t | y_<t, x),   y_n = EOS

with label smoothing ε (Szegedy et al. 2016) the target of each position is
(1 − ε) on y_t plus ε spread evenly over the vocabulary (`Seq2Seq.forward`).
Validation reports the plain loss (ε = 0), its perplexity, and BLEU of the
first `bleu_rows` val pairs decoded greedily, from BLEU's sufficient
statistics summed over batches and ranks (`lmlab.eval.metrics.bleu_stats`).

**Batches by length.** Each epoch is a seeded permutation of the training
pairs, cut into pools of `POOL` batches; each pool is sorted by length and cut
into batches, and the batches are shuffled. Pairs of similar length then share
a batch (little padding) while the order stays random. Batch g is a pure
function of g (epoch g // n_batches), so resuming at a step gives the batches
an uninterrupted run would have seen, and ranks take slices of one global order.

The run directory is a model directory: `lmlab.load(RUN).seq2seq(["你好"])`, or
`lmlab seq2seq generate --model RUN --input FILE`. With two vocabularies the
source tokenizer is kept in RUN/source_tokenizer/.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from torch import nn

from lmlab.config import Seq2SeqConfig
from lmlab.data.pairs import BUILTIN, load_pairs
from lmlab.errors import ConfigError, InputError
from lmlab.eval.metrics import (BLEU_STATS, bleu_from_stats, bleu_stats, bleu_tokenize,
                                generation_metrics)
from lmlab.fileio import atomic_write_text
from lmlab.finetune.classify import encode_texts, pad_batch
from lmlab.infer.beam import beam_search, greedy
from lmlab.model.seq2seq import Seq2Seq
from lmlab.outputs import absolute
from lmlab.tokenizer import Tokenizer
from lmlab.train.distributed import pick_device
from lmlab.train.runner import RunResult, claim_run_dir, run_task

log = logging.getLogger(__name__)

POOL = 50  # batches per pool sorted by length
SOURCE_TOKENIZER = "source_tokenizer"  # the source side's tokenizer, with two vocabularies


# ------------------------------------------------------------------ tokens

class Specials(NamedTuple):
    pad: int  # fills source and target rows (masked or not scored)
    start: int  # the decoder's first input
    eos: int  # ends every target


def specials(source: Tokenizer, target: Tokenizer) -> tuple[int, Specials]:
    """(source pad id, the target's `Specials`): lmlab's <|pad|>, <|bos|>, <|endoftext|>."""
    if target.eos_id is None:
        raise ConfigError(f"tokenizer {target.path or ''}: has no end-of-text token to end "
                          "targets with; use an lmlab tokenizer (`lmlab tokenizer train`)")
    start = target.bos_id if target.bos_id is not None else target.eos_id
    pad = target.pad_id if target.pad_id is not None else target.eos_id
    src_pad = source.pad_id if source.pad_id is not None else (source.eos_id or 0)
    return src_pad, Specials(pad, start, target.eos_id)


def encode_targets(tokenizer: Tokenizer, texts: Sequence[str], max_len: int) -> list[list[int]]:
    """Each target's ids, cut to leave room for EOS, then EOS: at most `max_len` tokens."""
    return [ids[:max_len - 1] + [tokenizer.eos_id] for ids in tokenizer.encode_batch(list(texts))]


def collate(src_rows: Sequence[list[int]], tgt_rows: Sequence[list[int]], src_pad: int,
            sp: Specials) -> tuple[torch.Tensor, ...]:
    """(src, src_lengths, tgt_in, tgt_out): right-padded; tgt_in = start + tgt[:-1], tgt_out =
    tgt with −100 (not scored) under the padding."""
    src, src_len = pad_batch(src_rows, src_pad)
    tgt_in, _ = pad_batch([[sp.start] + t[:-1] for t in tgt_rows], sp.pad)
    tgt_out, _ = pad_batch(tgt_rows, -100)
    return src, src_len, tgt_in, tgt_out


def length_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int
                   ) -> list[np.ndarray]:
    """The batches (index arrays) of one epoch: permuted, sorted by length within pools of
    `POOL` batches, cut, shuffled (see the module docstring)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    keys = np.asarray(lengths)
    pool = batch_size * POOL
    flat = np.concatenate([chunk[np.argsort(keys[chunk], kind="stable")]
                           for chunk in np.array_split(order, max(1, -(-len(order) // pool)))])
    batches = [flat[i:i + batch_size] for i in range(0, len(flat), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


# ------------------------------------------------------------------ the task

class Seq2SeqTask:
    """Teacher-forced cross-entropy (label-smoothed) on length-bucketed batches; validation
    loss, perplexity and greedy BLEU on the first `bleu_rows` val pairs."""

    def __init__(self, train: tuple[list[list[int]], list[list[int]]],
                 val: tuple[list[list[int]], list[list[int]]], val_refs: list[str],
                 target_tokenizer: Tokenizer, src_pad: int, sp: Specials, batch_size: int,
                 seed: int, label_smoothing: float = 0.0, bleu_rows: int = 64,
                 eval_tokens: int = 0):
        if not train[0]:
            raise InputError("no training pairs: the train split is empty")
        self.train_src, self.train_tgt = train
        self.val_src, self.val_tgt = val
        self.val_refs, self.tokenizer = val_refs, target_tokenizer
        self.src_pad, self.sp, self.batch_size, self.seed = src_pad, sp, batch_size, seed
        self.label_smoothing, self.eval_tokens = label_smoothing, eval_tokens
        self.bleu_rows = min(bleu_rows, len(self.val_src))
        self.bleu_tokenize = bleu_tokenize(val_refs[:self.bleu_rows])
        self.lengths = [len(s) + len(t) for s, t in zip(self.train_src, self.train_tgt)]
        self.n_batches = -(-len(self.lengths) // batch_size)
        self.eval_keys = ("nll_sum", "tokens") + tuple(f"bleu_{i}" for i in range(BLEU_STATS))

    @functools.lru_cache(maxsize=4)
    def _epoch(self, epoch: int) -> list[np.ndarray]:
        return length_batches(self.lengths, self.batch_size, self.seed, epoch)

    def train_batch(self, step: int, micro: int, accum: int, rank: int, world: int):
        epoch, j = divmod((step * accum + micro) * world + rank, self.n_batches)
        idx = self._epoch(epoch)[j]
        return collate([self.train_src[i] for i in idx], [self.train_tgt[i] for i in idx],
                       self.src_pad, self.sp)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        src, src_len, tgt_in, tgt_out = batch
        return model(src, src_len, tgt_in, targets=tgt_out, label_smoothing=self.label_smoothing)

    def val_batches(self, rank: int, world: int):
        """This rank's val pairs by length, with each row's val index (rows < bleu_rows are
        decoded for BLEU); at most `eval_tokens` target tokens in all (0: the whole split)."""
        mine = sorted(range(rank, len(self.val_src), world), key=lambda i: len(self.val_src[i]))
        seen = 0
        for k in range(0, len(mine), 2 * self.batch_size):
            chunk = mine[k:k + 2 * self.batch_size]
            yield collate([self.val_src[i] for i in chunk], [self.val_tgt[i] for i in chunk],
                          self.src_pad, self.sp) + (torch.tensor(chunk),)
            seen += sum(len(self.val_tgt[i]) for i in chunk)
            if self.eval_tokens and seen >= self.eval_tokens:
                return

    def eval_sums(self, model: nn.Module, batch) -> dict[str, float]:
        src, src_len, tgt_in, tgt_out, idx = batch
        nll = model(src, src_len, tgt_in, targets=tgt_out, reduction="sum")
        sums = {"nll_sum": float(nll), "tokens": int((tgt_out != -100).sum())}
        rows = (idx < self.bleu_rows).nonzero().flatten().to(src.device)
        stats = [0] * BLEU_STATS
        if len(rows):
            # decoded in the weights' dtype: the KV cache is kept in it
            with torch.autocast(src.device.type, enabled=False):
                out = greedy(model, src[rows], src_len[rows], self.sp.start, self.sp.eos)
            hyps = [self.tokenizer.decode(r, skip_special_tokens=True).strip() for r in out]
            stats = bleu_stats(hyps, [self.val_refs[int(idx[r])] for r in rows.tolist()],
                               self.bleu_tokenize)
        sums.update({f"bleu_{i}": v for i, v in enumerate(stats)})
        return sums

    def eval_metrics(self, s: dict[str, float]) -> dict[str, float]:
        if not s.get("tokens"):
            return {}
        loss = s["nll_sum"] / s["tokens"]
        out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
        if self.bleu_rows:
            out["val_bleu"] = bleu_from_stats([s[f"bleu_{i}"] for i in range(BLEU_STATS)])
        return out

    def tokens_per_step(self, accum: int, world: int) -> int:
        """Source + target tokens of a step, on average over the training pairs."""
        return round(self.batch_size * accum * world * float(np.mean(self.lengths)))


# ------------------------------------------------------------------ generation

def _check_kind(model: nn.Module) -> None:
    if getattr(model, "kind", None) != "seq2seq":
        raise ConfigError(f"model kind {getattr(model, 'kind', '?')!r} is not an encoder–decoder "
                          "(train one with `lmlab seq2seq train`)")


def load_tokenizers(model_dir: str | Path, model: Seq2Seq) -> tuple[Tokenizer, Tokenizer]:
    """(source, target) tokenizers of a seq2seq model directory (one, if they are shared)."""
    _check_kind(model)
    target = Tokenizer.load(model_dir)
    if model.shared_vocab:
        return target, target
    source = Path(model_dir) / SOURCE_TOKENIZER
    if not (source / "tokenizer.json").is_file():
        raise InputError(f"{model_dir}: no {SOURCE_TOKENIZER}/ (the model has two vocabularies); "
                         "load the run directory that `lmlab seq2seq train` wrote")
    return Tokenizer.load(source), target


@torch.no_grad()
def generate_texts(model: Seq2Seq, source_tokenizer: Tokenizer, target_tokenizer: Tokenizer,
                   texts: Sequence[str], beam: int = 1, length_penalty: float = 1.0,
                   max_new_tokens: int | None = None, batch_size: int = 32) -> list[str]:
    """The model's output for each text: greedy (`beam=1`) or beam search, in batches of
    similar source lengths."""
    _check_kind(model)
    model.eval()
    device = next(model.parameters()).device
    src_pad, sp = specials(source_tokenizer, target_tokenizer)
    rows = encode_texts(source_tokenizer, texts, model.spec.max_source_len)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out: list[str] = [""] * len(rows)
    for k in range(0, len(order), batch_size):
        chunk = order[k:k + batch_size]
        src, lengths = (t.to(device) for t in pad_batch([rows[i] for i in chunk], src_pad))
        if beam == 1:
            ids = greedy(model, src, lengths, sp.start, sp.eos, max_new_tokens)
        else:
            ids = [h.ids for h in beam_search(model, src, lengths, sp.start, sp.eos, beam,
                                              length_penalty, max_new_tokens)]
        for i, r in zip(chunk, ids):
            out[i] = target_tokenizer.decode(r, skip_special_tokens=True).strip()
    return out


def first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def baseline(sources: Sequence[str]) -> tuple[str, list[str]]:
    """The trivial baseline's name and outputs: each source copied (translation), or its first
    line (summarization: the lead; for a function, its signature)."""
    one_line = all("\n" not in s.strip() for s in sources)
    return ("source copied" if one_line else "first line of the source",
            [first_line(s) for s in sources])


# ------------------------------------------------------------------ the command

@dataclass
class Seq2SeqResult:
    run: RunResult
    test: dict[str, Any]  # generation_metrics of the model on the test split, and n
    baseline: dict[str, Any]  # the same, of the trivial baseline
    baseline_name: str
    data_report: dict[str, Any]


def _tokenizers(cfg: Seq2SeqConfig, run_dir: Path, sources: list[str], targets: list[str]
                ) -> tuple[Tokenizer, Tokenizer, str]:
    """(source, target, the target tokenizer's directory): given, or trained on the train split
    into RUN/tokenizer (and RUN/source_tokenizer with two vocabularies); kept on resume."""
    from lmlab.tokenizer import train_tokenizer

    def made(given: str | None, out: Path, texts: list[str]) -> str:
        if given:
            return given
        if not (out / "tokenizer.json").is_file():
            train_tokenizer(texts, cfg.vocab_size).save(out)
        return str(out)

    if cfg.vocab == "shared":
        target_dir = made(cfg.tokenizer, run_dir / "tokenizer", sources + targets)
        target = Tokenizer.load(target_dir)
        return target, target, target_dir
    target_dir = made(cfg.tokenizer, run_dir / "tokenizer", targets)
    source_dir = run_dir / SOURCE_TOKENIZER
    if cfg.source_tokenizer:  # a copy in the run directory, which is the model directory
        Tokenizer.load(cfg.source_tokenizer).save(source_dir, replace=True)
    made(None, source_dir, sources)
    return Tokenizer.load(source_dir), Tokenizer.load(target_dir), target_dir


def train_seq2seq(cfg: Seq2SeqConfig, callback=None) -> Seq2SeqResult:
    """Train an encoder–decoder as `cfg` says (the one loop, `run_task`); score the test split."""
    from lmlab.model_io import load_model_dir

    data = load_pairs(cfg.data, cfg.source_field, cfg.target_field, cfg.val_fraction,
                      cfg.test_fraction, cfg.split_seed)
    train_src, train_tgt = data.split("train")
    val_src, val_tgt = data.split("val")
    run_dir = Path(cfg.out_dir)
    builtin = cfg.data in BUILTIN
    inputs = {k: v for k, v in dataclasses.asdict(cfg).items()
              if k not in ("out_dir", "resume", "overwrite")}
    inputs["data"] = cfg.data if builtin else absolute(cfg.data)
    reads = tuple(p for p in (cfg.tokenizer, cfg.source_tokenizer) if p) + (
        () if builtin else (cfg.data,))
    claim = claim_run_dir(run_dir, "seq2seq train", inputs, reads, cfg.overwrite, cfg.resume)

    torch.manual_seed(cfg.train.seed)
    src_tok, tgt_tok, tokenizer_dir = _tokenizers(cfg, run_dir, train_src, train_tgt)
    src_pad, sp = specials(src_tok, tgt_tok)
    spec = cfg.model
    model = Seq2Seq(spec, tgt_tok.vocab_size,
                    None if cfg.vocab == "shared" else src_tok.vocab_size)

    def ids(sources, targets):
        return (encode_texts(src_tok, sources, spec.max_source_len),
                encode_targets(tgt_tok, targets, spec.max_target_len))

    task = Seq2SeqTask(ids(train_src, train_tgt), ids(val_src, val_tgt), val_tgt, tgt_tok,
                       src_pad, sp, cfg.train.batch_size, cfg.train.seed, cfg.label_smoothing,
                       cfg.bleu_rows, cfg.train.eval_tokens)
    result = run_task(model, task, cfg.train, run_dir, resume=cfg.resume, run_config=cfg,
                      tokenizer_dir=tokenizer_dir, callback=callback, command="seq2seq train",
                      claim=claim)
    # the test split, decoded by the model directory the run left, beside the baseline
    trained = load_model_dir(run_dir, device=pick_device(cfg.train.device)).eval()
    test_src, test_tgt = data.split("test")
    test, base, name = {"n": 0}, {"n": 0}, baseline(test_src)[0]
    if test_src:
        hyps = generate_texts(trained, src_tok, tgt_tok, test_src, cfg.beam, cfg.length_penalty)
        name, base_hyps = baseline(test_src)
        test = {"n": len(test_src), **generation_metrics(hyps, test_tgt)}
        base = {"n": len(test_src), **generation_metrics(base_hyps, test_tgt)}
        atomic_write_text(run_dir / "test_outputs.jsonl", "".join(
            json.dumps({"source": s, "reference": r, "output": h}, ensure_ascii=False) + "\n"
            for s, r, h in zip(test_src, test_tgt, hyps)))
    atomic_write_text(run_dir / "test_metrics.json", json.dumps(
        {"test": test, "baseline": {"name": name, **base},
         "decoding": {"beam": cfg.beam, "length_penalty": cfg.length_penalty},
         "data": data.report}, indent=2, ensure_ascii=False))
    return Seq2SeqResult(run=result, test=test, baseline=base, baseline_name=name,
                         data_report=data.report)
