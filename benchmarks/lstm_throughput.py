"""Recurrent language-model training: lmlab's `lstm` kind in its Trainer against a plain
`nn.LSTM` loop, and both against the same-size Transformer.

Same network (vocab 4096, embedding = hidden = 256, 2 LSTM layers, the output layer tied
to the embedding), same batch (16 windows of 256 tokens), same optimizer (torch AdamW,
fused where available), same gradient clipping, fp32. lmlab runs its real
`Trainer.train_step` (windows read from token shards); the plain loop is the one the
seeds write: Embedding → nn.LSTM → Linear → `F.cross_entropy` over the full logits.
A GPT-2-style Transformer of about the same parameter count (lmlab's quickstart CPU
model, d_model 128 × 4 layers) runs in the same Trainer, to answer the issue's
question "is any model more than 2× slower per token than the same-size Transformer?".
A second table answers it for the other kinds, each in one plain training step (forward
with its loss, backward, AdamW) at the Transformer's width and depth: the BERT-style
encoder (its MLM loss on 15 % of positions) and the encoder–decoder (2 + 2 layers; a
token is a source or a target token, 128 of each per row).
Variants are interleaved round by round; each figure is the median over rounds.

    python benchmarks/lstm_throughput.py [--rounds 3] [--steps 4] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from decode_throughput import cpu_name  # a sibling script: benchmarks/ is sys.path[0]
from lmlab.config import ModelSpec, TrainConfig
from lmlab.data.shards import TokenShards, TokenShardWriter
from lmlab.train.distributed import Dist
from lmlab.train.pretrain import LanguageModelingTask
from lmlab.train.trainer import Trainer

VOCAB, D, LAYERS, BATCH, SEQ = 4096, 256, 2, 16, 256


def random_shards(root: Path) -> Path:
    rng = np.random.default_rng(0)
    with TokenShardWriter(root, VOCAB, eos_id=0) as w:
        for _ in range(64):
            w.add(rng.integers(1, VOCAB, 4096), "train")
    return root


class LmlabVariant:
    def __init__(self, spec: ModelSpec, shards: Path, run_dir: Path):
        torch.manual_seed(0)
        self.model = spec.build_model(vocab_size=VOCAB)
        task = LanguageModelingTask(TokenShards(shards, "train"), None, SEQ, BATCH,
                                    [1] * VOCAB, seed=0, eval_tokens=None)
        cfg = TrainConfig(batch_size=BATCH, precision="fp32", lr=1e-3)
        self.trainer = Trainer(self.model, task, cfg, run_dir, Dist(), flops_per_token=0.0)
        self.trainer.metrics.enabled = False

    def step(self):
        self.trainer.train_step(1e-3)


class PlainLSTM(nn.Module):
    """The seeds' model as one writes it with torch alone."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.lstm = nn.LSTM(D, D, num_layers=LAYERS, batch_first=True)
        self.out = nn.Linear(D, VOCAB, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, x):
        h, _ = self.lstm(self.embed(x))
        return self.out(h)


class PlainVariant:
    def __init__(self):
        torch.manual_seed(0)
        self.model = PlainLSTM().train()
        try:
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, fused=True)
        except (RuntimeError, TypeError):
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(0)
        self.batches = [torch.randint(1, VOCAB, (BATCH, SEQ + 1), generator=g) for _ in range(8)]
        self.i = 0

    def step(self):
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        x, y = b[:, :-1], b[:, 1:]
        loss = F.cross_entropy(self.model(x).flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per variant per round")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="lmlab-bench-"))
    shards = random_shards(tmp / "shards")
    lstm = ModelSpec(kind="lstm", d_model=D, n_layer=LAYERS)
    gpt2 = ModelSpec(preset="small", d_model=128, n_head=2, n_layer=4, max_seq_len=SEQ)
    variants = {"lmlab lstm": LmlabVariant(lstm, shards, tmp / "lstm"),
                "plain nn.LSTM loop": PlainVariant(),
                "lmlab transformer": LmlabVariant(gpt2, shards, tmp / "gpt2")}
    params = {k: sum(p.numel() for p in v.model.parameters()) for k, v in variants.items()}
    print(f"{cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"batch {BATCH}×{SEQ}, vocab {VOCAB}")
    for name, v in variants.items():  # warm up: oneDNN primitives, fast-path measurements
        for _ in range(2):
            v.step()
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, v in variants.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                v.step()
            rates[name].append(args.steps * BATCH * SEQ / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\n{'variant':22s} {'parameters':>11s} {'tok/s':>9s}")
    for k in variants:
        print(f"{k:22s} {params[k]:11,d} {med[k]:9,.0f}")
    print(f"\nlmlab lstm / plain nn.LSTM loop: {med['lmlab lstm'] / med['plain nn.LSTM loop']:.2f}×")
    print(f"lmlab lstm / lmlab transformer (per token): "
          f"{med['lmlab lstm'] / med['lmlab transformer']:.2f}×")
    kinds_table(args.rounds, args.steps)


class PlainStep:
    """One training step of any kind: `loss_of(model)` → backward → clip → AdamW."""

    def __init__(self, model: nn.Module, loss_of, tokens: int):
        self.model, self.loss_of, self.tokens = model.train(), loss_of, tokens
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(self):
        loss = self.loss_of(self.model)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def kinds_table(rounds: int, steps: int) -> None:
    from lmlab.model import build_from_spec

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(5, VOCAB, (BATCH, SEQ), generator=g)
    y = torch.randint(5, VOCAB, (BATCH, SEQ), generator=g)
    mlm = torch.where(torch.rand(BATCH, SEQ, generator=g) < 0.15, y, torch.full_like(y, -100))
    half = SEQ // 2
    lengths = torch.full((BATCH,), half)
    shape = dict(d_model=128, n_head=2, dropout=0.0)
    gpt2 = build_from_spec("transformer", dict(preset="small", n_layer=4, max_seq_len=SEQ,
                                               vocab_size=VOCAB, **shape))
    bert = build_from_spec("bert", dict(preset="bert-tiny", n_layer=4, max_seq_len=SEQ,
                                        vocab_size=VOCAB, **shape))
    s2s = build_from_spec("seq2seq", dict(n_encoder_layer=2, n_decoder_layer=2,
                                          max_source_len=half, max_target_len=half,
                                          vocab_size=VOCAB, **shape))
    variants = {
        "transformer (causal LM)": PlainStep(gpt2, lambda m: m(x, targets=y), BATCH * SEQ),
        "bert (masked LM)": PlainStep(bert, lambda m: m(x, targets=mlm), BATCH * SEQ),
        "seq2seq (2 + 2 layers)": PlainStep(
            s2s, lambda m: m(x[:, :half], lengths, x[:, half:], targets=y[:, half:]),
            BATCH * SEQ),
    }
    for v in variants.values():
        for _ in range(2):
            v.step()
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, v in variants.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                v.step()
            rates[name].append(steps * v.tokens / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in rates.items()}
    base = med["transformer (causal LM)"]
    print(f"\n{'kind, d 128 × 4 layers':26s} {'parameters':>11s} {'tok/s':>9s} {'vs transformer':>15s}")
    for k, v in variants.items():
        n = sum(p.numel() for p in v.model.parameters())
        print(f"{k:26s} {n:11,d} {med[k]:9,.0f} {med[k] / base:14.2f}×")


if __name__ == "__main__":
    main()
