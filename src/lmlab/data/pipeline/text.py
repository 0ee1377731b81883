"""Fast text primitives shared by the pipeline steps: word splitting, CJK tests, shingle hashing.

Why a regex word splitter: datatrove's stock English filters split words with
spaCy, which costs ~3–10 ms for a 3 KB page and dominates their run time. The
rules themselves (Gopher, C4, FineWeb) only count words, their lengths and
their characters, so a regex that splits the way spaCy does on ordinary text
(punctuation and contractions as separate tokens, numbers and abbreviations
whole) gives the same keep/drop decision on almost every document at ~50×
the speed. `benchmarks/data_throughput.py` measures that agreement.

`RegexWordTokenizer` is a datatrove `WordTokenizer`, so it can be handed to any
datatrove block that takes a `language` (they accept a tokenizer instance there).
"""

from __future__ import annotations

import re
import zlib

import numpy as np
import regex
from datatrove.utils.word_tokenizers import WordTokenizer

# spaCy-like tokens: contractions split ("do" + "n't", "it" + "'s"), abbreviations
# (U.S.) and numbers (3.5, 1,000) kept whole, "..." one token, any other punctuation
# one token per character. E-mails and URL hosts are whole tokens too, but that
# branch is slow, so it runs only on texts that contain "@" or "://".
_BASE = r"n't\b|'(?:s|re|ve|ll|d|m)\b|(?:[^\W\d_]\.){2,}|\d+(?:[.,:/]\d+)*|\w+|\.\.\.+|[^\w\s]"
_WORD = re.compile(_BASE)
_WORD_WEB = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+|https?://[^\s/]+|" + _BASE)
# sentence ends: terminal punctuation (Latin and CJK) followed by space or end
_SENTENCE_END = regex.compile(r"(?<=[.!?。！？…])[\"'”’)\]]*\s+|(?<=[。！？])")


class RegexWordTokenizer(WordTokenizer):
    """A spaCy-compatible-enough word and sentence splitter with no model and no spaCy."""

    def __init__(self, language: str = "en"):
        super().__init__(language)

    def word_tokenize(self, text: str) -> list[str]:
        if "n't" in text:  # cheaper than a look-ahead on every word
            text = text.replace("n't", " n't")
        if "@" in text or "://" in text:
            return _WORD_WEB.findall(text)
        return _WORD.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        spans, start = [], 0
        for m in _SENTENCE_END.finditer(text):
            if m.start() > start:
                spans.append((start, m.start()))
            start = m.end()
        if start < len(text):
            spans.append((start, len(text)))
        return spans or [(0, len(text))]

    # datatrove caches word splits with lru_cache keyed on the tokenizer: make every
    # instance of one language equal so that copies in worker processes share hits
    def __eq__(self, other):
        return isinstance(other, RegexWordTokenizer) and other.language == self.language

    def __hash__(self):
        return hash(("RegexWordTokenizer", self.language))


# --------------------------------------------------------------------------- CJK

# CJK Unified Ideographs (+ Extension A, compatibility ideographs)
CJK_CHAR = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_NON_SPACE = re.compile(r"\S")


def cjk_ratio(text: str) -> float:
    """Fraction of non-whitespace characters that are Chinese characters."""
    n = len(_NON_SPACE.findall(text))
    return len(CJK_CHAR.findall(text)) / n if n else 0.0


# ----------------------------------------------------------------------- shingles

# punctuation and symbols become spaces before shingling, so "Hello, world" and
# "hello world" give the same shingles
_NOT_WORD = regex.compile(r"[^\p{L}\p{N}\s]+")
_SPACE = re.compile(r"\s+")
_NON_TEXT = regex.compile(r"[^\p{L}\p{N}]+")

_MASK64 = (1 << 64) - 1
# fixed odd multipliers for combining the n hashes of an n-gram (seeded, so every
# worker process computes the same shingles)
_MIX = np.random.RandomState(20240601).randint(1, 2**62, size=64, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def ngram_ids(seq, n: int = 1) -> np.ndarray:
    """n = 1: integer ids for a list of strings (equal strings, equal ids).
    n > 1: one uint64 per run of n consecutive ids (an array from n = 1)."""
    if n == 1 and not isinstance(seq, np.ndarray):
        vocab: dict[str, int] = {}
        return np.fromiter((vocab.setdefault(w, len(vocab)) for w in seq), dtype=np.uint64, count=len(seq))
    m = seq.size - n + 1
    h = np.zeros(max(m, 0), dtype=np.uint64)
    for k in range(n):
        h += (seq[k:k + m] + np.uint64(1)) * _MIX[k]
    return h


def simplify(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed: the text dedup compares."""
    return _SPACE.sub(" ", _NOT_WORD.sub(" ", text.lower())).strip()


def _combine(units: np.ndarray, n: int) -> np.ndarray:
    """Hash every run of n consecutive unit hashes into one uint64 (vectorised)."""
    if units.size < n:
        if units.size == 0:
            return units
        n = units.size  # a text shorter than one n-gram is one shingle
    m = units.size - n + 1
    h = np.zeros(m, dtype=np.uint64)
    for k in range(n):
        h += units[k:k + m] * _MIX[k]  # wraps modulo 2**64, as intended
    # murmur3 finaliser: spread the bits so that the low 32 carry the whole value
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    return h


def word_shingles(text: str, n: int) -> np.ndarray:
    """Hashes (uint64) of the word n-grams of `simplify(text)`."""
    words = _NOT_WORD.sub(" ", text.lower()).split()  # = simplify(text).split(), one pass less
    units = np.fromiter(map(zlib.crc32, map(str.encode, words)), dtype=np.uint64, count=len(words))
    return _combine(units, n)


def char_shingles(text: str, n: int) -> np.ndarray:
    """Hashes (uint64) of the character n-grams of the text without spaces and punctuation.

    For Chinese, where words are not separated by spaces, character n-grams play
    the part that word n-grams play for English.
    """
    t = _NON_TEXT.sub("", text.lower())
    units = np.frombuffer(t.encode("utf-32-le"), dtype="<u4").astype(np.uint64)
    return _combine(units, n)


def shingles(text: str, n: int, unit: str) -> np.ndarray:
    """unit "word", "char", or "auto": characters for mostly-Chinese text, words otherwise."""
    if unit == "auto":
        unit = "char" if cjk_ratio(text[:2000]) >= 0.3 else "word"
    return word_shingles(text, n) if unit == "word" else char_shingles(text, n)
