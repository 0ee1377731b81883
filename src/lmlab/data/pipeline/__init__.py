"""`lmlab data process`: recipe-driven cleaning of raw text into documents and token shards.

Built on Hugging Face datatrove: every stage is a datatrove pipeline step, runs
locally with N workers or on Ray / Slurm through datatrove's executors, and
re-runs skip finished tasks. See docs/data-pipeline.md for each stage and
`run.py` for how a recipe becomes phases.
"""

from lmlab.data.pipeline.recipe import load_recipe
from lmlab.data.pipeline.run import run_recipe

__all__ = ["load_recipe", "run_recipe"]
