"""lmlab as a user gets it from `pip install .`: what the package holds, and what it must not."""

from __future__ import annotations

import importlib.util


def test_the_package_carries_no_test_fixtures():
    # the planted corpora are fixture code: tests/data_pipeline/synthetic.py, not lmlab
    assert importlib.util.find_spec("lmlab.data.pipeline.synthetic") is None
