from pathlib import Path

import pytest

from lmlab.data.pipeline import load_recipe
from lmlab.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "data"


@pytest.mark.parametrize("name", ["web-en", "web-zh", "code"])
def test_shipped_recipes_load(name):
    r = load_recipe(CONFIGS / f"{name}.yaml")
    assert r["name"] == name
    assert load_recipe(name)["name"] == name  # a shipped recipe by name


def test_unknown_key_is_an_error_with_its_path():
    with pytest.raises(ConfigError, match="dedup.minhash.bandz"):
        load_recipe({"dedup": {"minhash": {"bandz": 3}}})


def test_unknown_threshold_names_the_filter():
    with pytest.raises(ConfigError, match="GopherQualityFilter"):
        load_recipe({"quality": {"gopher_quality": {"min_words": 3}}})


def test_bad_values():
    with pytest.raises(ConfigError, match="min_score"):
        load_recipe({"language": {"min_score": 3}})
    with pytest.raises(ConfigError, match="eval_files"):
        load_recipe({"decontamination": {"enabled": True}})
    with pytest.raises(ConfigError, match="fastText"):
        load_recipe({"language": {"model": "/nonexistent/lid.bin"}})
