from pathlib import Path

import pytest

from lmlab.data.pipeline import load_recipe
from lmlab.data.pipeline.recipe import shipped_recipes
from lmlab.errors import ConfigError

RECIPES = Path(__file__).resolve().parents[2] / "src" / "lmlab" / "data" / "recipes"


@pytest.mark.parametrize("name", ["web-en", "web-zh", "code", "zh-pretrain"])
def test_shipped_recipes_load(name):
    assert load_recipe(name)["name"] == name  # a shipped recipe by name
    assert load_recipe(RECIPES / f"{name}.yaml")["name"] == name  # or by path


def test_a_recipe_is_a_file_first_then_a_shipped_name(tmp_path, monkeypatch):
    assert shipped_recipes() == ["code", "web-en", "web-zh", "zh-pretrain"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "web-en").write_text("name: mine\n")
    assert load_recipe("web-en")["name"] == "mine"  # a file of that name wins
    with pytest.raises(ConfigError, match="nor a shipped recipe .code, web-en, web-zh, zh-pretrain."):
        load_recipe("web-fr")
    # the path the shipped recipes had before they became package data says where they are now
    with pytest.raises(ConfigError, match="pass its name, --recipe web-zh"):
        load_recipe("configs/data/web-zh.yaml")


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
    with pytest.raises(ConfigError, match="output.tokens.seed"):
        load_recipe({"output": {"tokens": {"seed": "one"}}})
