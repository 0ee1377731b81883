"""Supervised fine-tuning (SFT): a base model learns to answer in the chat template.

For a conversation x with assistant mask m (`lmlab.data.chat.render_chat`), SFT
maximises the likelihood of the assistant's tokens given everything before them:

    L(θ) = − Σ_t m_{t+1} · log p_θ(x_{t+1} | x_≤t) / Σ_t m_{t+1}

the next-token cross-entropy with target x_{t+1} where m_{t+1} is True, else -100
(not counted). The prompt and the user's turns are read, never learned, and the
end-of-turn token after each answer is learned, so the model stops by itself.

Batches (`SFTTask`) are a pure function of the step: each epoch a seeded permutation of
the training examples, cut into micro-batches by (step, micro-batch, rank) as
`ClassificationTask` does, so resuming gives the batches an uninterrupted run would
and DDP ranks take disjoint rows. Two ways to make rows:

- `pack`: examples, in the epoch's order, go into rows of `seq_len` tokens (best fit:
  the fullest row that still has room). A block-diagonal causal mask keeps each token
  to its own example and positions restart at 0 per example, so a packed example
  computes exactly what it would alone (tested), with almost no padding.
- `pad`: one example per row, right-padded to the longest in the micro-batch.

Either way a batch is padded up to a multiple of 64 tokens (`PAD_MULTIPLE`), so it has
few distinct shapes. `pack` is the default: on stdlib functions as chat turns (20-400
tokens, median 80) in rows of 512, preset `small`, it trained 2.5x the assistant tokens
per second of `pad`, whose rows were 61 % padding (1.4 % packed; benchmarks/sft_packing.py,
2-core AMD EPYC, a loaded machine: 1.6x in a shorter run).

The loss is the mean over the trained tokens of the whole optimizer step: the Trainer
divides each micro-batch's loss by the accumulation count and DDP averages over ranks,
which would weight a short answer's tokens more than a long one's. So each micro-batch
returns its summed nats × accum · world / N, N the trained tokens of the step on every
rank (known in advance: batches are a function of the step), and the Trainer's
averaging then gives Σ nats / N exactly.

`finetune_sft(cfg)` reads the conversations, splits them by content hash, runs the task
through `run_task` (the one loop; with `--lora.r`, adapters only) and answers held-out
prompts greedily before and after: exact match and how often the model stopped by itself.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import inspect
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmlab.config import SFTConfig
from lmlab.data.chat import (ensure_chat_tokens, iter_conversations, load_conversations,
                             prompt_ids, render_chat)
from lmlab.data.labelled import assign_splits
from lmlab.errors import ConfigError, InputError
from lmlab.eval import perplexity
from lmlab.fileio import atomic_write_text
from lmlab.infer import generate_ids
from lmlab.model import require_causal_lm
from lmlab.outputs import absolute
from lmlab.tokenizer import Tokenizer
from lmlab.train.runner import RunResult, claim_run_dir, run_task

log = logging.getLogger(__name__)

IGNORE = -100  # a target that is not counted
# batches are padded to a multiple of this many tokens: few distinct shapes, so the fast
# paths measured per shape (`lmlab.model.fastpath`) are timed a few times, not every step
PAD_MULTIPLE = 64


# ------------------------------------------------------------------ examples

@dataclass
class Example:
    ids: np.ndarray  # (L,) the conversation's tokens
    targets: np.ndarray  # (L,) the next token where it is an assistant token, else IGNORE


def masked_targets(labels: np.ndarray, mask: list[bool]) -> np.ndarray:
    """The target of position t: `labels[t]` (the next token) where `mask[t + 1]` marks it
    as trained, else IGNORE; the last position has no next token."""
    targets = np.full(len(labels) + 1, IGNORE, dtype=np.int64)
    m = np.asarray(mask[1:], dtype=bool)
    targets[:-1][m] = np.asarray(labels, dtype=np.int64)[m]
    return targets


def make_example(ids: list[int], mask: list[bool]) -> Example:
    """An example of a rendered conversation: its ids and the masked next-token targets."""
    ids_a = np.asarray(ids, dtype=np.int64)
    return Example(ids_a, masked_targets(ids_a[1:], mask))


def encode_examples(tokenizer: Tokenizer, conversations: list[tuple[str, list[dict]]],
                    seq_len: int, overlong: str) -> tuple[list[Example], dict[str, int]]:
    """Examples of `conversations` ((`path:line`, messages)) and the counts of what was cut:
    longer than `seq_len` → truncated (the start kept) or dropped, by `overlong`; an example
    left without a trained token is dropped."""
    counts = dict(conversations=len(conversations), truncated=0, tokens_cut=0,
                  dropped_overlong=0, dropped_no_answer=0)
    out = []
    for where, messages in conversations:
        ex = make_example(*render_chat(tokenizer, messages, where=where))
        cut = max(0, len(ex.ids) - seq_len)
        if cut and overlong == "drop":
            counts["dropped_overlong"] += 1
            continue
        # the last kept target is the first cut token: a real next token, still learned
        ex = Example(ex.ids[:seq_len], ex.targets[:seq_len])
        if not (ex.targets != IGNORE).any():
            counts["dropped_no_answer"] += 1
            continue
        if cut:
            counts["truncated"] += 1
            counts["tokens_cut"] += cut
        out.append(ex)
    counts["examples"] = len(out)
    return out, counts


def pack_rows(order: np.ndarray, lengths: np.ndarray, seq_len: int) -> list[tuple[int, ...]]:
    """Examples (indices in `order`) packed into rows of at most `seq_len` tokens: each goes
    into the row with the least room that still fits it (best fit), or a new row."""
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens left, row), sorted
    for i in order.tolist():
        n = int(lengths[i])
        k = bisect.bisect_left(room, (n, -1))
        left, r = room.pop(k) if k < len(room) else (seq_len, len(rows))
        if r == len(rows):
            rows.append([])
        rows[r].append(i)
        if left > n:
            bisect.insort(room, (left - n, r))
    return [tuple(r) for r in rows]


def collate(examples: list[Example], rows: list[tuple[int, ...]], pad_id: int,
            length: int | None = None) -> dict:
    """A batch of `rows` (each a tuple of example indices, laid end to end) padded to
    `length` (default: the longest row): ids, targets, and where a row holds several
    examples, positions restarting per example and a block-diagonal causal mask
    (B, 1, T, T); the padding after them is its own block."""
    T = max([length or 0] + [sum(len(examples[i].ids) for i in row) for row in rows])
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    positions = torch.zeros(len(rows), T, dtype=torch.long)
    segment = torch.full((len(rows), T), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        t = 0
        for k, i in enumerate(row):
            ex, n = examples[i], len(examples[i].ids)
            ids[b, t:t + n] = torch.from_numpy(ex.ids)
            targets[b, t:t + n] = torch.from_numpy(ex.targets)
            positions[b, t:t + n] = torch.arange(n)
            segment[b, t:t + n] = k
            t += n
        positions[b, t:] = torch.arange(T - t)
    batch = {"ids": ids, "targets": targets}
    if any(len(row) > 1 for row in rows):  # else plain causal attention is the same thing
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        batch["attn_mask"] = ((segment[:, :, None] == segment[:, None, :]) & causal)[:, None]
        batch["positions"] = positions
    return batch


def model_nats(model: nn.Module, batch: dict, reduction: str = "sum") -> torch.Tensor:
    """The cross-entropy of the batch's targets (summed, by default), through the model's own
    loss (no logits materialised); the mask and positions only when the batch has them."""
    extra = {k: batch[k] for k in ("attn_mask", "positions") if k in batch}
    return model(batch["ids"], targets=batch["targets"], reduction=reduction, **extra)


# ------------------------------------------------------------------ the task

class SFTTask:
    """The masked next-token loss over packed or padded rows of conversations (see the
    module docstring); validation: `val_loss` and `val_ppl` over the trained tokens."""

    eval_keys = ("loss_sum", "tokens")

    def __init__(self, train: list[Example], val: list[Example], seq_len: int, batch_size: int,
                 batching: str, pad_id: int, seed: int, eval_tokens: int | None = None):
        if not train:
            raise InputError("no training conversations: the train split is empty")
        self.train, self.val = train, val
        self.seq_len, self.batch_size, self.batching = seq_len, batch_size, batching
        self.pad_id, self.seed, self.eval_tokens = pad_id, seed, eval_tokens
        self.lengths = np.array([len(e.ids) for e in train])
        self.trained = np.array([int((e.targets != IGNORE).sum()) for e in train])
        self._starts = [0]  # the global row index each epoch starts at, as far as computed

    def _make_rows(self, lengths: np.ndarray, order: np.ndarray) -> list[tuple[int, ...]]:
        if self.batching == "pad":
            return [(int(i),) for i in order]
        return pack_rows(order, lengths, self.seq_len)

    @functools.lru_cache(maxsize=4)
    def epoch_rows(self, epoch: int) -> list[tuple[int, ...]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.train))
        return self._make_rows(self.lengths, order)

    def _row(self, q: int) -> tuple[int, ...]:
        """The q-th row of the stream of training rows, epoch after epoch."""
        while q >= self._starts[-1]:
            self._starts.append(self._starts[-1] + len(self.epoch_rows(len(self._starts) - 1)))
        epoch = bisect.bisect_right(self._starts, q) - 1
        return self.epoch_rows(epoch)[q - self._starts[epoch]]

    def _collate(self, examples: list[Example], rows: list[tuple[int, ...]]) -> dict:
        longest = max(sum(len(examples[i].ids) for i in row) for row in rows)
        length = min(self.seq_len, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)
        return collate(examples, rows, self.pad_id, length)

    def _rows(self, step: int, micro: int, accum: int, rank: int, world: int):
        start = ((step * accum + micro) * world + rank) * self.batch_size
        return [self._row(q) for q in range(start, start + self.batch_size)]

    def train_batch(self, step: int, micro: int, accum: int, rank: int, world: int) -> dict:
        rows = self._rows(step, micro, accum, rank, world)
        # the trained tokens of the whole step, every micro-batch of every rank
        n = sum(int(self.trained[list(row)].sum()) for m in range(accum) for r in range(world)
                for row in self._rows(step, m, accum, r, world))
        batch = self._collate(self.train, rows)
        batch["scale"] = torch.tensor(accum * world / n)
        return batch

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return model_nats(model, batch) * batch["scale"]

    @functools.cached_property
    def _val_rows(self) -> list[tuple[int, ...]]:
        rows = self._make_rows(np.array([len(e.ids) for e in self.val], dtype=np.int64),
                               np.arange(len(self.val)))
        if not self.eval_tokens:
            return rows
        seen, keep = 0, []
        for row in rows:  # the first rows holding eval_tokens tokens
            if seen >= self.eval_tokens:
                break
            keep.append(row)
            seen += sum(len(self.val[i].ids) for i in row)
        return keep

    def val_batches(self, rank: int, world: int):
        mine = self._val_rows[rank::world]
        for k in range(0, len(mine), self.batch_size):
            yield self._collate(self.val, mine[k:k + self.batch_size])

    def eval_sums(self, model: nn.Module, batch: dict) -> dict[str, float]:
        return {"loss_sum": float(model_nats(model, batch)),
                "tokens": int((batch["targets"] != IGNORE).sum())}

    def eval_metrics(self, s: dict[str, float]) -> dict[str, float]:
        if not s.get("tokens"):
            return {}
        loss = s["loss_sum"] / s["tokens"]
        return {"val_loss": loss, "val_ppl": perplexity(loss)}

    def tokens_per_step(self, accum: int, world: int) -> int:
        """Conversation tokens (not padding) per step, on average over the first epoch."""
        per_row = self.lengths.sum() / len(self.epoch_rows(0))
        return int(round(per_row * self.batch_size * accum * world))


# ------------------------------------------------------------------ answering

@torch.no_grad()
def answer_eval(model: nn.Module, tokenizer: Tokenizer, conversations: list[list[dict]],
                max_new_tokens: int, batch_size: int = 16) -> dict[str, Any]:
    """Greedy answers to each conversation's last (assistant) turn, given what precedes it:
    exact match with it (whitespace-stripped), and how many answers ended with a stop
    token (end of turn / eos) — the model stopping by itself."""
    model.eval()
    stops = tokenizer.stop_ids
    prompts = [prompt_ids(tokenizer, c[:-1]) for c in conversations]
    # batched by prompt length: a batch's budget is what its longest prompt leaves of the
    # context, so a long prompt does not cut the answers of short ones batched with it
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[dict[str, Any]] = [{}] * len(prompts)
    context = model.max_seq_len
    for k in range(0, len(order), batch_size):
        chunk = order[k:k + batch_size]
        longest = max(len(prompts[i]) for i in chunk)
        budget = max_new_tokens if context is None else min(max_new_tokens, context - longest + 1)
        outs = generate_ids(model, [prompts[i] for i in chunk], budget, temperature=0,
                            eos_id=stops)
        for i, out in zip(chunk, outs):
            c = conversations[i]
            stopped = bool(out) and out[-1] in stops
            text = tokenizer.decode(out[:-1] if stopped else out)
            answers[i] = {"prompt": c[-2]["content"] if len(c) > 1 else "",
                          "reference": c[-1]["content"], "answer": text,
                          "exact": text.strip() == c[-1]["content"].strip(),
                          "stopped": stopped}
    n = len(answers)
    return {"n": n, "exact_match": sum(a["exact"] for a in answers) / n if n else None,
            "stopped": sum(a["stopped"] for a in answers) / n if n else None,
            "answers": answers}


def eval_conversations(tokenizer: Tokenizer, conversations: list[list[dict]], rows: int,
                       max_seq_len: int | None) -> list[list[dict]]:
    """The first `rows` conversations that end with an assistant turn and whose prompt
    leaves room in the model's context for an answer."""
    out = []
    for c in conversations:
        if len(out) == rows:
            break
        if c[-1]["role"] == "assistant" and (
                max_seq_len is None or len(prompt_ids(tokenizer, c[:-1])) < max_seq_len):
            out.append(c)
    return out


# ------------------------------------------------------------------ the command

@dataclass
class SFTData:
    train: list[Example]
    val: list[Example]
    held_out: list[list[dict]]  # the val split's conversations, in file order
    report: dict[str, Any]  # counts: conversations, split sizes, truncated, dropped, tokens


def load_sft_data(path: str | Path, tokenizer: Tokenizer, seq_len: int, overlong: str,
                  val_fraction: float, seed: int) -> SFTData:
    """The conversations of `path`, split by a hash of their content (`assign_splits`) and
    encoded; what was cut or dropped is counted in the report and logged."""
    conversations = list(iter_conversations(path))
    if not conversations:
        raise InputError(f"{path}: no conversations")
    keys = [json.dumps(m, ensure_ascii=False, sort_keys=True) for _, m in conversations]
    splits = assign_splits(keys, val_fraction, 0.0, seed)
    encoded = {name: encode_examples(tokenizer, [conversations[i] for i in splits[name]],
                                     seq_len, overlong) for name in ("train", "val")}
    (train, counts), (val, val_counts) = encoded["train"], encoded["val"]
    report = {k: counts[k] + val_counts[k] for k in counts}
    report.update(dropped=report["dropped_overlong"] + report["dropped_no_answer"],
                  train=len(train), val=len(val), seq_len=seq_len,
                  tokens=int(sum(len(e.ids) for e in train)),
                  trained_tokens=int(sum(int((e.targets != IGNORE).sum()) for e in train)))
    if report["truncated"]:
        log.warning("%d conversations longer than seq_len=%d truncated (%d tokens cut)",
                    report["truncated"], seq_len, report["tokens_cut"])
    for key, why in (("dropped_overlong", f"longer than seq_len={seq_len}"),
                     ("dropped_no_answer", "without an assistant token left after truncation")):
        if report[key]:
            log.warning("%d conversations %s dropped", report[key], why)
    return SFTData(train, val, [conversations[i][1] for i in splits["val"]], report)


def claim_chat_run(cfg, command: str, tokenizer: Tokenizer, grown: bool,
                   **more_inputs: str | None) -> tuple[Any, str]:
    """Claim a fine-tuning run's directory (`cfg.out_dir`, reading `cfg.model`, `cfg.data`
    and the files of `more_inputs`); return the claim and the tokenizer directory the run
    carries: the model's, or — when ChatML's tokens had to be added — the grown tokenizer,
    saved into the run directory."""
    run_dir = Path(cfg.out_dir)
    inputs = {k: v for k, v in dataclasses.asdict(cfg).items()
              if k not in ("out_dir", "resume", "overwrite")}
    inputs.update(model=absolute(cfg.model), data=absolute(cfg.data),
                  **{k: v and absolute(v) for k, v in more_inputs.items()})
    reads = (cfg.model, cfg.data, *(v for v in more_inputs.values() if v))
    claim = claim_run_dir(run_dir, command, inputs, reads, cfg.overwrite, cfg.resume)
    if not grown:
        return claim, cfg.model
    tokenizer_dir = str(run_dir / "tokenizer")
    if int(os.environ.get("RANK", "0")) == 0:
        tokenizer.save(tokenizer_dir, replace=True)
    return claim, tokenizer_dir


@dataclass
class SFTResult:
    run: RunResult
    data: dict[str, Any]  # SFTData.report (+ pack_fill: tokens / (rows · seq_len))
    before: dict[str, Any]  # held-out answers of the starting model: n, exact_match, stopped
    after: dict[str, Any] | None  # the same after training (None if interrupted)
    eval_json: Path | None  # RUN/sft_eval.json


def _summary(scores: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if scores is None else {k: v for k, v in scores.items() if k != "answers"}


def finetune_sft(cfg: SFTConfig, callback=None) -> SFTResult:
    """Fine-tune `cfg.model` on the conversations of `cfg.data` (the one loop, `run_task`)."""
    from lmlab.finetune.lora import apply_lora
    from lmlab.model_io import load_model_dir

    if not cfg.model or not cfg.data:
        raise ConfigError("give --model DIR (the model to fine-tune) and --data FILE (JSONL "
                          "conversations)")
    model = load_model_dir(cfg.model)
    require_causal_lm(model, "finetune sft")
    base_tokenizer = Tokenizer.load(cfg.model)
    tokenizer = ensure_chat_tokens(base_tokenizer, model)
    grown = tokenizer is not base_tokenizer
    context = model.max_seq_len
    seq_len = cfg.seq_len or min(context or 1024, 1024)
    if context is not None and seq_len > context:
        raise ConfigError(f"seq_len={seq_len} > the model's max_seq_len={context}")
    if cfg.batching == "pack" and "attn_mask" not in inspect.signature(model.forward).parameters:
        raise ConfigError(f"batching=pack needs a model that takes an attention mask; model "
                          f"kind {model.kind!r} does not: use --batching pad")
    data = load_sft_data(cfg.data, tokenizer, seq_len, cfg.overlong, cfg.val_fraction,
                         cfg.split_seed)
    # adapters (lora.r > 0); a model loaded from an adapter run has its adapters folded in
    # ChatML's new rows, if the tokenizer had to grow, train whole beside the adapters
    model = apply_lora(model, cfg.lora, cfg.model, seed=cfg.train.seed,
                       train=("tok_emb", "lm_head") if grown else ("head",))
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id or 0
    task = SFTTask(data.train, data.val, seq_len, cfg.train.batch_size, cfg.batching, pad,
                   cfg.train.seed, cfg.train.eval_tokens or None)
    report = dict(data.report)
    if cfg.batching == "pack":
        report["pack_fill"] = report["tokens"] / (len(task.epoch_rows(0)) * seq_len)

    run_dir = Path(cfg.out_dir)
    claim, tokenizer_dir = claim_chat_run(cfg, "finetune sft", tokenizer, grown,
                                          eval_data=cfg.eval_data)
    is_main = int(os.environ.get("RANK", "0")) == 0

    held_out = eval_conversations(
        tokenizer, load_conversations(cfg.eval_data) if cfg.eval_data else data.held_out,
        cfg.eval_rows, context)
    before = answer_eval(model, tokenizer, held_out, cfg.max_new_tokens) if is_main else {}
    flops = model.flops_per_token(seq_len) if hasattr(model, "flops_per_token") else 0.0
    result = run_task(model, task, cfg.train, run_dir, resume=cfg.resume, run_config=cfg,
                      tokenizer_dir=tokenizer_dir, callback=callback, flops_per_token=flops,
                      trainable_only=bool(cfg.lora.r), command="finetune sft", claim=claim)
    after, eval_json = None, None
    if is_main and not result.fit.status.startswith("interrupted"):
        after = answer_eval(model, tokenizer, held_out, cfg.max_new_tokens)
        log.info("held-out answers (%d): exact match %s → %s, stopped by itself %s → %s",
                 after["n"], before["exact_match"], after["exact_match"], before["stopped"],
                 after["stopped"])
        answers = [{"prompt": b["prompt"], "reference": b["reference"], "before": b["answer"],
                    "after": a["answer"], "exact_before": b["exact"], "exact_after": a["exact"]}
                   for b, a in zip(before["answers"], after["answers"])]
        eval_json = run_dir / "sft_eval.json"
        atomic_write_text(eval_json, json.dumps(
            {"before": _summary(before), "after": _summary(after), "answers": answers,
             "data": report}, indent=2, ensure_ascii=False))
    return SFTResult(run=result, data=report, before=_summary(before) or {},
                     after=_summary(after), eval_json=eval_json)
