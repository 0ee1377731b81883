"""Task metrics: classification, paired significance, and generated text against a reference.

The field's own libraries do the work where one exists; the few formulas
written here are held equal to a library's in `tests/test_eval_metrics.py`.

    classification  accuracy, per-class and macro / micro precision, recall, F1,
                    from the confusion matrix (scikit-learn builds it; the
                    ratios below are tested against `sklearn.metrics`)
    paired test     McNemar's exact test on two models' right/wrong per row
                    (`scipy.stats.binomtest` on the discordant pairs)
    generation      exact match; BLEU and chrF (sacrebleu; BLEU tokenizes with
                    `tokenize="zh"` when a reference holds Chinese); ROUGE-1/2/L
                    (rouge-score, F-measure; Chinese scored character by
                    character, see `CJKTokenizer`)

Scores are fractions in [0, 1], except BLEU and chrF, which keep sacrebleu's
0-100 scale (the scale papers report them on). scikit-learn, scipy, sacrebleu
and rouge-score are the `lmlab[eval]` extra; each is imported when its metric
is first asked for.
"""

from __future__ import annotations

import math
import re
from typing import Hashable, Sequence

import numpy as np

# Han ideographs: CJK Unified (+ extension A) and Compatibility; what `tokenize="zh"` splits
_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
HAN_RE = re.compile(f"[{_HAN}]")
_ROUGE_TOKEN = re.compile(f"[{_HAN}]|[a-z0-9]+")


def has_cjk(texts: str | Sequence[str]) -> bool:
    """True when any of `texts` holds a Han character (then BLEU tokenizes as Chinese)."""
    texts = [texts] if isinstance(texts, str) else texts
    return any(HAN_RE.search(t) for t in texts)


# ------------------------------------------------------------------ classification

def confusion(y_true: Sequence[Hashable], y_pred: Sequence[Hashable],
              labels: Sequence[Hashable] | None = None) -> tuple[list, np.ndarray]:
    """(labels, C) with C[i, j] = rows of true label i predicted as j (scikit-learn's layout).

    `labels`: the order of rows and columns (default: every label seen, sorted);
    a label seen but not in `labels` (a classifier's unknown label) is added after them,
    so that no row is left out of the matrix."""
    from sklearn.metrics import confusion_matrix

    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    seen = sorted(set(y_true) | set(y_pred), key=str)
    labels = seen if labels is None else list(labels) + [x for x in seen if x not in labels]
    if not y_true:
        return labels, np.zeros((len(labels), len(labels)), dtype=np.int64)
    return labels, confusion_matrix(list(y_true), list(y_pred), labels=labels)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den is 0 (scikit-learn's zero_division=0)."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def scores_from_confusion(cm: np.ndarray) -> dict[str, np.ndarray | float]:
    """Precision, recall and F1 per class, macro and micro, and accuracy, from a confusion matrix.

    Rows are true labels, columns predictions. For class k: TP = C[k,k],
    FP = column sum − TP, FN = row sum − TP. Macro averages the per-class
    scores (every class counts the same); micro pools the counts first (every
    row counts the same), which for single-label data makes micro P = R = F1 =
    accuracy. A ratio with a zero denominator is 0.
    """
    cm = np.asarray(cm, dtype=float)
    tp = np.diag(cm)
    precision = _ratio(tp, cm.sum(axis=0))   # TP / (TP + FP)
    recall = _ratio(tp, cm.sum(axis=1))      # TP / (TP + FN)
    f1 = _ratio(2 * precision * recall, precision + recall)
    micro_p = float(_ratio(tp.sum(), cm.sum(axis=0).sum()))
    micro_r = float(_ratio(tp.sum(), cm.sum(axis=1).sum()))
    micro_f1 = float(_ratio(2 * micro_p * micro_r, micro_p + micro_r))
    return {"precision": precision, "recall": recall, "f1": f1, "support": cm.sum(axis=1),
            "macro_precision": float(precision.mean()) if len(tp) else 0.0,
            "macro_recall": float(recall.mean()) if len(tp) else 0.0,
            "macro_f1": float(f1.mean()) if len(tp) else 0.0,
            "micro_precision": micro_p, "micro_recall": micro_r, "micro_f1": micro_f1,
            "accuracy": float(_ratio(tp.sum(), cm.sum()))}


def classification_metrics(y_true: Sequence[Hashable], y_pred: Sequence[Hashable],
                           labels: Sequence[Hashable] | None = None) -> dict:
    """Accuracy, macro and micro P/R/F1, per-class P/R/F1/support and the confusion matrix.

    The macro averages run over `labels` and any other label seen in either list
    (scikit-learn's default: a predicted label no row has counts, with F1 0)."""
    labels, cm = confusion(y_true, y_pred, labels)
    s = scores_from_confusion(cm)
    return {
        "accuracy": s["accuracy"],
        **{k: s[k] for k in ("macro_precision", "macro_recall", "macro_f1",
                             "micro_precision", "micro_recall", "micro_f1")},
        "per_class": {str(lab): {"precision": float(s["precision"][i]),
                                 "recall": float(s["recall"][i]), "f1": float(s["f1"][i]),
                                 "support": int(s["support"][i])}
                      for i, lab in enumerate(labels)},
        "confusion": {"labels": [str(lab) for lab in labels], "matrix": cm.astype(int).tolist()},
    }


# ------------------------------------------------------------------ paired test

def mcnemar(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> dict:
    """McNemar's exact test: do two models, scored on the same rows, differ in accuracy?

    Only the discordant rows carry evidence: b = rows A got right and B wrong,
    c = rows A got wrong and B right. Under the null hypothesis (equal accuracy)
    each discordant row is a fair coin, so b ~ Binomial(b + c, ½) and the
    two-sided p-value is `binomtest(b, b + c, 0.5)`'s; p = 1 when there are no
    discordant rows.
    """
    from scipy.stats import binomtest

    if len(correct_a) != len(correct_b):
        raise ValueError(f"McNemar needs paired rows: {len(correct_a)} vs {len(correct_b)}")
    b = sum(1 for x, y in zip(correct_a, correct_b) if x and not y)
    c = sum(1 for x, y in zip(correct_a, correct_b) if y and not x)
    p = binomtest(b, b + c, 0.5, alternative="two-sided").pvalue if b + c else 1.0
    return {"b": b, "c": c, "n": len(correct_a), "p_value": float(p)}


# ------------------------------------------------------------------ generation

def exact_match(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Share of outputs equal to their reference after stripping surrounding whitespace."""
    _same_length(hyps, refs)
    return sum(h.strip() == r.strip() for h, r in zip(hyps, refs)) / len(refs) if refs else 0.0


def bleu_tokenize(refs: Sequence[str]) -> str:
    """sacrebleu's tokenizer for these references: "zh" when any holds Chinese, else "13a"."""
    return "zh" if has_cjk(refs) else "13a"


def bleu(hyps: Sequence[str], refs: Sequence[str]) -> dict:
    """Corpus BLEU (0-100) with sacrebleu's signature: {"bleu": score, "signature": str}."""
    from sacrebleu.metrics import BLEU

    _same_length(hyps, refs)
    metric = BLEU(tokenize=bleu_tokenize(refs))
    score = metric.corpus_score(list(hyps), [list(refs)])
    return {"bleu": float(score.score), "signature": str(metric.get_signature())}


BLEU_STATS = 10  # hypothesis length, reference length, matched and total n-grams, n = 1..4


def bleu_stats(hyps: Sequence[str], refs: Sequence[str], tokenize: str) -> list[int]:
    """BLEU's sufficient statistics of these rows, summed (sacrebleu's layout, `BLEU_STATS`
    numbers). They add over rows, so corpus BLEU of a set scored in batches, or on several
    processes, is `bleu_from_stats` of their sum (sacrebleu's significance tests do the same)."""
    from sacrebleu.metrics import BLEU

    _same_length(hyps, refs)
    if not refs:
        return [0] * BLEU_STATS
    rows = BLEU(tokenize=tokenize)._extract_corpus_statistics(list(hyps), [list(refs)])
    return [int(x) for x in np.sum(rows, axis=0)]


def bleu_from_stats(stats: Sequence[float]) -> float:
    """Corpus BLEU (0-100) from summed `bleu_stats` (sacrebleu's default smoothing)."""
    from sacrebleu.metrics import BLEU

    return float(BLEU()._compute_score_from_stats([int(x) for x in stats]).score)


def chrf(hyps: Sequence[str], refs: Sequence[str]) -> dict:
    """Corpus chrF (0-100; character 6-grams, β = 2) with sacrebleu's signature."""
    from sacrebleu.metrics import CHRF

    _same_length(hyps, refs)
    metric = CHRF()
    score = metric.corpus_score(list(hyps), [list(refs)])
    return {"chrf": float(score.score), "signature": str(metric.get_signature())}


class CJKTokenizer:
    """rouge-score's tokenizer, with each Han character a token of its own.

    rouge-score's default tokenizer lower-cases and keeps runs of [a-z0-9],
    which drops Chinese text altogether; this one keeps those runs (so English
    scores are rouge-score's own, tested) and adds every Han character as one
    token, so Chinese ROUGE is over characters, as is usual without a word
    segmenter."""

    def tokenize(self, text: str) -> list[str]:
        return _ROUGE_TOKEN.findall(text.lower())


def rouge(hyps: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F-measure (rouge-score) over the rows, in [0, 1]."""
    from rouge_score import rouge_scorer

    _same_length(hyps, refs)
    keys = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(keys), tokenizer=CJKTokenizer())
    sums = dict.fromkeys(keys, 0.0)
    for h, r in zip(hyps, refs):
        s = scorer.score(r, h)  # (target, prediction)
        for k in keys:
            sums[k] += s[k].fmeasure
    return {k: v / len(refs) if refs else 0.0 for k, v in sums.items()}


def generation_metrics(hyps: Sequence[str], refs: Sequence[str]) -> dict:
    """Exact match, BLEU, chrF and ROUGE-1/2/L of outputs against references."""
    b, c = bleu(hyps, refs), chrf(hyps, refs)
    return {"exact_match": exact_match(hyps, refs), "bleu": b["bleu"], "chrf": c["chrf"],
            **rouge(hyps, refs), "bleu_signature": b["signature"], "chrf_signature": c["signature"]}


# ------------------------------------------------------------------ multiple choice

def centered(acc: float, chance: float) -> float:
    """(acc − chance) / (1 − chance): 0 at random guessing, 1 when all right (nanochat's CORE)."""
    return (acc - chance) / (1 - chance) if chance < 1 else math.nan


def _same_length(hyps: Sequence, refs: Sequence) -> None:
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} outputs but {len(refs)} references")
