"""lmlab.eval.metrics against the libraries of the field, and the formulas lmlab writes itself.

- precision / recall / F1 (per class, macro, micro) and accuracy from a confusion
  matrix equal scikit-learn's, classes never predicted (zero division) included;
- McNemar's exact test equals the binomial tail summed by hand (and statsmodels'
  exact test where it is installed);
- BLEU, chrF are sacrebleu's, with `tokenize="zh"` exactly when a reference is Chinese;
- ROUGE on English is rouge-score's own; on Chinese it counts characters (values by hand);
- exact match and the centred accuracy on numbers known in closed form.
"""

import math
import random

import numpy as np
import pytest

from lmlab.eval.metrics import (CJKTokenizer, bleu, bleu_tokenize, centered, chrf,
                                classification_metrics, confusion, exact_match,
                                generation_metrics, has_cjk, mcnemar, rouge,
                                scores_from_confusion)


def random_labels(seed, n=60, k=4, never_predicted=True):
    rng = random.Random(seed)
    labels = [f"c{i}" for i in range(k)]
    y_true = [rng.choice(labels) for _ in range(n)]
    pool = labels[:-1] if never_predicted else labels  # the last class is never predicted
    y_pred = [t if rng.random() < 0.6 and t in pool else rng.choice(pool) for t in y_true]
    return labels, y_true, y_pred


@pytest.mark.parametrize("seed", range(6))
def test_scores_from_confusion_equal_sklearn(seed):
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

    labels, y_true, y_pred = random_labels(seed, never_predicted=seed % 2 == 0)
    _, cm = confusion(y_true, y_pred, labels)
    s = scores_from_confusion(cm)
    kw = dict(labels=labels, zero_division=0)
    np.testing.assert_allclose(s["precision"], precision_score(y_true, y_pred, average=None, **kw))
    np.testing.assert_allclose(s["recall"], recall_score(y_true, y_pred, average=None, **kw))
    np.testing.assert_allclose(s["f1"], f1_score(y_true, y_pred, average=None, **kw))
    for avg in ("macro", "micro"):
        for name, fn in (("precision", precision_score), ("recall", recall_score),
                         ("f1", f1_score)):
            assert s[f"{avg}_{name}"] == pytest.approx(fn(y_true, y_pred, average=avg, **kw))
    assert s["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert s["micro_f1"] == pytest.approx(s["accuracy"])  # single-label: micro = accuracy


def test_classification_metrics_report_and_an_unknown_predicted_label():
    from sklearn.metrics import f1_score

    y_true = ["正面", "负面", "正面", "正面", "负面", "neutral"]
    y_pred = ["正面", "正面", "正面", "负面", "负面", "?"]  # "?" is no class of the task
    m = classification_metrics(y_true, y_pred, labels=["正面", "负面", "neutral"])
    assert m["confusion"]["labels"] == ["正面", "负面", "neutral", "?"]
    assert m["confusion"]["matrix"][0] == [2, 1, 0, 0]
    assert m["confusion"]["matrix"][2] == [0, 0, 0, 1]
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro",
                                                   zero_division=0))
    third = pytest.approx(2 / 3)
    assert m["per_class"]["正面"] == {"precision": third, "recall": third, "f1": third,
                                    "support": 3}
    assert m["per_class"]["neutral"]["support"] == 1 and m["per_class"]["neutral"]["f1"] == 0


def exact_mcnemar_by_hand(b, c):
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


@pytest.mark.parametrize("b, c", [(0, 0), (3, 10), (7, 7), (0, 9), (25, 12), (1, 0)])
def test_mcnemar_is_the_exact_binomial_test_on_discordant_rows(b, c):
    # rows: b where only A is right, c where only B is right, plus concordant rows
    a_right = [True] * b + [False] * c + [True] * 5 + [False] * 4
    b_right = [False] * b + [True] * c + [True] * 5 + [False] * 4
    r = mcnemar(a_right, b_right)
    assert (r["b"], r["c"], r["n"]) == (b, c, b + c + 9)
    assert r["p_value"] == pytest.approx(exact_mcnemar_by_hand(b, c), rel=1e-12)


def test_mcnemar_equals_statsmodels():
    sm = pytest.importorskip("statsmodels.stats.contingency_tables")
    rng = random.Random(0)
    a = [rng.random() < 0.7 for _ in range(80)]
    b = [rng.random() < 0.5 for _ in range(80)]
    r = mcnemar(a, b)
    table = [[sum(x and y for x, y in zip(a, b)), r["b"]],
             [r["c"], sum(not x and not y for x, y in zip(a, b))]]
    assert r["p_value"] == pytest.approx(sm.mcnemar(table, exact=True).pvalue)


HYPS_EN = ["the cat sat on the mat", "a quick brown fox jumps", "hello world"]
REFS_EN = ["the cat is on the mat", "the quick brown fox jumps over", "hello there world"]
HYPS_ZH = ["我爱北京", "今天天气很好", "语言模型预测下一个词"]
REFS_ZH = ["我爱北京天安门", "今天的天气很好", "语言模型预测下一个词"]


def test_bleu_and_chrf_are_sacrebleus_with_zh_tokenization_for_chinese():
    import sacrebleu

    assert bleu_tokenize(REFS_EN) == "13a" and bleu_tokenize(REFS_ZH) == "zh"
    assert has_cjk("mixed 中文") and not has_cjk(["ascii only", "ñandú"])
    for hyps, refs, tok in ((HYPS_EN, REFS_EN, "13a"), (HYPS_ZH, REFS_ZH, "zh")):
        assert bleu(hyps, refs)["bleu"] == pytest.approx(
            sacrebleu.corpus_bleu(hyps, [refs], tokenize=tok).score)
        assert f"tok:{tok}" in bleu(hyps, refs)["signature"]
        assert chrf(hyps, refs)["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    # without "zh" a Chinese sentence is one token: BLEU would be near 0 for a close match
    assert bleu(HYPS_ZH, REFS_ZH)["bleu"] > 3 * sacrebleu.corpus_bleu(HYPS_ZH, [REFS_ZH]).score


def test_rouge_on_english_is_rouge_scores_own():
    from rouge_score import rouge_scorer

    ref = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    got = rouge(HYPS_EN, REFS_EN)
    for k in ("rouge1", "rouge2", "rougeL"):
        want = sum(ref.score(r, h)[k].fmeasure for h, r in zip(HYPS_EN, REFS_EN)) / len(HYPS_EN)
        assert got[k] == pytest.approx(want)
    text = "Hello, World! It's 2024 — naïve café"
    default = rouge_scorer.tokenizers.DefaultTokenizer()
    assert CJKTokenizer().tokenize(text) == default.tokenize(text)


def test_rouge_on_chinese_counts_characters():
    assert CJKTokenizer().tokenize("我爱NLP和北京。") == ["我", "爱", "nlp", "和", "北", "京"]
    r = rouge(["我爱北京"], ["我爱北京天安门"])
    # ROUGE-1: 4 of 4 hypothesis characters match, 4 of 7 reference ones: F = 2·1·(4/7)/(1+4/7)
    assert r["rouge1"] == pytest.approx(8 / 11)
    # ROUGE-2: 3 of 3 hypothesis bigrams, 3 of 6 reference bigrams: F = 2/3
    assert r["rouge2"] == pytest.approx(2 / 3)
    assert r["rougeL"] == pytest.approx(8 / 11)  # the longest common subsequence is 我爱北京


def test_exact_match_centred_accuracy_and_all_generation_metrics():
    assert exact_match([" blue\n", "red"], ["blue", "green"]) == 0.5
    assert centered(0.25, 0.25) == 0 and centered(1.0, 0.25) == 1
    assert centered(0.625, 0.25) == pytest.approx(0.5)
    m = generation_metrics(HYPS_ZH, REFS_ZH)
    assert m["exact_match"] == pytest.approx(1 / 3)
    assert {"bleu", "chrf", "rouge1", "rouge2", "rougeL"} <= set(m)
    with pytest.raises(ValueError):
        exact_match(["a"], ["a", "b"])
