import numpy as np

from lmlab.data.pipeline.text import RegexWordTokenizer, char_shingles, shingles, word_shingles


def test_regex_words_split_like_spacy():
    words = RegexWordTokenizer().word_tokenize("Don't stop, it's 3.5 U.S. dollars... mail a@b.com!")
    assert words == ["Do", "n't", "stop", ",", "it", "'s", "3.5", "U.S.", "dollars", "...", "mail",
                     "a@b.com", "!"]


def test_shingles_ignore_case_and_punctuation():
    assert np.array_equal(word_shingles("Hello, World! foo bar", 3), word_shingles("hello world foo   bar", 3))
    assert np.array_equal(char_shingles("你好，世界。", 2), char_shingles("你好世界", 2))
    assert word_shingles("a b", 3).size == 1  # shorter than n: one shingle of the whole text
    assert word_shingles("", 3).size == 0


def test_auto_unit_picks_characters_for_chinese():
    zh, en = "数据的质量决定了模型的上限", "the quality of data sets the ceiling"
    assert np.array_equal(shingles(zh, 3, "auto"), char_shingles(zh, 3))
    assert np.array_equal(shingles(en, 3, "auto"), word_shingles(en, 3))
