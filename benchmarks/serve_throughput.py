"""Serving throughput: `lmlab serve` under concurrent streaming clients, as ratios.

One run measures, on the same model and the same requests:

1. aggregate new tokens/s of the server at 1, 4, 8 and 16 concurrent streaming
   clients (OpenAI's chat API, `stream: true`), against the same requests sent
   one after another: continuous batching's gain (goal: ≥ 3× at 8 clients);
2. time to first token (p50 / p95, as the client sees it) at each concurrency;
3. the server's overhead: the same requests at 8 at a time submitted to the
   engine in this process, no HTTP (goal: the server within 10 %);
4. batch-1 decode against Hugging Face `generate` on the same weights (from
   `decode_throughput.py`; goal ≥ 2×).

The server runs in its own process (`lmlab.serve.server.run_server`), the
clients are asyncio + httpx in this one, so on a small machine they share its
cores, as a real client on the same host would. Greedy decoding; tokens are
counted from the server's usage (`stream_options.include_usage`), so a reply
that stops early counts what it produced. The model has random weights unless
`--model DIR` names one.

    python benchmarks/serve_throughput.py                    # preset small, 16 requests
    python benchmarks/serve_throughput.py --model runs/quickstart --max-tokens 128

Needs the `serve` extra (FastAPI, uvicorn) and httpx; `transformers` for item 4.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).parent))
from decode_throughput import build_models, cpu_name, time_hf, time_lmlab  # noqa: E402

from lmlab.data.chat import prompt_ids  # noqa: E402
from lmlab.infer.engine import Engine, SamplingParams  # noqa: E402

QUESTIONS = [
    "What does the json module do?", "解释一下注意力机制。", "How do I read a file in Python?",
    "什么是语言模型？", "Write a function that reverses a list.", "北京的天气怎么样？",
    "What is a decorator?", "列举三种排序算法。", "Explain recursion to a child.",
    "如何训练一个分词器？", "What is the difference between a list and a tuple?",
    "请写一首关于春天的诗。", "How does garbage collection work?", "数据清洗为什么重要？",
    "What is a context manager?", "给我讲一个笑话。",
]


def make_model_dir(root: Path, preset_name: str, vocab_size: int) -> Path:
    """A random-weight model of `preset_name` with a ChatML tokenizer trained on the stdlib."""
    import sysconfig

    from lmlab.model import Transformer, preset
    from lmlab.model_io import save_model_dir
    from lmlab.tokenizer import train_tokenizer

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:80]
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files] + QUESTIONS * 20
    tok = train_tokenizer(texts, vocab_size=vocab_size).with_chatml()
    tok.save(root / "tok")
    torch.manual_seed(0)
    model = Transformer(preset(preset_name, vocab_size=tok.vocab_size))
    save_model_dir(model, root / "model", tokenizer_dir=root / "tok")
    return root / "model"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, port: int, max_batch: int) -> subprocess.Popen:
    code = ("from lmlab.serve.server import run_server; "
            f"run_server({str(model_dir)!r}, port={port}, max_batch={max_batch}, "
            "max_queue=256, device='cpu', log_level='warning')")
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError("the server exited while starting")
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not become healthy in 120 s")


async def one_stream(client: httpx.AsyncClient, url: str, model: str, question: str,
                     max_tokens: int) -> tuple[float, int]:
    """(seconds to the first text chunk, completion tokens) of one streamed chat."""
    body = {"model": model, "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0, ttft, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            if ttft is None and any(c["delta"].get("content") for c in chunk["choices"]):
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return (ttft if ttft is not None else time.perf_counter() - t0), tokens


async def run_clients(port: int, model: str, questions: list[str], concurrency: int,
                      max_tokens: int) -> tuple[float, int, list[float]]:
    """(wall seconds, completion tokens, TTFTs) of all questions, `concurrency` at a time."""
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    todo = list(questions)
    results: list[tuple[float, int]] = []
    limits = httpx.Limits(max_connections=concurrency + 1)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker() -> None:
            while todo:
                results.append(await one_stream(client, url, model, todo.pop(0), max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return wall, sum(n for _, n in results), [t for t, _ in results]


def in_process(model_dir: Path, questions: list[str], concurrency: int,
               max_tokens: int) -> tuple[float, int]:
    """The same requests submitted to an engine in this process, `concurrency` at a time."""
    import lmlab

    lm = lmlab.load(model_dir)
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    prompts = [prompt_ids(lm.tokenizer, [{"role": "user", "content": q}]) for q in questions]
    engine = Engine(lm.model, lm.tokenizer, max_batch=concurrency)
    engine.generate(prompts[:2], params)  # warm-up
    t0 = time.perf_counter()
    out = engine.generate(prompts, params)
    return time.perf_counter() - t0, sum(c.completion_tokens for c in out)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a model directory (default: random weights)")
    p.add_argument("--preset", default="small")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--requests", type=int, default=16, help="requests per measurement")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--concurrency", default="1,4,8,16")
    p.add_argument("--skip-hf", action="store_true", help="skip the batch-1 decode vs HF line")
    args = p.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    questions = [QUESTIONS[i % len(QUESTIONS)] + ("" if i < len(QUESTIONS) else f" ({i})")
                 for i in range(args.requests)]

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = (Path(args.model) if args.model
                     else make_model_dir(Path(tmp), args.preset, args.vocab_size))
        name = model_dir.resolve().name
        port = free_port()
        server = start_server(model_dir, port, max_batch=max(levels))
        try:
            asyncio.run(run_clients(port, name, questions[:2], 1, 8))  # warm-up
            rows = []
            for c in [1, *levels]:
                wall, tokens, ttfts = asyncio.run(run_clients(port, name, questions, c,
                                                              args.max_tokens))
                rows.append((c, wall, tokens, ttfts))
        finally:
            server.terminate()
            server.wait(30)
        engine_wall, engine_tokens = in_process(model_dir, questions, 8, args.max_tokens)

    print(f"serve throughput: {name}, {args.requests} chat requests x up to {args.max_tokens} "
          f"new tokens, greedy, streamed; CPU {cpu_name()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}")
    seq_tps = rows[0][2] / rows[0][1]
    print(f"\n{'clients':>8} {'tokens':>7} {'wall s':>7} {'tokens/s':>9} {'vs 1-by-1':>9} "
          f"{'TTFT p50':>9} {'TTFT p95':>9}")
    print(f"{'1-by-1':>8} {rows[0][2]:>7} {rows[0][1]:>7.2f} {seq_tps:>9.1f} {'1.00x':>9} "
          f"{statistics.median(rows[0][3]) * 1e3:>7.0f}ms {pct(rows[0][3], .95) * 1e3:>7.0f}ms")
    at8 = None
    for c, wall, tokens, ttfts in rows[1:]:
        tps = tokens / wall
        at8 = tps if c == 8 else at8
        print(f"{c:>8} {tokens:>7} {wall:>7.2f} {tps:>9.1f} {tps / seq_tps:>8.2f}x "
              f"{statistics.median(ttfts) * 1e3:>7.0f}ms {pct(ttfts, .95) * 1e3:>7.0f}ms")
    engine_tps = engine_tokens / engine_wall
    if at8 is not None:
        print(f"\nserver at 8 clients {at8:.1f} tokens/s vs the engine in process, 8 at a time, "
              f"{engine_tps:.1f} tokens/s: overhead {100 * (1 - at8 / engine_tps):.1f} %")

    if not args.skip_hf:
        import logging

        logging.getLogger("transformers").setLevel(logging.ERROR)
        model, hfs = build_models(args.preset, args.vocab_size, torch.float32, 0, ("sdpa",))
        prompts = torch.randint(0, args.vocab_size, (1, 32), generator=torch.Generator()
                                .manual_seed(0))
        times = {"lmlab": [], "hf": []}
        for i in range(4):
            t_l, _ = time_lmlab(model, prompts, 128)
            t_h, _ = time_hf(hfs["sdpa"], prompts, 128)
            if i:  # the first of each is a warm-up
                times["lmlab"].append(t_l)
                times["hf"].append(t_h)
        l_tps = 128 / statistics.median(times["lmlab"])
        h_tps = 128 / statistics.median(times["hf"])
        print(f"batch-1 decode, preset {args.preset} random weights, 32 + 128 tokens: lmlab "
              f"{l_tps:.1f} tokens/s, HF generate {h_tps:.1f} tokens/s: {l_tps / h_tps:.2f}x")


if __name__ == "__main__":
    main()
