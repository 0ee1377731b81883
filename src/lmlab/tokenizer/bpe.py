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

`Tokenizer` also wraps the tokenizer of an imported Hugging Face model. Its
special tokens then come from that directory's own files, not from lmlab's
names: a LLaMA ends text with `</s>`, Llama 3 ends a chat turn with
`<|eot_id|>`, and a model stops generating only at the ids it was trained to
end with (tokenizer_config.json names the tokens, generation_config.json
lists every id `transformers` stops at).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

from lmlab.errors import InputError
from lmlab.fileio import write_dir_atomically

logger = logging.getLogger(__name__)

# id order is fixed: special tokens take ids 0..len-1 in every lmlab tokenizer
EOS = "<|endoftext|>"
BOS = "<|bos|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"  # chat turns: <|im_start|>role\n ... <|im_end|>\n  (ChatML)
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS, BOS, PAD, IM_START, IM_END]
_LMLAB_NAMES = {"bos": BOS, "eos": EOS, "pad": PAD}
ROLES = ("bos", "eos", "pad", "eot")
# Tokens that end a chat turn, by chat format; a tokenizer's end of turn is the first of
# these it has as an added token. (Llama 2 and Mistral end a turn with EOS itself.)
END_OF_TURN_TOKENS = (
    IM_END,  # ChatML: lmlab, Qwen and many fine-tunes
    "<|eot_id|>",  # Llama 3
    "<|eot|>",  # Llama 4
    "<end_of_turn>",  # Gemma
    "<|end|>",  # Phi-3
)

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers ≥ 4.43 saves the template

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
    """A BPE tokenizer (lmlab's own, or a Hugging Face model's) and its special tokens.

    `encode` never adds special tokens by itself: what goes in is what comes out.

    The special tokens are ids, or None where the tokenizer has no such token:
    `bos_id`, `eos_id` (end of text), `pad_id`, `eot_id` (end of a chat turn),
    and `stop_ids`, every id generation stops at (eos, end of turn, and the
    eos ids of generation_config.json), without repeats, in that order.
    """

    def __init__(self, hf: HFTokenizer, path: str | None = None,
                 special: dict[str, str | None] | None = None,
                 extra_stop_ids: Iterable[int] = (), files: dict[str, str] | None = None):
        """`special` maps a role ("bos", "eos", "pad", "eot") to its token (None: none); a
        role it leaves out takes lmlab's token when the vocabulary has it, "eot" the first
        of END_OF_TURN_TOKENS that it has. `extra_stop_ids`: more ids to stop generating at.
        `files`: config files as `load` read them, which `save` writes back unchanged."""
        self.hf = hf
        self.path = path
        special = special or {}
        ids = {}
        for role in ROLES:
            token = special[role] if role in special else self._default_token(role)
            ids[role] = None if token is None else self._id(token)
        self.bos_id, self.eos_id, self.pad_id, self.eot_id = (ids[r] for r in ROLES)
        self._stop_ids = list(dict.fromkeys(
            i for i in (self.eos_id, self.eot_id, *extra_stop_ids) if i is not None))
        self._files = dict(files or {})

    def _default_token(self, role: str) -> str | None:
        if role == "eot":
            added = {t.content for t in self.hf.get_added_tokens_decoder().values()}
            return next((t for t in END_OF_TURN_TOKENS if t in added), None)
        name = _LMLAB_NAMES[role]
        return name if self.hf.token_to_id(name) is not None else None

    def _id(self, token: str) -> int:
        i = self.hf.token_to_id(token)
        if i is None:
            raise InputError(f"tokenizer {self.path or ''}: special token {token!r} missing; "
                             "use a tokenizer that has it (`lmlab tokenizer train` makes "
                             "lmlab's)")
        return i

    @property
    def stop_ids(self) -> list[int]:
        """Every id generation should stop at: eos, end of turn, generation_config's eos ids."""
        return list(self._stop_ids)

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
        # a config may name a plain vocabulary entry as a special token, too
        special |= {self._token(i) for i in (self.bos_id, self.eos_id, self.pad_id, self.eot_id,
                                             *self._stop_ids) if i is not None}
        lengths = [0] * self.vocab_size
        for token, i in self.hf.get_vocab(with_added_tokens=True).items():
            lengths[i] = 0 if token in special else len(token)
        return lengths

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """ChatML text for a list of {"role", "content"} messages (same as CHAT_TEMPLATE)."""
        missing = [t for t in (IM_START, IM_END) if self.hf.token_to_id(t) is None]
        if missing:
            raise InputError(f"tokenizer {self.path or ''}: no {missing[0]} token, so no ChatML "
                             "chat format; use a tokenizer trained by `lmlab tokenizer train`")
        text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
        return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template, found where `transformers` looks: chat_template.jinja, else
        tokenizer_config.json's "chat_template" (one string, or named ones: "default"); a
        tokenizer without config files has lmlab's ChatML if it has its tokens. None: none."""
        if CHAT_TEMPLATE_FILE in self._files:
            return self._files[CHAT_TEMPLATE_FILE]
        config = self._files.get(TOKENIZER_CONFIG) or self._lmlab_config_files()[TOKENIZER_CONFIG]
        template = json.loads(config).get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            template = next((t.get("template") for t in template
                             if isinstance(t, dict) and t.get("name") == "default"), None)
        return template if isinstance(template, str) else None

    def with_chatml(self) -> "Tokenizer":
        """A copy with ChatML: `<|im_start|>`, `<|im_end|>` added as special tokens where
        missing (new ids after the last) and CHAT_TEMPLATE as its chat template (in
        tokenizer_config.json, which `save` writes); `<|im_end|>` ends a turn. Its other
        special tokens and stop ids stay."""
        hf = HFTokenizer.from_str(self.hf.to_str())
        hf.add_special_tokens([t for t in (IM_START, IM_END) if hf.token_to_id(t) is None])
        files = {k: v for k, v in self._files.items() if k != CHAT_TEMPLATE_FILE}
        config = json.loads(files.get(TOKENIZER_CONFIG)
                            or self._lmlab_config_files()[TOKENIZER_CONFIG])
        # transformers 5 writes "extra_special_tokens", earlier versions the other
        key = ("extra_special_tokens" if "extra_special_tokens" in config
               else "additional_special_tokens")
        extra = config.get(key) if isinstance(config.get(key), list) else []
        config[key] = extra + [t for t in (IM_START, IM_END) if t not in extra]
        config["chat_template"] = CHAT_TEMPLATE
        files[TOKENIZER_CONFIG] = json.dumps(config, indent=2, ensure_ascii=False)
        special = {"bos": self._token(self.bos_id), "eos": self._token(self.eos_id),
                   "pad": self._token(self.pad_id), "eot": IM_END}
        return Tokenizer(hf, self.path, special=special, extra_stop_ids=self._stop_ids,
                         files=files)

    @property
    def hash(self) -> str:
        """sha256 of the serialized tokenizer: shards record it to catch a mismatched tokenizer."""
        return hashlib.sha256(self.hf.to_str().encode("utf-8")).hexdigest()

    def _token(self, i: int | None) -> str | None:
        return None if i is None else self.hf.id_to_token(i)

    def _lmlab_config_files(self) -> dict[str, str]:
        """tokenizer_config.json and special_tokens_map.json, which `AutoTokenizer` reads."""
        special = {"bos_token": self._token(self.bos_id), "eos_token": self._token(self.eos_id),
                   "pad_token": self._token(self.pad_id), "unk_token": None}
        chatml = all(self.hf.token_to_id(t) is not None for t in (IM_START, IM_END))
        extra = list(dict.fromkeys(t for t in (IM_START if chatml else None,
                                               self._token(self.eot_id)) if t))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "additional_special_tokens": extra,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
            **({"chat_template": CHAT_TEMPLATE} if chatml else {}),
        }
        special_map = {**{k: v for k, v in special.items() if v},
                       "additional_special_tokens": extra}
        return {TOKENIZER_CONFIG: json.dumps(config, indent=2, ensure_ascii=False),
                SPECIAL_TOKENS_MAP: json.dumps(special_map, indent=2)}

    def save(self, out_dir: str | os.PathLike, replace: bool = False) -> None:
        """Write tokenizer.json and its config files as one atomic update of `out_dir`
        (with `replace`, `out_dir` is replaced whole: nothing else it held stays).

        The config files `load` read come back unchanged (a Hugging Face tokenizer keeps
        its chat template and settings); a tokenizer without them gets lmlab's.
        """
        files = dict(self._files)
        if TOKENIZER_CONFIG not in files:
            files = {**self._lmlab_config_files(), **files}

        def write(directory: Path) -> None:
            self.hf.save(str(directory / TOKENIZER_FILE))
            for name, text in files.items():
                (directory / name).write_text(text, encoding="utf-8")

        out = write_dir_atomically(out_dir, write, last=TOKENIZER_FILE, replace=replace)
        self.path = str(out)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Read tokenizer.json (a directory's, or the file itself) and, beside it, the special
        tokens that tokenizer_config.json / special_tokens_map.json name and the eos ids of
        generation_config.json. Without config files, lmlab's token names are looked up."""
        p = Path(path)
        f = p / TOKENIZER_FILE if p.is_dir() else p
        if not f.is_file():
            raise InputError(f"{path}: no tokenizer.json; train one with "
                             "`lmlab tokenizer train --input FILES --vocab-size N --out DIR`")
        try:
            hf = HFTokenizer.from_file(str(f))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise InputError(f"{f}: not a valid tokenizer.json ({e})") from None
        directory = f.parent
        files = {name: _read_text(directory / name)
                 for name in (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, GENERATION_CONFIG,
                              CHAT_TEMPLATE_FILE)
                 if (directory / name).is_file()}
        configs = {name: _json_object(directory / name, text) for name, text in files.items()
                   if name != CHAT_TEMPLATE_FILE}
        named = _named_special_tokens(directory, configs, hf)
        generation = _generation_ids(directory / GENERATION_CONFIG,
                                     configs.get(GENERATION_CONFIG, {}), hf)
        special: dict[str, str | None] = {}
        for role in ("bos", "eos", "pad"):
            token = named[role] if named is not None else (
                _LMLAB_NAMES[role] if hf.token_to_id(_LMLAB_NAMES[role]) is not None else None)
            if token is None and generation[role]:  # e.g. only generation_config names the EOS
                token = hf.id_to_token(generation[role][0])
            special[role] = token
        return cls(hf, str(p), special=special, extra_stop_ids=generation["eos"], files=files)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e}); fix or delete the file") from None


def _json_object(path: Path, text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e}); fix or delete the file") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(data).__name__}; "
                         "fix or delete the file")
    return data


def _named_special_tokens(directory: Path, configs: dict[str, dict[str, Any]],
                          hf: HFTokenizer) -> dict[str, str | None] | None:
    """bos/eos/pad as tokenizer_config.json (else special_tokens_map.json) names them;
    None when the directory has neither file.

    A named EOS that the vocabulary lacks is an error (generation could not stop);
    a missing BOS or pad is logged and taken as none.
    """
    sources = [n for n in (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP) if n in configs]
    if not sources:
        return None
    out: dict[str, str | None] = {}
    for role in ("bos", "eos", "pad"):
        token, source = None, sources[0]
        for name in sources:  # the first file that names the token wins
            token = _token_text(configs[name].get(f"{role}_token"), directory / name, role)
            if token is not None:
                source = name
                break
        if token is not None and hf.token_to_id(token) is None:
            where = f"{directory / source}: {role}_token {token!r} is not in tokenizer.json"
            if role == "eos":
                raise InputError(f"{where}; name a token of the vocabulary or re-save the "
                                 "tokenizer with transformers' save_pretrained")
            logger.warning("%s; taking the tokenizer to have no %s token", where, role)
            token = None
        out[role] = token
    return out


def _token_text(value: Any, path: Path, role: str) -> str | None:
    """A token as the config files write it: a string, {"content": ...} or null."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is None or isinstance(value, str):
        return value or None
    raise InputError(f"{path}: {role}_token must be a token string or null, got {value!r}; "
                     "fix the file")


def _generation_ids(path: Path, config: dict[str, Any], hf: HFTokenizer) -> dict[str, list[int]]:
    """bos/eos/pad ids of generation_config.json; each key may hold one id or a list.

    Ids the tokenizer does not have (a config's default left from another
    vocabulary, like GPT-2's 50256 on a small one) are logged and dropped.
    """
    out = {}
    for role in ("bos", "eos", "pad"):
        value = config.get(f"{role}_token_id")
        ids = [] if value is None else [value] if _is_id(value) else value
        if not (isinstance(ids, list) and all(_is_id(i) for i in ids)):
            raise InputError(f"{path}: {role}_token_id must be a token id or a list of ids, "
                             f"got {value!r}; fix the file")
        known = [i for i in ids if hf.id_to_token(i) is not None]
        if len(known) < len(ids):
            logger.warning("%s: %s_token_id %s not in the tokenizer's vocabulary; ignored", path,
                           role, sorted(set(ids) - set(known)))
        out[role] = known
    return out


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
                    show_progress: bool = False, length: int | None = None) -> Tokenizer:
    """Learn BPE merges from an iterator of documents (runs on all cores in Rust)."""
    n_min = 256 + len(SPECIAL_TOKENS)
    if min_frequency < 1:
        raise InputError(f"--min-frequency {min_frequency}: must be >= 1")
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
    if tok.get_vocab_size() < vocab_size:
        logger.warning("the tokenizer has %d tokens, not the %d asked: the corpus offers no more "
                    "merges of pairs seen at least %d times", tok.get_vocab_size(), vocab_size,
                    min_frequency)
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
