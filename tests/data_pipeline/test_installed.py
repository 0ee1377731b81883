"""lmlab as a user gets it from `pip install .`: what the package holds, and what it must not.

A non-editable install has no repository around it, so everything a command
needs at run time (the shipped recipes) must travel inside the package, and
fixture code must not.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from .conftest import write_jsonl
from .synthetic import english_prose

ROOT = Path(__file__).resolve().parents[2]


def test_the_package_carries_no_test_fixtures():
    # the planted corpora are fixture code: tests/data_pipeline/synthetic.py, not lmlab
    assert importlib.util.find_spec("lmlab.data.pipeline.synthetic") is None


def _build_and_install(tmp: Path) -> Path:
    """Build a wheel from a copy of the sources (the checkout stays untouched), install to a dir."""
    src = tmp / "sources"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "--no-index", str(src),
                          "-w", str(tmp / "wheel")], check=True, capture_output=True)
    (wheel,) = (tmp / "wheel").glob("lmlab-*.whl")
    target = tmp / "installed"
    subprocess.run(pip + ["install", "--no-deps", "--no-index", "--target", str(target),
                          str(wheel)], check=True, capture_output=True)
    return target


@pytest.mark.slow
def test_a_shipped_recipe_runs_by_name_from_a_wheel_install(tmp_path):
    target = _build_and_install(tmp_path)
    # -S: site-packages' .pth files are not read, so the editable install's path to this
    # checkout's src/ is not on sys.path; the venv's site-packages comes in, for the
    # dependencies, through PYTHONPATH, after the installed wheel
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]])}
    python = [sys.executable, "-S"]
    cwd = tmp_path / "elsewhere"  # outside the checkout: nothing is found relative to the cwd
    cwd.mkdir()
    where = subprocess.run(python + ["-c", "import lmlab; print(lmlab.__file__)"], cwd=cwd, env=env,
                           check=True, capture_output=True, text=True).stdout.strip()
    assert Path(where).resolve().is_relative_to(target.resolve()), where
    rng = random.Random(0)
    docs = [{"id": f"d{i}", "text": english_prose(rng)} for i in range(20)]
    corpus = write_jsonl(cwd / "in.jsonl", docs)
    proc = subprocess.run(python + ["-m", "lmlab.cli", "data", "process", "--recipe", "web-en",
                                    "--input", str(corpus), "--out", "out"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((cwd / "out" / "report.json").read_text(encoding="utf-8"))
    assert report["recipe"] == "web-en" and report["documents_in"] == len(docs)
    assert report["documents_out"] > 0
