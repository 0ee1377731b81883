"""Byte-level BPE: train with Hugging Face `tokenizers`, load, encode, decode.

Why byte-level: every UTF-8 string is a sequence of bytes, and the base
vocabulary holds all 256 of them, so *any* text — Chinese, emoji, combining
marks, control characters — encodes without an unknown token and decodes back
to exactly the same string. Nothing here normalises or strips text, because
either would break that round trip.

Pre-tokenization splits text before merges are learned, so that a merge never
joins, say, a word and the space after it. We use the GPT-4 (cl100k) pattern:
letters, 1–3 digit numbers, punctuation runs and whitespace are separate
pieces; a run of Chinese characters is one piece, so BPE learns common
Chinese words and characters as tokens.

The saved directory (`tokenizer.json` + `tokenizer_config.json`) also loads in
`transformers.AutoTokenizer` and gives the same ids.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

from lmlab.errors import InputError

# id order is fixed: special tokens take ids 0..len-1 in every lmlab tokenizer
EOS = "<|endoftext|>"
BOS = "<|bos|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"  # chat turns: <|im_start|>role\n ... <|im_end|>\n  (ChatML)
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS, BOS, PAD, IM_START, IM_END]

SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _new_tokenizer() -> HFTokenizer:
    tok = HFTokenizer(models.BPE(byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


class Tokenizer:
    """A byte-level BPE tokenizer with lmlab's special tokens.

    `encode` never adds special tokens by itself: what goes in is what comes out.
    """

    def __init__(self, hf: HFTokenizer, path: str | None = None):
        self.hf = hf
        self.path = path
        self.eos_id = self._id(EOS)
        self.bos_id = self._id(BOS)
        self.pad_id = self._id(PAD)

    def _id(self, token: str) -> int:
        i = self.hf.token_to_id(token)
        if i is None:
            raise InputError(f"tokenizer {self.path or ''}: special token {token!r} missing; "
                             "train the tokenizer with `lmlab tokenizer train`")
        return i

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int:
        return self._id(token)

    def token_byte_lengths(self) -> list[int]:
        """UTF-8 bytes each token id stands for (0 for special tokens), for bits per byte.

        In byte-level BPE every character of a vocabulary entry stands for one byte.
        """
        special = {t.content for t in self.hf.get_added_tokens_decoder().values()}
        lengths = [0] * self.vocab_size
        for token, i in self.hf.get_vocab(with_added_tokens=True).items():
            lengths[i] = 0 if token in special else len(token)
        return lengths

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """ChatML text for a list of {"role", "content"} messages (same as CHAT_TEMPLATE)."""
        text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
        return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")

    @property
    def hash(self) -> str:
        """sha256 of the serialized tokenizer: shards record it to catch a mismatched tokenizer."""
        return hashlib.sha256(self.hf.to_str().encode("utf-8")).hexdigest()

    def save(self, out_dir: str | os.PathLike) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json atomically."""
        out = Path(out_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        self.hf.save(str(tmp / "tokenizer.json"))
        special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": None}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "additional_special_tokens": [IM_START, IM_END],
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
            "chat_template": CHAT_TEMPLATE,
        }
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        (tmp / "special_tokens_map.json").write_text(json.dumps(
            {**{k: v for k, v in special.items() if v}, "additional_special_tokens": [IM_START, IM_END]},
            indent=2))
        out.mkdir(exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
        shutil.rmtree(tmp, ignore_errors=True)
        self.path = str(out)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        p = Path(path)
        f = p / "tokenizer.json" if p.is_dir() else p
        if not f.is_file():
            raise InputError(f"{path}: no tokenizer.json; train one with "
                             "`lmlab tokenizer train --input FILES --vocab-size N --out DIR`")
        try:
            hf = HFTokenizer.from_file(str(f))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise InputError(f"{f}: not a valid tokenizer.json ({e})") from None
        return cls(hf, str(p))


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
                    show_progress: bool = False, length: int | None = None) -> Tokenizer:
    """Learn BPE merges from an iterator of documents (runs on all cores in Rust)."""
    n_min = 256 + len(SPECIAL_TOKENS)
    if vocab_size < n_min:
        raise InputError(f"--vocab-size {vocab_size} is too small: byte-level BPE needs at least "
                         f"{n_min} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    tok = _new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(_batches(texts), trainer=trainer, length=length)
    return Tokenizer(tok)


def _batches(texts: Iterable[str], size: int = 1000) -> Iterator[list[str]]:
    batch: list[str] = []
    for t in texts:
        batch.append(t)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
