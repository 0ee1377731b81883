"""The encoder–decoder Transformer (Vaswani et al. 2017), kind "seq2seq": translation, summaries.

    source ids ─► embed·√d + positions ─► N × EncoderLayer ─► norm ─► memory (B, S, d)
    target ids ─► embed·√d + positions ─► M × DecoderLayer ─► norm ─► output layer ─► logits
                                              ▲ cross-attention reads the memory

An encoder layer is self-attention over the whole source (a padding mask hides
pad keys) and an MLP; a decoder layer is causal self-attention over the target
so far, cross-attention, and an MLP. Cross-attention is attention whose queries
come from the decoder and whose keys and values come from the encoder's output:

    CrossAttn(x, m) = softmax((x W_q)(m W_k)ᵀ / √d_k + M_pad) (m W_v) W_o

Each sub-layer is a residual, pre-norm (`norm_first`, as lmlab's decoder
blocks) x + f(Norm(x)), or post-norm as in the paper Norm(x + f(x)); both
stacks end in a LayerNorm, as `torch.nn.Transformer` does (tests hold this
model equal to it given the same weights). Positions are the paper's
sinusoids, PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(p / 10000^(2i/d)),
or learned tables. One vocabulary (`source_vocab_size=None`) ties the source
embedding, the target embedding and the output layer (three names, one
tensor); two vocabularies tie the target embedding and the output layer.

The layers are lmlab's own (`lmlab.model.transformer`: `Attention` with its KV
cache, `MLP`, `Linear`); cross-attention is added here. The kind protocol of
`lmlab.model` is kept where it fits (config_dict / from_config_dict /
from_spec, vocab_size, max_seq_len = the longest target), and the rest is
seq2seq's own, which `lmlab.infer.beam` talks to:

    forward(src, src_lengths, tgt_in, targets=None, reduction="mean", label_smoothing=0.0)
        logits (B, T, V); with `targets` (-100 = not counted) the cross-entropy,
        label-smoothed when `label_smoothing` > 0
    encode(src, src_lengths) -> Encoded          memory (B, S, d) and its key mask
    start_decoding(encoded, max_len) -> state    the self-attention KV cache, and each
                                                 layer's cross-attention keys/values,
                                                 computed once from the memory
    decode_step(ids, state) -> logits (B, V)     next-token logits; the state advances
    reorder(state, rows) -> state                rows (N,) of the state, in that order
                                                 (beam search: keep, copy, drop beams)
    conditioned(encoded) -> nn.Module            the decoder bound to a memory, with the
                                                 decoder-only protocol: `lmlab.infer.generate`
                                                 (greedy, sampling) runs on it unchanged
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.checks import check_fields
from lmlab.errors import ConfigError
from lmlab.model import register_kind
from lmlab.model.config import ModelConfig
from lmlab.model.loss import linear_cross_entropy
from lmlab.model.transformer import MLP, Attention, KVCache, Linear


@dataclass
class Seq2SeqSpec:
    """The encoder–decoder's shape (the vocabulary sizes come from the tokenizers)."""

    d_model: int = 256
    n_head: int = 4
    n_encoder_layer: int = 3
    n_decoder_layer: int = 3
    d_ff: int | None = None  # None: 4·d_model
    dropout: float = 0.1
    pos_emb: Literal["sinusoidal", "learned"] = "sinusoidal"
    norm_first: bool = True  # pre-norm x + f(Norm(x)); False: the paper's Norm(x + f(x))
    max_source_len: int = 128  # source tokens read (longer sources are cut)
    max_target_len: int = 64  # target tokens written, EOS included

    def __post_init__(self) -> None:
        check_fields(self, "model.", d_model=">=1", n_head=">=1", n_encoder_layer=">=1",
                     n_decoder_layer=">=1", d_ff=">=1", dropout="[0,1)", max_source_len=">=1",
                     max_target_len=">=2")
        if self.d_model % self.n_head:
            raise ConfigError(f"model: d_model={self.d_model} is not divisible by "
                              f"n_head={self.n_head}; change one of them")

    def layer_config(self, n_layer: int) -> ModelConfig:
        """The `ModelConfig` lmlab's layers (Attention, MLP, KVCache) are built from."""
        return ModelConfig(vocab_size=1, n_layer=n_layer, n_head=self.n_head,
                           d_model=self.d_model, d_ff=self.d_ff or 4 * self.d_model,
                           max_seq_len=max(self.max_source_len, self.max_target_len),
                           dropout=self.dropout)


def sinusoidal_positions(positions: torch.Tensor, d_model: int) -> torch.Tensor:
    """PE (…, d_model) of integer positions: sin at even features, cos at odd ones."""
    i = torch.arange(0, d_model, 2, device=positions.device, dtype=torch.float32)
    angles = positions.float()[..., None] / 10000 ** (i / d_model)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)[..., :d_model]


def _sublayer(x: torch.Tensor, f: Callable[[torch.Tensor], torch.Tensor], norm: nn.Module,
              norm_first: bool) -> torch.Tensor:
    """The residual around one sub-layer: pre-norm x + f(Norm(x)), or post-norm Norm(x + f(x))."""
    return x + f(norm(x)) if norm_first else norm(x + f(x))


class CrossAttention(nn.Module):
    """Queries from the decoder, keys and values from the encoder's memory (one K/V Linear)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.q = Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.kv = Linear(cfg.d_model, 2 * cfg.d_model, bias=cfg.bias)
        self.proj = Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)

    def keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K = m W_k, V = m W_v of the memory (B, S, d), each (B, H, S, D)."""
        k, v = self.kv(memory).chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                key_mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, d) reads the memory's (K, V); `key_mask` (B, 1, 1, S), True = a real token."""
        B, T, _ = x.shape
        y = F.scaled_dot_product_attention(
            self._heads(self.q(x)), *kv, attn_mask=key_mask,
            dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, norm_first: bool):
        super().__init__()
        self.norm_first = norm_first
        self.norm1, self.attn = nn.LayerNorm(cfg.d_model), Attention(cfg)
        self.norm2, self.mlp = nn.LayerNorm(cfg.d_model), MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        # a mask is always given: without one, lmlab's Attention is causal
        x = _sublayer(x, lambda h: self.dropout(self.attn(h, attn_mask=key_mask)), self.norm1,
                      self.norm_first)
        return _sublayer(x, self.mlp, self.norm2, self.norm_first)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, norm_first: bool):
        super().__init__()
        self.norm_first = norm_first
        self.norm1, self.attn = nn.LayerNorm(cfg.d_model), Attention(cfg)
        self.norm2, self.cross = nn.LayerNorm(cfg.d_model), CrossAttention(cfg)
        self.norm3, self.mlp = nn.LayerNorm(cfg.d_model), MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                key_mask: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        # causal self-attention (no mask: lmlab's Attention is causal, and continues a cache)
        x = _sublayer(x, lambda h: self.dropout(self.attn(h, cache=cache, layer=layer)),
                      self.norm1, self.norm_first)
        x = _sublayer(x, lambda h: self.dropout(self.cross(h, kv, key_mask)), self.norm2,
                      self.norm_first)
        return _sublayer(x, self.mlp, self.norm3, self.norm_first)


class Encoded(NamedTuple):
    """The encoder's output: memory (B, S, d) and key_mask (B, 1, 1, S), True = a real token."""

    memory: torch.Tensor
    key_mask: torch.Tensor

    def repeat_interleave(self, k: int) -> "Encoded":
        """Each row k times in a row (beam search: one memory per beam)."""
        return Encoded(self.memory.repeat_interleave(k, 0), self.key_mask.repeat_interleave(k, 0))


@dataclass
class Seq2SeqState:
    """What `decode_step` carries: the decoder's self-attention cache, and per layer the
    cross-attention keys/values of the memory (fixed while decoding) with its key mask."""

    cache: KVCache
    cross: list[tuple[torch.Tensor, torch.Tensor]]
    key_mask: torch.Tensor


@register_kind("seq2seq")
class Seq2Seq(nn.Module):
    """The encoder–decoder Transformer (kind "seq2seq"); see the module docstring."""

    objective = "seq2seq"  # trained on pairs (`lmlab seq2seq train`), not next-token text

    def __init__(self, spec: Seq2SeqSpec, vocab_size: int, source_vocab_size: int | None = None):
        super().__init__()
        if vocab_size < 1 or (source_vocab_size is not None and source_vocab_size < 1):
            raise ConfigError(f"model: vocabulary sizes must be >= 1, got {vocab_size}, "
                              f"{source_vocab_size}")
        self.spec, self._vocab_size, self.source_vocab_size = spec, vocab_size, source_vocab_size
        d = spec.d_model
        self.enc_cfg, self.dec_cfg = (spec.layer_config(spec.n_encoder_layer),
                                      spec.layer_config(spec.n_decoder_layer))
        self.tgt_emb = nn.Embedding(vocab_size, d)
        self.src_emb = self.tgt_emb if source_vocab_size is None else nn.Embedding(
            source_vocab_size, d)
        if spec.pos_emb == "learned":
            self.src_pos = nn.Embedding(spec.max_source_len, d)
            self.tgt_pos = nn.Embedding(spec.max_target_len, d)
        self.drop = nn.Dropout(spec.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(self.enc_cfg, spec.norm_first)
                                     for _ in range(spec.n_encoder_layer))
        self.decoder = nn.ModuleList(DecoderLayer(self.dec_cfg, spec.norm_first)
                                     for _ in range(spec.n_decoder_layer))
        self.enc_norm, self.dec_norm = nn.LayerNorm(d), nn.LayerNorm(d)
        self.out = Linear(d, vocab_size, bias=False)
        self.out.weight = self.tgt_emb.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Xavier-uniform matrices, zero biases (as `torch.nn.Transformer`); embeddings
        N(0, 1/d), so that embedding·√d has unit variance; unit norms."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for emb in (self.tgt_emb, self.src_emb):  # after the Linears: `out` shares tgt_emb
            nn.init.normal_(emb.weight, 0.0, self.spec.d_model ** -0.5)
        if self.spec.pos_emb == "learned":
            nn.init.normal_(self.src_pos.weight, 0.0, 0.02)
            nn.init.normal_(self.tgt_pos.weight, 0.0, 0.02)

    # ------------------------------------------------ the kind protocol (see lmlab.model)

    @classmethod
    def from_config_dict(cls, d: dict) -> "Seq2Seq":
        d = dict(d)
        vocab, source_vocab = d.pop("vocab_size", None), d.pop("source_vocab_size", None)
        known = {f.name for f in dataclasses.fields(Seq2SeqSpec)}
        unknown = sorted(set(d) - known)
        if unknown or not isinstance(vocab, int):
            raise ConfigError(f"seq2seq config: needs an integer vocab_size; unknown field(s) "
                              f"{unknown}; known: {sorted(known | {'source_vocab_size'})}")
        return cls(Seq2SeqSpec(**d), vocab, source_vocab)

    @classmethod
    def from_spec(cls, fields: dict) -> "Seq2Seq":
        known = {f.name for f in dataclasses.fields(Seq2SeqSpec)} | {"vocab_size",
                                                                    "source_vocab_size"}
        return cls.from_config_dict({k: v for k, v in fields.items() if k in known})

    def config_dict(self) -> dict:
        return {**dataclasses.asdict(self.spec), "vocab_size": self._vocab_size,
                "source_vocab_size": self.source_vocab_size}

    @property
    def vocab_size(self) -> int:
        """Target ids: what the decoder reads and predicts."""
        return self._vocab_size

    @property
    def max_seq_len(self) -> int:
        return self.spec.max_target_len

    @property
    def shared_vocab(self) -> bool:
        return self.source_vocab_size is None

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------ encoder and decoder

    def _embed(self, emb: nn.Embedding, table: nn.Embedding | None, ids: torch.Tensor,
               start: int = 0) -> torch.Tensor:
        """emb(ids)·√d + the positions start, start + 1, ..."""
        positions = torch.arange(start, start + ids.shape[1], device=ids.device)
        pos = sinusoidal_positions(positions, self.spec.d_model) if table is None else table(
            positions)
        return self.drop(emb(ids) * math.sqrt(self.spec.d_model) + pos)

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor | None = None) -> Encoded:
        """Right-padded source ids (B, S), each row `src_lengths` (B,) long → `Encoded`."""
        B, S = src.shape
        if S > self.spec.max_source_len:
            raise ValueError(f"source of {S} tokens > max_source_len {self.spec.max_source_len}")
        if src_lengths is None:
            src_lengths = torch.full((B,), S, device=src.device)
        key_mask = (torch.arange(S, device=src.device)[None, :]
                    < src_lengths.to(src.device)[:, None])[:, None, None]  # (B, 1, 1, S)
        x = self._embed(self.src_emb, getattr(self, "src_pos", None), src)
        for layer in self.encoder:
            x = layer(x, key_mask)
        return Encoded(self.enc_norm(x), key_mask)

    def _decode(self, tgt: torch.Tensor, cross: list[tuple[torch.Tensor, torch.Tensor]],
                key_mask: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The decoder's final hidden states (B, T, d) for target ids (B, T) after the cache."""
        start = cache.pos if cache is not None else 0
        if start + tgt.shape[1] > self.spec.max_target_len:
            raise ValueError(f"target of {start + tgt.shape[1]} tokens > max_target_len "
                             f"{self.spec.max_target_len}")
        x = self._embed(self.tgt_emb, getattr(self, "tgt_pos", None), tgt, start)
        for i, layer in enumerate(self.decoder):
            x = layer(x, cross[i], key_mask, cache, i)
        if cache is not None:
            cache.pos += tgt.shape[1]
        return self.dec_norm(x)

    def _cross(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [layer.cross.keys_values(memory) for layer in self.decoder]

    def forward(self, src: torch.Tensor, src_lengths: torch.Tensor | None, tgt_in: torch.Tensor,
                targets: torch.Tensor | None = None, reduction: str = "mean",
                label_smoothing: float = 0.0):
        """Teacher forcing: logits (B, T, V) of the next target token at every position of
        `tgt_in` (B, T: the start token, then the target shifted right).

        With `targets` (B, T; -100 = not counted) the cross-entropy instead, reduced as
        `linear_cross_entropy` reduces it; with `label_smoothing` ε > 0 the smoothed
        cross-entropy of `F.cross_entropy`: (1 − ε)·(−log p(y)) + ε·mean over v of −log p(v)
        ("mean", "sum" or "none").
        """
        enc = self.encode(src, src_lengths)
        h = self._decode(tgt_in, self._cross(enc.memory), enc.key_mask)
        if targets is None:
            return self.out(h)
        if not label_smoothing:
            return linear_cross_entropy(h, self.out.weight, targets, reduction=reduction)
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction {reduction!r} with label smoothing; use mean, sum, none")
        nats = F.cross_entropy(self.out(h).float().flatten(0, 1), targets.flatten(),
                               ignore_index=-100, label_smoothing=label_smoothing,
                               reduction=reduction)
        return nats.view(targets.shape) if reduction == "none" else nats

    # ------------------------------------------------ decoding (lmlab.infer.beam)

    def new_decode_state(self, batch_size: int, max_len: int, pad=None):
        """Not a language model: the decoder needs a source (`conditioned`, `start_decoding`)."""
        raise ConfigError("a seq2seq model writes a target for a source: use `lmlab seq2seq "
                          "generate --model DIR --input TEXT` or lmlab.load(DIR).seq2seq(texts)")

    def start_decoding(self, encoded: Encoded, max_len: int) -> Seq2SeqState:
        """A decode state for `max_len` target positions reading `encoded`'s memory."""
        p = self.tgt_emb.weight
        cache = KVCache(self.dec_cfg, encoded.memory.shape[0], max_len, p.device, p.dtype)
        return Seq2SeqState(cache, self._cross(encoded.memory), encoded.key_mask)

    def decode_step(self, ids: torch.Tensor, state: Seq2SeqState) -> torch.Tensor:
        """Feed target ids (B, T) after the cached ones; next-token logits (B, V) at the last."""
        h = self._decode(ids, state.cross, state.key_mask, state.cache)
        return self.out(h[:, -1])

    @staticmethod
    def reorder(state: Seq2SeqState, rows: torch.Tensor) -> Seq2SeqState:
        """The state of rows `rows` (N,) of `state`, in that order (a row may come twice)."""
        c = state.cache
        c.k = [t.index_select(0, rows) for t in c.k]
        c.v = [t.index_select(0, rows) for t in c.v]
        state.cross = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in state.cross]
        state.key_mask = state.key_mask.index_select(0, rows)
        return state

    def conditioned(self, encoded: Encoded) -> "Conditioned":
        return Conditioned(self, encoded)


class Conditioned(nn.Module):
    """The decoder of a `Seq2Seq` bound to encoded sources, as a decoder-only kind: every row's
    prompt is the start token, so `lmlab.infer.generate` decodes it like a language model."""

    def __init__(self, model: Seq2Seq, encoded: Encoded):
        super().__init__()
        self.model, self.encoded = model, encoded

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    @property
    def max_seq_len(self) -> int:
        return self.model.max_seq_len

    def new_decode_state(self, batch_size: int, max_len: int,
                         pad: torch.Tensor | None = None) -> Seq2SeqState:
        if pad is not None or batch_size != self.encoded.memory.shape[0]:
            raise ValueError("a conditioned decoder takes one equal-length prompt per source")
        return self.model.start_decoding(self.encoded, max_len)

    def decode_step(self, ids: torch.Tensor, state: Seq2SeqState) -> torch.Tensor:
        return self.model.decode_step(ids, state)
