"""Shared fixtures: a small tokenizer trained once per session on real text.

The text is the running Python's standard library source plus Chinese prose,
so tests need no downloads and see code, English and Chinese.
"""

from __future__ import annotations

import contextlib
import io
import os
import sysconfig
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core: a worker that also ran torch's 2 threads per core
    # would oversubscribe the CPU (a tiny training step measured 5× slower that way); the
    # processes a test starts (torchrun, the CLI) keep torch's default
    torch.set_num_threads(1)

CHINESE = [
    "语言模型通过预测下一个词来学习语言的规律。",
    "我们从零开始训练一个字节级的分词器，它可以无损地编码任何文本。",
    "注意力机制让每个位置都能看到前面所有的位置，这就是因果掩码的作用。",
    "数据的质量决定了模型的上限，清洗和去重是预训练中最重要的步骤之一。",
    "北京、上海和深圳的天气今天都很好，适合出门散步。",
]


def stdlib_texts(limit: int = 60) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))[:limit]
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


@pytest.fixture(scope="session")
def corpus_texts() -> list[str]:
    return stdlib_texts() + CHINESE * 200


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus_texts):
    from lmlab.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(corpus_texts, vocab_size=2048).save(out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from lmlab.tokenizer import Tokenizer

    return Tokenizer.load(tokenizer_dir)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def write_shards(out, tokenizer, tokenizer_dir, texts, val_every: int):
    """Token shards of `texts` (every `val_every`-th held out), with the tokenizer beside them
    in out/tokenizer so that pretraining finds it without --tokenizer."""
    import shutil

    from lmlab.data.shards import TokenShardWriter

    with TokenShardWriter(out, tokenizer.vocab_size, tokenizer.eos_id, tokenizer.hash) as w:
        for i, text in enumerate(texts):
            w.add(tokenizer.encode(text), "val" if i % val_every == 0 else "train")
    shutil.copytree(tokenizer_dir, Path(out) / "tokenizer")
    return out


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `lmlab ARGV`, run in-process as the console script runs it."""
    from lmlab.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:  # what a user would see: a traceback, exit 1
            traceback.print_exc(file=err)
            rc = 1
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory, tokenizer):
    """A tiny LLaMA-style model directory (random weights, fp32) whose tokenizer has ChatML:
    what the serving tests (engine, server, web page, `lmlab chat`, RAG) talk to. Its text is
    noise, but every id it samples is real: English, code and Chinese pieces."""
    from lmlab.model import Transformer, preset
    from lmlab.model_io import save_model_dir

    chat_tok = tokenizer.with_chatml()
    root = tmp_path_factory.mktemp("chat-model")
    chat_tok.save(root / "tok")
    torch.manual_seed(0)
    model = Transformer(preset("llama-tiny", vocab_size=chat_tok.vocab_size, d_model=64))
    save_model_dir(model, root / "model", tokenizer_dir=root / "tok")
    return root / "model"


@pytest.fixture(scope="session")
def long_chat_model_dir(chat_model_dir, tmp_path_factory):
    """chat_model_dir with a 4096-token context, under the same directory name (so the same
    model id): the same weights (RoPE has no position table), so that a reply runs for
    seconds, long enough for a client to leave in the middle of it or a user to press Stop."""
    import json
    import shutil

    out = tmp_path_factory.mktemp("long-chat-model") / chat_model_dir.name
    shutil.copytree(chat_model_dir, out)
    config = json.loads((out / "config.json").read_text())
    config["lmlab_model"]["max_seq_len"] = 4096
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture
def plain_ops(monkeypatch):
    """The plain ops, unmeasured (timing fast paths on first use per shape costs seconds on
    2 cores; test_fastpath.py tests them), on one thread: at these sizes a second thread
    only adds overhead, and on a loaded machine it waits for a core (4x slower measured)."""
    from lmlab.model import fastpath

    monkeypatch.setenv(fastpath.ENV, "plain")
    fastpath.clear()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    fastpath.clear()


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now (the OS picks it): torchrun's
    store and the test servers take one each, so a fixed port never collides with a run
    left over from another job on the same machine."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A real `lmlab.serve.server.run_server(model_dir, **options)` process on a free port of
    127.0.0.1, its output in `log`; it dies with this process (if pytest itself is killed)."""

    def __init__(self, model_dir, log, env: dict | None = None, **options):
        import subprocess
        import sys

        port = free_port()
        kwargs = "".join(f", {k}={str(v) if isinstance(v, Path) else v!r}"
                         for k, v in options.items())
        code = (f"from lmlab.procs import die_with_parent; die_with_parent({os.getpid()}); "
                "from lmlab.serve.server import run_server; "
                f"run_server({str(model_dir)!r}, port={port}, log_level='warning'{kwargs})")
        self.log, self.base = Path(log), f"http://127.0.0.1:{port}"
        with open(log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=out,
                                         stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})

    def wait_healthy(self, timeout: float = 90) -> str:
        """The base URL, once /health answers 200 (a failure with the log if it dies)."""
        import time

        import httpx

        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return self.base
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited ({self.proc.returncode}): "
                            f"{self.log.read_text()[-2000:]}")
            assert time.monotonic() < deadline, f"the server was not healthy in {timeout} s"
            time.sleep(0.1)

    def stop(self) -> None:
        import subprocess

        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def running_server(model_dir, log, env: dict | None = None, **options):
    """The base URL of a healthy `ServerProcess`, stopped on leaving."""
    server = ServerProcess(model_dir, log, env, **options)
    try:
        yield server.wait_healthy()
    finally:
        server.stop()
