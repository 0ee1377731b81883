"""The one validation path for configuration values: types and ranges, checked before work.

Every config dataclass (`TrainConfig`, `PretrainConfig`, `ModelConfig`, ...) calls
`check_fields(self, prefix, **ranges)` from its `__post_init__`, so a value is
checked the same way whether it came from YAML, the command line or Python:

    check_fields(self, "train.", batch_size=">=1", lr=">0", min_lr_ratio="[0,1]")

A failure is a `ConfigError` of one line naming the field, the value and what
is allowed, e.g. ``train.batch_size: 0 is out of range; allowed: >= 1``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from typing import Any, Literal, Union, get_args, get_origin

from lmlab.errors import ConfigError

_INTERVAL = re.compile(r"^([\[(])\s*(-?[\d.e+-]+|-inf)\s*,\s*(-?[\d.e+-]+|inf)\s*([\])])$")
_BOUND = re.compile(r"^(>=|>|<=|<)\s*(-?[\d.e+-]+)$")


def in_range(value: float, rule: str) -> bool:
    """Whether `value` satisfies `rule`: ">=1", ">0", "<1", "[0,1]", "(0,1]", "[0,1)"."""
    if isinstance(value, float) and math.isnan(value):
        return False
    m = _BOUND.match(rule)
    if m:
        op, b = m.group(1), float(m.group(2))
        return {">=": value >= b, ">": value > b, "<=": value <= b, "<": value < b}[op]
    m = _INTERVAL.match(rule)
    if not m:
        raise ValueError(f"bad range rule {rule!r}")
    lo, hi = float(m.group(2)), float(m.group(3))
    return ((value >= lo) if m.group(1) == "[" else (value > lo)) and (
        (value <= hi) if m.group(4) == "]" else (value < hi))


def _type_ok(value: Any, hint: Any) -> bool:
    origin = get_origin(hint)
    if hint is Any:
        return True
    if origin is Union or str(origin) == "types.UnionType":
        return any(_type_ok(value, h) for h in get_args(hint))
    if hint is type(None):
        return value is None
    if origin is Literal:
        return value in get_args(hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (dict, list, tuple):
        return isinstance(value, origin)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # a type this checker does not know is not refused


def _type_name(hint: Any) -> str:
    origin = get_origin(hint)
    if origin is Union or str(origin) == "types.UnionType":
        return " or ".join(_type_name(h) for h in get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def check_fields(obj: Any, prefix: str = "", **ranges: str) -> None:
    """Check every field of dataclass `obj` against its type, and the named ones against
    their range rules (None passes a range: an optional field left unset)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        hint = hints.get(f.name, Any)
        if dataclasses.is_dataclass(value):
            continue  # a nested config checks itself
        if not _type_ok(value, hint):
            raise ConfigError(f"{prefix}{f.name}: {value!r} is not {_type_name(hint)}")
    for name, rule in ranges.items():
        value = getattr(obj, name)
        if value is not None and not in_range(value, rule):
            allowed = re.sub(r"^([<>]=?)", r"\1 ", rule)
            raise ConfigError(f"{prefix}{name}: {value!r} is out of range; allowed: {allowed}")
