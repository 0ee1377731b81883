"""The one training loop, its optimizer and schedule, checkpoints, distribution and metrics.

Knows nothing of the CLI. A task (pretraining, SFT, classification, ...) supplies
batches and a loss; `run_task` (lmlab.train.runner) does the run plumbing and
`Trainer` the loop.
"""


def __getattr__(name):  # lazy: `import lmlab.train.X` should not import every module here
    if name in ("run_task", "RunResult"):
        from lmlab.train import runner

        return getattr(runner, name)
    raise AttributeError(name)
