"""General-purpose compressors as baselines for bits per byte (formula: `lmlab.eval`).

Each runs at its strongest standard setting, on the data as one stream, and
is charged for everything its format writes (headers and checksums included):

    xz     LZMA2 in the .xz container, preset 9 | PRESET_EXTREME (`xz -9e`)
    bz2    Burrows–Wheeler, compresslevel 9 (`bzip2 -9`)
    zlib   DEFLATE in the zlib wrapper, level 9 (`gzip -9` less gzip's header)
"""

from __future__ import annotations

import bz2
import lzma
import math
import zlib
from typing import Callable

COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "xz": lambda data: lzma.compress(data, format=lzma.FORMAT_XZ,
                                     preset=9 | lzma.PRESET_EXTREME),
    "bz2": lambda data: bz2.compress(data, compresslevel=9),
    "zlib": lambda data: zlib.compress(data, level=9),
}


def compress(data: bytes, name: str) -> bytes:
    """`data` compressed by compressor `name` ("xz", "bz2" or "zlib") at the settings above."""
    if name not in COMPRESSORS:
        raise ValueError(f"unknown compressor {name!r}; known: {sorted(COMPRESSORS)}")
    return COMPRESSORS[name](bytes(data))


def compressor_bits_per_byte(data: bytes, name: str = "xz") -> float:
    """Bits the compressor spends per byte of `data`: 8·len(compressed)/len(data); NaN if empty."""
    packed = compress(data, name)  # validates the name even for empty data
    return 8 * len(packed) / len(data) if len(data) else math.nan


def baselines(data: bytes) -> dict[str, float]:
    """Bits per byte of every compressor on `data`: {"xz": …, "bz2": …, "zlib": …}."""
    return {name: compressor_bits_per_byte(data, name) for name in COMPRESSORS}
