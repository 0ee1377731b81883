"""Conversations → token ids, and the mask of the tokens a chat model learns.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content":
str}`. The tokenizer's chat template (Jinja, in its tokenizer_config.json or
chat_template.jinja) turns it into text; lmlab renders it with `transformers`' own
renderer, so the ids equal `AutoTokenizer.apply_chat_template` on the same directory.
lmlab's template is ChatML:

    <|im_start|>system\\n你是一个乐于助人的助手。<|im_end|>\\n
    <|im_start|>user\\n2+3等于几？<|im_end|>\\n
    <|im_start|>assistant\\n5<|im_end|>\\n

Supervised fine-tuning maximises log p(assistant tokens | everything before them), so
the loss needs a mask: True on the tokens the model must produce. For the k-th
assistant message render

    P_k = the conversation before it, plus the generation prompt (what inference gives)
    S_k = the conversation up to and including it

and its tokens are those of S_k after those of P_k: the content, the end-of-turn
token (`<|im_end|>`, learned so that the model stops by itself) and whatever the
template writes after it before the next turn (ChatML's "\\n"). The header
`<|im_start|>assistant\\n` is not learned: inference supplies it. This works only if
tokens(P_k) and tokens(S_k) are prefixes of the tokens of the whole conversation —
ChatML, Llama 2/3, Zephyr and Qwen 2.5 templates are; a template that rewrites earlier
turns (e.g. drops their reasoning) is not, and `render_chat` then says so in one line
rather than return a wrong mask.

A tokenizer without a template (an imported GPT-2) gets lmlab's ChatML and its two
tokens from `ensure_chat_tokens`, which grows the model's embedding to match.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from lmlab.errors import ConfigError, InputError
from lmlab.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
FORMATS = ('{"messages": [{"role", "content"}, ...]}, {"prompt", "response"} or Alpaca\'s '
           '{"instruction", "input", "output"}')


# ------------------------------------------------------------------ messages

def check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """`messages` as a list of {"role", "content"} dicts (other keys dropped); an unknown
    role, a non-string content or an empty assistant turn is an InputError at `where`."""
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: messages must be a non-empty list of "
                         '{"role": ..., "content": ...} objects')
    out = []
    for k, m in enumerate(messages, 1):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InputError(f'{where}: message {k} is not an object with "role" and "content"')
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise InputError(f"{where}: message {k} has role {role!r}; use one of "
                             f"{', '.join(ROLES)}")
        if not isinstance(content, str):
            raise InputError(f"{where}: message {k} ({role}): content must be a string, got "
                             f"{type(content).__name__}")
        if role == "assistant" and not content.strip():
            raise InputError(f"{where}: message {k} (assistant) is empty; give the answer")
        out.append({"role": role, "content": content})
    return out


def as_messages(prompt: str | list[dict], system: str | None = None) -> list[dict[str, str]]:
    """A conversation from a user's text (after a `system` turn, if given) or from messages
    (`system` then goes first, unless they start with a system turn already)."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = check_messages(list(prompt), "messages")
        if system is not None and messages[0]["role"] == "system":
            raise ConfigError("system: the messages start with a system turn already; give one")
    head = [] if system is None else [{"role": "system", "content": system}]
    return head + messages


def _from_record(record: dict, where: str) -> list[dict[str, str]]:
    if "messages" in record:
        messages = check_messages(record["messages"], where)
    elif "prompt" in record and "response" in record:
        system = record.get("system")
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["response"]}]
        messages = check_messages(messages, where)
    elif "instruction" in record and "output" in record:
        extra = record.get("input") or ""
        if not isinstance(record["instruction"], str) or not isinstance(extra, str):
            raise InputError(f'{where}: "instruction" and "input" must be strings')
        user = record["instruction"] + (f"\n\n{extra}" if extra.strip() else "")
        messages = check_messages([{"role": "user", "content": user},
                                   {"role": "assistant", "content": record["output"]}], where)
    else:
        shown = ", ".join(repr(k) for k in list(record)[:8]) or "none"
        raise InputError(f"{where}: none of the formats {FORMATS} (fields: {shown})")
    if not any(m["role"] == "assistant" for m in messages):
        raise InputError(f"{where}: no assistant turn; a conversation must hold at least one "
                         "answer to learn from")
    return messages


def iter_conversations(path: str | Path) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """(`path:line`, messages) for each non-blank line of a JSONL file in one of FORMATS;
    the first bad line raises an InputError naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file; give a JSONL file of conversations ({FORMATS})")
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            raw = raw.removeprefix(b"\xef\xbb\xbf") if n == 1 else raw
            if not raw.strip():
                continue
            where = f"{path}:{n}"
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise InputError(f"{where}: not UTF-8 (byte {e.start}); save the file as "
                                 "UTF-8") from None
            except json.JSONDecodeError as e:
                raise InputError(f"{where}: not JSON ({e.msg}, column {e.colno}); one JSON "
                                 "object per line") from None
            if not isinstance(record, dict):
                raise InputError(f"{where}: a JSON {type(record).__name__}, not an object "
                                 f"({FORMATS})")
            yield where, _from_record(record, where)


def load_conversations(path: str | Path) -> list[list[dict[str, str]]]:
    """Every conversation of a JSONL file (see `iter_conversations`); none is an error."""
    out = [messages for _, messages in iter_conversations(path)]
    if not out:
        raise InputError(f"{path}: no conversations; one JSON object per line ({FORMATS})")
    return out


# ------------------------------------------------------------------ rendering

def _template(tokenizer: Tokenizer) -> str:
    template = tokenizer.chat_template
    if template is None:
        raise InputError(f"tokenizer {tokenizer.path or ''}: no chat template; fine-tune it "
                         "with `lmlab finetune sft`, which adds ChatML")
    return template


def _render(tokenizer: Tokenizer, conversations: list[list[dict]], add_generation_prompt: bool,
            where: str) -> list[str]:
    """Each conversation's text, as `transformers` renders the template (its sandbox, its
    filters, the special tokens as variables: `bos_token`, `eos_token`, `pad_token`)."""
    import jinja2
    from transformers.utils.chat_template_utils import render_jinja_template

    names = {f"{role}_token": tokenizer.hf.id_to_token(i)
             for role, i in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id),
                             ("pad", tokenizer.pad_id)) if i is not None}
    try:
        texts, _ = render_jinja_template(conversations=conversations,
                                         chat_template=_template(tokenizer),
                                         add_generation_prompt=add_generation_prompt, **names)
    except jinja2.TemplateError as e:
        raise InputError(f"{where}: the chat template refuses this conversation ({e})") from None
    return texts


def render_chat(tokenizer: Tokenizer, messages: list[dict], *,
                where: str = "conversation") -> tuple[list[int], list[bool]]:
    """(ids of the whole conversation, True on each assistant token), see the module doc."""
    messages = check_messages(messages, where)
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    prefixes = [messages[:k] for k in turns]  # P_k: before turn k, with the generation prompt
    upto = [messages[:k + 1] for k in turns]  # S_k: up to and including turn k
    texts = (_render(tokenizer, [messages], False, where)
             + (_render(tokenizer, prefixes, True, where) if turns else [])
             + (_render(tokenizer, upto, False, where) if turns else []))
    encoded = tokenizer.encode_batch(texts)
    ids, starts, ends = encoded[0], encoded[1:1 + len(turns)], encoded[1 + len(turns):]
    mask = [False] * len(ids)
    for k, p, s in zip(turns, starts, ends):
        if not (len(p) <= len(s) and ids[:len(s)] == s and s[:len(p)] == p):
            raise InputError(
                f"{where}: the chat template of {tokenizer.path or 'the tokenizer'} does not "
                f"render message {k + 1} as a prefix of the whole conversation (it rewrites "
                "earlier turns, or tokens merge across the turn boundary), so the assistant's "
                "tokens cannot be told apart; use a template that renders turns in order")
        mask[len(p):len(s)] = [True] * (len(s) - len(p))
    return ids, mask


def prompt_ids(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    """The ids of the conversation so far and the generation prompt (the assistant's header):
    what a chat model is given to answer."""
    messages = check_messages(messages, "messages")
    return tokenizer.encode(_render(tokenizer, [messages], True, "messages")[0])


# ------------------------------------------------------------------ chat tokens

def ensure_chat_tokens(tokenizer: Tokenizer, model: nn.Module) -> Tokenizer:
    """`tokenizer` as it is if it has a chat template; else a copy with ChatML
    (`Tokenizer.with_chatml`), `model`'s embedding and output rows grown to its ids."""
    if tokenizer.chat_template is not None:
        return tokenizer
    from lmlab.model import Transformer

    if not isinstance(model, Transformer):
        raise ConfigError(f"the tokenizer has no chat template and model kind "
                          f"{getattr(model, 'kind', '?')!r} cannot grow its vocabulary for "
                          "ChatML's tokens; give a tokenizer with a chat template")
    chat = tokenizer.with_chatml()
    new_ids = range(tokenizer.vocab_size, chat.vocab_size)
    _grow_rows(model, chat.vocab_size, new_ids, known=tokenizer.vocab_size)
    return chat


@torch.no_grad()
def _grow_rows(model: nn.Module, vocab_size: int, new_ids: range, known: int) -> None:
    """Rows `new_ids` of the Transformer's embedding (and untied output layer) set to the
    mean of its first `known` rows; the matrices grown to `vocab_size` rows first if short.

    Why the mean: a new token's output logit is then the average logit, so the model's
    distribution over the tokens it knows barely moves (Hewitt 2021, "Initializing new word
    embeddings for pretrained language models"), and as an input the new row lies where
    the model's inputs do. A fresh N(0, 0.02) row can get a logit far from the others'
    and is an input the trained layers never saw."""
    tied = model.lm_head.weight is model.tok_emb.weight
    rows = max(vocab_size, model.cfg.vocab_size)

    def grown(w: torch.Tensor) -> nn.Parameter:
        out = torch.cat([w, w.new_zeros(rows - w.shape[0], w.shape[1])])
        out[list(new_ids)] = w[:known].mean(0)
        return nn.Parameter(out)

    head = model.lm_head.weight
    model.tok_emb.weight = grown(model.tok_emb.weight)
    model.tok_emb.num_embeddings = rows
    model.lm_head.weight = model.tok_emb.weight if tied else grown(head)
    model.lm_head.out_features = rows
    model.cfg.vocab_size = rows
