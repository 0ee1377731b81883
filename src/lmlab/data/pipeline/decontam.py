"""Decontamination: drop training documents that share a long n-gram with evaluation data.

GPT-3 (Brown et al. 2020) removed training documents overlapping benchmark
examples in 13-grams; we do the same. The evaluation files are any files lmlab
reads; every n-gram of their (simplified: lower case, no punctuation) text is
hashed into a sorted array, and a document with any n-gram in it is dropped
(reason "contaminated"). Words for English and code, characters for Chinese
(`unit`). An evaluation text shorter than n units becomes a single shorter
n-gram, which no document n-gram can equal: choose n below the length of the
evaluation items you need caught.
"""

from __future__ import annotations

import numpy as np
from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter

from lmlab.data.pipeline.text import shingles


class DecontaminationFilter(BaseFilter):
    name = "🧪 Decontaminate"

    def __init__(self, eval_files: list[str], ngram: int = 13, unit: str = "word",
                 text_field: str = "text", exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.eval_files = list(eval_files)
        self.ngram, self.unit, self.text_field = ngram, unit, text_field
        self._index: np.ndarray | None = None

    def index(self) -> np.ndarray:
        if self._index is None:
            from lmlab.data.sources import iter_documents

            parts = [shingles(d.text, self.ngram, self.unit)
                     for d in iter_documents(self.eval_files, text_field=self.text_field)]
            self._index = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.uint64)
        return self._index

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        idx = self.index()
        if idx.size == 0:
            return True
        h = shingles(doc.text, self.ngram, self.unit)
        pos = np.searchsorted(idx, h)
        pos[pos == idx.size] = 0
        if np.any(idx[pos] == h):
            return False, "contaminated"
        return True
