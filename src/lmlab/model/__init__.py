"""nn.Modules only: the models and their layers. No I/O, no tokenizers, no training.

Model kinds
-----------
Every model lmlab can train, save, load and generate with is an `nn.Module`
class registered under a *kind* name (`@register_kind("transformer")`). A
model directory's config.json records the kind; loading, pretraining and
resuming build through `build_model(kind, config)`, so nothing outside this
package names a model class.

What a kind provides (the protocol the rest of lmlab talks to):

    kind: str                         set by `register_kind`
    from_config_dict(d) -> model      classmethod: rebuild from `config_dict()`
    from_spec(fields) -> model        classmethod: build from a run config's model
                                      fields (a preset name, overrides, vocab_size)
    config_dict() -> dict             JSON-able; written to config.json
    vocab_size: int                   ids the model reads and predicts
    max_seq_len: int | None           longest sequence it can take (None: no limit)

    forward(ids, targets=None, reduction="mean")
        ids (B, T) -> logits (B, T, vocab). With `targets` (B, T; -100 = not
        counted) the next-token cross-entropy instead, reduced as
        `lmlab.model.loss.linear_cross_entropy` reduces it ("mean", "sum",
        "none" per token, "row_sum" one differentiable sum per row).

  for generation (`lmlab.infer.generate` uses these and nothing else):
    new_decode_state(batch_size, max_len, pad=None) -> state
        `max_len` positions will go through the model; `pad` (B,) counts the
        left-padding tokens of each row, which must not influence the rest.
    decode_step(ids, state) -> logits (B, vocab)
        Feed ids (B, T) — the whole (padded) prompt at the first call, one new
        token per row after that — and return the next-token logits at the
        last position; the state advances. The Transformer's state is its KV
        cache; a recurrent model's is its hidden state.

  for continuous batching (optional; `lmlab.infer.engine` uses them where a kind has
  them, else runs its rows in lockstep through the two methods above):
    new_slots(n_slots, max_len) -> slots
        one slot of decode state per sequence (the Transformer's `SlotCache`: a KV
        cache row per slot, each at its own length); `slots.reserve(length)` makes
        room for `length` positions, `slots.move(src, dst)` moves a sequence
    prefill_slot(ids, slots, slot) -> logits (1, vocab)
        run a prompt (T,) into an empty slot
    decode_slots(ids, slots) -> logits (n, vocab)
        one token per running sequence, ids (n,) for slots 0..n-1, each at its
        own position; the engine keeps the running ones in slots 0..n-1

  optional:
    flops_per_token(seq_len) -> float training FLOPs per token, for MFU
    num_params() -> int
    objective: str                    what it predicts: "clm" (the next token; the
                                      default), "mlm" (an encoder), "seq2seq",
                                      "classify"; only "clm" models are scored and
                                      sampled as language models
    default_seq_len: int              the training window when a kind without a
                                      max_seq_len is given no --seq_len
    fit_counts(...)                   a model that is counted, not trained (the
                                      n-gram): pretraining hands it to
                                      `train.runner.fit_task`, not the Trainer
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

from lmlab.errors import ConfigError, InputError

_KINDS: dict[str, type[nn.Module]] = {}
DEFAULT_KIND = "transformer"  # what a config.json without "kind" (lmlab ≤ 0.1) holds


def register_kind(name: str):
    """Class decorator: make `cls` buildable as kind `name`."""
    def register(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _KINDS and _KINDS[name] is not cls:
            raise ValueError(f"model kind {name!r} is already registered to {_KINDS[name]}")
        cls.kind = name
        _KINDS[name] = cls
        return cls
    return register


def model_class(kind: str) -> type[nn.Module]:
    if kind not in _KINDS:
        raise ConfigError(f"unknown model kind {kind!r}; known kinds: {sorted(_KINDS)}")
    return _KINDS[kind]


def model_kinds() -> list[str]:
    return sorted(_KINDS)


def build_model(kind: str, config: dict[str, Any]) -> nn.Module:
    """A fresh model of `kind` from its config dict (as `config_dict()` returns it)."""
    return model_class(kind).from_config_dict(dict(config))


def device_of(model: nn.Module):
    """Where `model` lives: its first parameter's device, or its first buffer's (a counted
    model such as the n-gram holds buffers only)."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def require_causal_lm(model: nn.Module, what: str) -> None:
    """One line, exit 2, for a model that `what` (next-token scoring or sampling) cannot use."""
    objective = getattr(model, "objective", "clm")
    if objective != "clm":
        why = {"mlm": "a bidirectional encoder, trained by masked LM, sees the token it predicts",
               "seq2seq": "an encoder–decoder; use `lmlab seq2seq generate`",
               "classify": "a classifier; use `lmlab classify`"}.get(objective, objective)
        raise InputError(f"{what}: model kind {getattr(model, 'kind', '?')!r} is not a "
                         f"next-token language model ({why})")


def build_from_spec(kind: str, fields: dict[str, Any]) -> nn.Module:
    """A fresh model of `kind` from a run config's model fields (presets resolved by the kind)."""
    return model_class(kind).from_spec(dict(fields))


# imported last: the Transformer registers itself with the functions above
from lmlab.model.config import PRESETS, ModelConfig, preset  # noqa: E402
from lmlab.model.transformer import KVCache, Transformer  # noqa: E402
from lmlab.model.classifier import LSTMClassifier, SequenceClassifier  # noqa: E402
from lmlab.model.seq2seq import Seq2Seq  # noqa: E402,F401
from lmlab.model.recurrent import ElmanRNNLM, GRULM, LSTMLM  # noqa: E402
from lmlab.model.ngram import NGramLM  # noqa: E402
from lmlab.model.encoder import Encoder  # noqa: E402,F401

__all__ = ["ModelConfig", "preset", "PRESETS", "Transformer", "KVCache", "LSTMClassifier",
           "SequenceClassifier", "LSTMLM", "ElmanRNNLM", "GRULM", "NGramLM", "register_kind",
           "model_class", "model_kinds", "device_of", "require_causal_lm", "build_model", "build_from_spec",
           "DEFAULT_KIND"]
