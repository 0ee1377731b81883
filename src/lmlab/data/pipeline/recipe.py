"""Recipes: the YAML file that says which stages run and with which thresholds.

A recipe is a nested mapping. `DEFAULTS` below is the complete schema: a
recipe file names only what it changes, is merged over the defaults, and any
key that is not in the schema is an error (with the path of the key), so a
typo never silently leaves a default in place.

The shipped recipes (`web-en`, `web-zh`, `code`) are package data,
`src/lmlab/data/recipes/*.yaml`, found through `importlib.resources`, so
`--recipe web-en` works from any install (a wheel has no repository around
it). A recipe argument is a file path if such a file exists, else the name of
a shipped recipe.
"""

from __future__ import annotations

import copy
import inspect
import os
from importlib import resources
from pathlib import Path

import yaml

from lmlab.data.sources import MAX_LINE_BYTES, check_max_line_bytes
from lmlab.errors import ConfigError

# Every stage has `enabled`. Filter sections hold the keyword arguments of the
# datatrove block they configure (checked against its signature in `validate`).
DEFAULTS: dict = {
    "name": "custom",
    # max_line_bytes: longer lines (JSONL records, lines of text) are reported and skipped
    "input": {"text_field": "text", "id_field": "id", "strict": False,
              "max_line_bytes": MAX_LINE_BYTES},
    "normalize": {
        "enabled": True,
        "nfkc": True,
        "whitespace": True,
        "control_chars": True,
        "traditional_to_simplified": False,
    },
    "language": {
        "enabled": True,
        "model": "langid",        # "langid" (ships its model) or the path of a fastText .bin/.ftz
        "keep": ["en"],           # languages to keep; empty list keeps every language
        "min_score": 0.65,        # minimum probability of the detected language
        "max_chars": 2000,        # identify from the first N characters (speed)
    },
    "quality": {
        "gopher_repetition": {"enabled": True},
        "gopher_quality": {"enabled": True},
        "c4": {"enabled": True},
        "fineweb": {"enabled": True},
        "chinese": {"enabled": False},
    },
    "pii": {
        "enabled": True,
        "email": True,
        "ip": True,
        "phone": True,
        "cn_id": True,
        "bank_card": True,
        "max_hits": 10,           # drop a document with more matches than this
        "replacements": {
            "email": "<EMAIL>", "ip": "<IP>", "phone": "<PHONE>", "cn_id": "<ID>", "bank_card": "<CARD>",
        },
    },
    "dedup": {
        "exact": {"enabled": True},
        # CCNet-style: drop every line (paragraph) whose simplified text a kept document had earlier
        "paragraph": {"enabled": False},
        "minhash": {
            "enabled": True,
            "unit": "word",       # "word" n-grams (English, code), "char" (Chinese), "auto" (mixed corpora)
            "ngram": 3,
            "bands": 40,
            "rows": 4,
            "seed": 1,
            "min_similarity": 0.3,  # verify LSH candidates: share of equal hashes (0 = no check)
        },
    },
    "decontamination": {
        "enabled": False,
        "eval_files": [],         # files in any format lmlab reads; their texts are the evaluation set
        "ngram": 13,
        "unit": "word",
    },
    "output": {
        "documents": True,        # write kept documents as JSONL (id, text, metadata)
        "exclusions": True,       # write removed documents per filter under excluded/
        "report_samples": 5,      # removed documents shown per filter in report.html
        "tokens": {
            "enabled": False,
            "tokenizer": None,    # tokenizer directory; the run's `tokenizer_dir` argument overrides it
            "val_fraction": 0.005,
            "seed": 0,            # seed of the train/val split (the rule of `lmlab data prepare`)
            "batch_size": 256,
        },
    },
    "executor": {
        "tasks": None,            # parallel tasks (input shards); default: workers
        "ray": {"cpus_per_task": 1, "mem_per_cpu_gb": 2},
        "slurm": {"partition": None, "time": "24:00:00", "cpus_per_task": 1, "mem_per_cpu_gb": 2,
                  "sbatch_args": {}, "venv_path": None},
    },
}

# free-form sections: their keys are checked elsewhere (datatrove signatures) or are user data
_OPEN = {("pii", "replacements"), ("executor", "slurm", "sbatch_args")}
_FILTER_KEYS = {"gopher_repetition", "gopher_quality", "c4", "fineweb", "chinese"}


def _merge(base: dict, over: dict, path: tuple) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        here = path + (k,)
        if path == ("quality",) and k in _FILTER_KEYS:
            if not isinstance(v, dict):
                raise ConfigError(f"recipe: quality.{k} must be a mapping, got {v!r}")
            for name, value in v.items():
                _check_type(out.get(k, {}).get(name), value, here + (name,))
            out[k] = {**out.get(k, {}), **v}
        elif k not in base and path not in _OPEN:
            known = ", ".join(sorted(base))
            raise ConfigError(f"recipe: unknown key {'.'.join(here)!r} (known here: {known})")
        elif isinstance(base.get(k), dict) and path + (k,) not in _OPEN:
            if not isinstance(v, dict):
                raise ConfigError(f"recipe: {'.'.join(here)} must be a mapping, got {v!r}")
            out[k] = _merge(base[k], v, here)
        else:
            _check_type(base.get(k), v, here)
            out[k] = v
    return out


def _check_type(default, value, here: tuple) -> None:
    """A value takes its default's type: a number stays a number, a switch true/false."""
    where = ".".join(map(str, here))
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"recipe: {where}: {value!r} is not true or false")
    elif isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"recipe: {where}: {value!r} is not a number")
    elif isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"recipe: {where}: {value!r} is not a string")
    elif isinstance(default, list) and not isinstance(value, list):
        raise ConfigError(f"recipe: {where}: {value!r} is not a list")


def _shipped_dir():
    return resources.files("lmlab.data").joinpath("recipes")


def shipped_recipes() -> list[str]:
    """Names of the recipes that ship inside the package (`lmlab/data/recipes/NAME.yaml`)."""
    return sorted(p.name.removesuffix(".yaml") for p in _shipped_dir().iterdir()
                  if p.name.endswith(".yaml"))


def _recipe_text(recipe: str | os.PathLike) -> tuple[str, str]:
    """(where it came from, YAML text): a file if one exists at `recipe`, else a shipped recipe."""
    path = Path(recipe)
    if path.is_file():
        try:
            return str(path), path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save the recipe as "
                              "UTF-8 YAML") from None
    names = shipped_recipes()
    if str(recipe) in names:
        shipped = _shipped_dir().joinpath(f"{recipe}.yaml")
        return str(shipped), shipped.read_text(encoding="utf-8")
    hint = ""
    if path.suffix in (".yaml", ".yml") and path.stem in names:  # e.g. configs/data/web-en.yaml
        hint = (f"; the shipped {path.stem!r} is in the package now: "
                f"pass its name, --recipe {path.stem}")
    raise ConfigError(f"{recipe}: no such recipe file, nor a shipped recipe "
                      f"({', '.join(names)}){hint}")


def load_recipe(recipe: str | os.PathLike | dict) -> dict:
    """A recipe (file path, shipped recipe name, or mapping) merged over DEFAULTS and validated."""
    if isinstance(recipe, dict):
        data, path = recipe, None
    else:
        path, text = _recipe_text(recipe)
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{path}: not valid YAML ({where}{what}); fix the recipe") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a recipe is a mapping of sections, got {type(data).__name__}")
    try:
        merged = _merge(DEFAULTS, data, ())
        validate(merged)
    except ConfigError as e:
        if path is None:
            raise
        raise ConfigError(f"{path}: {str(e).removeprefix('recipe: ')}") from None
    return merged


def _check_kwargs(section: str, cls, kwargs: dict) -> None:
    params = inspect.signature(cls.__init__).parameters
    allowed = set(params) - {"self", "exclusion_writer", "language"}
    bad = sorted(set(kwargs) - allowed)
    if bad:
        raise ConfigError(f"recipe: quality.{section} has unknown threshold(s) {bad}; "
                          f"{cls.__name__} takes {sorted(allowed)}")
    for name, value in kwargs.items():  # a threshold takes the type of the filter's default
        default = params[name].default
        if default is not inspect.Parameter.empty and default is not None:
            _check_type(default, value, ("quality", section, name))


def validate(r: dict) -> None:
    """Raise ConfigError for values that cannot work (types, ranges, combinations)."""
    from lmlab.data.pipeline.quality import FILTER_CLASSES

    check_max_line_bytes(r["input"]["max_line_bytes"], "recipe: input.max_line_bytes")
    for name, section in r["quality"].items():
        if name not in FILTER_CLASSES:
            raise ConfigError(f"recipe: unknown quality filter {name!r} (known: {sorted(FILTER_CLASSES)})")
        _check_kwargs(name, FILTER_CLASSES[name], {k: v for k, v in section.items() if k != "enabled"})
    lang = r["language"]
    if not 0 <= float(lang["min_score"]) <= 1:
        raise ConfigError(f"recipe: language.min_score must be in [0, 1], got {lang['min_score']}")
    if lang["model"] != "langid" and not Path(lang["model"]).is_file():
        raise ConfigError(f"recipe: language.model {lang['model']!r} is neither 'langid' "
                          "nor an existing fastText model file")
    mh = r["dedup"]["minhash"]
    if mh["unit"] not in ("word", "char", "auto"):
        raise ConfigError(f"recipe: dedup.minhash.unit must be 'word', 'char' or 'auto', got {mh['unit']!r}")
    for k in ("ngram", "bands", "rows"):
        if not isinstance(mh[k], int) or mh[k] < 1:
            raise ConfigError(f"recipe: dedup.minhash.{k} must be a positive integer, got {mh[k]!r}")
    if not 0 <= float(mh["min_similarity"]) <= 1:
        raise ConfigError(f"recipe: dedup.minhash.min_similarity must be in [0, 1], got {mh['min_similarity']}")
    dc = r["decontamination"]
    if dc["enabled"] and not dc["eval_files"]:
        raise ConfigError("recipe: decontamination is enabled but decontamination.eval_files is empty")
    if dc["unit"] not in ("word", "char", "auto"):
        raise ConfigError(f"recipe: decontamination.unit must be 'word', 'char' or 'auto', got {dc['unit']!r}")
    if not isinstance(r["pii"]["max_hits"], int) or r["pii"]["max_hits"] < 0:
        raise ConfigError(f"recipe: pii.max_hits must be an integer >= 0, got {r['pii']['max_hits']!r}")
    vf = r["output"]["tokens"]["val_fraction"]
    if not 0 <= float(vf) < 1:
        raise ConfigError(f"recipe: output.tokens.val_fraction must be in [0, 1), got {vf}")
    seed = r["output"]["tokens"]["seed"]
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"recipe: output.tokens.seed must be an integer, got {seed!r}")
