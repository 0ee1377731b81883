"""The multi-node recipes stay runnable: the Slurm example is valid bash, and its torchrun
line and every `torchrun` line of docs/scaling.md parse with torchrun's own parser and name
real lmlab options (the lmlab part goes through the CLI's parser and the typed config, so a
renamed or mistyped field fails here, not on a cluster an hour into the queue)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SBATCH = ROOT / "examples" / "slurm" / "pretrain.sbatch"
SCALING = ROOT / "docs" / "scaling.md"
# what Slurm and the script's defaults put in the variables the command line uses
SLURM_ENV = {"SLURM_JOB_NUM_NODES": "4", "GPUS_PER_NODE": "8", "HEAD_NODE": "node001",
             "RDZV_PORT": "29500", "SLURM_JOB_ID": "1234", "DATA": "data/shards",
             "OUT": "runs/pretrain-1234", "RESUME": "false"}


def logical_lines(text: str) -> list[str]:
    """Lines with backslash continuations joined and comments dropped."""
    return [line.strip() for line in re.sub(r"\\\n", " ", text).splitlines()
            if line.strip() and not line.strip().startswith("#")]


def expand(line: str, env: dict[str, str]) -> list[str]:
    def value(m):
        name = m.group(1) or m.group(2)
        if name not in env:
            raise AssertionError(f"${name} is not set by the script or Slurm: {line}")
        return env[name]

    return shlex.split(re.sub(r"\$\{(\w+)\}|\$(\w+)", value, line))


def check_torchrun(argv: list[str]) -> tuple:
    """Parse `argv` (from `torchrun` or `python -m torch.distributed.run` on) as torchrun
    would, then the lmlab command it starts as lmlab would; (torchrun args, lmlab config)."""
    from torch.distributed.run import get_args_parser

    from lmlab.cli import build_parser

    start = argv.index("torchrun") + 1 if "torchrun" in argv else \
        argv.index("torch.distributed.run") + 1
    args = get_args_parser().parse_args(argv[start:])
    if args.module:
        assert args.training_script == "lmlab.cli", args.training_script
    else:
        assert args.training_script.endswith("lmlab"), args.training_script
    lmlab_argv = args.training_script_args
    cfg = build_parser().parse_args(lmlab_argv)  # unknown options and bad values exit here
    command = lmlab_argv[0]
    section = cfg[command]
    if command == "pretrain":
        from lmlab.config import PretrainConfig, config_from_dict

        return args, config_from_dict(PretrainConfig, section.as_dict())  # __post_init__ checks
    return args, section


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_the_slurm_example_is_valid_bash():
    p = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_the_slurm_example_runs_one_torchrun_per_node_with_real_options():
    text = SBATCH.read_text(encoding="utf-8")
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, re.M))
    assert directives["ntasks-per-node"] == "1"  # torchrun starts the node's workers itself
    (line,) = [ln for ln in logical_lines(text) if ln.startswith("srun ")]
    args, cfg = check_torchrun(expand(line, SLURM_ENV))
    assert (args.nnodes, args.nproc_per_node) == ("4", "8")
    assert args.rdzv_backend == "c10d" and args.rdzv_endpoint == "node001:29500"
    assert args.rdzv_id == "1234"
    assert cfg.train.strategy == "fsdp" and cfg.train.precision == "bf16"
    assert cfg.model.preset == "gpt2-124m" and cfg.train.checkpoint_every > 0
    # every variable the command line uses is set in the script (or by Slurm)
    for name in re.findall(r"\$\{?(\w+)", line):
        assert name.startswith("SLURM_") or re.search(rf"^{name}=", text, re.M), name


def test_every_torchrun_line_of_the_scaling_docs_parses():
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", SCALING.read_text(encoding="utf-8"), re.S)
    lines = [ln for b in blocks for ln in logical_lines(b) if ln.startswith("torchrun")]
    assert len(lines) >= 3, lines  # one machine, several GPUs, several machines
    env = {"HEAD": "node001", "NODE_RANK": "0"}
    seen_multi_node = False
    for line in lines:
        args, _ = check_torchrun(expand(line, env))
        if args.nnodes not in ("1", "1:1"):  # torchrun's default is "1:1"
            seen_multi_node = True
            assert args.rdzv_backend == "c10d" and args.rdzv_endpoint, line
    assert seen_multi_node
