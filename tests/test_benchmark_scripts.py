"""The GPU benchmarks' code paths, run on the CPU at toy sizes (no GPU here): the scripts
parse their options, build both sides, time them and print the ratio table, so a session
that is lent a GPU runs `--device cuda` on code that has already run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def run(script: str, *args: str) -> str:
    r = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True,
                       text=True, timeout=600, cwd=BENCH.parent)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.mark.slow
def test_train_throughput_runs_a_preset_at_a_chosen_batch_and_context():
    out = run("train_throughput.py", "--preset", "tiny", "--batch", "2", "--seq", "64",
              "--rounds", "1", "--steps", "1", "--no-compile", "--precisions", "fp32",
              "--threads", "1")
    assert "batch 2 x 64" in out and "'n_layer': 2" in out
    row = next(line for line in out.splitlines() if line.startswith("fp32 "))
    assert row.rstrip().endswith("×") and "%" in row  # tok/s, MFU and the ratio


@pytest.mark.slow
def test_decode_throughput_runs_and_checks_tokens_against_hf():
    out = run("decode_throughput.py", "--preset", "tiny", "--batch-sizes", "1",
              "--new-tokens", "8", "--repeats", "1", "--threads", "1")
    assert "sdpa: identical; eager: identical" in out


def test_cuda_without_a_gpu_is_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    r = subprocess.run([sys.executable, str(BENCH / "train_throughput.py"), "--device", "cuda"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and r.stderr.strip() == "--device cuda: torch sees no CUDA device"


def test_gpu_peaks_come_from_the_spec_sheet_by_name():
    sys.path.insert(0, str(BENCH))
    try:
        from train_throughput import spec_peak
    finally:
        sys.path.remove(str(BENCH))
    assert spec_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert spec_peak("NVIDIA H100 PCIe") == 756e12
    assert spec_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert spec_peak("NVIDIA H200") == 989e12
    assert spec_peak("Some Future GPU") is None
