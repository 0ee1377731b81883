"""SFT throughput: packed rows against one padded conversation per row.

The conversations are what every machine has: each standard-library function with a
docstring as a chat turn, "写一个 Python 函数：<its docstring's first sentence>" →
its source (`lmlab.data.pairs`, the `stdlib-summaries` set), kept where the rendered
conversation is 20-400 tokens — a long-tailed mix like real instruction data. Both
variants train the same model (preset `small`, 6 layers × 384, context 512, fp32;
`--preset` for another) from the same weights with the real `Trainer.train_step`
(batch building included), the same number of steps of 8 rows, interleaved round by
round; each figure is the median over rounds:

- trained tokens/s: assistant tokens (the loss's) per second — what SFT is for;
- conversation tokens/s: every real token, prompt included, padding not;
- padding: the share of row positions that hold no conversation.

    python benchmarks/sft_packing.py [--rounds 3] [--steps 4] [--preset small]

Before timing, each variant runs once at every row width it will meet (batches are
padded to a multiple of 64 tokens), so the fast paths measured per shape
(`lmlab.model.fastpath`) are decided outside the timed steps; they are printed after
the table.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from decode_throughput import cpu_name  # a sibling script: benchmarks/ is sys.path[0]

from lmlab.config import TrainConfig
from lmlab.data.chat import render_chat
from lmlab.data.pairs import load_pairs
from lmlab.finetune.sft import IGNORE, PAD_MULTIPLE, SFTTask, make_example
from lmlab.model import Transformer, fastpath, preset
from lmlab.tokenizer import train_tokenizer
from lmlab.train.distributed import Dist
from lmlab.train.trainer import Trainer

SEQ, BATCH, LENGTHS = 512, 8, (20, 400)


def conversations() -> tuple[list, object]:
    pairs = load_pairs("stdlib-summaries")
    chats = [[{"role": "user", "content": f"写一个 Python 函数：{summary}"},
              {"role": "assistant", "content": source}]
             for source, summary in zip(pairs.sources, pairs.targets)]
    tok = train_tokenizer((m["content"] for c in chats for m in c), vocab_size=4096)
    examples = [make_example(*render_chat(tok, c)) for c in chats]
    return [e for e in examples if LENGTHS[0] <= len(e.ids) <= LENGTHS[1]], tok


class Variant:
    def __init__(self, batching: str, examples, pad_id: int, vocab: int, run_dir: Path,
                 model_preset: str):
        torch.manual_seed(0)
        model = Transformer(preset(model_preset, vocab_size=vocab, max_seq_len=SEQ))
        self.task = SFTTask(examples, [], SEQ, BATCH, batching, pad_id, seed=0)
        cfg = TrainConfig(batch_size=BATCH, precision="fp32", lr=1e-4, weight_decay=0.0)
        self.trainer = Trainer(model, self.task, cfg, run_dir, Dist(), flops_per_token=0.0)
        self.trainer.metrics.enabled = False
        self.name, self.pad_id = batching, pad_id

    def warm_up(self) -> None:
        """One step at each row width the rows of the first epochs need (fast paths decided)."""
        widths, seen = {}, 0
        while len(widths) < SEQ // PAD_MULTIPLE and seen < 200:
            batch = self.task.train_batch(seen, 0, 1, 0, 1)
            widths.setdefault(batch["ids"].shape[1], seen)
            seen += 1
        for step in sorted(widths.values()):
            self.trainer.step = step
            self.trainer.train_step(1e-4)

    def run(self, steps: int) -> dict[str, float]:
        """`steps` training steps, timed; their tokens counted beforehand, untimed."""
        batches = [self.task.train_batch(s, 0, 1, 0, 1)
                   for s in range(self.trainer.step, self.trainer.step + steps)]
        trained = sum(int((b["targets"] != IGNORE).sum()) for b in batches)
        real = sum(int((b["ids"] != self.pad_id).sum()) for b in batches)
        slots = sum(b["ids"].numel() for b in batches)
        t0 = time.perf_counter()
        for _ in range(steps):
            self.trainer.train_step(1e-4)
        dt = time.perf_counter() - t0
        return {"trained/s": trained / dt, "tokens/s": real / dt, "padding": 1 - real / slots}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--preset", default="small", help="the model (an lmlab preset)")
    args = ap.parse_args()
    examples, tok = conversations()
    lengths = sorted(len(e.ids) for e in examples)
    print(f"{len(examples)} conversations, {lengths[0]}-{lengths[-1]} tokens (median "
          f"{lengths[len(lengths) // 2]}); rows of {SEQ}, {BATCH} per step, preset "
          f"{args.preset}, fp32, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        variants = [Variant(b, examples, tok.pad_id, tok.vocab_size, Path(tmp) / b, args.preset)
                    for b in ("pack", "pad")]
        for v in variants:
            v.warm_up()
        results: dict[str, list[dict[str, float]]] = {v.name: [] for v in variants}
        for r in range(args.rounds):
            for v in (variants if r % 2 == 0 else variants[::-1]):
                results[v.name].append(v.run(args.steps))
    med = {name: {k: statistics.median(x[k] for x in rows) for k in rows[0]}
           for name, rows in results.items()}
    print(f"{'':6}{'trained tok/s':>15}{'conv. tok/s':>14}{'padding':>10}")
    for name, m in med.items():
        print(f"{name:6}{m['trained/s']:>15,.0f}{m['tokens/s']:>14,.0f}{m['padding']:>10.1%}")
    print(f"pack / pad: {med['pack']['trained/s'] / med['pad']['trained/s']:.2f}x trained "
          f"tokens/s, {med['pack']['tokens/s'] / med['pad']['tokens/s']:.2f}x conversation "
          "tokens/s")
    print(f"CPU: {cpu_name()}")
    print(fastpath.report())


if __name__ == "__main__":
    main()
