"""Language identification: keep the languages a recipe names, above a score.

The model is either `langid` (Lui & Baldwin 2012; its model ships inside the
pip package, so nothing is downloaded) or a fastText language-id model file the
user names (e.g. lid.176.bin, which FineWeb and CCNet use). The score is the
probability of the predicted language. Each document gets
`metadata["language"]` and `metadata["language_score"]`; the scores of every
document seen are kept as a histogram for the report.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.filters.base_filter import BaseFilter

from lmlab.data.pipeline.meter import write_json
from lmlab.errors import ConfigError

SCORE_BINS = 20
_LANGID = None


def _sparse_langid(ident):
    """langid's classify with the naive-Bayes product taken over the features present only.

    langid computes np.dot(counts, weights) with an integer count vector over all
    7,480 features against a float matrix; numpy cannot hand mixed types to BLAS,
    so each call costs ~12 ms. A page has a few hundred distinct features: the
    same sum over those rows gives the same scores in ~0.3 ms.
    """
    weights, prior, langs = ident.nb_ptc, ident.nb_pc, ident.nb_classes

    def classify(text: str):
        fv = ident.instance2fv(text)
        nz = np.flatnonzero(fv)
        logp = fv[nz].astype(np.float64) @ weights[nz] + prior
        p = np.exp(logp - logp.max())
        i = int(np.argmax(p))
        return langs[i], float(p[i] / p.sum())

    return classify


class LanguageFilter(BaseFilter):
    name = "🌐 Language"

    def __init__(self, keep: list[str], min_score: float = 0.65, model: str = "langid",
                 max_chars: int = 2000, report_folder: str | None = None, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.keep = set(keep or [])
        self.min_score = float(min_score)
        self.model = model
        self.max_chars = max_chars
        self.report_folder = report_folder
        self._predict = None

    def _load(self):
        if self.model == "langid":
            global _LANGID
            if _LANGID is None:  # ~3 s to unpack: once per process, not once per task
                import langid.langid as lid

                _LANGID = _sparse_langid(lid.LanguageIdentifier.from_modelstring(lid.model, norm_probs=True))
            return _LANGID
        try:
            import fasttext
        except ImportError:
            raise ConfigError(f"language.model {self.model}: reading a fastText model needs the "
                              "`fasttext` package (pip install fasttext-wheel)") from None
        if not Path(self.model).is_file():
            raise ConfigError(f"language.model {self.model}: no such file")
        ft = fasttext.load_model(self.model)

        def classify(text: str):
            # the list form: fasttext's one-string predict calls np.array(copy=False), which
            # NumPy 2 refuses
            labels, scores = ft.predict([text.replace("\n", " ")], k=1)
            if not labels[0]:
                return "unknown", 0.0
            return labels[0][0].removeprefix("__label__"), float(scores[0][0])

        return classify

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if self._predict is None:
            self._predict = self._load()
        lang, score = self._predict(doc.text[: self.max_chars])
        score = float(score)
        doc.metadata["language"], doc.metadata["language_score"] = lang, round(score, 4)
        self._hist[min(int(score * SCORE_BINS), SCORE_BINS - 1)] += 1
        self.stat_update(f"lang_{lang}")
        if self.keep and lang not in self.keep:
            return False, f"language_{lang}"
        if score < self.min_score:
            return False, "language_low_score"
        return True

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        self._hist = [0] * SCORE_BINS
        yield from super().run(data, rank, world_size)
        if self.report_folder:
            write_json(Path(self.report_folder) / f"{rank:05d}.json", {"score_hist": self._hist})
