"""The architecture of a decoder-only Transformer, as one dataclass.

GPT-2 and LLaMA are the same network with different switches:

| switch        | GPT-2            | LLaMA / Qwen2 / Mistral       |
|---------------|------------------|-------------------------------|
| `pos_emb`     | "learned"        | "rope"                        |
| `norm`        | "layernorm"      | "rmsnorm"                     |
| `mlp`         | "gelu"           | "swiglu"                      |
| `bias`        | True             | False                         |
| `qkv_bias`    | True             | False (Qwen2: True)           |
| `n_kv_head`   | = n_head         | < n_head (grouped-query attn) |
| `qk_norm`     | False            | False (Qwen3: True)           |

("gelu" is GPT-2's tanh approximation; BERT's exact GELU is `mlp="gelu_exact"`.)
The BERT-style encoder (kind "bert", `lmlab.model.encoder`) takes the same
config for its shapes; its sizes are the `bert-*` presets of `ENCODER_PRESETS`.

Presets are built from a few dials (depth, width, heads) so that a user picks a
size by name and every other number follows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from lmlab.checks import check_fields
from lmlab.errors import ConfigError


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    n_layer: int = 6
    n_head: int = 6
    n_kv_head: int | None = None  # None: same as n_head (multi-head attention)
    d_model: int = 384
    d_ff: int | None = None  # None: 4*d_model (gelu) or the LLaMA rule (swiglu)
    head_dim: int | None = None  # None: d_model // n_head
    max_seq_len: int = 256
    pos_emb: Literal["learned", "rope"] = "learned"
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    mlp: Literal["gelu", "gelu_exact", "swiglu"] = "gelu"
    bias: bool = True  # biases in every Linear and LayerNorm
    qkv_bias: bool | None = None  # None: same as `bias`; Qwen2 has qkv biases only
    qk_norm: bool = False  # RMSNorm over each query and key head before RoPE (Qwen3)
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # HF-style rope scaling dict, e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    rope_scaling: dict[str, Any] | None = None
    dropout: float = 0.0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        check_fields(self, "model.", vocab_size=">=1", n_layer=">=1", n_head=">=1",
                     n_kv_head=">=1", d_model=">=1", d_ff=">=1", head_dim=">=1",
                     max_seq_len=">=1", norm_eps=">0", rope_theta=">0", dropout="[0,1)",
                     init_std=">=0")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.qkv_bias is None:
            self.qkv_bias = self.bias
        if self.head_dim is None:
            if self.d_model % self.n_head:
                raise ConfigError(
                    f"model: d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                    "change one of them or set head_dim"
                )
            self.head_dim = self.d_model // self.n_head
        if self.n_head % self.n_kv_head:
            raise ConfigError(
                f"model: n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}"
            )
        if self.d_ff is None:
            if self.mlp == "swiglu":
                # LLaMA: 2/3 of 4*d, rounded up to a multiple of 64 for fast matmuls
                self.d_ff = 64 * ((int(8 * self.d_model / 3) + 63) // 64)
            else:
                self.d_ff = 4 * self.d_model
        for name, allowed in (
            ("pos_emb", ("learned", "rope")),
            ("norm", ("layernorm", "rmsnorm")),
            ("mlp", ("gelu", "gelu_exact", "swiglu")),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"model.{name}={getattr(self, name)!r}; expected one of {allowed}")
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise ConfigError(f"model: RoPE needs an even head_dim, got {self.head_dim}")

    @property
    def family(self) -> str:
        return "gpt2" if self.pos_emb == "learned" else "llama"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"model config: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count computed from the config (matches the built module)."""
        d, hd, L = self.d_model, self.head_dim, self.n_layer
        q, kv = self.n_head * hd, self.n_kv_head * hd
        b = 1 if self.bias else 0
        qb = 1 if self.qkv_bias else 0
        norm = d * (2 if (self.norm == "layernorm" and self.bias) else 1)
        qk = 2 * hd if self.qk_norm else 0  # the query and key norms' gains
        attn = d * (q + 2 * kv) + qb * (q + 2 * kv) + q * d + b * d + qk
        n_in = 2 * self.d_ff if self.mlp == "swiglu" else self.d_ff
        mlp = d * n_in + b * n_in + self.d_ff * d + b * d
        total = L * (attn + mlp + 2 * norm) + norm
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        if self.pos_emb == "learned":
            emb += self.max_seq_len * d
        return total if non_embedding else total + emb

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6N for the matmuls plus the attention scores (PaLM, App. B)."""
        T = seq_len or self.max_seq_len
        # the output projection is a matmul whether or not its weight is tied
        n = self.num_params(non_embedding=True) + self.vocab_size * self.d_model
        return 6 * n + 12 * self.n_layer * self.n_head * self.head_dim * T


def _gpt2(n_layer: int, d_model: int, n_head: int, **kw) -> dict[str, Any]:
    return dict(n_layer=n_layer, d_model=d_model, n_head=n_head, **kw)


def _llama(n_layer: int, d_model: int, n_head: int, n_kv_head: int, **kw) -> dict[str, Any]:
    base = dict(
        pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False,
        norm_eps=1e-5, rope_theta=10000.0,
    )
    base.update(kw)
    return dict(n_layer=n_layer, d_model=d_model, n_head=n_head, n_kv_head=n_kv_head, **base)


# name -> config fields; vocab_size and max_seq_len can be overridden by the caller
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": _gpt2(2, 128, 4, max_seq_len=256),
    "small": _gpt2(6, 384, 6, max_seq_len=256),
    "gpt2-124m": _gpt2(12, 768, 12, max_seq_len=1024, vocab_size=50257),
    "gpt2-350m": _gpt2(24, 1024, 16, max_seq_len=1024, vocab_size=50257),
    "llama-tiny": _llama(2, 128, 4, 2, max_seq_len=256),
    "llama-small": _llama(6, 384, 6, 2, max_seq_len=256, tie_embeddings=True),
    "llama-1b": _llama(16, 2048, 32, 8, d_ff=8192, max_seq_len=2048, vocab_size=128256,
                       rope_theta=500000.0, tie_embeddings=True),
}


def _bert(n_layer: int, d_model: int, n_head: int, **kw) -> dict[str, Any]:
    base = dict(mlp="gelu_exact", norm_eps=1e-12, max_seq_len=512, vocab_size=30522)
    base.update(kw)
    return dict(n_layer=n_layer, d_model=d_model, n_head=n_head, **base)


# the bert kind's sizes: Google's BERT-Tiny, -Mini, -Small (Turc et al. 2019) and BERT-Base
ENCODER_PRESETS: dict[str, dict[str, Any]] = {
    "bert-tiny": _bert(2, 128, 2),
    "bert-mini": _bert(4, 256, 4),
    "bert-small": _bert(4, 512, 8),
    "bert-base": _bert(12, 768, 12),
}


def preset(name: str, presets: dict[str, dict[str, Any]] = PRESETS,
           **overrides: Any) -> ModelConfig:
    """A named size, e.g. ``preset("small", vocab_size=8192)`` (`presets`: the table to look in)."""
    if name not in presets:
        hint = (" (an encoder's: set --model.kind bert)"
                if presets is PRESETS and name in ENCODER_PRESETS else "")
        raise ConfigError(f"unknown model preset {name!r}{hint}; choose one of {sorted(presets)}")
    fields = dict(presets[name])
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return ModelConfig.from_dict(fields)
