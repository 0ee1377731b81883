"""Experiments: controlled comparisons built from lmlab's own commands (`lmlab experiment ...`)."""

from lmlab.experiments.history import history

__all__ = ["history"]
