"""Generation from Python: prompt ids in, new token ids out, one step at a time.

`generate` is a thin wrapper over the engine (`lmlab.infer.engine`), the one
decode loop that `lmlab chat`, the server and evaluation use too, so sampling,
stopping and batching behave the same everywhere. It submits each prompt as a
request and runs the engine's steps in the caller's thread.

How decoding works (autoregressive, with a key/value cache):

1. prefill: one forward pass over the whole prompt fills the KV cache and gives
   the logits of the first new token;
2. decode: each step feeds only the token just chosen; attention reads the
   cached keys/values of all earlier positions, so a step costs O(1) matmuls
   per layer instead of re-running the whole sequence.

The engine talks to the model through the kind protocol of `lmlab.model` only:
the slot protocol (`new_slots`, `prefill_slot`, `decode_slots`) where the kind
has it (the Transformer: each row at its own position, rows joining and
leaving), else `new_decode_state` / `decode_step` in lockstep. A row's result
does not depend on what it was batched with (tested against one-at-a-time
decoding).

Speed: on a CPU at batch 1 a step of a small model takes a few milliseconds,
most of it streaming every weight matrix from memory for a matrix-vector
product, then the framework's per-op overhead. So the loop adds almost nothing
per step: the cache is allocated once, a batch whose rows are at the same
position passes no mask at all (the model then takes its mask-free path),
only the last prompt position goes through the output layer, and the last
new token is never fed back. The products themselves go through
`lmlab.model.transformer.Linear`, which on a CPU takes a blocked matrix-vector
product where that measures faster than `F.linear` on the machine at hand
(`lmlab.model.fastpath`; 2-3x on the 2-core AMD EPYC of the benchmarks, slower
on an Intel Xeon with AMX, where `F.linear` is kept). torch.compile was
measured and is not used: on the model's forward, the cache's Python-int
position makes it recompile at every step (34 s for the first compile on 2
cores); a static-cache step written for it compiled in ~10 s and then ran no
faster than this eager loop, because the matrix-vector products dominate.

Text helpers sit on top: `TextStreamer` turns the id stream into printable
pieces without splitting a multi-byte character, `stream_text` and
`generate_text` go from a string prompt to text.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Iterable, Iterator, Sequence
from typing import overload

import torch
from torch import nn

from lmlab.infer.engine import Engine, SamplingParams, stop_ids_of
from lmlab.infer.sampling import GenerationError

__all__ = [
    "generate", "generate_ids", "stream_text", "generate_text", "TextStreamer", "GenerationError",
]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- the loop

@overload
def generate(model: nn.Module, prompt_ids: Sequence[int], max_new_tokens: int, *,
             temperature: float = ..., top_k: int | None = ..., top_p: float | None = ...,
             seed: int | None = ..., eos_id: int | Iterable[int] | None = ...,
             stop_at_eos: bool = ...) -> Iterator[int]: ...
@overload
def generate(model: nn.Module, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = ..., top_k: int | None = ..., top_p: float | None = ...,
             seed: int | None = ..., eos_id: int | Iterable[int] | None = ...,
             stop_at_eos: bool = ...) -> Iterator[list[int | None]]: ...


def generate(model, prompt_ids, max_new_tokens, *, temperature=1.0, top_k=None, top_p=None,
             seed=None, eos_id=None, stop_at_eos=True):
    """Stream new token ids for one prompt (a list of ints) or a batch (a list of lists).

    One prompt: yields one int per step. A batch: yields, per step, a list with
    one entry per prompt, None for prompts that have already stopped.

    - `temperature=0` is greedy; otherwise sampling with optional `top_k` / `top_p`
      (see `lmlab.infer.sampling`). `seed` makes sampling reproducible: the same
      seed and settings give the same tokens; prompt i of a batch draws from
      seed + i, so it gets the tokens it would get alone with that seed.
    - `eos_id` (one id or several, e.g. end-of-text and end-of-turn): a prompt
      stops after yielding one of them when `stop_at_eos`; the stop token itself
      is yielded, so a caller can tell "stopped" from "ran out of tokens".
    - Prompt plus new tokens never exceed `model.max_seq_len`: a prompt stops
      there (logged); a prompt longer than that raises GenerationError.

    The rows run through the engine (`lmlab.infer.engine`), in this thread.
    Arguments are checked here, before the first `next()`, so a bad setting
    fails at the call. The model's parameters give the device and dtype; call
    `model.eval()` first (dropout is not switched off here).
    """
    rows, single = _as_rows(prompt_ids)
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not rows:
        raise GenerationError("no prompts given")
    engine = Engine(model, max_batch=len(rows), max_queue=0)
    stops = () if eos_id is None or not stop_at_eos else (
        (eos_id,) if isinstance(eos_id, int) else tuple(eos_id))
    reqs = [engine.submit(r, SamplingParams(
        max_tokens=max(max_new_tokens, 1), temperature=temperature, top_k=top_k, top_p=top_p,
        seed=None if seed is None else seed + i, stop_ids=stops)) for i, r in enumerate(rows)]
    if max_new_tokens == 0:
        return iter(())
    _warn_if_cut(model, reqs, max_new_tokens)
    steps = _steps(engine, reqs)
    return (step[0] for step in steps) if single else steps


def _steps(engine: Engine, reqs: list) -> Iterator[list[int | None]]:
    """One list per engine step: each request's new id, None once it has stopped."""
    seen = [0] * len(reqs)
    while engine.step() or any(len(r.token_ids) > n for r, n in zip(reqs, seen)):
        out: list[int | None] = []
        for i, r in enumerate(reqs):
            out.append(r.token_ids[seen[i]] if len(r.token_ids) > seen[i] else None)
            seen[i] = len(r.token_ids)
        yield out


def _warn_if_cut(model, reqs: list, max_new_tokens: int) -> None:
    cut = [r for r in reqs if r.budget < max_new_tokens]
    if cut:
        logger.warning("generating %d tokens, not %d: the prompt (%d tokens) leaves that much "
                       "of the model's context (max_seq_len=%d)", cut[0].budget, max_new_tokens,
                       cut[0].prompt_tokens, model.max_seq_len)


def generate_ids(model: nn.Module, prompt_ids, max_new_tokens: int, **kwargs):
    """All new ids at once: a list for one prompt, a list of lists for a batch."""
    steps = generate(model, prompt_ids, max_new_tokens, **kwargs)
    rows, single = _as_rows(prompt_ids)
    if single:
        return list(steps)
    out: list[list[int]] = [[] for _ in rows]
    for step in steps:
        for row, tok in zip(out, step):
            if tok is not None:
                row.append(tok)
    return out


def _as_rows(prompt_ids) -> tuple[list[list[int]], bool]:
    """(rows of Python ints, whether one prompt was given) from a list, lists or a tensor."""
    if isinstance(prompt_ids, torch.Tensor):
        prompt_ids = prompt_ids.tolist()
    single = len(prompt_ids) == 0 or isinstance(prompt_ids[0], numbers.Integral)
    rows = [prompt_ids] if single else prompt_ids
    return [[int(t) for t in r] for r in rows], single


# ---------------------------------------------------------------- text

class TextStreamer:
    """Turns a stream of token ids into text pieces, never splitting a character.

    A byte-level BPE token can hold part of a UTF-8 character (a Chinese
    character is 3 bytes, an emoji 4, and they may span several tokens). Decoding
    such a prefix gives U+FFFD (the replacement character) at the end, so a
    piece is held back while the decoded tail ends with U+FFFD and released,
    as the new text only, once the character is complete.

    New text is the decoding of the ids since the previous emitted piece minus
    the decoding of that previous piece: decoders that treat the start of a
    sequence specially (SentencePiece drops a leading space) then still give
    the right pieces. Concatenated, the pieces equal
    `tokenizer.decode(all_ids, skip_special_tokens)`.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window: the last emitted piece
        self._read = 0  # end of what has been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def put(self, token_id: int) -> str:
        """Add one id; return the text it completes ("" while a character is unfinished)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        if len(text) <= len(prefix_text) or text.endswith("\ufffd"):
            return ""
        # keep only the last emitted piece as context, so decoding stays O(piece)
        self._ids = self._ids[self._read:]
        self._prefix, self._read = 0, len(self._ids)
        return text[len(prefix_text):]

    def flush(self) -> str:
        """The held-back text at the end (ends in U+FFFD if the ids stop mid-character)."""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        self._ids, self._prefix, self._read = [], 0, 0
        return text[len(prefix_text):]


def stream_text(model: nn.Module, tokenizer, prompt: str | Sequence[int],
                max_new_tokens: int = 256, **kwargs) -> Iterator[str]:
    """Text pieces of the continuation of `prompt` (a text, or token ids: a rendered chat),
    as they are generated.

    Stops at the tokenizer's EOS (not included in the text) unless `eos_id` is
    given in kwargs. An empty prompt starts from EOS: lmlab separates documents
    with it, so that is the context "start of a new document".
    """
    kwargs.setdefault("eos_id", stop_ids_of(tokenizer))
    stops = kwargs["eos_id"]
    stops = set() if stops is None else ({stops} if isinstance(stops, int) else set(stops))
    ids = (tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)) or [
        _start_id(tokenizer)]
    # generate checks its arguments now, so that a bad one fails before any text is shown
    tokens = generate(model, ids, max_new_tokens, **kwargs)
    return _pieces(tokenizer, tokens, stops if kwargs.get("stop_at_eos", True) else set())


def _pieces(tokenizer, tokens: Iterator[int], stops: set[int]) -> Iterator[str]:
    streamer = TextStreamer(tokenizer)
    for tok in tokens:
        if tok in stops:
            break
        piece = streamer.put(tok)
        if piece:
            yield piece
    tail = streamer.flush()
    if tail:
        yield tail


def _start_id(tokenizer) -> int:
    """The context of an empty prompt: "a new document starts here"."""
    for tok in (tokenizer.eos_id, getattr(tokenizer, "bos_id", None)):
        if tok is not None:
            return tok
    return 0


def generate_text(model: nn.Module, tokenizer, prompt: str | Sequence[int], max_new_tokens: int = 256,
                  **kwargs) -> str:
    """The continuation of `prompt` (without the prompt), as one string. See `stream_text`."""
    return "".join(stream_text(model, tokenizer, prompt, max_new_tokens, **kwargs))
