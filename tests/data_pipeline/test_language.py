import random

from datatrove.data import Document

from lmlab.data.pipeline.language import LanguageFilter, _sparse_langid

from .synthetic import chinese_prose, english_junk, english_prose


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


def test_fasttext_model_file(tmp_path):
    """A local fastText model (here one trained on the spot) is read and used like langid."""
    import pytest

    fasttext = pytest.importorskip("fasttext")
    rng = random.Random(2)
    train = tmp_path / "train.txt"
    with open(train, "w", encoding="utf-8") as f:
        for _ in range(200):
            f.write("__label__en " + english_prose(rng, (1, 1)).replace("\n", " ") + "\n")
            f.write("__label__zh " + " ".join(chinese_prose(rng, (1, 1)).replace("\n", "")) + "\n")
    model = fasttext.train_supervised(str(train), epoch=5, minn=1, maxn=2, dim=8, verbose=0, seed=0)
    model.save_model(str(tmp_path / "lid.bin"))

    f = LanguageFilter(keep=["zh"], min_score=0.5, model=str(tmp_path / "lid.bin"))
    f._hist = [0] * 20
    zh = Document(text=" ".join(chinese_prose(rng, (1, 1))), id="z")
    en = Document(text=english_prose(rng, (1, 1)), id="e")
    assert f.filter(zh) is True and zh.metadata["language"] == "zh"
    assert f.filter(en) == (False, "language_en")
    assert 0.5 <= zh.metadata["language_score"] <= 1.0
