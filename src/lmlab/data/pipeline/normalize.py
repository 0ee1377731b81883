"""Normalisation: one spelling for one text, before anything looks at it.

- Unicode NFKC: full-width Latin letters and digits become ASCII, ligatures split,
  compatibility forms folded, so that "ＡＢＣ１２３" and "ABC123" are the same
  string for language id, the filters and deduplication. (NFKC also turns the
  full-width ！？：， into ASCII; 。 stays. The Chinese rules accept both.)
- control characters: removed, except newline and tab.
- whitespace: runs of spaces/tabs become one space, lines are stripped at the
  end, more than two newlines become two (a paragraph break).
- optionally traditional → simplified Chinese with OpenCC (`t2s`), so that one
  Chinese text in two scripts deduplicates as one.

Documents left empty are dropped (reason "empty").
"""

from __future__ import annotations

import re
import unicodedata

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\u200e\u200f\u2028\u2029\ufeff]")
_SPACES = re.compile(r"[ \t\u00a0\u3000]+")
_TRAILING = re.compile(r" +\n")
_NEWLINES = re.compile(r"\n{3,}")


class Normalizer(BaseFilter):
    """Rewrites each document's text in place; drops documents that end up empty."""

    name = "🧽 Normalize"

    def __init__(self, nfkc: bool = True, whitespace: bool = True, control_chars: bool = True,
                 traditional_to_simplified: bool = False, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.nfkc, self.whitespace, self.control_chars = nfkc, whitespace, control_chars
        self.t2s = traditional_to_simplified
        self._opencc = None

    def normalize(self, text: str) -> str:
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        if self.nfkc and not text.isascii():
            text = unicodedata.normalize("NFKC", text)
        if self.control_chars:
            text = _CONTROL.sub("", text)
        if self.whitespace:
            text = _NEWLINES.sub("\n\n", _TRAILING.sub("\n", _SPACES.sub(" ", text))).strip()
        if self.t2s and not text.isascii():
            if self._opencc is None:
                import opencc

                self._opencc = opencc.OpenCC("t2s")
            text = self._opencc.convert(text)
        return text

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        doc.text = self.normalize(doc.text)
        return (True if doc.text else (False, "empty"))
