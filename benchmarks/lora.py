"""LoRA's training step against full fine-tuning, and against PEFT on Hugging Face's model.

One LLaMA-style model (4 layers, d_model 256, 4 query / 2 key-value heads, SwiGLU d_ff 688,
vocab 8192, untied head), one batch shape (8 × 256 tokens, random ids), fp32, torch AdamW
(fused where available, no weight decay), gradient clipping at 1.0:

    full   lmlab's `Trainer.train_step`, every weight trained
    lora   the same Trainer after `apply_lora(r=8, alpha=16, all-linear)`
    peft   transformers' LlamaForCausalLM built from the model's `export-hf` config
           (`interop.hf.hf_config_from`), `peft.get_peft_model` with the same r, alpha
           and modules (q k v o gate up down _proj), the loop a user writes around it;
           with each of HF's CPU attention implementations (sdpa, eager), the faster kept

Step time: the variants interleaved round by round, each figure the median over rounds.
Memory, in a fresh process per variant (lmlab's with its plain ops, `LMLAB_FASTPATH=plain`,
so that a fast path measured anew cannot differ between them):
  - exact: bytes of the gradients and of AdamW's state after a step, and of the tensors
    autograd saves for the backward pass (weights excluded, each storage once);
  - peak RSS growth over 3 steps (the first allocates the optimizer state), psutil
    sampling every millisecond from a thread: all of it together, approximate (malloc's
    caching included; every variant runs with lmlab's `keep_freed_memory`, which the
    Trainer sets).

    python benchmarks/lora.py [--rounds 3] [--steps 3] [--threads N]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from decode_throughput import cpu_name  # a sibling script: benchmarks/ is sys.path[0]

from lmlab.config import LoraSpec, TrainConfig
from lmlab.finetune.lora import apply_lora
from lmlab.interop.hf import hf_config_from
from lmlab.model import ModelConfig, Transformer, fastpath
from lmlab.model_io import save_model_dir
from lmlab.train.distributed import Dist, keep_freed_memory
from lmlab.train.trainer import Trainer

CFG = dict(n_layer=4, d_model=256, n_head=4, n_kv_head=2, d_ff=688, vocab_size=8192,
           max_seq_len=256, pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False,
           tie_embeddings=False)
BATCH, SEQ, R, ALPHA = 8, 256, 8, 16.0
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    w = [torch.randint(1, CFG["vocab_size"], (BATCH, SEQ + 1), generator=g) for _ in range(4)]
    return [(b[:, :-1], b[:, 1:]) for b in w]


class RandomTokens:
    """Four fixed batches of next-token windows, cycled: all `Trainer.train_step` asks."""

    def __init__(self):
        self.batches = batches()

    def train_batch(self, step, micro, accum, rank, world):
        return self.batches[step % len(self.batches)]

    def loss(self, model, batch):
        x, y = batch
        return model(x, targets=y)


class Lmlab:
    def __init__(self, lora: bool, tmp: Path):
        torch.manual_seed(0)
        model = Transformer(ModelConfig(**CFG))
        if lora:
            save_model_dir(model, tmp / "base")
            apply_lora(model, LoraSpec(r=R, alpha=ALPHA, targets=["all-linear"]), tmp / "base")
        cfg = TrainConfig(batch_size=BATCH, precision="fp32", lr=1e-4, weight_decay=0.0,
                          grad_clip=1.0, device="cpu")
        self.trainer = Trainer(model, RandomTokens(), cfg, tmp / f"run-{lora}", Dist())
        self.trainer.metrics.enabled = False
        self.model, self.optimizer = model, self.trainer.optimizer

    def step(self):
        self.trainer.train_step(1e-4)


class Peft:
    def __init__(self, attn: str):
        import transformers
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        hf = dict(hf_config_from(ModelConfig(**CFG)))
        config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
        config._attn_implementation = attn
        base = transformers.LlamaForCausalLM(config).train()
        self.model = get_peft_model(base, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                                                     target_modules=HF_TARGETS,
                                                     task_type="CAUSAL_LM"))
        params = [p for p in self.model.parameters() if p.requires_grad]
        try:
            self.optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True)
        except (RuntimeError, TypeError):
            self.optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
        self.batches, self.i = batches(), 0

    def step(self):
        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        logits = self.model(input_ids=x).logits
        F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def build(name: str, tmp: Path):
    if name.startswith("peft"):
        return Peft(name.split("-", 1)[1])
    return Lmlab(name == "lora", tmp)


def exact_bytes(v) -> dict[str, int]:
    """Bytes of the tensors autograd saves for the backward pass (weights excluded, each
    storage once), of the gradients and of the optimizer state, after one step."""
    v.step()
    x, y = batches()[0]
    model = v.model
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = (model(x, targets=y) if isinstance(v, Lmlab) else
                F.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten()))
    loss.backward()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()
                if p.grad is not None)
    state = sum(t.numel() * t.element_size() for s in v.optimizer.state.values()
                for t in s.values() if torch.is_tensor(t))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "grad_bytes": grads, "optimizer_bytes": state,
            "saved_bytes": sum(saved.values())}


def peak_rss_growth(name: str) -> dict[str, int]:
    """In this (fresh) process: RSS growth over 3 steps, sampled every millisecond."""
    import psutil

    keep_freed_memory()
    tmp = Path(tempfile.mkdtemp(prefix="lmlab-bench-lora-"))
    v = build(name, tmp)
    gc.collect()
    proc = psutil.Process()
    start = peak = proc.memory_info().rss
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.001)

    t = threading.Thread(target=sample)
    t.start()
    for _ in range(3):
        v.step()
    done.set()
    t.join()
    return {"peak_rss_growth": peak - start, **exact_bytes(v)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--memory", help=argparse.SUPPRESS)  # the child: one variant's memory
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory:
        print(json.dumps(peak_rss_growth(args.memory)))
        return

    print(f"{cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{ModelConfig(**CFG).num_params():,} parameters, batch {BATCH} × {SEQ} tokens")
    tmp = Path(tempfile.mkdtemp(prefix="lmlab-bench-lora-"))
    names = ["full", "lora", "peft-sdpa", "peft-eager"]
    variants = {n: build(n, tmp) for n in names}
    for n, v in variants.items():  # warm up: allocator, oneDNN caches, fast-path choices
        for _ in range(2):
            v.step()
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.rounds):
        for n, v in variants.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                v.step()
            seconds[n].append((time.perf_counter() - t0) / args.steps)
    step = {n: statistics.median(s) for n, s in seconds.items()}
    peft = min(("peft-sdpa", "peft-eager"), key=step.get)
    del variants
    gc.collect()

    memory = {}
    for n in ("full", "lora", peft):
        child = [sys.executable, __file__, "--memory", n] + (
            ["--threads", str(args.threads)] if args.threads else [])
        # the plain ops: a fast path measured anew in each child could differ between them
        env = {**os.environ, fastpath.ENV: "plain"}
        out = subprocess.run(child, capture_output=True, text=True, check=True,
                             cwd=Path(__file__).parent, env=env)
        memory[n] = json.loads(out.stdout.strip().splitlines()[-1])

    mib = 2 ** 20
    print(f"\n{'variant':12s} {'step s':>8s} {'tok/s':>8s} {'trainable':>11s} {'grad MiB':>9s} "
          f"{'AdamW MiB':>10s} {'saved MiB':>10s} {'peak RSS +MiB':>14s}")
    for n in ("full", "lora", peft):
        m = memory[n]
        print(f"{n:12s} {step[n]:8.3f} {BATCH * SEQ / step[n]:8,.0f} {m['trainable']:11,d} "
              f"{m['grad_bytes'] / mib:9.2f} {m['optimizer_bytes'] / mib:10.2f} "
              f"{m['saved_bytes'] / mib:10.1f} "
              f"{m['peak_rss_growth'] / mib:14.1f}")
    full, lora, hf = memory["full"], memory["lora"], memory[peft]
    print(f"\nLoRA vs full fine-tuning: step time {step['lora'] / step['full']:.2f}×, "
          f"AdamW state {lora['optimizer_bytes']:,} vs {full['optimizer_bytes']:,} bytes "
          f"({lora['optimizer_bytes'] / full['optimizer_bytes']:.4f}×), gradients "
          f"{lora['grad_bytes'] / full['grad_bytes']:.4f}×, saved for backward "
          f"{lora['saved_bytes'] / full['saved_bytes']:.2f}×, peak RSS growth "
          f"{lora['peak_rss_growth'] / full['peak_rss_growth']:.2f}×")
    print(f"lmlab LoRA vs PEFT ({peft}, the faster of sdpa {step['peft-sdpa']:.3f} s and eager "
          f"{step['peft-eager']:.3f} s): step time {step['lora'] / step[peft]:.2f}×, "
          f"trainable {lora['trainable']:,} vs {hf['trainable']:,}, AdamW state "
          f"{lora['optimizer_bytes'] / hf['optimizer_bytes']:.2f}×, saved for backward "
          f"{lora['saved_bytes'] / hf['saved_bytes']:.2f}×, peak RSS growth "
          f"{lora['peak_rss_growth'] / hf['peak_rss_growth']:.2f}×")


if __name__ == "__main__":
    main()
