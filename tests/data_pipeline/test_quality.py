"""Quality rules: Chinese prose survives web-zh as well as English prose survives web-en."""

import random

import pytest
from datatrove.data import Document

from lmlab.data.pipeline import load_recipe
from lmlab.data.pipeline.normalize import Normalizer
from lmlab.data.pipeline.quality import build_quality_filters

from .synthetic import chinese_junk, chinese_prose, english_junk, english_prose


def keeps(recipe_name: str, texts: list[str]) -> list[bool]:
    r = load_recipe(recipe_name)
    n = r["normalize"]
    norm = Normalizer(n["nfkc"], n["whitespace"], n["control_chars"], n["traditional_to_simplified"])
    filters = build_quality_filters(r["quality"])
    out = []
    for i, t in enumerate(texts):
        doc = Document(text=norm.normalize(t), id=str(i))
        ok = True
        for f in filters:
            if f.filter(doc) is not True:
                ok = False
                break
        out.append(ok)
    return out


def rate(xs):
    return sum(xs) / len(xs)


def test_chinese_prose_passes_web_zh_like_english_prose_passes_web_en():
    rng = random.Random(3)
    en = rate(keeps("web-en", [english_prose(rng) for _ in range(150)]))
    zh = rate(keeps("web-zh", [chinese_prose(rng) for _ in range(150)]))
    assert en >= 0.95 and zh >= 0.95 and abs(en - zh) <= 0.05, (en, zh)


def test_english_rules_would_destroy_chinese():
    rng = random.Random(4)
    assert rate(keeps("web-en", [chinese_prose(rng) for _ in range(30)])) < 0.2


@pytest.mark.parametrize("recipe,junk", [("web-en", english_junk), ("web-zh", chinese_junk)])
def test_junk_is_removed(recipe, junk):
    rng = random.Random(5)
    texts = []
    for _ in range(100):
        t, kind = junk(rng)
        if kind != "lorem" or recipe == "web-en":
            texts.append(t)
    assert rate(keeps(recipe, texts)) <= 0.05


def test_regex_words_agree_with_spacy_decisions():
    """The fast tokenizer takes the same keep/drop decision as datatrove's stock spaCy filters."""
    pytest.importorskip("spacy")
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    rng = random.Random(6)
    texts = [english_prose(rng) if i % 3 else english_junk(rng)[0] for i in range(90)]
    stock = [GopherRepetitionFilter(), GopherQualityFilter(), C4QualityFilter(), FineWebQualityFilter()]
    ours = keeps("web-en", texts)
    theirs = []
    for i, t in enumerate(texts):
        doc = Document(text=Normalizer().normalize(t), id=str(i))
        theirs.append(all(f.filter(doc) is True for f in stock))  # all() stops at the first drop
    agree = sum(a == b for a, b in zip(ours, theirs)) / len(texts)
    assert agree >= 0.97, agree
