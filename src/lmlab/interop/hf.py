"""Hugging Face checkpoints in and out: GPT-2, LLaMA, Qwen2, Qwen3, Mistral and BERT.

lmlab's Transformer is the same network as these five `transformers` models;
only the names and layouts of the weights differ:

| lmlab                     | GPT2LMHeadModel                  | Llama / Qwen2 / Qwen3 / Mistral  |
|---------------------------|----------------------------------|----------------------------------|
| tok_emb, pos_emb          | transformer.wte, transformer.wpe | model.embed_tokens (RoPE)        |
| blocks.i.norm1 / norm2    | h.i.ln_1 / ln_2                  | input_ / post_attention_layernorm |
| blocks.i.attn.qkv (fused) | h.i.attn.c_attn (fused, Conv1D)  | self_attn.q_proj, k_proj, v_proj |
| blocks.i.attn.q_norm, k_norm (`qk_norm`) | —                 | self_attn.q_norm, k_norm (Qwen3) |
| blocks.i.attn.proj        | h.i.attn.c_proj (Conv1D)         | self_attn.o_proj                 |
| blocks.i.mlp.fc (fused)   | h.i.mlp.c_fc (Conv1D)            | mlp.gate_proj, up_proj           |
| blocks.i.mlp.proj         | h.i.mlp.c_proj (Conv1D)          | mlp.down_proj                    |
| norm, lm_head             | transformer.ln_f, lm_head        | model.norm, lm_head              |

GPT-2's Conv1D stores a weight as (in, out), the transpose of `nn.Linear`. Both
sides use the "rotate half" RoPE layout, so Q and K rows need no permutation.
Where one side has a bias the other lacks (a bias-free lmlab GPT-2, or a LLaMA
with `attention_bias` but no MLP bias), the missing bias is zero on the other
side, which is the same function.

Export writes config.json and model.safetensors directly, so it needs neither
`transformers` nor network access; the tests load the result with
`transformers` to prove it. Import reads model.safetensors, a sharded
safetensors index, or pytorch_model.bin (through `torch.load(weights_only=True)`,
which unpickles tensors only), and writes an lmlab model directory.

Both carry generation_config.json: its `eos_token_id` (one id or a list) is
where generation stops, and a model that ends text with `</s>` or a chat turn
with `<|im_end|>` must stop there on both sides. Export writes the tokenizer's
`stop_ids` into it.

Qwen3 is Qwen2 without the fixed Q/K/V biases (its `attention_bias` covers Q, K,
V and O, as LLaMA's does) and with `qk_norm`: an RMSNorm over each query and
key head before RoPE. An lmlab model with `qk_norm` exports as Qwen3 (its MLP
biases, if `bias` gave it any, must be zero: an imported Qwen3's are).

Mistral's `sliding_window` (and Qwen2's and Qwen3's `use_sliding_window`, on the
layers `layer_types` marks "sliding_attention") is ignored: lmlab attends to all
past positions, which is the same computation for sequences no longer than the
window and differs only beyond it; the import says so in its log.

BERT (`BertForMaskedLM`) is lmlab's encoder (kind "bert", `lmlab.model.encoder`):

| lmlab (bert)                 | BertForMaskedLM                                           |
|------------------------------|-----------------------------------------------------------|
| tok_emb, pos_emb, type_emb   | bert.embeddings.word_ / position_ / token_type_embeddings |
| emb_norm                     | bert.embeddings.LayerNorm                                 |
| blocks.i.attn.qkv (fused)    | bert.encoder.layer.i.attention.self.query, key, value     |
| blocks.i.attn.proj, norm1    | ….attention.output.dense, ….attention.output.LayerNorm    |
| blocks.i.mlp.fc, proj, norm2 | ….intermediate.dense, ….output.dense, ….output.LayerNorm  |
| head_dense, head_norm        | cls.predictions.transform.dense, ….transform.LayerNorm    |
| lm_head (bias; weight tied)  | cls.predictions.bias (decoder.weight = word_embeddings)   |
| pooler                       | bert.pooler.dense                                         |

`BertForMaskedLM` has no pooler: an import without one keeps lmlab's fresh
pooler; an export writes it (as Google's checkpoints hold it; `transformers`
loads the MLM model without it, `BertForSequenceClassification` with it).
A BERT checkpoint's next-sentence head (`cls.seq_relationship`) is dropped.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from lmlab.errors import ConfigError, InputError
from lmlab.fileio import write_dir_atomically
from lmlab.outputs import absolute, claim_output_dir
from lmlab.model import ModelConfig, build_model
from lmlab.model_io import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    cast_parameters,
    copy_tokenizer_files,
    has_tokenizer_files,
    is_model_config,
    load_model_dir,
    load_state_dict_strict,
    read_safetensors,
    read_torch_file,
    save_model_dir,
)
from lmlab.tokenizer.bpe import GENERATION_CONFIG, TOKENIZER_FILE, Tokenizer

if TYPE_CHECKING:
    from lmlab.model import Transformer
    from lmlab.model.encoder import Encoder

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "qwen2", "qwen3", "mistral", "bert")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_ROPE_REQUIRED_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
# Buffers that some transformers versions saved with the weights; they are recomputed. And
# BERT's next-sentence head, which lmlab does not have.
_IGNORED_HF_KEYS = re.compile(r"(\.attn\.(bias|masked_bias)|\.rotary_emb\.inv_freq"
                              r"|(^|\.)embeddings\.position_ids)$|^cls\.seq_relationship\.")
# BERT's output bias: one tensor under two names, except in an untied transformers v5 model,
# whose decoder has its own (the one it uses)
_BERT_BIAS, _BERT_DECODER_BIAS = "cls.predictions.bias", "cls.predictions.decoder.bias"
_BERT_POOLER = "bert.pooler.dense.weight"


# ---------------------------------------------------------------- the name map

@dataclass(frozen=True)
class _Tensor:
    """One lmlab tensor and the Hugging Face tensor(s) it corresponds to.

    `ours` None: lmlab has no such tensor (it is zero); `hf` empty: HF has none.
    Several `hf` names are concatenated along dim 0 into `ours`, in `sizes` rows each.
    """

    ours: str | None
    hf: tuple[str, ...]
    sizes: tuple[int, ...] = ()
    transpose: bool = False  # GPT-2's Conv1D stores (in, out)


def _bias(ours: str, has_ours: bool, hf: tuple[str, ...], has_hf: bool,
          sizes: tuple[int, ...]) -> list[_Tensor]:
    if not (has_ours or has_hf):
        return []
    return [_Tensor(ours if has_ours else None, hf if has_hf else (), sizes)]


def _gpt2_tensors(cfg: ModelConfig) -> list[_Tensor]:
    """GPT2LMHeadModel always has every bias; a bias-free lmlab model maps to zeros."""
    d, ff = cfg.d_model, cfg.d_ff
    t = [_Tensor("tok_emb.weight", ("transformer.wte.weight",)),
         _Tensor("pos_emb.weight", ("transformer.wpe.weight",))]
    for i in range(cfg.n_layer):
        o, h = f"blocks.{i}.", f"transformer.h.{i}."
        t += [_Tensor(o + "norm1.weight", (h + "ln_1.weight",))]
        t += _bias(o + "norm1.bias", cfg.bias, (h + "ln_1.bias",), True, (d,))
        t += [_Tensor(o + "attn.qkv.weight", (h + "attn.c_attn.weight",), transpose=True)]
        t += _bias(o + "attn.qkv.bias", cfg.qkv_bias, (h + "attn.c_attn.bias",), True, (3 * d,))
        t += [_Tensor(o + "attn.proj.weight", (h + "attn.c_proj.weight",), transpose=True)]
        t += _bias(o + "attn.proj.bias", cfg.bias, (h + "attn.c_proj.bias",), True, (d,))
        t += [_Tensor(o + "norm2.weight", (h + "ln_2.weight",))]
        t += _bias(o + "norm2.bias", cfg.bias, (h + "ln_2.bias",), True, (d,))
        t += [_Tensor(o + "mlp.fc.weight", (h + "mlp.c_fc.weight",), transpose=True)]
        t += _bias(o + "mlp.fc.bias", cfg.bias, (h + "mlp.c_fc.bias",), True, (ff,))
        t += [_Tensor(o + "mlp.proj.weight", (h + "mlp.c_proj.weight",), transpose=True)]
        t += _bias(o + "mlp.proj.bias", cfg.bias, (h + "mlp.c_proj.bias",), True, (d,))
    t += [_Tensor("norm.weight", ("transformer.ln_f.weight",))]
    t += _bias("norm.bias", cfg.bias, ("transformer.ln_f.bias",), True, (d,))
    if not cfg.tie_embeddings:
        t.append(_Tensor("lm_head.weight", ("lm_head.weight",)))
    return t


@dataclass(frozen=True)
class _HFBiases:
    """Which biases a LLaMA-like Hugging Face model has."""

    qkv: bool
    o: bool
    mlp: bool


def _llama_tensors(cfg: ModelConfig, hf_bias: _HFBiases) -> list[_Tensor]:
    q, kv, ff = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.d_ff
    t = [_Tensor("tok_emb.weight", ("model.embed_tokens.weight",))]
    for i in range(cfg.n_layer):
        o, h = f"blocks.{i}.", f"model.layers.{i}."
        qkv = tuple(f"{h}self_attn.{p}_proj" for p in "qkv")
        gate_up = (h + "mlp.gate_proj", h + "mlp.up_proj")
        t += [_Tensor(o + "norm1.weight", (h + "input_layernorm.weight",)),
              _Tensor(o + "attn.qkv.weight", tuple(n + ".weight" for n in qkv), (q, kv, kv))]
        t += _bias(o + "attn.qkv.bias", cfg.qkv_bias,
                   tuple(n + ".bias" for n in qkv), hf_bias.qkv, (q, kv, kv))
        if cfg.qk_norm:
            t += [_Tensor(f"{o}attn.{n}_norm.weight", (f"{h}self_attn.{n}_norm.weight",))
                  for n in "qk"]
        t += [_Tensor(o + "attn.proj.weight", (h + "self_attn.o_proj.weight",))]
        t += _bias(o + "attn.proj.bias", cfg.bias, (h + "self_attn.o_proj.bias",), hf_bias.o,
                   (cfg.d_model,))
        t += [_Tensor(o + "norm2.weight", (h + "post_attention_layernorm.weight",)),
              _Tensor(o + "mlp.fc.weight", tuple(n + ".weight" for n in gate_up), (ff, ff))]
        t += _bias(o + "mlp.fc.bias", cfg.bias, tuple(n + ".bias" for n in gate_up), hf_bias.mlp,
                   (ff, ff))
        t += [_Tensor(o + "mlp.proj.weight", (h + "mlp.down_proj.weight",))]
        t += _bias(o + "mlp.proj.bias", cfg.bias, (h + "mlp.down_proj.bias",), hf_bias.mlp,
                   (cfg.d_model,))
    t += [_Tensor("norm.weight", ("model.norm.weight",))]
    if not cfg.tie_embeddings:
        t.append(_Tensor("lm_head.weight", ("lm_head.weight",)))
    return t


def _bert_tensors(cfg: ModelConfig, pooler: bool) -> list[_Tensor]:
    d = cfg.d_model
    e = "bert.embeddings."
    t = [_Tensor("tok_emb.weight", (e + "word_embeddings.weight",)),
         _Tensor("pos_emb.weight", (e + "position_embeddings.weight",)),
         _Tensor("type_emb.weight", (e + "token_type_embeddings.weight",))]
    for p in ("weight", "bias"):
        t.append(_Tensor(f"emb_norm.{p}", (f"{e}LayerNorm.{p}",)))
        for i in range(cfg.n_layer):
            o, h = f"blocks.{i}.", f"bert.encoder.layer.{i}."
            t += [_Tensor(f"{o}attn.qkv.{p}", tuple(f"{h}attention.self.{n}.{p}"
                                                    for n in ("query", "key", "value")),
                          (d, d, d)),
                  _Tensor(f"{o}attn.proj.{p}", (f"{h}attention.output.dense.{p}",)),
                  _Tensor(f"{o}norm1.{p}", (f"{h}attention.output.LayerNorm.{p}",)),
                  _Tensor(f"{o}mlp.fc.{p}", (f"{h}intermediate.dense.{p}",)),
                  _Tensor(f"{o}mlp.proj.{p}", (f"{h}output.dense.{p}",)),
                  _Tensor(f"{o}norm2.{p}", (f"{h}output.LayerNorm.{p}",))]
        t += [_Tensor(f"head_dense.{p}", (f"cls.predictions.transform.dense.{p}",)),
              _Tensor(f"head_norm.{p}", (f"cls.predictions.transform.LayerNorm.{p}",))]
        if pooler:
            t.append(_Tensor(f"pooler.{p}", (f"bert.pooler.dense.{p}",)))
    t.append(_Tensor("lm_head.bias", (_BERT_BIAS,)))
    if not cfg.tie_embeddings:
        t.append(_Tensor("lm_head.weight", ("cls.predictions.decoder.weight",)))
    return t


def _hf_biases(hf_config: dict[str, Any]) -> _HFBiases:
    model_type = hf_config["model_type"]
    if model_type == "qwen2":  # fixed by the architecture, not by a config field
        return _HFBiases(qkv=True, o=False, mlp=False)
    if model_type == "mistral":
        return _HFBiases(qkv=False, o=False, mlp=False)
    attention_bias = bool(hf_config.get("attention_bias", False))
    mlp_bias = bool(hf_config.get("mlp_bias", False))
    return _HFBiases(qkv=attention_bias, o=attention_bias, mlp=mlp_bias)


# ---------------------------------------------------------------- configs

def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from a transformers v4 (`rope_theta`, `rope_scaling`)
    or v5 (`rope_parameters`, theta inside) config."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise InputError(f"partial_rotary_factor={partial} is not supported; lmlab rotates the "
                         "whole head")
    if kind not in SUPPORTED_ROPE_TYPES:
        raise InputError(f"rope scaling type {kind!r} is not supported; "
                         f"supported: {list(SUPPORTED_ROPE_TYPES)}")
    if kind == "default":
        return theta, None
    missing = [k for k in _ROPE_REQUIRED_KEYS[kind] if k not in params]
    if missing:
        raise InputError(f"rope scaling {kind!r} lacks {missing}; fix config.json")
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "type")}
    scaling["rope_type"] = kind
    return theta, scaling


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """The lmlab ModelConfig of a Hugging Face config.json (as a dict)."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InputError(f"model_type {model_type!r} is not supported; "
                         f"supported: {list(SUPPORTED_MODEL_TYPES)}")
    # lmlab's dropout is for training; an imported model starts without it, as in inference.
    try:
        if model_type == "gpt2":
            return _gpt2_config_from_hf(hf)
        if model_type == "bert":
            return _bert_config_from_hf(hf)
        return _llama_config_from_hf(hf)
    except KeyError as e:
        raise InputError(f"{model_type} config lacks the field {e.args[0]!r}") from e
    except ConfigError as e:
        raise InputError(str(e)) from e


def _gpt2_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):  # both are the tanh approximation
        raise InputError(f"gpt2 activation_function {act!r} is not supported; "
                         "lmlab uses 'gelu_new'")
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        raise InputError("gpt2 with non-standard attention scaling (scale_attn_weights=false or "
                         "scale_attn_by_inverse_layer_idx=true) is not supported")
    if hf.get("add_cross_attention"):
        raise InputError("gpt2 with cross-attention is an encoder-decoder; not supported")
    d = hf["n_embd"]
    return ModelConfig(
        vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_head=hf["n_head"], d_model=d,
        d_ff=hf.get("n_inner") or 4 * d, max_seq_len=hf["n_positions"],
        pos_emb="learned", norm="layernorm", mlp="gelu", bias=True, qkv_bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), init_std=hf.get("initializer_range", 0.02),
    )


def _bert_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    act = hf.get("hidden_act", "gelu")
    mlp = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu"}.get(act)
    if mlp is None:
        raise InputError(f"bert hidden_act {act!r} is not supported; lmlab has 'gelu' (exact) "
                         "and 'gelu_new'")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise InputError(f"bert position_embedding_type {hf['position_embedding_type']!r} is "
                         "not supported; lmlab's encoder has absolute positions")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise InputError("bert with is_decoder or add_cross_attention is not an encoder; "
                         "not supported")
    return ModelConfig(
        vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"], d_model=hf["hidden_size"],
        d_ff=hf["intermediate_size"], max_seq_len=hf["max_position_embeddings"],
        pos_emb="learned", norm="layernorm", mlp=mlp, bias=True, qkv_bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True),
        norm_eps=hf.get("layer_norm_eps", 1e-12), init_std=hf.get("initializer_range", 0.02),
    )


def _llama_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    model_type = hf["model_type"]
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise InputError(f"{model_type} hidden_act {act!r} is not supported; "
                         "lmlab's SwiGLU uses 'silu'")
    theta, scaling = _rope_from_hf(hf)
    biases = _hf_biases(hf)
    n_head = hf["num_attention_heads"]
    return ModelConfig(
        vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head, d_model=hf["hidden_size"],
        d_ff=hf["intermediate_size"], head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head,
        max_seq_len=hf.get("max_position_embeddings", 2048),
        pos_emb="rope", norm="rmsnorm", mlp="swiglu",
        # lmlab's `bias` covers the output and MLP projections, `qkv_bias` Q/K/V
        bias=biases.o or biases.mlp, qkv_bias=biases.qkv, qk_norm=model_type == "qwen3",
        tie_embeddings=hf.get("tie_word_embeddings", False),
        norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
        init_std=hf.get("initializer_range", 0.02),
    )


def _ignored_sliding_window(hf: dict[str, Any]) -> int | None:
    """The attention window `transformers` would apply and lmlab does not: Mistral's always,
    Qwen2's and Qwen3's with `use_sliding_window`, unless `layer_types` marks no layer
    "sliding_attention"."""
    window = hf.get("sliding_window")
    if not window:
        return None
    if hf.get("model_type") == "mistral":
        return window
    layer_types = hf.get("layer_types")
    if hf.get("use_sliding_window") and (layer_types is None
                                         or "sliding_attention" in layer_types):
        return window
    return None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _common_hf_config(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    return {"vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
            "initializer_range": cfg.init_std,
            # v4 reads torch_dtype, v5 dtype
            "torch_dtype": _dtype_name(dtype), "dtype": _dtype_name(dtype)}


def bert_hf_config(cfg: ModelConfig, type_vocab_size: int,
                   dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The Hugging Face config.json (as a dict) of an lmlab encoder (kind "bert")."""
    problems = [f"{k}={v!r}" for k, v, ok in (
        ("norm", cfg.norm, cfg.norm == "layernorm"), ("bias", cfg.bias, cfg.bias),
        ("qkv_bias", cfg.qkv_bias, cfg.qkv_bias),
        ("n_kv_head", cfg.n_kv_head, cfg.n_kv_head == cfg.n_head),
        ("head_dim", cfg.head_dim, cfg.head_dim * cfg.n_head == cfg.d_model),
        ("qk_norm", cfg.qk_norm, not cfg.qk_norm),
    ) if not ok]
    if problems:
        raise InputError(f"an encoder exports as BERT, which cannot express {', '.join(problems)}")
    return {
        "architectures": ["BertForMaskedLM"], "model_type": "bert",
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "intermediate_size": cfg.d_ff,
        "hidden_act": "gelu" if cfg.mlp == "gelu_exact" else "gelu_new",
        "max_position_embeddings": cfg.max_seq_len, "type_vocab_size": type_vocab_size,
        "layer_norm_eps": cfg.norm_eps, "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.dropout, "position_embedding_type": "absolute",
        "is_decoder": False, **_common_hf_config(cfg, dtype),
    }


def hf_config_from(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The Hugging Face config.json (as a dict) of an lmlab ModelConfig."""
    common = _common_hf_config(cfg, dtype)
    if cfg.pos_emb == "learned":
        problems = [f"{k}={v!r}" for k, v, ok in (
            ("norm", cfg.norm, cfg.norm == "layernorm"),
            ("mlp", cfg.mlp, cfg.mlp == "gelu"),
            ("n_kv_head", cfg.n_kv_head, cfg.n_kv_head == cfg.n_head),
            ("head_dim", cfg.head_dim, cfg.head_dim * cfg.n_head == cfg.d_model),
            ("qk_norm", cfg.qk_norm, not cfg.qk_norm),
        ) if not ok]
        if problems:
            raise InputError(f"a learned-position model exports as GPT-2, which cannot express "
                             f"{', '.join(problems)}")
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "n_positions": cfg.max_seq_len, "n_embd": cfg.d_model, "n_layer": cfg.n_layer,
            "n_head": cfg.n_head, "n_inner": cfg.d_ff, "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, **common,
        }
    problems = [f"{k}={v!r}" for k, v, ok in (
        ("norm", cfg.norm, cfg.norm == "rmsnorm"), ("mlp", cfg.mlp, cfg.mlp == "swiglu"),
    ) if not ok]
    if problems:
        raise InputError(f"a RoPE model exports as LLaMA, which cannot express "
                         f"{', '.join(problems)}")
    scaling = None
    if cfg.rope_scaling:
        scaling = dict(cfg.rope_scaling)
        scaling["rope_type"] = scaling.pop("type", scaling.get("rope_type", "default"))
    llama_like = {
        "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        # v4 reads rope_theta + rope_scaling, v5 rope_parameters; both say the same
        "rope_theta": cfg.rope_theta, "rope_scaling": scaling,
        "rope_parameters": {"rope_type": "default", **(scaling or {}),
                            "rope_theta": cfg.rope_theta},
        "attention_dropout": cfg.dropout, **common,
    }
    if cfg.qk_norm:  # Qwen3: attention_bias covers Q, K, V and O; the MLP has no biases
        return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
                "attention_bias": bool(cfg.qkv_bias or cfg.bias), "use_sliding_window": False,
                "sliding_window": None, **llama_like}
    if cfg.qkv_bias and not cfg.bias:  # biases on Q, K, V only: exactly Qwen2
        return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                "use_sliding_window": False, **llama_like}
    # LLaMA's attention_bias covers Q, K, V and O together; a side lmlab lacks is zero
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "attention_bias": bool(cfg.qkv_bias or cfg.bias), "mlp_bias": bool(cfg.bias),
            **llama_like}


def _tensor_map(cfg: ModelConfig, hf_config: dict[str, Any]) -> list[_Tensor]:
    if hf_config["model_type"] == "gpt2":
        return _gpt2_tensors(cfg)
    return _llama_tensors(cfg, _hf_biases(hf_config))


# ---------------------------------------------------------------- state dicts

def to_hf_state_dict(model: Transformer | Encoder
                     ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(Hugging Face config dict, Hugging Face state dict) of an lmlab model.

    Tensors are fresh copies (safetensors refuses views that share storage); a
    tied output head is left out, as `transformers` saves it.
    """
    if model.kind not in ("transformer", "bert"):
        raise InputError(f"model kind {model.kind!r} has no Hugging Face counterpart; "
                         "export-hf takes a transformer or a bert")
    cfg = model.cfg
    ours = model.state_dict()
    dtype = model.tok_emb.weight.dtype
    if model.kind == "bert":
        hf_config = bert_hf_config(cfg, model.type_vocab_size, dtype)
        tensors = _bert_tensors(cfg, pooler=True)
    else:
        hf_config = hf_config_from(cfg, dtype)
        tensors = _tensor_map(cfg, hf_config)
    state: dict[str, torch.Tensor] = {}
    for t in tensors:
        if not t.hf:
            # hf_config_from picks an architecture with every bias lmlab has, except Qwen3,
            # whose MLP has none: a zero bias (an imported Qwen3's) is the same function
            if t.ours is not None and bool(ours[t.ours].any()):
                raise InputError(f"{t.ours} is not zero and {hf_config['architectures'][0]} "
                                 "has no such bias; train with model.bias=false to export it")
            continue
        if t.ours is None:
            for name, size in zip(t.hf, t.sizes):
                state[name] = torch.zeros(size, dtype=dtype)
            continue
        tensor = ours[t.ours].detach().cpu()
        if t.transpose:
            tensor = tensor.t()
        parts = tensor.split(list(t.sizes)) if len(t.hf) > 1 else (tensor,)
        for name, part in zip(t.hf, parts):
            state[name] = part.contiguous().clone()
    if model.kind == "bert" and not cfg.tie_embeddings:
        state[_BERT_DECODER_BIAS] = state[_BERT_BIAS].clone()
    return hf_config, state


def _canonical_hf_keys(model_type: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Prefix the keys of a bare base model (GPT2Model, LlamaModel, BertModel, old hub GPT-2
    files) as the *ForCausalLM / BertForMaskedLM class names them, rename old BERT files'
    LayerNorm.gamma / beta, and drop recomputed buffers."""
    prefix = {"gpt2": "transformer.", "bert": "bert."}.get(model_type, "model.")
    head = "cls." if model_type == "bert" else "lm_head."
    out = {}
    for key, value in state.items():
        if _IGNORED_HF_KEYS.search(key) or not isinstance(value, torch.Tensor):
            continue
        if not key.startswith(prefix) and not key.startswith(head):
            key = prefix + key
        if model_type == "bert":  # old files name a LayerNorm's weight and bias gamma, beta
            key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", key)
            key = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key)
        out[key] = value
    if model_type == "bert" and _BERT_DECODER_BIAS in out:  # the bias the decoder adds
        out[_BERT_BIAS] = out.pop(_BERT_DECODER_BIAS)
    return out


def from_hf(hf_config: dict[str, Any], state_dict: dict[str, torch.Tensor]
            ) -> Transformer | Encoder:
    """An lmlab Transformer (a BERT: an Encoder) holding the weights of a Hugging Face
    checkpoint.

    The weights keep their stored dtype. A checkpoint without `lm_head.weight`
    ties the output head to the embedding, as `transformers` does.
    """
    model_type = hf_config["model_type"]
    cfg = config_from_hf(hf_config)
    hf_state = _canonical_hf_keys(model_type, state_dict)
    head = "cls.predictions.decoder.weight" if model_type == "bert" else "lm_head.weight"
    if not cfg.tie_embeddings and head not in hf_state:
        cfg.tie_embeddings = True
    if cfg.tie_embeddings:
        # transformers ignores a stored head when the config ties it; so do we
        hf_state.pop(head, None)
    if model_type == "bert":
        kind = "bert"
        config = {**cfg.to_dict(), "type_vocab_size": hf_config.get("type_vocab_size", 2)}
        tensors = _bert_tensors(cfg, pooler=_BERT_POOLER in hf_state)
    else:
        kind, config, tensors = "transformer", cfg.to_dict(), _tensor_map(cfg, hf_config)

    ours: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    for t in tensors:
        if t.ours is None:
            continue  # config_from_hf gives lmlab every bias HF has; else "unexpected" below
        if not t.hf:  # a bias lmlab's config must have for another side's sake: zero here
            ours[t.ours] = torch.zeros(sum(t.sizes))
            continue
        absent = [n for n in t.hf if n not in hf_state]
        if absent:
            missing += absent
            continue
        used.update(t.hf)
        parts = [hf_state[n] for n in t.hf]
        tensor = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
        ours[t.ours] = tensor.t() if t.transpose else tensor
    unexpected = sorted(set(hf_state) - used)
    if missing or unexpected:
        raise InputError(
            f"{hf_config['model_type']} weights do not match config.json: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}"
        )
    model = build_model(kind, config)
    if kind == "bert" and _BERT_POOLER not in hf_state:
        # BertForMaskedLM has no pooler: lmlab's stays as initialised, for fine-tuning to train
        ours.update({k: v for k, v in model.state_dict().items() if k.startswith("pooler.")})
    load_state_dict_strict(model, ours, f"{hf_config['model_type']} checkpoint")
    cast_parameters(model, ours["tok_emb.weight"].dtype)
    return model.eval()


# ---------------------------------------------------------------- directories

def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from e


def _load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    state = read_torch_file(path, "PyTorch weights file")
    if not isinstance(state, dict):
        raise InputError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    return state


def load_hf_state_dict(hf_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All weights of a Hugging Face model directory, single-file or sharded."""
    root = Path(hf_dir)
    for index_name, load in (("model.safetensors.index.json", read_safetensors),
                             ("pytorch_model.bin.index.json", _load_torch_file)):
        single = root / index_name.removesuffix(".index.json")
        if single.is_file():
            return load(single)
        if (root / index_name).is_file():
            weight_map = _read_json(root / index_name).get("weight_map", {})
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                if not (root / shard).is_file():
                    raise InputError(f"{root / shard}: shard named in {index_name} is missing")
                state.update(load(root / shard))
            return state
    raise InputError(f"{root}: no weights found (model.safetensors, model.safetensors.index.json "
                     "or pytorch_model.bin)")


def import_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike,
              overwrite: bool = False) -> Path:
    """Convert a Hugging Face model directory into an lmlab model directory at `out_dir`
    (an existing `out_dir` only if it holds this import of the same directory, or with
    `overwrite`: see `lmlab.outputs`)."""
    root = Path(hf_dir)
    claim = claim_output_dir(out_dir, "import-hf", {"hf_dir": absolute(root)}, reads=[root],
                             overwrite=overwrite)
    if not (root / CONFIG_FILE).is_file():
        raise InputError(f"{root}: no {CONFIG_FILE}; expected a Hugging Face model directory")
    hf_config = _read_json(root / CONFIG_FILE)
    if is_model_config(hf_config):
        raise InputError(f"{root}: already an lmlab model directory; use it as it is")
    try:
        config_from_hf(hf_config)  # refuse an unsupported model before reading its weights
        state = load_hf_state_dict(root)
        model = from_hf(hf_config, state)
    except InputError as e:
        raise InputError(str(e) if str(root) in str(e) else f"{root}: {e}") from e
    window = _ignored_sliding_window(hf_config)
    if window:
        logger.info("%s: sliding_window=%d is ignored; the model is the same for sequences up to "
                    "%d tokens and attends further back beyond them", root, window, window)
    tokenizer_dir = root if has_tokenizer_files(root) else None
    if (root / TOKENIZER_FILE).is_file():
        tokenizer = Tokenizer.load(root)  # its special tokens must resolve: refuse now, not later
        if tokenizer.vocab_size > model.cfg.vocab_size:
            logger.warning("%s: the tokenizer has %d ids but the model only %d; ids beyond them "
                           "fail to encode into the model", root, tokenizer.vocab_size,
                           model.cfg.vocab_size)
    elif tokenizer_dir is not None:
        logger.warning("%s has no tokenizer.json (only a slow tokenizer's files); lmlab needs "
                       "tokenizer.json: save the tokenizer with transformers to get one", root)
    generation = _generation_config_text(root, hf_config)
    logger.info("imported %s (%s, %d parameters) into %s", root, hf_config["model_type"],
                model.num_params(), out_dir)

    def write_files(directory: Path) -> None:
        save_model_dir(model, directory, tokenizer_dir=tokenizer_dir)
        if generation is not None:  # lmlab.tokenizer reads the stop ids from it
            (directory / GENERATION_CONFIG).write_text(generation, encoding="utf-8")

    # save_model_dir fills the staging directory; it then appears at out_dir whole
    out = write_dir_atomically(out_dir, write_files, last=CONFIG_FILE, replace=True)
    claim.record()
    return out


def _generation_config_text(root: Path, hf_config: dict[str, Any]) -> str | None:
    """generation_config.json for the imported model: the Hugging Face directory's own, else
    the special token ids of its config.json, from which `transformers` would derive one."""
    path = root / GENERATION_CONFIG
    if path.is_file():
        _read_json(path)  # refuse a malformed file before writing anything
        return path.read_text(encoding="utf-8")
    ids = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
           if hf_config.get(k) is not None}
    return json.dumps(ids, indent=2) if ids else None


def _generation_config(root: Path, tokenizer: Tokenizer | None) -> dict[str, Any] | None:
    """generation_config.json for an export, with the tokenizer's stop ids as `eos_token_id`
    so that `transformers`' generate stops where lmlab's does; other settings (sampling
    defaults an imported model came with) are kept."""
    path = root / GENERATION_CONFIG
    config = _read_json(path) if path.is_file() else {}
    if not isinstance(config, dict):
        raise InputError(f"{path}: expected a JSON object; fix or delete the file")
    if tokenizer is None:
        return config or None
    stops = tokenizer.stop_ids
    config.update({"bos_token_id": tokenizer.bos_id,
                   "eos_token_id": stops[0] if len(stops) == 1 else (stops or None),
                   "pad_token_id": tokenizer.pad_id})
    return config


def export_hf(model_dir: str | os.PathLike, out_dir: str | os.PathLike,
              overwrite: bool = False) -> Path:
    """Write the lmlab model directory `model_dir` as a Hugging Face model directory
    (an existing `out_dir` only if it holds this export of the same model, or with
    `overwrite`: see `lmlab.outputs`)."""
    root = Path(model_dir)
    claim = claim_output_dir(out_dir, "export-hf", {"model": absolute(root)}, reads=[root],
                             overwrite=overwrite)
    from lmlab.finetune.lora import merge_adapters

    model = merge_adapters(load_model_dir(root))  # a LoRA run: W + (alpha/r)·B A folded in
    try:
        hf_config, state = to_hf_state_dict(model)
    except InputError as e:
        raise InputError(f"{root}: {e}") from e
    tokenizer = Tokenizer.load(root) if (root / TOKENIZER_FILE).is_file() else None
    # explicit None: transformers' defaults (GPT-2's 50256, LLaMA's 1 and 2) name tokens of
    # another vocabulary
    hf_config.update({"bos_token_id": None, "eos_token_id": None, "pad_token_id": None})
    if tokenizer is not None:
        hf_config.update({"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
                          "pad_token_id": tokenizer.pad_id})
    generation = _generation_config(root, tokenizer)
    if not has_tokenizer_files(root):
        logger.info("%s has no tokenizer files; exporting the weights alone", root)

    def write_files(directory: Path) -> None:
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        copy_tokenizer_files(root, directory)
        if generation is not None:
            (directory / GENERATION_CONFIG).write_text(json.dumps(generation, indent=2),
                                                       encoding="utf-8")
        with open(directory / CONFIG_FILE, "w", encoding="utf-8") as f:
            json.dump(hf_config, f, indent=2)

    out = write_dir_atomically(out_dir, write_files, last=CONFIG_FILE, replace=True)
    claim.record()
    return out
