"""Planted corpora: web-like English and Chinese documents whose truth is known.

Fixture code, so it lives with the tests and is not part of the installed
package. The tests (`from .synthetic import ...`) and
`benchmarks/data_throughput.py` (which loads this file by path) need corpora
where every answer is known in advance — which documents are exact or near
copies of which, which are junk and why, where the personal data is — and
nothing may be downloaded. So this module writes them: prose from a
Zipf-distributed vocabulary (English pseudo-words around real stop words;
Chinese words from common characters), junk of the kinds the quality rules
exist for, copies edited at a chosen rate, and personal data next to
look-alike numbers (years, prices, dates).

Every record carries its truth in plain fields (`kind`, `dup_of`, `lang`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

_STOP = ["the", "of", "and", "to", "a", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an", "they", "you", "were", "her", "she", "there", "been", "one", "all", "we", "their", "has", "would", "when", "if", "so", "what", "can", "more", "will", "about", "out", "up", "them", "into", "some", "could", "then", "other"]
_ONSETS = ["b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "v", "w",
           "br", "cr", "dr", "fl", "gr", "pl", "pr", "sh", "st", "str", "th", "tr", "ch"]
_VOWELS = ["a", "e", "i", "o", "u", "ea", "ai", "ou", "io"]
_CODAS = ["", "", "n", "r", "s", "t", "l", "nd", "st", "ng", "ck", "m"]

_ZH_CHARS = (
    "的一是不了人我在有他这为之大来以个中上们到说国和地也子时道出而要于就下得可你年生自会那后能对着事其"
    "里所去行过家十用发天如然作方成者多日都三小军二无同么经法当起与好看学进种将还分此心前面又定见只主没公"
    "从知最新市场城市发展经济社会文化历史教育科学技术研究工作问题方面重要提高建设管理服务企业产品质量环境"
    "政府人民群众生活安全健康水平条件要求内容形式情况过程结果影响作用关系基础能力系统信息数据网络平台资源"
    "活动组织部门地区国家世界全球时间空间语言文字书籍阅读写作思想精神传统现代未来变化改革开放合作交流")
_ZH_PUNCT_MID = "，"
_ZH_PUNCT_END = "。。。！？"


def _zipf_choice(rng: random.Random, items: list[str], s: float = 1.1) -> list[str]:
    weights = [1.0 / (i + 1) ** s for i in range(len(items))]
    return rng.choices(items, weights=weights, k=1)


class _Vocab:
    def __init__(self, seed: int = 0, size: int = 6000):
        rng = random.Random(seed)
        words: set[str] = set()
        while len(words) < size:
            w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.choice([1, 2, 2, 3])))
            words.add(w + rng.choice(_CODAS))
        self.en = list(_STOP) + sorted(words)
        rng.shuffle(self.en[len(_STOP):])
        w_en = [1.0 / (i + 1) ** 1.05 for i in range(len(self.en))]
        self.en_cum = _cumulative(w_en)
        zh: set[str] = set()
        chars = list(dict.fromkeys(_ZH_CHARS))
        while len(zh) < size:
            zh.add("".join(rng.choice(chars) for _ in range(rng.choice([1, 2, 2, 2, 3]))))
        self.zh = sorted(zh)
        rng.shuffle(self.zh)
        self.zh_cum = _cumulative([1.0 / (i + 1) ** 1.05 for i in range(len(self.zh))])


def _cumulative(weights: list[float]) -> list[float]:
    out, acc = [], 0.0
    for w in weights:
        acc += w
        out.append(acc)
    return out


_VOCAB: _Vocab | None = None


def _vocab() -> _Vocab:
    global _VOCAB
    if _VOCAB is None:
        _VOCAB = _Vocab()
    return _VOCAB


def english_prose(rng: random.Random, paragraphs: tuple[int, int] = (3, 7)) -> str:
    v = _vocab()
    paras = []
    for _ in range(rng.randint(*paragraphs)):
        sents = []
        for _ in range(rng.randint(3, 6)):
            words = rng.choices(v.en, cum_weights=v.en_cum, k=rng.randint(8, 22))
            if rng.random() < 0.4:
                words[rng.randrange(2, len(words) - 1)] += ","
            sents.append(" ".join(words).capitalize() + rng.choice("....?!"))
        paras.append(" ".join(sents))
    return "\n\n".join(paras)


def chinese_prose(rng: random.Random, paragraphs: tuple[int, int] = (3, 7)) -> str:
    v = _vocab()
    paras = []
    for _ in range(rng.randint(*paragraphs)):
        sents = []
        for _ in range(rng.randint(3, 6)):
            parts = ["".join(rng.choices(v.zh, cum_weights=v.zh_cum, k=rng.randint(4, 9)))
                     for _ in range(rng.randint(1, 3))]
            sents.append(_ZH_PUNCT_MID.join(parts) + rng.choice(_ZH_PUNCT_END))
        paras.append("".join(sents))
    return "\n\n".join(paras)


# ------------------------------------------------------------------------ junk

def english_junk(rng: random.Random) -> tuple[str, str]:
    """One junk page and the kind of junk it is."""
    kind = rng.choice(["menu", "spam", "lorem", "code", "short", "repeated_lines", "hashtags"])
    v = _vocab()
    if kind == "menu":
        text = "\n".join(" ".join(rng.choices(v.en[60:400], k=rng.randint(1, 3))).title()
                         for _ in range(rng.randint(20, 60)))
    elif kind == "spam":
        w = rng.choices(v.en[60:200], k=4)
        text = " ".join(rng.choice(w) for _ in range(rng.randint(200, 400))) + "."
    elif kind == "lorem":
        text = english_prose(rng) + "\n\nLorem ipsum dolor sit amet, consectetur adipiscing elit."
    elif kind == "code":
        text = "\n".join(f"function f{i}(x) {{ return x * {i}; }}" for i in range(rng.randint(20, 60)))
    elif kind == "short":
        text = "Click here to continue."
    elif kind == "repeated_lines":
        line = english_prose(rng, (1, 1)).split(". ")[0] + "."
        text = "\n".join([line] * rng.randint(20, 40))
    else:
        text = " ".join("#" + w for w in rng.choices(v.en[60:500], k=rng.randint(80, 200)))
    return text, kind


def chinese_junk(rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(["nav", "repeated_chars", "repeated_lines", "latin", "short"])
    v = _vocab()
    if kind == "nav":
        text = "\n".join(" | ".join(rng.choices(v.zh[:300], k=rng.randint(3, 6)))
                         for _ in range(rng.randint(20, 50)))
    elif kind == "repeated_chars":
        w = rng.choices(v.zh[:50], k=3)
        text = "".join(rng.choice(w) for _ in range(rng.randint(300, 600))) + "。"
    elif kind == "repeated_lines":
        line = chinese_prose(rng, (1, 1))[:30] + "。"
        text = "\n".join([line] * rng.randint(20, 40))
    elif kind == "latin":
        text = "\n".join(f"SKU-{rng.randint(10000, 99999)} ITEM {rng.randint(1, 999)} "
                         f"{rng.choice(v.zh[:100])}" for _ in range(rng.randint(30, 80)))
    else:
        text = "点击这里继续。"
    return text, kind


# --------------------------------------------------------------------- editing

def edit_words(rng: random.Random, text: str, fraction: float) -> str:
    """Replace, insert or delete `fraction` of the words (a near duplicate of English text)."""
    v = _vocab()
    words = text.split(" ")
    for _ in range(max(1, round(fraction * len(words)))):
        i = rng.randrange(len(words))
        op = rng.random()
        if op < 0.6:
            words[i] = rng.choice(v.en[60:])
        elif op < 0.8:
            words.insert(i, rng.choice(v.en[60:]))
        elif len(words) > 1:
            del words[i]
    return " ".join(words)


def edit_chars(rng: random.Random, text: str, fraction: float) -> str:
    """Replace, insert or delete `fraction` of the characters (a near duplicate of Chinese text)."""
    chars = list(text)
    pool = list(dict.fromkeys(_ZH_CHARS))
    for _ in range(max(1, round(fraction * len(chars)))):
        i = rng.randrange(len(chars))
        op = rng.random()
        if op < 0.6:
            chars[i] = rng.choice(pool)
        elif op < 0.8:
            chars.insert(i, rng.choice(pool))
        elif len(chars) > 1:
            del chars[i]
    return "".join(chars)


# ------------------------------------------------------------------------- PII

def luhn_complete(prefix: str) -> str:
    """Append the Luhn check digit to a string of digits (bank-card numbers carry one)."""
    from lmlab.data.pipeline.pii import luhn_valid

    return next(prefix + d for d in "0123456789" if luhn_valid(prefix + d))


def cn_resident_id(rng: random.Random) -> str:
    """A checksum-valid 18-character mainland Chinese resident ID number."""
    body = (f"{rng.choice([110101, 310104, 440305, 510107, 330106])}"
            f"{rng.randint(1950, 2005)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
            f"{rng.randint(0, 999):03d}")
    weights = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2]
    return body + "10X98765432"[sum(int(c) * w for c, w in zip(body, weights)) % 11]


def pii_samples(rng: random.Random) -> dict[str, str]:
    """One planted value of each personal-data kind the masker must catch."""
    return {
        "email": f"{rng.choice(['alice', 'bob.smith', 'wang_wei'])}{rng.randint(1, 99)}@example.com",
        "ip": f"{rng.randint(11, 223)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
        "phone": f"+1 ({rng.randint(201, 989)}) {rng.randint(200, 999)}-{rng.randint(1000, 9999)}",
        "cn_mobile": f"1{rng.choice('3456789')}{rng.randint(0, 999999999):09d}",
        "cn_id": cn_resident_id(rng),
        "card": luhn_complete(f"4{rng.randint(0, 10**14 - 1):014d}"),
    }


def number_decoys(rng: random.Random) -> list[str]:
    """Ordinary numbers that must survive masking: years, prices, dates, counts."""
    return [str(rng.randint(1900, 2030)), f"${rng.randint(1, 9999)}.{rng.randint(0, 99):02d}",
            f"¥{rng.randint(100, 99999)}", f"{rng.randint(2000, 2030)}-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}",
            f"{rng.randint(1, 100)}%", f"{rng.randint(1000, 999999):,}", f"3.{rng.randint(10, 99)}"]


# ---------------------------------------------------------------------- corpus

@dataclass
class PlantedDoc:
    id: str
    text: str
    lang: str            # "en" or "zh"
    kind: str            # "prose", "junk:<why>", "exact_dup", "near_dup"
    dup_of: str | None = None

    def record(self) -> dict:
        return {"id": self.id, "text": self.text, "lang": self.lang, "kind": self.kind,
                "dup_of": self.dup_of}


def planted_corpus(n: int, seed: int = 0, zh_fraction: float = 0.5, junk_fraction: float = 0.1,
                   exact_fraction: float = 0.05, near_fraction: float = 0.1,
                   edit_range: tuple[float, float] = (0.05, 0.10)) -> list[PlantedDoc]:
    """`n` documents: prose, junk, and exact and near copies of earlier prose.

    Copies always come after their original, so a deduplicator that keeps the
    first document of each cluster keeps the original.
    """
    rng = random.Random(seed)
    docs: list[PlantedDoc] = []
    originals: list[PlantedDoc] = []
    copied: set[str] = set()
    for i in range(n):
        lang = "zh" if rng.random() < zh_fraction else "en"
        r = rng.random()
        # only copy documents that are not copies themselves, each at most once:
        # clusters stay pairs, so "one kept per cluster" is easy to check
        candidates = [d for d in originals[-200:] if d.lang == lang and d.id not in copied]
        if r < exact_fraction and candidates:
            src = rng.choice(candidates)
            copied.add(src.id)
            docs.append(PlantedDoc(f"doc{i}", src.text, lang, "exact_dup", src.id))
        elif r < exact_fraction + near_fraction and candidates:
            src = rng.choice(candidates)
            copied.add(src.id)
            p = rng.uniform(*edit_range)
            text = edit_words(rng, src.text, p) if lang == "en" else edit_chars(rng, src.text, p)
            docs.append(PlantedDoc(f"doc{i}", text, lang, "near_dup", src.id))
        elif r < exact_fraction + near_fraction + junk_fraction:
            text, why = english_junk(rng) if lang == "en" else chinese_junk(rng)
            docs.append(PlantedDoc(f"doc{i}", text, lang, f"junk:{why}"))
        else:
            text = english_prose(rng) if lang == "en" else chinese_prose(rng)
            d = PlantedDoc(f"doc{i}", text, lang, "prose")
            docs.append(d)
            originals.append(d)
    return docs
