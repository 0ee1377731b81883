"""Text classifiers: a pooled representation of the text, then one linear layer.

Two kinds, one interface — `forward(ids, lengths)` returns logits (B, labels)
for right-padded ids (B, T) whose rows are `lengths` (B,) long, and `labels`
names the classes (id = index):

- "lstm-classifier": the seeds' model, trained from scratch —
  Embedding → LSTM (layers, hidden size, optionally bidirectional) → Dense,
  the LSTM's outputs averaged over each row's real tokens (`RecurrentEncoder`).
- "classifier": any causal language model of lmlab (a pretrained Transformer) as
  its body, and a head on the hidden state of each row's last real token: in a
  causal model that is the one position that has read the whole text (pads to
  its right cannot reach it). A bidirectional body (the "bert" encoder) reads
  the whole text at every position, pads included unless it is told which they
  are: it gets the padding mask, and the head reads its pooled output (BERT's
  tanh(W h₀ + b) of the first token) or the mean over the real tokens.
  `freeze_body()` makes it a linear probe.

    p(y | text) = softmax(W · pool(h(text)) + b)

The loss is the cross-entropy of those logits (`forward(..., targets=y)`),
optionally weighted per class by the task.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.errors import ConfigError
from lmlab.model import build_from_spec, build_model, register_kind
from lmlab.model.rnn import RecurrentEncoder


def _labels(labels: list[str] | None, num_labels: int) -> list[str]:
    labels = [str(x) for x in labels] if labels else [str(i) for i in range(num_labels)]
    if len(labels) != num_labels:
        raise ConfigError(f"model: {len(labels)} label names for {num_labels} labels")
    if num_labels < 2:
        raise ConfigError(f"model: a classifier needs at least 2 labels, got {num_labels}")
    return labels


def _head(d_in: int, num_labels: int) -> nn.Linear:
    head = nn.Linear(d_in, num_labels)
    nn.init.normal_(head.weight, 0.0, 0.02)
    nn.init.zeros_(head.bias)
    return head


def _logits_or_loss(logits: torch.Tensor, targets: torch.Tensor | None, reduction: str):
    if targets is None:
        return logits
    return F.cross_entropy(logits.float(), targets, reduction=reduction)


@register_kind("lstm-classifier")
class LSTMClassifier(nn.Module):
    """Embedding → LSTM → mean over the text's tokens → dropout → Dense (kind "lstm-classifier")."""

    objective = "classify"
    FIELDS = ("vocab_size", "num_labels", "labels", "d_embed", "hidden", "n_layer",
              "bidirectional", "cell", "dropout", "pad_id", "max_len")

    def __init__(self, vocab_size: int, num_labels: int = 2, labels: list[str] | None = None,
                 d_embed: int = 128, hidden: int = 128, n_layer: int = 1,
                 bidirectional: bool = False, cell: Literal["lstm", "gru", "rnn"] = "lstm",
                 dropout: float = 0.1, pad_id: int = 0, max_len: int | None = None):
        super().__init__()
        self.labels = _labels(labels, num_labels)
        self.max_len = max_len  # the text length (tokens) it was trained on; predict cuts to it
        self.cfg = dict(vocab_size=vocab_size, num_labels=num_labels, labels=self.labels,
                        d_embed=d_embed, hidden=hidden, n_layer=n_layer,
                        bidirectional=bidirectional, cell=cell, dropout=dropout, pad_id=pad_id)
        self.encoder = RecurrentEncoder(vocab_size, d_embed, hidden, n_layer, cell,
                                        bidirectional, dropout, pad_id)
        self.drop = nn.Dropout(dropout)
        self.head = _head(self.encoder.out_dim, num_labels)

    @classmethod
    def from_config_dict(cls, d: dict) -> "LSTMClassifier":
        unknown = sorted(set(d) - set(cls.FIELDS))
        if unknown:
            raise ConfigError(f"lstm-classifier config: unknown field(s) {unknown}")
        return cls(**d)

    @classmethod
    def from_spec(cls, fields: dict) -> "LSTMClassifier":
        return cls.from_config_dict({k: v for k, v in fields.items() if k in cls.FIELDS})

    def config_dict(self) -> dict:
        return {**self.cfg, "max_len": self.max_len}

    @property
    def vocab_size(self) -> int:
        return self.cfg["vocab_size"]

    @property
    def max_seq_len(self) -> None:
        return None

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, reduction: str = "mean"):
        pooled = self.encoder.pooled(ids, lengths, "mean")
        return _logits_or_loss(self.head(self.drop(pooled)), targets, reduction)


@register_kind("classifier")
class SequenceClassifier(nn.Module):
    """A language model's pooled hidden states → Dense (kind "classifier").

    The body is any kind whose forward takes `return_hidden=True` and returns the
    final hidden states (B, T, d) (the Transformer and the encoder do); one that
    is `bidirectional` also takes `attention_mask` (B, T) and may have `pooled(h)`.
    `pool` "auto" is the encoder's "pooler", a causal body's "last"."""

    objective = "classify"

    def __init__(self, body: nn.Module, num_labels: int = 2, labels: list[str] | None = None,
                 pool: Literal["auto", "last", "mean", "pooler"] = "auto", dropout: float = 0.0,
                 max_len: int | None = None):
        super().__init__()
        self.max_len = max_len  # the text length (tokens) it was trained on; predict cuts to it
        self.bidirectional = getattr(body, "bidirectional", False)
        has_pooler = self.bidirectional and hasattr(body, "pooled")
        if pool == "auto":
            pool = "pooler" if has_pooler else "last"
        if pool not in ("last", "mean", "pooler") or (pool == "pooler" and not has_pooler):
            raise ConfigError(f"model.pool={pool!r}; expected 'last', 'mean' or (for a body "
                              "with a pooler, the bert kind) 'pooler'")
        self.labels = _labels(labels, num_labels)
        self.body = body
        self.pool, self.num_labels, self.dropout_p = pool, num_labels, dropout
        self.drop = nn.Dropout(dropout)
        d = getattr(getattr(body, "cfg", None), "d_model", None)
        if d is None:
            raise ConfigError(f"model kind {getattr(body, 'kind', '?')!r} cannot be a classifier "
                              "body (no cfg.d_model)")
        self.head = _head(d, num_labels)

    @classmethod
    def from_config_dict(cls, d: dict) -> "SequenceClassifier":
        d = dict(d)
        body = d.pop("body", None)
        if not isinstance(body, dict) or "kind" not in body or "config" not in body:
            raise ConfigError("classifier config: 'body' must be {'kind': ..., 'config': {...}}")
        return cls(build_model(body["kind"], body["config"]), **d)

    @classmethod
    def from_spec(cls, fields: dict) -> "SequenceClassifier":
        fields = dict(fields)
        head = {k: fields.pop(k) for k in ("num_labels", "labels", "pool") if k in fields}
        return cls(build_from_spec(fields.pop("body_kind", "transformer"), fields), **head)

    def config_dict(self) -> dict[str, Any]:
        return {"num_labels": self.num_labels, "labels": self.labels, "pool": self.pool,
                "dropout": self.dropout_p, "max_len": self.max_len,
                "body": {"kind": self.body.kind, "config": self.body.config_dict()}}

    @property
    def vocab_size(self) -> int:
        return self.body.vocab_size

    @property
    def max_seq_len(self) -> int | None:
        return self.body.max_seq_len

    def freeze_body(self) -> "SequenceClassifier":
        """Train only the head (a linear probe of what the body has learnt)."""
        for p in self.body.parameters():
            p.requires_grad_(False)
        return self

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, reduction: str = "mean"):
        B, T = ids.shape
        if lengths is None:
            lengths = torch.full((B,), T, device=ids.device)
        lengths = lengths.to(ids.device).clamp(1, T)
        real = torch.arange(T, device=ids.device)[None] < lengths[:, None]  # (B, T)
        # a causal body's real tokens never see the pads to their right; a bidirectional one's
        # would, unless told
        h = (self.body(ids, attention_mask=real, return_hidden=True) if self.bidirectional
             else self.body(ids, return_hidden=True))  # (B, T, d)
        if self.pool == "pooler":
            pooled = self.body.pooled(h)
        elif self.pool == "last":
            pooled = h[torch.arange(B, device=ids.device), lengths - 1]
        else:
            mask = real.to(h.dtype)
            pooled = (h * mask[..., None]).sum(1) / lengths[:, None].to(h.dtype)
        return _logits_or_loss(self.head(self.drop(pooled)), targets, reduction)
