"""Recurrent language models: the seeds' Embedding → LSTM → Dense softmax, and Elman's RNN.

Three kinds, one class — they differ only in the recurrent cell:

- "rnn" (Elman, 1990):  h_t = tanh(W x_t + U h_{t−1} + b)
- "lstm" (Hochreiter & Schmidhuber, 1997): gates i, f, o and a cell c_t
      i_t, f_t, o_t = σ(W_{i,f,o} x_t + U_{i,f,o} h_{t−1} + b_{i,f,o})
      c_t = f_t ⊙ c_{t−1} + i_t ⊙ tanh(W_c x_t + U_c h_{t−1} + b_c)
      h_t = o_t ⊙ tanh(c_t)
- "gru" (Cho et al., 2014), the LSTM's two-gate cousin.

Each reads x_t = E[id_t], runs `n_layer` recurrent layers of width `d_model`
(`lmlab.model.rnn.RecurrentEncoder`, the layer the LSTM classifier uses too),
and predicts the next token with p(· | ids ≤ t) = softmax(V h_t) — V the
embedding matrix again when `tie_embeddings` (a projection to `d_embed` first
if the widths differ). Training is truncated backpropagation through time
over the training windows: every window starts from a zero state, so the
gradient flows back at most `seq_len` steps.

The decode state is the hidden state (h, c for the LSTM) after the tokens fed
so far: a step costs the same at token 10 and token 10,000, and there is no
context limit (`max_seq_len` is None) — the history the Transformer's KV
cache keeps in full is squeezed into `d_model` numbers per layer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmlab.errors import ConfigError
from lmlab.model import register_kind
from lmlab.model.loss import linear_cross_entropy
from lmlab.model.rnn import RecurrentEncoder

# init_std: the embedding's N(0, σ²); 0.1 as Zaremba et al.'s ±0.1 (0.02 learns slower here)
_DEFAULTS = dict(d_model=512, n_layer=2, d_embed=None, dropout=0.0, tie_embeddings=True,
                 init_std=0.1)


class RecurrentState:
    """What a recurrent model carries between decode steps: its hidden state per row."""

    def __init__(self, pad: torch.Tensor | None):
        self.hidden = None  # the cell's state after the tokens so far (None: zeros)
        self.pad = pad  # left padding per row, only in the first (prompt) call


class RecurrentLM(nn.Module):
    """Embedding → `n_layer` recurrent layers → (projection) → output layer; see the module doc."""

    cell = "lstm"
    max_seq_len = None  # no context limit
    default_seq_len = 256  # the training window when the run sets none

    def __init__(self, vocab_size: int, d_model: int = 512, n_layer: int = 2,
                 d_embed: int | None = None, dropout: float = 0.0, tie_embeddings: bool = True,
                 init_std: float = 0.1):
        super().__init__()
        d_embed = d_embed or d_model
        self.cfg = dict(vocab_size=vocab_size, d_model=d_model, n_layer=n_layer, d_embed=d_embed,
                        dropout=dropout, tie_embeddings=tie_embeddings, init_std=init_std)
        self.encoder = RecurrentEncoder(vocab_size, d_embed, d_model, n_layer, self.cell,
                                        dropout=dropout, pad_id=None)
        self.drop = nn.Dropout(dropout)
        # the output layer reads d_embed numbers when it shares the embedding's matrix
        d_out = d_embed if tie_embeddings else d_model
        self.proj = nn.Linear(d_model, d_out, bias=False) if d_out != d_model else None
        self.lm_head = nn.Linear(d_out, vocab_size, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.encoder.embed.weight
        nn.init.normal_(self.encoder.embed.weight, 0.0, init_std)
        if not tie_embeddings:
            nn.init.normal_(self.lm_head.weight, 0.0, init_std)

    # ------------------------------------------------ the kind protocol (see lmlab.model)

    @classmethod
    def from_config_dict(cls, d: dict) -> "RecurrentLM":
        unknown = sorted(set(d) - set(_DEFAULTS) - {"vocab_size"})
        if unknown:
            raise ConfigError(f"{cls.kind} config: unknown field(s) {unknown}; known: "
                              f"{sorted(_DEFAULTS) + ['vocab_size']}")
        return cls(**d)

    @classmethod
    def from_spec(cls, fields: dict) -> "RecurrentLM":
        """`fields`: vocab_size and any of d_model, n_layer, d_embed, dropout, tie_embeddings,
        init_std; a Transformer preset does not apply."""
        fields = {k: v for k, v in fields.items() if k != "preset"}
        unknown = sorted(set(fields) - set(_DEFAULTS) - {"vocab_size"})
        if unknown:
            raise ConfigError(f"model.{unknown[0]} does not apply to model kind {cls.kind!r}; "
                              f"its fields: {sorted(_DEFAULTS)}")
        return cls(**{**_DEFAULTS, **fields})

    def config_dict(self) -> dict[str, Any]:
        return dict(self.cfg)

    @property
    def vocab_size(self) -> int:
        return self.cfg["vocab_size"]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6 per weight of a matrix multiply (2 forward, 4 backward)
        — the recurrent layers' input and hidden weights, the projection, the output layer."""
        matmul = sum(p.numel() for name, p in self.encoder.rnn.named_parameters()
                     if name.startswith("weight_"))
        if self.proj is not None:
            matmul += self.proj.weight.numel()
        return 6.0 * (matmul + self.lm_head.weight.numel())

    def _out(self, h: torch.Tensor) -> torch.Tensor:
        h = self.drop(h)
        return self.proj(h) if self.proj is not None else h

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None,
                reduction: str = "mean", return_hidden: bool = False):
        """Logits (B, T, vocab) for ids (B, T), each row from a zero state; with `targets` the
        next-token cross-entropy (reduced as `linear_cross_entropy`), no logits made."""
        out, _ = self.encoder(ids)
        h = self._out(out)
        if targets is not None:
            return linear_cross_entropy(h, self.lm_head.weight, targets, reduction=reduction)
        return h if return_hidden else self.lm_head(h)

    def new_decode_state(self, batch_size: int, max_len: int,
                         pad: torch.Tensor | None = None) -> RecurrentState:
        return RecurrentState(pad if pad is not None and bool(pad.any()) else None)

    def decode_step(self, ids: torch.Tensor, state: RecurrentState) -> torch.Tensor:
        if state.pad is None:
            out, state.hidden = self.encoder(ids, state=state.hidden)
            last = out[:, -1]
        else:  # a left-padded prompt: move each row's tokens to the left, run them packed
            B, T = ids.shape
            lengths = (T - state.pad.to(ids.device)).clamp(min=1)
            cols = (torch.arange(T, device=ids.device)[None] + state.pad[:, None]) % T
            out, state.hidden = self.encoder(ids.gather(1, cols), lengths)
            last = out[torch.arange(B, device=ids.device), lengths - 1]
            state.pad = None
        return self.lm_head(self._out(last))


@register_kind("lstm")
class LSTMLM(RecurrentLM):
    """The seeds' language model: Embedding → LSTM → Dense softmax (kind "lstm")."""

    cell = "lstm"


@register_kind("rnn")
class ElmanRNNLM(RecurrentLM):
    """Elman's simple recurrent network, h_t = tanh(W x_t + U h_{t−1} + b) (kind "rnn")."""

    cell = "rnn"


@register_kind("gru")
class GRULM(RecurrentLM):
    """A gated recurrent unit language model (kind "gru")."""

    cell = "gru"
