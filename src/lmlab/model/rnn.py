"""Recurrent layers: an embedding followed by a stack of LSTM (or GRU, or plain RNN) layers.

`RecurrentEncoder` is the one recurrent layer of lmlab: the sentiment
classifier of the seeds (Embedding → LSTM → Dense) uses it, and so will the
recurrent language models. It is torch's `nn.LSTM` / `nn.GRU` / `nn.RNN`
(cuDNN on a GPU, oneDNN on a CPU) behind an interface that knows padding:

    h_t = LSTM(x_t, h_{t-1})      x_t = E[id_t]     (one step of each layer)

A right-padded batch (B, T) with `lengths` (B,) goes through
`pack_padded_sequence`, so no row reads its pad positions and each row's final
state is the state after its own last token (for a bidirectional layer, the
backward direction starts at that token too). `pooled(...)` is the
mean of the outputs over each row's real positions, or the final state.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

_CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class RecurrentEncoder(nn.Module):
    def __init__(self, vocab_size: int, d_embed: int, hidden: int, n_layer: int = 1,
                 cell: Literal["lstm", "gru", "rnn"] = "lstm", bidirectional: bool = False,
                 dropout: float = 0.0, pad_id: int | None = 0):
        super().__init__()
        self.cell, self.bidirectional = cell, bidirectional
        self.embed = nn.Embedding(vocab_size, d_embed, padding_idx=pad_id)
        self.rnn = _CELLS[cell](d_embed, hidden, num_layers=n_layer, batch_first=True,
                                bidirectional=bidirectional,
                                dropout=dropout if n_layer > 1 else 0.0)
        self.out_dim = hidden * (2 if bidirectional else 1)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor | None = None, state=None):
        """Outputs (B, T, out_dim) and the final state, for ids (B, T) right-padded to
        `lengths` (None: every row is full). Outputs past a row's length are zero."""
        x = self.embed(ids)
        if lengths is None:
            return self.rnn(x, state)
        packed = pack_padded_sequence(x, lengths.cpu().clamp(min=1), batch_first=True,
                                      enforce_sorted=False)
        out, final = self.rnn(packed, state)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])
        return out, final

    def pooled(self, ids: torch.Tensor, lengths: torch.Tensor | None = None,
               how: Literal["mean", "last"] = "mean") -> torch.Tensor:
        """One vector per row (B, out_dim): the mean of its outputs over its real positions,
        or its final state (both directions' for a bidirectional layer)."""
        out, final = self(ids, lengths)
        if how == "last":
            h = final[0] if self.cell == "lstm" else final  # (layers·dirs, B, hidden)
            dirs = 2 if self.bidirectional else 1
            return torch.cat(list(h[-dirs:]), dim=-1)
        if lengths is None:
            return out.mean(1)
        n = lengths.clamp(min=1).to(out.dtype)[:, None]
        return out.sum(1) / n  # pad positions are zero: the sum is over real positions
