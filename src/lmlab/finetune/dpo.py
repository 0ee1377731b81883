"""`lmlab finetune dpo`: preference tuning, Direct Preference Optimization (Rafailov et al. 2023).

People compare two responses y_w ≻ y_l to a prompt x. The Bradley–Terry model says they
prefer y_w with probability σ(r(x, y_w) − r(x, y_l)) for some reward r. The policy that
maximises E[r] − β·KL(π ‖ π_ref) is π(y|x) = π_ref(y|x)·exp(r(x, y)/β) / Z(x), so a policy
*defines* a reward, r(x, y) = β·log(π(y|x)/π_ref(y|x)) + β·log Z(x), and Z(x) cancels in the
difference. The negative log-likelihood of the preferences is then a loss of π alone:

    L = −log σ(β[(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))])

where log π(y|x) sums the log-probabilities of the response's tokens only (the prompt is
given, not predicted). No reward model, no sampling: a classification loss on pairs.

    pairs (JSONL) ─► rendered by the model's chat template: prompt ids, then each response
                  ─► split by a hash of the prompt (a prompt's pairs all in train or all in val)
                  ─► log π_ref(y_w|x), log π_ref(y_l|x) of every pair: the starting model, once,
                     without gradient, kept in RUN/ref_logps.safetensors (--resume reads it)
                  ─► PreferenceTask + the model ─► train.run_task (the one loop)

The reference is the starting model, frozen — and since its log-probabilities are numbers
cached per response, a step runs one model once: chosen and rejected in one batch
(right-padded; targets −100 outside the responses), no second copy of the weights. With LoRA
(`--lora.r 8`) the reference is the base with its adapters off.

Validation (the Trainer logs it; a training row carries the loss) reports, with reward
r = β(log π − log π_ref): val_loss, val_reward_acc — the fraction of pairs with r_w > r_l, a
tie counting ½, so the starting model (every reward 0) scores ½ exactly —, val_margin (mean
r_w − r_l), val_chosen_reward, val_rejected_reward. The run keeps the weights of its best
val_reward_acc (on a tie the earlier step's, nearer the reference).

Data: one JSON object per line, ``{"prompt": ..., "chosen": ..., "rejected": ...}``. The
prompt is a string (one user turn) or a list of ``{"role", "content"}`` messages; chosen and
rejected are strings (one assistant turn) or message lists (the turns after the prompt).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config import DPOConfig
from lmlab.data.chat import check_messages, ensure_chat_tokens, prompt_ids, render_chat
from lmlab.data.labelled import assign_splits, json_records
from lmlab.errors import ConfigError, InputError
from lmlab.eval.logprobs import sequence_logprobs
from lmlab.fileio import atomic_write_bytes, atomic_write_text
from lmlab.finetune.classify import pad_batch
from lmlab.finetune.lora import adapters_disabled, apply_lora
from lmlab.finetune.sft import claim_chat_run
from lmlab.model import require_causal_lm
from lmlab.model.loss import IGNORE_INDEX
from lmlab.model_io import UnreadableFile, read_safetensors
from lmlab.outputs import absolute
from lmlab.tokenizer import Tokenizer
from lmlab.train.distributed import autocast, autocast_dtype, pick_device
from lmlab.train.metrics import read_metrics
from lmlab.train.runner import RunResult, run_task

log = logging.getLogger(__name__)

REF_FILE = "ref_logps.safetensors"  # in the run directory: the reference's log-probabilities
REPORT_FILE = "dpo_metrics.json"
WIDTH_STEP = 16  # batch widths are multiples of this (see `pair_batch`)
_FORMAT = '{"prompt": ..., "chosen": ..., "rejected": ...}'


# ------------------------------------------------------------------ the loss

def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair, chosen rewards, rejected rewards) from the summed response log-probs."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(chosen_rewards - rejected_rewards), chosen_rewards, rejected_rewards


def reward_sums(policy: torch.Tensor, ref: torch.Tensor, beta: float) -> dict[str, float]:
    """Validation sums (`PreferenceTask.eval_keys`) of pairs whose log-probs are `policy` and
    `ref` (n, 2: chosen, rejected). A tie (margin exactly 0) counts ½ towards the accuracy."""
    losses, chosen, rejected = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta)
    margin = chosen - rejected
    acc = (margin > 0).double() + 0.5 * (margin == 0).double()
    return {"loss_sum": float(losses.sum()), "acc_sum": float(acc.sum()),
            "margin_sum": float(margin.sum()), "chosen_sum": float(chosen.sum()),
            "rejected_sum": float(rejected.sum()), "n": len(policy)}


# ------------------------------------------------------------------ reading pairs

@dataclass(frozen=True)
class PreferenceRecord:
    where: str  # "path:line"
    prompt: list[dict]
    chosen: list[dict]  # the turns after the prompt
    rejected: list[dict]


class _Refuse:
    """`json_records`' problem sink: here a bad row is an error, not a skipped row (a pair
    left out silently changes what the model is taught to prefer)."""

    def add(self, reason: str, where: str, what: str) -> None:
        raise InputError(f"{where}: {what}; a preference pair is {_FORMAT}")


def _messages(value: Any, where: str, name: str, role: str) -> list[dict]:
    """`value` as chat messages (`lmlab.data.chat.check_messages`): a string is one message
    of `role`."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list):
        raise InputError(f"{where}: {name} is a JSON {type(value).__name__}; give a string or "
                         'a list of {"role": ..., "content": ...} messages')
    if not value:
        raise InputError(f"{where}: {name} is empty; give its text")
    return check_messages(value, f"{where}: {name}")


def read_preferences(path: str | os.PathLike) -> list[PreferenceRecord]:
    """Every pair of a JSONL file; a bad row is an `InputError` naming `path:line` and the field:
    not JSON, a field missing, a prompt or response that is neither a string nor messages, an
    empty prompt or response, a response without an assistant turn, chosen = rejected."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file; give --data a JSONL file of {_FORMAT}")
    fields = {k: f"missing {k}" for k in ("prompt", "chosen", "rejected")}
    records = []
    for where, row in json_records(path, fields, _Refuse(), [0]):
        prompt = _messages(row["prompt"], where, "prompt", "user")
        if not any(m["content"].strip() for m in prompt):
            raise InputError(f"{where}: prompt is empty; give the question the responses answer")
        sides = {}
        for side in ("chosen", "rejected"):
            msgs = _messages(row[side], where, side, "assistant")
            answers = [m for m in msgs if m["role"] == "assistant"]
            if not answers:
                raise InputError(f"{where}: {side} has no assistant turn; a response is what "
                                 "the assistant says")
            if not any(m["content"].strip() for m in answers):
                raise InputError(f"{where}: {side} is empty; give the response's text")
            sides[side] = msgs
        if sides["chosen"] == sides["rejected"]:
            raise InputError(f"{where}: chosen and rejected are the same response, so there is "
                             "no preference to learn; fix one of them or drop the row")
        records.append(PreferenceRecord(where, prompt, sides["chosen"], sides["rejected"]))
    if not records:
        raise InputError(f"{path}: no preference pairs; each line is {_FORMAT}")
    return records


# ------------------------------------------------------------------ token ids

class Side(NamedTuple):
    """One response in its context: prompt + response ids, and per id its label (the id where
    it is a response token to score, else −100)."""

    ids: list[int]
    labels: list[int]


class Pair(NamedTuple):
    chosen: Side
    rejected: Side


def _response(tokenizer: Tokenizer, record: PreferenceRecord, prompt: list[int],
              side: str) -> tuple[list[int], list[bool]]:
    """The ids after `prompt` of the prompt followed by `side`'s turns, and which to score."""
    ids, mask = render_chat(tokenizer, record.prompt + getattr(record, side), where=record.where)
    if ids[:len(prompt)] != prompt:
        raise InputError(f"{record.where}: the chat template renders the prompt differently once "
                         f"{side} follows it, so the response's tokens cannot be told apart; use "
                         "a template that renders earlier turns as the generation prompt does")
    return ids[len(prompt):], mask[len(prompt):]


def encode_pairs(tokenizer: Tokenizer, records: Sequence[PreferenceRecord], seq_len: int
                 ) -> tuple[list[Pair | None], dict[str, int]]:
    """Each record's pair of sequences (None: dropped), and the counts.

    A pair longer than `seq_len` (prompt + its longer response) loses tokens from the
    prompt's left, both sides alike; one whose longer response leaves no prompt token is
    dropped. Both are counted and logged."""
    pairs: list[Pair | None] = []
    truncated = dropped = 0
    for r in records:
        prompt = prompt_ids(tokenizer, r.prompt)
        responses = [_response(tokenizer, r, prompt, s) for s in ("chosen", "rejected")]
        keep = seq_len - max(len(ids) for ids, _ in responses)
        if keep < 1:
            dropped += 1
            pairs.append(None)
            continue
        if len(prompt) > keep:
            truncated += 1
            prompt = prompt[-keep:]
        pairs.append(Pair(*(Side(prompt + ids, [IGNORE_INDEX] * len(prompt)
                                 + [t if m else IGNORE_INDEX for t, m in zip(ids, mask)])
                            for ids, mask in responses)))
    if truncated or dropped:
        log.warning("%d of %d pairs longer than seq_len %d: %d truncated from the prompt's "
                    "left, %d dropped (the response alone does not fit)", truncated + dropped,
                    len(records), seq_len, truncated, dropped)
    return pairs, {"pairs": len(records), "truncated": truncated, "dropped": dropped}


def pair_batch(pairs: Sequence[Pair], pad_id: int, max_width: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, targets), each (2B, T): the chosen sequences of `pairs`, then their rejected ones,
    right-padded; targets are the next ids, −100 where they are not response tokens.

    T is rounded up to a multiple of WIDTH_STEP (at most `max_width`): every new batch shape
    costs the CPU kernels' set-up (oneDNN, `lmlab.model.fastpath`'s timing), and pairs of
    every length would make a new shape nearly every step — measured, 30 steps of a tiny
    model on pairs of 15-220 tokens took 16.0 s unrounded and 11.5 s rounded to 16."""
    sides = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    ids, _ = pad_batch([s.ids[:-1] for s in sides], pad_id)
    targets, _ = pad_batch([s.labels[1:] for s in sides], IGNORE_INDEX)
    width = ids.shape[1]
    rounded = -(-width // WIDTH_STEP) * WIDTH_STEP
    if max_width is not None:
        rounded = max(width, min(rounded, max_width))
    extra = rounded - width
    return F.pad(ids, (0, extra), value=pad_id), F.pad(targets, (0, extra), value=IGNORE_INDEX)


def pair_logps(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log π(response | prompt) of a `pair_batch`: (B, 2), columns chosen and rejected."""
    return sequence_logprobs(model, ids, targets).float().view(2, -1).t()


@torch.no_grad()
def reference_logps(model: nn.Module, pairs: Sequence[Pair], pad_id: int, batch_size: int,
                    device: torch.device, amp_dtype: torch.dtype | None = None,
                    max_width: int | None = None) -> torch.Tensor:
    """(N, 2) float32 on the CPU: log π(y_w|x), log π(y_l|x) of every pair under `model` as it
    is (eval mode, no gradient), in batches of `batch_size` pairs."""
    was_training = model.training
    model.eval()
    out = [torch.zeros(0, 2)]
    with autocast(device, amp_dtype):
        for k in range(0, len(pairs), batch_size):
            ids, targets = pair_batch(pairs[k:k + batch_size], pad_id, max_width)
            out.append(pair_logps(model, ids.to(device), targets.to(device)).cpu())
    model.train(was_training)
    return torch.cat(out)


def _cache_key(pairs: Sequence[Pair], model_dir: str, amp_dtype: torch.dtype | None) -> bytes:
    """What the reference's log-probs depend on: the pairs' ids, the model's files, precision."""
    h = hashlib.sha256(f"{absolute(model_dir)}|{amp_dtype}".encode())
    for name in ("config.json", "model.safetensors"):
        p = Path(model_dir) / name
        if p.is_file():
            st = p.stat()
            h.update(f"|{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    for p in pairs:
        for side in p:
            h.update(np.asarray(side.ids + side.labels, dtype=np.int64).tobytes())
    return h.digest()


def cached_reference(path: Path, key: bytes, compute) -> tuple[torch.Tensor, bool]:
    """(the reference log-probs, whether `path` held them): read when its key is `key`, else
    `compute()`d and written there (rank 0), atomically."""
    from safetensors.torch import save

    if path.is_file():
        try:
            saved = read_safetensors(path)
            if bytes(saved["key"].tolist()) == key:
                return saved["logps"], True
            why = "computed for other pairs or another model"
        except (UnreadableFile, KeyError) as e:
            why = str(e)
        log.warning("%s: %s; computing the reference again", path, why)
    ref = compute()
    if int(os.environ.get("RANK", "0")) == 0:  # one process writes it
        atomic_write_bytes(path, save({"logps": ref.contiguous(),
                                       "key": torch.tensor(list(key), dtype=torch.uint8)}))
    return ref, False


# ------------------------------------------------------------------ the task

class PreferenceTask:
    """The DPO loss of pairs against their cached reference log-probs; validation rewards.

    Batches are a pure function of the step (each epoch a seeded permutation of the
    training pairs), so a resumed run sees the batches an uninterrupted one would.
    `tokens_per_step`: the tokens of both sides of a step's pairs, on average.
    """

    best_metric = "val_reward_acc"
    eval_keys = ("loss_sum", "acc_sum", "margin_sum", "chosen_sum", "rejected_sum", "n")

    def __init__(self, train: list[Pair], train_ref: torch.Tensor, val: list[Pair],
                 val_ref: torch.Tensor, beta: float, batch_size: int, pad_id: int, seed: int,
                 max_width: int | None = None):
        if not train:
            raise InputError("no training pairs: the train split is empty")
        self.train, self.train_ref, self.val, self.val_ref = train, train_ref, val, val_ref
        self.beta, self.batch_size, self.pad_id, self.seed = beta, batch_size, pad_id, seed
        self.max_width = max_width  # the widest batch the model takes (seq_len − 1)

    @functools.lru_cache(maxsize=4)
    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.train))

    def train_batch(self, step: int, micro: int, accum: int, rank: int, world: int):
        n = len(self.train)
        start = ((step * accum + micro) * world + rank) * self.batch_size
        idx = [int(self._order(q // n)[q % n]) for q in range(start, start + self.batch_size)]
        return (*pair_batch([self.train[i] for i in idx], self.pad_id, self.max_width),
                self.train_ref[idx])

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        ids, targets, ref = batch
        policy = pair_logps(model, ids, targets)
        return dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], self.beta)[0].mean()

    def val_batches(self, rank: int, world: int):
        mine = list(range(rank, len(self.val), world))
        for k in range(0, len(mine), self.batch_size):
            idx = mine[k:k + self.batch_size]
            yield (*pair_batch([self.val[i] for i in idx], self.pad_id, self.max_width),
                   self.val_ref[idx])

    def eval_sums(self, model: nn.Module, batch) -> dict[str, float]:
        ids, targets, ref = batch
        return reward_sums(pair_logps(model, ids, targets), ref, self.beta)

    def eval_metrics(self, s: dict[str, float]) -> dict[str, float]:
        if not s.get("n"):
            return {}
        n = s["n"]
        return {"val_loss": s["loss_sum"] / n, "val_reward_acc": s["acc_sum"] / n,
                "val_margin": s["margin_sum"] / n, "val_chosen_reward": s["chosen_sum"] / n,
                "val_rejected_reward": s["rejected_sum"] / n}

    def tokens_per_step(self, accum: int, world: int) -> int:
        per_pair = sum(len(p.chosen.ids) + len(p.rejected.ids) for p in self.train) / len(self.train)
        return int(round(per_pair * self.batch_size * accum * world))


# ------------------------------------------------------------------ the command

@dataclass
class DPOResult:
    run: RunResult
    before: dict[str, float]  # val metrics of the starting model (= the reference: acc ½)
    after: dict[str, float]  # val metrics of the weights the run directory holds
    data_report: dict[str, int]  # pairs, truncated, dropped, train, val
    ref_reused: bool  # the reference log-probs were read from RUN/ref_logps.safetensors


def _seq_len(cfg: DPOConfig, model: nn.Module) -> int:
    limit = getattr(model, "max_seq_len", None)
    if cfg.seq_len is None:
        return min(limit or 1024, 1024)
    if limit and cfg.seq_len > limit:
        raise ConfigError(f"seq_len {cfg.seq_len}: the model reads at most {limit} tokens; "
                          f"pass --seq_len {limit} or less")
    return cfg.seq_len


def _kept_val_metrics(run_dir: Path, result: RunResult) -> dict[str, float]:
    """The validation row of the step whose weights the run directory holds."""
    if result.best is None:
        return dict(result.fit.val)
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl")
            if r.get("step") == result.best["step"] and "val_reward_acc" in r]
    return {k: v for k, v in rows[-1].items() if k.startswith("val_")} if rows else {}


def finetune_dpo(cfg: DPOConfig, callback=None) -> DPOResult:
    """Tune `cfg.model` on the preference pairs of `cfg.data` (the one loop, `run_task`)."""
    from lmlab.model_io import load_model_dir

    if not cfg.model:
        raise ConfigError("model: give --model DIR, the model to tune (usually an SFT run)")
    if not cfg.data:
        raise ConfigError(f"data: give --data FILE, a JSONL file of {_FORMAT}")
    records = read_preferences(cfg.data)
    model = load_model_dir(cfg.model)
    require_causal_lm(model, "finetune dpo")
    base_tokenizer = Tokenizer.load(cfg.model)
    tokenizer = ensure_chat_tokens(base_tokenizer, model)
    grown = tokenizer is not base_tokenizer
    seq_len = _seq_len(cfg, model)
    encoded, report = encode_pairs(tokenizer, records, seq_len)
    kept = [i for i, p in enumerate(encoded) if p is not None]
    pairs = [encoded[i] for i in kept]  # in file order: the rows of the reference cache
    split = assign_splits([json.dumps(records[i].prompt, ensure_ascii=False) for i in kept],
                          cfg.val_fraction, 0.0, cfg.split_seed)
    train, val = split["train"], split["val"]
    report.update(train=len(train), val=len(val))
    if not train:
        raise InputError(f"{cfg.data}: no training pairs left ({report}); raise --seq_len or "
                         "lower --val_fraction")

    run_dir = Path(cfg.out_dir)
    claim, tokenizer_dir = claim_chat_run(cfg, "finetune dpo", tokenizer, grown)
    is_main = int(os.environ.get("RANK", "0")) == 0
    torch.manual_seed(cfg.train.seed)
    # adapters (lora.r > 0; a model loaded from an adapter run has its adapters folded in);
    # ChatML's new rows, if the tokenizer had to grow, train whole beside them
    model = apply_lora(model, cfg.lora, cfg.model,
                       train=("tok_emb", "lm_head") if grown else ("head",),
                       seed=cfg.train.seed)
    device = pick_device(cfg.train.device, int(os.environ.get("LOCAL_RANK", "0")))
    amp = autocast_dtype(cfg.train.precision, device)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    model.to(device)

    def compute() -> torch.Tensor:  # taken before training: the starting model, exactly
        with adapters_disabled(model):  # (with LoRA, the base: adapters off)
            return reference_logps(model, pairs, pad, cfg.train.batch_size, device, amp,
                                   seq_len - 1)

    ref, reused = cached_reference(run_dir / REF_FILE, _cache_key(pairs, cfg.model, amp), compute)
    task = PreferenceTask([pairs[i] for i in train], ref[train], [pairs[i] for i in val],
                          ref[val], cfg.beta, cfg.train.batch_size, pad, cfg.train.seed,
                          seq_len - 1)
    before = task.eval_metrics(reward_sums(task.val_ref, task.val_ref, cfg.beta)) if val else {}
    result = run_task(model, task, cfg.train, run_dir, resume=cfg.resume, run_config=cfg,
                      tokenizer_dir=tokenizer_dir, callback=callback, command="finetune dpo",
                      claim=claim, trainable_only=bool(cfg.lora.r))
    after = _kept_val_metrics(run_dir, result)
    if is_main:
        atomic_write_text(run_dir / REPORT_FILE, json.dumps(
            {"before": before, "after": after, "data": report, "best": result.best}, indent=2))
    return DPOResult(run=result, before=before, after=after, data_report=report,
                     ref_reused=reused)
