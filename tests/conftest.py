"""Shared fixtures: a small tokenizer trained once per session on real text.

The text is the running Python's standard library source plus Chinese prose,
so tests need no downloads and see code, English and Chinese.
"""

from __future__ import annotations

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
