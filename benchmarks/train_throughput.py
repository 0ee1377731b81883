"""Training throughput: lmlab's training step against Hugging Face GPT2LMHeadModel.

Same architecture (n_layer 6, n_head 6, n_embd 384, context 256, vocab 8192),
same batch (8), same optimizer (torch AdamW, fused where available), same
gradient clipping; fp32 and bf16 autocast, each with and without torch.compile.
lmlab runs its real `Trainer.train_step` (data loading from token shards
included); HF runs the loop a user would write around `model(input_ids,
labels=...)`, once with each of its CPU attention implementations ("sdpa"
and "eager"), and each setting reports the faster of the two (on the
reference CPU "eager" wins under torch.compile, "sdpa" without). Variants are
interleaved round by round so that drift in machine load hits all of them
alike; each figure is the median over rounds.

    python benchmarks/train_throughput.py [--rounds 3] [--steps 5] [--no-compile]
                                          [--precisions fp32,bf16]
    python benchmarks/train_throughput.py --device cuda    # GPT-2-124M, context 1024, bf16

On a GPU (`--device cuda`) the default model is GPT-2-124M (12 layers, 768 wide,
context 1024, vocab 50257) at batch 8, bf16 autocast, with and without compile; MFU is
reported against the GPU's dense bf16 peak from its spec sheet (`GPU_BF16_PEAK`, by
name; the measured matmul peak is printed beside it), and every timed stretch ends
with a device synchronisation.

After the table it prints the CPU and the fast paths lmlab picked on it
(`lmlab.model.fastpath`: blocked or SDPA attention, chunked or plain loss,
measured on the first step; under torch.compile attention keeps its fixed rule).

MFU = tokens/s × training FLOPs per token ÷ the measured matmul peak of the
same dtype on this machine (so fp32 and bf16 are each judged against their own
ceiling).

lmlab's Trainer tells glibc's malloc to keep freed memory (see
`lmlab.train.distributed.keep_freed_memory`); the setting is process-wide, so
HF, measured in the same process, runs with it too (without it, HF's bf16 step
page-faults ~30,000 times and is 5-10 % slower). The ratios are conservative.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lmlab.config import TrainConfig
from lmlab.data.shards import TokenShards, TokenShardWriter
from decode_throughput import cpu_name  # a sibling script: benchmarks/ is sys.path[0]

from lmlab.model import ModelConfig, Transformer, fastpath
from lmlab.train.distributed import Dist
from lmlab.train.metrics import measured_peak_flops
from lmlab.train.pretrain import LanguageModelingTask
from lmlab.train.trainer import Trainer

CFG = dict(n_layer=6, n_head=6, d_model=384, max_seq_len=256, vocab_size=8192)
BATCH, SEQ = 8, 256
DEVICE = "cpu"
# dense bf16 tensor-core peaks from the vendors' spec sheets (FLOP/s, no sparsity), by a
# substring of torch.cuda.get_device_name(); the first match wins
GPU_BF16_PEAK = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12),
                 ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12),
                 ("RTX 4090", 165e12), ("RTX 3090", 71e12)]


def spec_peak(name: str) -> float | None:
    return next((peak for key, peak in GPU_BF16_PEAK if key in name), None)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def random_shards(root: Path) -> Path:
    rng = np.random.default_rng(0)
    with TokenShardWriter(root, CFG["vocab_size"], eos_id=0) as w:
        for _ in range(max(64, 4 * BATCH * SEQ // 4096)):
            w.add(rng.integers(1, CFG["vocab_size"], 4096), "train")
    return root


class LmlabVariant:
    def __init__(self, shards: Path, run_dir: Path, precision: str, compile: bool):
        torch.manual_seed(0)
        model = Transformer(ModelConfig(**CFG))
        task = LanguageModelingTask(TokenShards(shards, "train"), None, SEQ, BATCH,
                                    [1] * CFG["vocab_size"], seed=0, eval_tokens=None)
        cfg = TrainConfig(batch_size=BATCH, precision=precision, compile=compile, lr=1e-4,
                          device=DEVICE)
        self.trainer = Trainer(model, task, cfg, run_dir, Dist(), flops_per_token=0.0)
        self.trainer.metrics.enabled = False

    def step(self):
        self.trainer.train_step(1e-4)


class HFVariant:
    def __init__(self, precision: str, compile: bool, attn: str = "sdpa"):
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        cfg = GPT2Config(n_layer=CFG["n_layer"], n_head=CFG["n_head"], n_embd=CFG["d_model"],
                         n_positions=CFG["max_seq_len"], vocab_size=CFG["vocab_size"],
                         attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                         bos_token_id=0, eos_token_id=0)
        cfg._attn_implementation = attn  # "sdpa" or "eager"; the faster one is reported
        self.model = GPT2LMHeadModel(cfg).to(DEVICE).train()
        try:
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)
        except (RuntimeError, TypeError):
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.fwd = torch.compile(self.model) if compile else self.model
        self.dtype = torch.bfloat16 if precision == "bf16" else None
        g = torch.Generator().manual_seed(0)
        self.batches = [torch.randint(1, CFG["vocab_size"], (BATCH, SEQ), generator=g).to(DEVICE)
                        for _ in range(8)]
        self.i = 0

    def step(self):
        x = self.batches[self.i % len(self.batches)]
        self.i += 1
        with torch.autocast(DEVICE, dtype=self.dtype, enabled=self.dtype is not None):
            loss = self.fwd(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant per round")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--precisions", default=None,
                    help="comma-separated (default: fp32,bf16 on a CPU, where bf16 is slow if "
                         "emulated; bf16 on a GPU)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--preset", default=None,
                    help="an lmlab preset instead of the 6x384 model (default on cuda: gpt2-124m)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default 8)")
    ap.add_argument("--seq", type=int, default=None,
                    help="context (default: 256, or the preset's max_seq_len)")
    args = ap.parse_args()
    global DEVICE, BATCH, SEQ
    DEVICE = args.device
    if DEVICE == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no CUDA device")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    preset_name = args.preset or ("gpt2-124m" if DEVICE == "cuda" else None)
    if preset_name:
        from lmlab.model import preset

        pc = preset(preset_name)
        CFG.clear()
        CFG.update(n_layer=pc.n_layer, n_head=pc.n_head, d_model=pc.d_model,
                   max_seq_len=pc.max_seq_len, vocab_size=pc.vocab_size)
        SEQ = pc.max_seq_len
    BATCH, SEQ = args.batch or BATCH, args.seq or SEQ
    CFG["max_seq_len"] = max(CFG["max_seq_len"], SEQ)
    precisions = (args.precisions or ("bf16" if DEVICE == "cuda" else "fp32,bf16")).split(",")
    if args.threads:
        torch.set_num_threads(args.threads)

    flops_per_token = ModelConfig(**CFG).flops_per_token(SEQ)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    peaks = {p: measured_peak_flops(DEVICE, dtypes[p], seconds=1.0) for p in precisions}
    where = cpu_name() + f", {torch.get_num_threads()} threads"
    if DEVICE == "cuda":
        where = torch.cuda.get_device_name()
        spec = spec_peak(where)
        print(f"measured matmul peak on {where}: "
              + ", ".join(f"{p} {peak / 1e12:.0f} TFLOP/s" for p, peak in peaks.items())
              + (f"; spec-sheet dense bf16 peak {spec / 1e12:.0f} TFLOP/s (MFU is against it)"
                 if spec else "; no spec-sheet peak known for it: MFU is against the measured peak"))
        if spec:
            peaks = {p: (spec if p == "bf16" else peak) for p, peak in peaks.items()}
    print(f"{where}; torch {torch.__version__}; model {CFG}, batch {BATCH} x {SEQ}; "
          "MFU against: "
          + ", ".join(f"{p} {peak / 1e9:,.0f} GFLOP/s" for p, peak in peaks.items())
          + f"; {flops_per_token / 1e6:.1f} MFLOP per token")

    tmp = Path(tempfile.mkdtemp(prefix="lmlab-bench-"))
    shards = random_shards(tmp / "shards")
    variants = {}
    for precision in precisions:
        for comp in ((False,) if args.no_compile else (False, True)):
            tag = f"{precision}{' + compile' if comp else ''}"
            variants[("lmlab", tag)] = LmlabVariant(shards, tmp / f"run-{precision}-{comp}",
                                                    precision, comp)
            for attn in ("sdpa", "eager"):
                variants[(f"HF-{attn}", tag)] = HFVariant(precision, comp, attn)
    for name, v in variants.items():  # warm up: compile, allocator, oneDNN primitive caches
        t0 = time.perf_counter()
        for _ in range(2):
            v.step()
        sync()
        print(f"  warmed up {name[0]:8s} {name[1]:16s} in {time.perf_counter() - t0:5.1f} s")

    rates: dict[tuple, list[float]] = {k: [] for k in variants}
    for r in range(args.rounds):
        for name, v in variants.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                v.step()
            sync()
            rates[name].append(args.steps * BATCH * SEQ / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in rates.items()}
    tags = sorted({t for _, t in variants}, key=lambda t: (t.startswith("bf16"), "compile" in t))
    hf = {}  # setting -> (tok/s, attention implementation) of HF's faster attention
    for tag in tags:
        hf[tag] = max((med[(f"HF-{a}", tag)], a) for a in ("sdpa", "eager"))

    print(f"\n{'setting':18s} {'lmlab tok/s':>12s} {'MFU':>6s} {'HF tok/s':>10s} {'MFU':>6s} "
          f"{'HF attn':>8s} {'lmlab/HF':>9s}")
    for tag in tags:
        a, (b, attn) = med[("lmlab", tag)], hf[tag]
        peak = peaks[tag[:4]]
        print(f"{tag:18s} {a:12,.0f} {a * flops_per_token / peak:6.1%} {b:10,.0f} "
              f"{b * flops_per_token / peak:6.1%} {attn:>8s} {a / b:8.2f}×")
    best_ours = max((v, t) for (impl, t), v in med.items() if impl == "lmlab")
    print()
    for label, pick in (("HF as it comes (sdpa attention)", lambda t: (med[("HF-sdpa", t)], "sdpa")),
                        ("HF with its faster attention", lambda t: hf[t])):
        v, a, t = max((*pick(t), t) for t in tags)
        print(f"fastest lmlab ({best_ours[1]}) {best_ours[0]:,.0f} tok/s vs fastest {label} "
              f"({t}, {a}) {v:,.0f} tok/s: {best_ours[0] / v:.2f}×")
    print(f"\nfast paths lmlab picked on this machine ({where}; lmlab.model.fastpath):")
    print(fastpath.report())
    if not args.no_compile:
        print("  (under torch.compile attention is not measured: the blocked path, by rule)")


if __name__ == "__main__":
    main()
