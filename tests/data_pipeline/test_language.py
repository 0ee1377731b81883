import random

from datatrove.data import Document

from lmlab.data.pipeline.language import LanguageFilter, _sparse_langid
from lmlab.data.pipeline.synthetic import chinese_prose, english_junk, english_prose


def test_sparse_langid_matches_langid():
    import langid.langid as lid

    ident = lid.LanguageIdentifier.from_modelstring(lid.model, norm_probs=True)
    fast = _sparse_langid(ident)
    rng = random.Random(0)
    texts = ([english_prose(rng) for _ in range(20)] + [chinese_prose(rng) for _ in range(20)]
             + [english_junk(rng)[0] for _ in range(10)] + ["", "123", "Bonjour tout le monde"])
    for t in texts:
        (a, pa), (b, pb) = fast(t[:2000]), ident.classify(t[:2000])
        assert a == b and abs(pa - pb) < 1e-6


def test_keep_by_language_and_score():
    f = LanguageFilter(keep=["zh"], min_score=0.65)
    f._hist = [0] * 20
    rng = random.Random(1)
    zh, en = Document(text=chinese_prose(rng), id="z"), Document(text=english_prose(rng), id="e")
    assert f.filter(zh) is True and zh.metadata["language"] == "zh"
    assert f.filter(en) == (False, f"language_{en.metadata['language']}")
