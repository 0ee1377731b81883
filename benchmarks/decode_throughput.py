"""Greedy decode throughput: lmlab's `generate` beside Hugging Face `model.generate`.

Both sides run the SAME weights (an lmlab model with random weights, converted
with `lmlab.interop.hf.to_hf_state_dict`), the same prompts and the same number
of new tokens, interleaved in one process so that a change in machine load
hits both alike; the table reports the median over repeats. Below it, the
fast paths lmlab picked by measurement on this machine (`lmlab.model.fastpath`:
the blocked matrix-vector product of `model.Linear` or `F.linear`, per shape). Tokens/s counts
new tokens per second of a whole generate call (prefill included) for the
whole batch. The greedy tokens of the two sides are compared too: a speed-up
that changed the output would not count. HF runs with each of its CPU
attention implementations ("sdpa", its default, and "eager"), and the table
reports the faster of the two.

    python benchmarks/decode_throughput.py                      # small, batch 1 and 8
    python benchmarks/decode_throughput.py --batch-sizes 1 --new-tokens 256 --threads 1
    python benchmarks/decode_throughput.py --preset llama-small --dtype bfloat16

Needs `transformers` (the `hf` extra).
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import time

import torch

from lmlab.infer import generate_ids
from lmlab.interop.hf import to_hf_state_dict
from lmlab.model import Transformer, fastpath, preset


def build_models(preset_name: str, vocab_size: int, dtype: torch.dtype, seed: int,
                 attns: tuple[str, ...] = ("sdpa", "eager")):
    """(lmlab model, {attention implementation: HF model}), all holding identical weights."""
    import transformers

    torch.manual_seed(seed)
    model = Transformer(preset(preset_name, vocab_size=vocab_size)).eval()
    hf_config, state = to_hf_state_dict(model)
    cfg = dict(hf_config)
    config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    hfs = {}
    for attn in attns:
        hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()
        missing, unexpected = hf.load_state_dict(state, strict=False)
        # a tied head is not in the state dict; it is the embedding, tied again below
        missing = [k for k in missing
                   if not (k == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or unexpected:
            raise RuntimeError(f"weight conversion mismatch: missing {missing}, "
                               f"unexpected {unexpected}")
        hf.tie_weights()
        # greedy with no end token: both sides must produce exactly --new-tokens tokens, and
        # HF's min_new_tokens would otherwise change its argmax by masking the EOS logit
        hf.generation_config.eos_token_id = None
        hf.generation_config.pad_token_id = 0
        hfs[attn] = hf.to(dtype)
    return model.to(dtype), hfs


def time_lmlab(model, prompts: torch.Tensor, n_new: int) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    out = generate_ids(model, prompts.tolist(), n_new, temperature=0)
    return time.perf_counter() - t0, out


def time_hf(hf, prompts: torch.Tensor, n_new: int) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                          max_new_tokens=n_new, min_new_tokens=n_new, use_cache=True)
    return time.perf_counter() - t0, out[:, prompts.shape[1]:].tolist()


def cpu_name() -> str:
    """The CPU's model name (as lscpu prints it) and the vector units that decide its fast paths."""
    name, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not name:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    units = [u for u in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if u in flags]
    return ((name or platform.processor() or platform.machine())
            + (f" ({', '.join(units)})" if units else ""))


def first_difference(a: list[list[int]], b: list[list[int]]) -> str:
    for row, (x, y) in enumerate(zip(a, b)):
        for i, (s, t) in enumerate(zip(x, y)):
            if s != t:
                return f"row {row} differs at token {i}"
        if len(x) != len(y):
            return f"row {row}: {len(x)} vs {len(y)} tokens"
    return "identical"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small", help="lmlab model preset (default: small)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated (default: 1,8)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per side (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per side first")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: both models on the GPU (e.g. --preset gpt2-124m --dtype bfloat16)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")

    import transformers

    logging.getLogger("transformers").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model, hfs = build_models(args.preset, args.vocab_size, dtype, args.seed)
    model = model.to(args.device)
    hfs = {a: m.to(args.device) for a, m in hfs.items()}
    where = (torch.cuda.get_device_name() if args.device == "cuda"
             else f"{torch.get_num_threads()} threads, {cpu_name()}")
    print(f"preset {args.preset} ({model.num_params() / 1e6:.1f}M params, {args.dtype}), "
          f"prompt {args.prompt_len} + {args.new_tokens} new tokens, greedy, "
          f"median of {args.repeats}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, {where}")

    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        g = torch.Generator().manual_seed(args.seed + batch)
        prompts = torch.randint(0, args.vocab_size, (batch, args.prompt_len),
                                generator=g).to(args.device)
        times: dict[str, list[float]] = {"lmlab": [], "sdpa": [], "eager": []}
        outs = {}
        for r in range(args.warmup + args.repeats):
            # alternate which side goes first, so neither always runs on a warmer cache
            order = [("lmlab", time_lmlab, model)] + [(a, time_hf, m) for a, m in hfs.items()]
            for name, fn, m in order if r % 2 == 0 else order[::-1]:
                dt, outs[name] = fn(m, prompts, args.new_tokens)
                if r >= args.warmup:
                    times[name].append(dt)
        tps = {k: batch * args.new_tokens / statistics.median(v) for k, v in times.items()}
        same = "; ".join(f"{a}: {first_difference(outs['lmlab'], outs[a])}" for a in hfs)
        rows.append((batch, tps["lmlab"], tps["sdpa"], tps["eager"], same))

    print(f"\n{'batch':>5}  {'lmlab tok/s':>11}  {'HF sdpa':>9}  {'HF eager':>9}  "
          f"{'lmlab/faster HF':>15}  greedy tokens vs HF")
    for batch, ours, sdpa, eager, same in rows:
        print(f"{batch:>5}  {ours:>11.1f}  {sdpa:>9.1f}  {eager:>9.1f}  "
              f"{ours / max(sdpa, eager):>14.2f}x  {same}")
    print(f"\nfast paths lmlab picked on this machine ({where}; lmlab.model.fastpath):")
    print(fastpath.report())


if __name__ == "__main__":
    main()
