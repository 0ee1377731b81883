"""Pretraining: next-token prediction on token shards, run by the one Trainer.

`LanguageModelingTask` is the task: a batch is (inputs, targets) with targets
the inputs shifted by one, the loss is the mean cross-entropy of the targets
(maximum likelihood of the text), and validation reports loss, perplexity
(e^loss) and bits per byte (the loss summed over the held-out text, in bits,
divided by its UTF-8 bytes — a figure comparable across tokenizers, and with
compressors such as xz).

`pretrain(cfg)` builds everything from a `PretrainConfig` and returns the result.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from lmlab.config import PretrainConfig, to_yaml
from lmlab.data.loader import WindowBatches, eval_windows
from lmlab.data.shards import TokenShards, atomic_write_text
from lmlab.errors import ConfigError, InputError
from lmlab.model import Transformer
from lmlab.model.loss import linear_cross_entropy
from lmlab.model_io import has_tokenizer_files, save_model_dir
from lmlab.tokenizer import Tokenizer
from lmlab.train.distributed import init_distributed, shutdown_distributed
from lmlab.train.metrics import bits_per_byte, plot_loss_curve
from lmlab.train.trainer import FitResult, Trainer

log = logging.getLogger(__name__)


class LanguageModelingTask:
    def __init__(self, train: TokenShards, val: TokenShards | None, seq_len: int, batch_size: int,
                 token_bytes: list[int], seed: int, eval_tokens: int | None, device: torch.device):
        self.train = WindowBatches(train, seq_len, batch_size, seed)
        self.val, self.seq_len, self.batch_size = val, seq_len, batch_size
        self.eval_tokens = eval_tokens
        self.token_bytes = torch.tensor(token_bytes, dtype=torch.int64, device=device)
        self.device = device

    def _to(self, batch):
        x, y = batch
        nb = self.device.type == "cuda"
        return x.to(self.device, non_blocking=nb), y.to(self.device, non_blocking=nb)

    def train_batch(self, step, micro, accum, rank, world):
        return self._to(self.train.get(step, micro, accum, rank, world))

    def loss(self, model, batch):
        x, y = batch
        return model(x, targets=y)  # mean cross-entropy, logits never materialised

    def tokens_per_step(self, accum, world):
        return self.batch_size * self.seq_len * accum * world

    def val_batches(self, rank, world):
        if self.val is None:
            return
        # a tiny held-out split may be shorter than one training window
        seq = min(self.seq_len, len(self.val) - 1)
        for batch in eval_windows(self.val, seq, self.batch_size, self.eval_tokens, rank, world):
            yield self._to(batch)

    def eval_sums(self, model, batch):
        x, y = batch
        hidden = model(x, return_hidden=True)
        nats = linear_cross_entropy(hidden, model.lm_head.weight, y, reduction="none").view(-1)
        nbytes = self.token_bytes[y.reshape(-1)]
        # bits per byte counts text only: special tokens (EOS between documents) have no bytes
        return {"loss_sum": nats.sum().item(), "tokens": y.numel(),
                "text_nats": nats[nbytes > 0].sum().item(), "bytes": nbytes.sum().item()}

    def eval_metrics(self, s):
        if not s.get("tokens"):
            return {}
        loss = s["loss_sum"] / s["tokens"]
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)),
                "val_bpb": bits_per_byte(s["text_nats"], int(s["bytes"]))}


@dataclass
class PretrainResult:
    fit: FitResult
    run_dir: Path
    params: int
    model_config: dict
    loss_png: Path | None


def resolve_tokenizer_dir(cfg: PretrainConfig) -> str:
    if cfg.tokenizer:
        return cfg.tokenizer
    guess = Path(cfg.data) / "tokenizer"
    if has_tokenizer_files(guess):
        return str(guess)
    raise ConfigError(f"no tokenizer given and {guess} has none; set --tokenizer DIR "
                      "(the directory `lmlab tokenizer train --out` wrote)")


def pretrain(cfg: PretrainConfig, callback=None) -> PretrainResult:
    """Train a model from scratch (or resume) as `cfg` says; run under torchrun for DDP."""
    d = init_distributed(cfg.train.device)
    try:
        return _pretrain(cfg, d, callback)
    finally:
        shutdown_distributed()


def _pretrain(cfg: PretrainConfig, d, callback) -> PretrainResult:
    run_dir = Path(cfg.out_dir)
    tok_dir = resolve_tokenizer_dir(cfg)
    tokenizer = Tokenizer.load(tok_dir)
    train = TokenShards(cfg.data, "train")
    val = TokenShards(cfg.data, "val") if "val" in train.meta["splits"] else None
    if train.meta.get("tokenizer_hash") not in (None, tokenizer.hash):
        raise InputError(f"{cfg.data}: shards were made with another tokenizer than {tok_dir} "
                         "(hash differs); prepare the data again with this tokenizer")
    model_cfg = cfg.model.build(vocab_size=tokenizer.vocab_size)
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={model_cfg.vocab_size} < the tokenizer's "
                          f"{tokenizer.vocab_size}")
    seq_len = cfg.seq_len or model_cfg.max_seq_len
    if seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"seq_len={seq_len} > model.max_seq_len={model_cfg.max_seq_len}")
    if not cfg.resume and (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        raise ConfigError(f"{run_dir} already holds checkpoints; pass --resume to continue that "
                          "run, or choose another --out_dir")

    torch.manual_seed(cfg.train.seed)
    model = Transformer(model_cfg)
    task = LanguageModelingTask(train, val, seq_len, cfg.train.batch_size,
                                tokenizer.token_byte_lengths(), cfg.train.seed,
                                cfg.train.eval_tokens or None, d.device)
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    trainer = Trainer(model, task, cfg.train, run_dir, d, tokenizer_dir=tok_dir, callback=callback,
                      flops_per_token=model_cfg.flops_per_token(seq_len))
    if cfg.resume:
        if trainer.resume() is None:
            log.warning("--resume: no checkpoint in %s yet; starting from step 0", run_dir)
    result = trainer.fit()
    png = None
    if d.is_main:
        # the run directory is itself a model directory: `lmlab generate --model RUN_DIR`
        save_model_dir(trainer.raw_model, run_dir, tokenizer_dir=tok_dir)
        png = plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss.png")
    return PretrainResult(fit=result, run_dir=run_dir, params=model.num_params(),
                          model_config=model_cfg.to_dict(), loss_png=png)
