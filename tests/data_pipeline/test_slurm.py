"""The data pipeline on a real Slurm cluster: the same recipe gives the same result as locally.

Runs where `sinfo` shows an idle node (CI starts a one-node cluster with
`.ci/slurm-up`); skips elsewhere.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmlab.data.pipeline import load_recipe, run_recipe

from .conftest import read_jsonl_dir, write_jsonl
from .synthetic import planted_corpus


def _idle_partition() -> str | None:
    if not shutil.which("sbatch") or not shutil.which("sinfo"):
        return None
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P %t"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        part, state = line.split()[:2]
        if state.startswith("idle") or state.startswith("mix"):
            return part.rstrip("*")
    return None


@pytest.mark.slow
def test_slurm_executor_matches_local(tmp_path):
    partition = _idle_partition()
    if partition is None:
        pytest.skip("no Slurm cluster here (CI starts one with .ci/slurm-up)")
    docs = planted_corpus(400, seed=6, zh_fraction=0.3, junk_fraction=0.1,
                          exact_fraction=0.05, near_fraction=0.08)
    inputs = [str(write_jsonl(tmp_path / f"part{i}.jsonl", [d.record() for d in docs[i::2]]))
              for i in range(2)]
    activate = Path(sys.prefix) / "bin" / "activate"
    recipe = load_recipe("web-en")
    recipe["executor"] = {"tasks": 2, "slurm": {
        "partition": partition, "time": "00:20:00", "cpus_per_task": 1, "mem_per_cpu_gb": 1,
        "venv_path": str(activate) if activate.is_file() else None}}
    out = tmp_path / "slurm"
    sub = run_recipe(recipe, inputs, str(out), workers=2, executor="slurm")
    assert sub["submitted"][-1] == "report"
    deadline = time.time() + 240
    while not (out / "report.json").is_file():
        assert time.time() < deadline, f"Slurm jobs did not finish; see {out}/work/logs/*/slurm_logs"
        time.sleep(2)
    time.sleep(1)  # the report is written atomically; let the job exit
    slurm = json.loads((out / "report.json").read_text())
    local = run_recipe(recipe, inputs, str(tmp_path / "local"), workers=2)
    assert slurm["documents_in"] == local["documents_in"] == len(docs)
    assert slurm["documents_out"] == local["documents_out"] > 0
    assert slurm["removals"] == local["removals"]
    assert ({r["id"] for r in read_jsonl_dir(out / "documents")}
            == {r["id"] for r in read_jsonl_dir(tmp_path / "local" / "documents")})
