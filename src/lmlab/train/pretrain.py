"""Pretraining: next-token prediction on token shards, run by the one Trainer.

`LanguageModelingTask` is the task: a batch is (inputs, targets) with targets
the inputs shifted by one, the loss is the mean cross-entropy of the targets
(maximum likelihood of the text), and validation reports loss, perplexity
(e^loss) and bits per byte (the loss summed over the held-out text, in bits,
divided by its UTF-8 bytes — a figure comparable across tokenizers, and with
compressors such as xz; see `lmlab.eval`).

With `--objective mlm` the task is `lmlab.train.mlm.MaskedLMTask` instead: BERT's
masked language modelling, for a bidirectional encoder (kind "bert").

`pretrain(cfg)` builds the model of any registered kind from a
`PretrainConfig` and hands it with the task to `lmlab.train.runner.run_task` (or, for a
model that is counted rather than trained, the n-gram, to `fit_task`).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from lmlab.config import PretrainConfig
from lmlab.data.loader import WindowBatches, eval_windows
from lmlab.data.shards import TokenShards
from lmlab.errors import ConfigError, InputError
from lmlab.eval import bits_per_byte, perplexity
from lmlab.model import model_class
from lmlab.model_io import has_tokenizer_files
from lmlab.outputs import absolute
from lmlab.tokenizer import Tokenizer
from lmlab.train.runner import RunResult, fit_task, run_task

log = logging.getLogger(__name__)

PretrainResult = RunResult  # the name callers of lmlab ≤ 0.1 used


class LanguageModelingTask:
    """Next-token prediction over token-shard windows (batches built on the CPU)."""

    eval_keys = ("loss_sum", "tokens", "text_nats", "bytes")

    def __init__(self, train: TokenShards, val: TokenShards | None, seq_len: int, batch_size: int,
                 token_bytes: list[int], seed: int, eval_tokens: int | None):
        self.train = WindowBatches(train, seq_len, batch_size, seed)
        self.val, self.seq_len, self.batch_size = val, seq_len, batch_size
        self.eval_tokens = eval_tokens
        self.token_bytes = torch.tensor(token_bytes, dtype=torch.int64)

    def train_batch(self, step, micro, accum, rank, world):
        return self.train.get(step, micro, accum, rank, world)

    def loss(self, model, batch):
        x, y = batch
        return model(x, targets=y)  # mean cross-entropy, logits never materialised

    def train_chunks(self, tokens: int = 1 << 21):
        """The training split in order, in consecutive pieces (for a model that counts it)."""
        split = self.train.shards
        for start in range(0, len(split), tokens):
            yield split.slice(start, min(start + tokens, len(split)))

    def tokens_per_step(self, accum, world):
        return self.batch_size * self.seq_len * accum * world

    def val_batches(self, rank, world):
        if self.val is None:
            return
        # a tiny held-out split may be shorter than one training window
        seq = min(self.seq_len, len(self.val) - 1)
        yield from eval_windows(self.val, seq, self.batch_size, self.eval_tokens, rank, world)

    def eval_sums(self, model, batch):
        x, y = batch
        nats = model(x, targets=y, reduction="none").reshape(-1)
        if self.token_bytes.device != y.device:
            self.token_bytes = self.token_bytes.to(y.device)
        nbytes = self.token_bytes[y.reshape(-1)]
        # bits per byte counts text only: special tokens (EOS between documents) have no bytes
        return {"loss_sum": nats.sum().item(), "tokens": y.numel(),
                "text_nats": nats[nbytes > 0].sum().item(), "bytes": nbytes.sum().item()}

    def eval_metrics(self, s):
        if not s.get("tokens"):
            return {}
        loss = s["loss_sum"] / s["tokens"]
        return {"val_loss": loss, "val_ppl": perplexity(loss),
                "val_bpb": bits_per_byte(s["text_nats"], int(s["bytes"]))}


def resolve_tokenizer_dir(cfg: PretrainConfig) -> str:
    if cfg.tokenizer:
        return cfg.tokenizer
    guess = Path(cfg.data) / "tokenizer"
    if has_tokenizer_files(guess):
        return str(guess)
    raise ConfigError(f"no tokenizer given and {guess} has none; set --tokenizer DIR "
                      "(the directory `lmlab tokenizer train --out` wrote)")


def pretrain(cfg: PretrainConfig, callback=None, claim=None) -> RunResult:
    """Train a model from scratch (or resume) as `cfg` says; run under torchrun for DDP.

    `claim`: the caller's claim on `cfg.out_dir` (`lmlab.outputs`), if it made one."""
    tok_dir = resolve_tokenizer_dir(cfg)
    tokenizer = Tokenizer.load(tok_dir)
    train = TokenShards(cfg.data, "train")
    val = TokenShards(cfg.data, "val") if "val" in train.meta["splits"] else None
    if train.meta.get("tokenizer_hash") not in (None, tokenizer.hash):
        raise InputError(f"{cfg.data}: shards were made with another tokenizer than {tok_dir} "
                         "(hash differs); prepare the data again with this tokenizer")

    objective = getattr(model_class(cfg.model.kind), "objective", "clm")
    if objective != cfg.objective:
        hint = {"mlm": "a bidirectional encoder would see the very token it predicts; pass "
                       "--objective mlm",
                "clm": "masked language modelling needs a bidirectional encoder: "
                       "--model.kind bert",
                "seq2seq": "an encoder–decoder trains on pairs: lmlab seq2seq train",
                "classify": "a classifier trains on labelled texts: lmlab finetune classify",
                }.get(objective, f"it is trained for {objective!r}")
        raise ConfigError(f"objective={cfg.objective!r} cannot train model kind "
                          f"{cfg.model.kind!r}; {hint}")
    vocab, ids = tokenizer.vocab_size, f"{tokenizer.vocab_size} tokens"
    if cfg.objective == "mlm":  # the mask id: the tokenizer's own, or one row more
        from lmlab.train.mlm import MaskedLMTask, mask_token

        vocab = mask_token(tokenizer)[1]
        ids += " + the mask id" if vocab > tokenizer.vocab_size else ""
    torch.manual_seed(cfg.train.seed)  # the initial weights
    model = cfg.model.build_model(vocab_size=vocab)
    if model.vocab_size != vocab:
        why = ("its ids would not fit" if model.vocab_size < vocab else
               "the extra rows are never trained")
        raise ConfigError(f"model.vocab_size: {model.vocab_size} is not the tokenizer's "
                          f"{ids} ({tok_dir}) and {why}; leave "
                          "model.vocab_size unset to take the tokenizer's")
    seq_len = cfg.seq_len or model.max_seq_len or getattr(model, "default_seq_len", None)
    if seq_len is None:
        raise ConfigError(f"model kind {model.kind!r} has no max_seq_len; set --seq_len")
    if model.max_seq_len is not None and seq_len > model.max_seq_len:
        raise ConfigError(f"seq_len={seq_len} > model.max_seq_len={model.max_seq_len}")

    if cfg.objective == "mlm":
        task = MaskedLMTask(train, val, seq_len, cfg.train.batch_size, tokenizer,
                            cfg.train.seed, cfg.train.eval_tokens or None)
    else:
        task = LanguageModelingTask(train, val, seq_len, cfg.train.batch_size,
                                    tokenizer.token_byte_lengths(), cfg.train.seed,
                                    cfg.train.eval_tokens or None)
    flops = model.flops_per_token(seq_len) if hasattr(model, "flops_per_token") else 0.0
    # what defines the run: everything in its config but where it goes and how it starts
    inputs = {k: v for k, v in dataclasses.asdict(cfg).items()
              if k not in ("out_dir", "resume", "overwrite")}
    inputs.update(data=absolute(cfg.data), tokenizer=absolute(tok_dir))
    if hasattr(model, "fit_counts"):  # counted, not trained (the n-gram): no gradient loop
        return fit_task(model, task, cfg.train, cfg.out_dir, resume=cfg.resume, run_config=cfg,
                        tokenizer_dir=tok_dir, callback=callback, command="pretrain",
                        inputs=inputs, reads=(cfg.data, tok_dir), overwrite=cfg.overwrite,
                        claim=claim)
    return run_task(model, task, cfg.train, cfg.out_dir, resume=cfg.resume, run_config=cfg,
                    tokenizer_dir=tok_dir, callback=callback, flops_per_token=flops,
                    command="pretrain", inputs=inputs, reads=(cfg.data, tok_dir),
                    overwrite=cfg.overwrite, claim=claim)
