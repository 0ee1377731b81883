"""A BERT-style encoder: the Transformer's layers reading in both directions (kind "bert").

A decoder's position i attends to positions j ≤ i. An encoder's attends to every
real token of its text, before and after it:

    Attention(Q, K, V) = softmax(Q Kᵀ / √d_k + M) V,   M_ij = 0 if token j is real, −∞ if padding

So it cannot learn to predict the next token (it would see it); it learns to
fill in hidden ones (masked language modelling, `lmlab.train.mlm`), and its
hidden states represent the whole text (classification, `lmlab.model.classifier`).

    ids ─► word + position + token-type embeddings ─► LayerNorm ─► N × Block ─► h (B, T, d)
    h   ─► MLM head: LayerNorm(GELU(h W_t + b_t)) Eᵀ + b  (E: the word embedding, tied) ─► logits
    h₀  ─► pooler: tanh(h₀ W_p + b_p), the first token's state ─► the pooled output (B, d)

The blocks are `lmlab.model.transformer.Block` with two switches: `causal=False`
(no causal mask; the padding mask M where rows are padded, none where no row
is) and `post_norm=True`, BERT's order x ← Norm(x + F(x)) instead of the
decoder's x ← x + F(Norm(x)). The `bert-*` presets use BERT's exact GELU
(`mlp="gelu_exact"`) and learned positions; the weights are Hugging Face's
`BertForMaskedLM` under other names (`lmlab.interop.hf` maps them; tests hold
the logits equal). The pooler is BERT's too; `BertForMaskedLM` has none, so
an import without one starts it fresh and fine-tuning trains it.

An encoder does not generate text: `new_decode_state` and `decode_step` say so.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.errors import ConfigError
from lmlab.model import register_kind
from lmlab.model.config import ENCODER_PRESETS, ModelConfig, preset
from lmlab.model.loss import IGNORE_INDEX
from lmlab.model.transformer import Block, Linear, Transformer, make_norm

DEFAULT_PRESET = "bert-small"
_NO_TEXT = ("model kind 'bert' is a bidirectional encoder: it fills in masked tokens and does "
            "not generate text; generate with a causal kind (transformer)")


def key_padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, 1, 1, T) bool, True where a key is a real token, from `attention_mask` (B, T; 1 / True
    = real). None when no row is padded: attention then takes SDPA's mask-free kernel. A row
    with no real token at all sees its pads (softmax over no key would be 0/0 = NaN)."""
    if attention_mask is None:
        return None
    real = attention_mask.bool()
    if bool(real.all()):
        return None
    real = real | ~real.any(-1, keepdim=True)
    return real[:, None, None, :]


@register_kind("bert")
class Encoder(nn.Module):
    """The bidirectional encoder with BERT's MLM head and pooler (kind "bert")."""

    bidirectional = True  # every position sees the whole row: a classifier passes the padding
    objective = "mlm"  # `lmlab pretrain --objective`: masked, not next-token, prediction

    def __init__(self, cfg: ModelConfig, type_vocab_size: int = 2):
        super().__init__()
        if cfg.pos_emb != "learned" or cfg.mlp == "swiglu":
            raise ConfigError(f"model: the bert kind has learned positions and a GELU MLP, not "
                              f"pos_emb={cfg.pos_emb!r}, mlp={cfg.mlp!r}; use a bert-* preset")
        if type_vocab_size < 1:
            raise ConfigError(f"model.type_vocab_size={type_vocab_size}: must be >= 1 "
                              "(BERT's segments A and B: 2)")
        self.cfg, self.type_vocab_size = cfg, type_vocab_size
        d = cfg.d_model
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, d)
        self.type_emb = nn.Embedding(type_vocab_size, d)
        self.emb_norm = make_norm(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, causal=False, post_norm=True)
                                    for _ in range(cfg.n_layer))
        self.head_dense = Linear(d, d, bias=cfg.bias)
        self.head_norm = make_norm(cfg)
        self.lm_head = Linear(d, cfg.vocab_size, bias=cfg.bias)  # + a bias per token
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.pooler = Linear(d, d, bias=cfg.bias)
        self._gelu = "none" if cfg.mlp == "gelu_exact" else "tanh"  # the head's GELU = the MLP's
        self.reset_parameters()

    # N(0, init_std), zero biases, unit norms, as the Transformer is initialised
    reset_parameters = Transformer.reset_parameters

    # ------------------------------------------------ the kind protocol (see lmlab.model)

    @classmethod
    def from_config_dict(cls, d: dict) -> "Encoder":
        d = dict(d)
        return cls(ModelConfig.from_dict({k: v for k, v in d.items() if k != "type_vocab_size"}),
                   d.get("type_vocab_size", 2))

    @classmethod
    def from_spec(cls, fields: dict) -> "Encoder":
        """A bert-* preset (default bert-small) and overrides; a bare size ("tiny", "small":
        ModelSpec's default) names the bert preset of that size."""
        fields = dict(fields)
        name = fields.pop("preset", None) or DEFAULT_PRESET
        if name not in ENCODER_PRESETS and f"bert-{name}" in ENCODER_PRESETS:
            name = f"bert-{name}"
        type_vocab_size = fields.pop("type_vocab_size", None)
        return cls(preset(name, ENCODER_PRESETS, **fields),
                   2 if type_vocab_size is None else type_vocab_size)

    def config_dict(self) -> dict:
        return {**self.cfg.to_dict(), "type_vocab_size": self.type_vocab_size}

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def max_seq_len(self) -> int:
        return self.cfg.max_seq_len

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_decode_state(self, batch_size: int, max_len: int, pad=None):
        raise ConfigError(_NO_TEXT)

    def decode_step(self, input_ids: torch.Tensor, state) -> torch.Tensor:
        raise ConfigError(_NO_TEXT)

    # ------------------------------------------------ forward

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The final hidden states (B, T, d). `attention_mask` (B, T): 1 / True at real tokens,
        0 / False at padding (None: all real); `token_type_ids` (B, T): segments (None: all 0)."""
        B, T = input_ids.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens > max_seq_len {self.cfg.max_seq_len}")
        x = self.tok_emb(input_ids) + self.pos_emb(torch.arange(T, device=input_ids.device))
        x = x + (self.type_emb.weight[0] if token_type_ids is None
                 else self.type_emb(token_type_ids))
        x = self.drop(self.emb_norm(x))
        mask = key_padding_mask(attention_mask)
        for block in self.blocks:
            x = block(x, attn_mask=mask)
        return x

    def mlm_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits over the vocabulary for hidden states h (..., d): what each position holds."""
        return self.lm_head(self.head_norm(F.gelu(self.head_dense(h), approximate=self._gelu)))

    def pooled(self, h: torch.Tensor) -> torch.Tensor:
        """BERT's pooled output (B, d): tanh(W_p h₀ + b_p), h₀ the first position's state."""
        return torch.tanh(self.pooler(h[:, 0]))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                reduction: str = "mean", return_hidden: bool = False):
        """MLM logits (B, T, vocab), or with `return_hidden` the hidden states (B, T, d).

        With `targets` (B, T; -100 = not predicted) the cross-entropy at the positions they
        name, *in place* (the token at position t, hidden in the input, not the next one),
        computed at those positions only: "mean" over them, "sum", "none" (B, T; 0 elsewhere)
        or "row_sum" (B,), as `lmlab.model.loss.linear_cross_entropy` reduces.
        """
        h = self.encode(input_ids, attention_mask, token_type_ids)
        if return_hidden:
            return h
        if targets is None:
            return self.mlm_logits(h)
        chosen = targets != IGNORE_INDEX
        nats = F.cross_entropy(self.mlm_logits(h[chosen]).float(), targets[chosen],
                               reduction="none")
        if reduction == "mean":
            return nats.sum() / max(nats.numel(), 1)
        if reduction == "sum":
            return nats.sum()
        per_token = nats.new_zeros(targets.shape).masked_scatter(chosen, nats)
        if reduction == "none":
            return per_token
        if reduction == "row_sum":
            return per_token.sum(-1)
        raise ValueError(f"reduction={reduction!r}; expected mean, sum, none or row_sum")
