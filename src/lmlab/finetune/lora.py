"""LoRA: low-rank adapters on a frozen model (Hu et al. 2021).

A weight matrix W (out × in) stays frozen; the layer learns a low-rank update

    y = W x + b + (alpha / r) · B A dropout(x),      A: r × in,  B: out × r

with A drawn Kaiming-uniform (as PEFT draws it) and B = 0, so training starts
from the base model exactly. A step trains r·(in + out) numbers per layer
instead of in·out, and AdamW keeps two moments of those alone: the optimizer
state of a rank-8 adapter on a 512 × 512 layer is 1/32 of the full one.

lmlab fuses projections (Q|K|V rows in `attn.qkv`, SwiGLU's gate|up in `mlp.fc`),
so each part of a fused layer gets its own A and B on its slice of the output
rows. Target names are the parts, which map 1:1 to Hugging Face's modules:

    q k v    attn.qkv's slices        q_proj k_proj v_proj (GPT-2: c_attn, fused)
    o        attn.proj                o_proj (c_proj)
    gate up  mlp.fc's halves          gate_proj up_proj (a GELU MLP's fc is "up": c_fc)
    down     mlp.proj                 down_proj (mlp.c_proj)
    lm_head  the output layer         lm_head (not in "all-linear")

The k adapted parts of one layer are one adapter of rank k·r: their A stacked,
their B block-diagonal (`LoraAdapter.factors`) — one pair of small matmuls per
layer in the forward pass, and exactly the form PEFT needs for GPT-2's fused
c_attn. The output layer's adapter is a parametrization of `lm_head.weight`
(W ↦ W + ΔW), because the Transformer's loss reads that weight directly
(`linear_cross_entropy`, no logits); it has no dropout.

`apply_lora` puts adapters in place and freezes the rest (a classifier's new
`head` stays trainable); a run then saves adapters only (`lmlab.model_io`
records the base directory it needs). `merge_lora` folds W + (alpha/r)·B A
into a plain model directory; `export_peft` writes the adapters as PEFT loads
them on the `export-hf` of the base.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

from lmlab.config import LoraSpec
from lmlab.errors import ConfigError, InputError
from lmlab.fileio import write_dir_atomically
from lmlab.model.transformer import MLP, Attention, Linear
from lmlab.outputs import absolute, claim_output_dir

log = logging.getLogger(__name__)

TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "lm_head")
ALL_LINEAR = ("q", "k", "v", "o", "gate", "up", "down")
LM_KINDS = ("transformer", "bert")  # the kinds whose layers LoRA adapts (a classifier: its body)
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


# ------------------------------------------------------------------ the layers

class LoraAdapter(nn.Module):
    """ΔW = (alpha/r)·B A on some parts of one layer's output rows (the other rows: 0).

    `parts` names every slice of the layer's output, in order, with its size
    (attn.qkv: q, k, v); `adapted` are those that get an A (r × in) and a B
    (size × r). `enabled` False makes the adapter contribute nothing
    (`adapters_disabled`)."""

    def __init__(self, in_features: int, parts: list[tuple[str, int]], adapted: list[str],
                 r: int, alpha: float, dropout: float, like: torch.Tensor, init: bool = True):
        super().__init__()
        self.parts, self.r, self.scale = parts, r, alpha / r
        kw = dict(dtype=like.dtype, device=like.device)
        self.A = nn.ParameterDict({p: nn.Parameter(torch.zeros(r, in_features, **kw))
                                   for p, _ in parts if p in adapted})
        self.B = nn.ParameterDict({p: nn.Parameter(torch.zeros(n, r, **kw))
                                   for p, n in parts if p in adapted})
        if init:
            for a in self.A.values():
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's default draw
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.enabled = True

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (k·r × in), B (out × k·r)) of the k adapted parts, ΔW = scale · B A: the A's
        stacked, the B's block-diagonal, zero rows for the parts not adapted."""
        if len(self.parts) == 1:  # o, down, lm_head, a GELU MLP's up: A and B as they are
            (p, _), = self.parts
            return self.A[p], self.B[p]
        # the adapted parts in row order (a ParameterDict keeps its keys sorted)
        adapted = [p for p, _ in self.parts if p in self.A]
        k, r, rows = len(adapted), self.r, []
        for p, n in self.parts:
            if p in self.B:
                j = adapted.index(p)
                rows.append(F.pad(self.B[p], (j * r, (k - j - 1) * r)))
            else:
                rows.append(self.B[adapted[0]].new_zeros(n, k * r))
        return torch.cat([self.A[p] for p in adapted]), torch.cat(rows)

    def delta_weight(self) -> torch.Tensor:
        """ΔW (out × in), computed in float32 and returned in the adapter's dtype."""
        a, b = self.factors()
        return (self.scale * (b.float() @ a.float())).to(a.dtype)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + ΔW x, as two thin products (never the out × in matrix), the second one
        accumulating into y with the scale (`addmm`: no separate passes to scale and add)."""
        a, b = self.factors()
        h = F.linear(self.dropout(x), a)
        return torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), b.t(),
                           alpha=self.scale).view(y.shape)


class LoraLinear(Linear):
    """A `Linear` with an adapter (`apply_lora` turns an adapted layer into one in place, so
    its weight and bias keep their names and ties): W x + b + ΔW x. The base product is
    `Linear`'s, decode fast path included."""

    lora: LoraAdapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return self.lora(x, y) if self.lora.enabled else y


class LoraWeight(LoraAdapter):
    """The output layer's adapter, as a parametrization: `lm_head.weight` reads W + ΔW."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return weight + self.delta_weight() if self.enabled else weight


def adapters(model: nn.Module) -> Iterator[tuple[str, LoraAdapter]]:
    """(name of the adapted layer, its adapter) for every adapter in `model`."""
    for name, m in model.named_modules():
        if isinstance(m, LoraLinear):
            yield name, m.lora
        elif parametrize.is_parametrized(m, "weight"):
            for p in m.parametrizations.weight:
                if isinstance(p, LoraWeight):
                    yield name, p


def has_adapters(model: nn.Module) -> bool:
    return next(adapters(model), None) is not None


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Inside, `model` computes its base's outputs (every adapter off; no weights copied):
    DPO's frozen reference is the policy without its adapters."""
    states = [(a, a.enabled) for _, a in adapters(model)]
    try:
        for a, _ in states:
            a.enabled = False
        yield model
    finally:
        for a, enabled in states:
            a.enabled = enabled


# ------------------------------------------------------------------ putting them in place

def _lm(model: nn.Module) -> tuple[str, nn.Module]:
    """The Transformer inside `model` whose layers LoRA adapts, and its name there."""
    if model.kind in LM_KINDS:
        return "", model
    body = getattr(model, "body", None)
    if model.kind == "classifier" and getattr(body, "kind", None) in LM_KINDS:
        return "body", body
    raise ConfigError(f"lora: model kind {model.kind!r} has no Transformer layers to adapt; "
                      "LoRA takes a transformer, a bert encoder or a classifier on one "
                      "(set --lora.r 0 to train every weight)")


def _layers(lm: nn.Module, with_head: bool) -> dict[str, list[tuple[str, int]]]:
    """Every layer LoRA can adapt, by its name in `lm`: the parts of its output rows."""
    layers: dict[str, list[tuple[str, int]]] = {}
    for name, m in lm.named_modules():
        if isinstance(m, Attention):
            q, kv = m.n_head * m.head_dim, m.n_kv_head * m.head_dim
            layers[f"{name}.qkv"] = [("q", q), ("k", kv), ("v", kv)]
            layers[f"{name}.proj"] = [("o", m.proj.out_features)]
        elif isinstance(m, MLP):
            ff = m.proj.in_features
            layers[f"{name}.fc"] = [("gate", ff), ("up", ff)] if m.swiglu else [("up", ff)]
            layers[f"{name}.proj"] = [("down", m.proj.out_features)]
    if with_head:
        layers["lm_head"] = [("lm_head", lm.lm_head.out_features)]
    return layers


def _targets(wanted: list[str], layers: dict[str, list[tuple[str, int]]], lm_name: str
             ) -> set[str]:
    """The parts `wanted` names ("all-linear": every block part there is); one line, naming
    `lora.targets`, for a name that is unknown or matches no layer."""
    present = [t for t in TARGETS if any(p == t for parts in layers.values() for p, _ in parts)]
    chosen: set[str] = set()
    for t in wanted:
        if t == "all-linear":
            chosen.update(p for p in ALL_LINEAR if p in present)
        elif t not in TARGETS:
            raise ConfigError(f"lora.targets: unknown target {t!r}; this model's layers are "
                              f"{' '.join(present)}, or all-linear")
        elif t not in present:
            why = {"gate": " (a GELU MLP has no gate: its input projection is 'up')",
                   "lm_head": f" (a classifier does not use its {lm_name}'s output layer)"
                   if lm_name else ""}.get(t, "")
            raise ConfigError(f"lora.targets: {t!r} matches no layer of this model{why}; "
                              f"its layers are {' '.join(present)}")
        else:
            chosen.add(t)
    return chosen


def _install(model: nn.Module, record: dict, init: bool) -> nn.Module:
    """Adapters as `record` says, everything else frozen but the `trained` modules."""
    spec = record["lora"]
    lm_name, lm = _lm(model)
    layers = _layers(lm, with_head=not lm_name)
    targets = _targets(list(spec["targets"]), layers, lm_name)
    model.requires_grad_(False)
    for name, parts in layers.items():
        adapted = [p for p, _ in parts if p in targets]
        if not adapted:
            continue
        layer = lm.get_submodule(name)
        if name == "lm_head":  # the loss reads its weight: adapt the weight itself
            parametrize.register_parametrization(layer, "weight", LoraWeight(
                layer.in_features, parts, adapted, spec["r"], spec["alpha"], 0.0, layer.weight,
                init))
        else:
            layer.lora = LoraAdapter(layer.in_features, parts, adapted, spec["r"],
                                     spec["alpha"], spec["dropout"], layer.weight, init)
            layer.__class__ = LoraLinear
    for name in record["trained"]:
        model.get_submodule(name).requires_grad_(True)
    model.adapter_config = record  # what lmlab.model_io writes to config.json
    return model


def _check_shapes(model: nn.Module, base_dir: str | os.PathLike, into: str,
                  trained: list[str]) -> None:
    """Refuse a frozen tensor whose shape is not the base's (a grown vocabulary not trained):
    a run directory could not rebuild it from the base."""
    from lmlab.model_io import build_from_dir, read_model_config

    part = model.get_submodule(into) if into else model
    if read_model_config(base_dir)[1] == json.loads(json.dumps(part.config_dict())):
        return  # one config, one set of shapes
    theirs = build_from_dir(base_dir).state_dict()
    ours = part.state_dict()
    pre = f"{into}." if into else ""
    odd = [pre + k for k in set(ours) | set(theirs)
           if k not in ours or k not in theirs or ours[k].shape != theirs[k].shape]
    odd = [k for k in odd if not any(k == t or k.startswith(t + ".") for t in trained)]
    if odd:
        raise ConfigError(f"lora: {sorted(odd)[:3]} differ from the base {base_dir} in shape; "
                          "a frozen tensor must be the base's (train it: apply_lora(..., "
                          "train=(its module,)))")


def apply_lora(model: nn.Module, spec: LoraSpec, base_dir: str | os.PathLike,
               train: tuple[str, ...] = ("head",), seed: int = 0) -> nn.Module:
    """Adapters on `model` (which holds the weights of the model directory `base_dir`), in
    place; every other parameter frozen except the modules named in `train` that exist
    (default: a classifier's new `head`). Returns `model`.

    `model` is a transformer or bert, or a classifier whose body is one (then `base_dir` is
    the body's directory, or a classifier's). A model loaded from an adapter run has those
    adapters folded in first (`merge_adapters`; the run is then the base). `spec.r == 0`:
    no adapters, only that folding — a plain model to train whole. Train it with
    `run_task(..., trainable_only=True)`: the run directory then holds the adapters (and
    `train`'s modules) alone, and config.json the base it needs (`lmlab.model_io`).
    The A matrices are drawn from `seed` (a run's `train.seed`), so the same run starts
    from the same adapters, in one process or under torchrun.
    """
    from lmlab.model_io import base_record, read_model_config

    merge_adapters(model)
    if not spec.r:
        return model
    lm_name, lm = _lm(model)
    base_kind, _ = read_model_config(base_dir)
    if base_kind == model.kind:
        into = ""
    elif base_kind == lm.kind:
        into = lm_name
    else:
        raise ConfigError(f"lora: the base {base_dir} is a {base_kind!r}, which is neither this "
                          f"model ({model.kind!r}) nor its body ({lm.kind!r})")
    modules = dict(model.named_modules())
    missing = [n for n in spec.modules_to_save if n not in modules or not n]
    if missing:
        top = ", ".join(n for n, _ in model.named_children())
        raise ConfigError(f"lora.modules_to_save: {missing} match no module of this model "
                          f"(its modules: {top})")
    trained = list(dict.fromkeys(n for n in (*spec.modules_to_save, *train) if n in modules and n))
    _check_shapes(model, base_dir, into, trained)
    record = {"type": "lora", "lora": dataclasses.asdict(spec),
              "base": {**base_record(base_dir), "into": into}, "trained": trained}
    with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
        torch.manual_seed(seed)
        return _install(model, record, init=True)


def restore_adapters(model: nn.Module, record: dict) -> nn.Module:
    """The adapter structure of a saved run (`record`: its config.json's "adapter"), zero
    until its weights are loaded: `lmlab.model_io.load_model_dir` calls this."""
    return _install(model, record, init=False)


@torch.no_grad()
def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight, W ← W + (alpha/r)·B A (in float32), and make
    `model` a plain one: adapter layers back to `Linear`, every parameter trainable, no
    adapter record. A tied output layer with an adapter becomes untied (the embedding keeps
    W). A model without adapters is returned as it is."""
    found = list(adapters(model))
    if not found:
        return model
    for name, adapter in found:
        layer = model.get_submodule(name)
        if isinstance(adapter, LoraWeight):
            merged = layer.weight.detach().clone()  # the parametrization's W + ΔW
            tied = any(layer.parametrizations.weight.original is p for n, p in
                       model.named_parameters(remove_duplicate=False)
                       if not n.startswith(name + "."))
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
            layer.weight = nn.Parameter(merged)
            if tied:
                _lm(model)[1].cfg.tie_embeddings = False
        else:
            layer.weight.copy_((layer.weight.float() + adapter.delta_weight().float())
                               .to(layer.weight.dtype))
            del layer.lora
            layer.__class__ = Linear
    model.requires_grad_(True)
    for m in model.modules():
        m.__dict__.pop("adapter_config", None)
    return model


# ------------------------------------------------------------------ run directories

def lora_report(run_dir: str | os.PathLike) -> dict | None:
    """What a summary shows of a run directory's adapters, from its files (None: it has
    none): the base, r, alpha, dropout, targets, the modules trained whole, and the number
    and bytes of the tensors the run saved."""
    from lmlab.model_io import WEIGHTS_FILE, read_adapter_record

    root = Path(run_dir)
    record = read_adapter_record(root)
    if not record:
        return None
    with safe_open(str(root / WEIGHTS_FILE), framework="pt") as f:
        saved = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return {"base": record["base"]["path"], **record["lora"], "trained": record["trained"],
            "saved_params": saved, "saved_bytes": (root / WEIGHTS_FILE).stat().st_size}


def _load_run(run_dir: str | os.PathLike) -> nn.Module:
    from lmlab.model_io import load_model_dir

    model = load_model_dir(run_dir)
    if not has_adapters(model):
        raise InputError(f"{run_dir}: holds no LoRA adapters (its config.json records none); "
                         "give the directory of a run trained with --lora.r")
    return model


def merge_lora(run_dir: str | os.PathLike, out_dir: str | os.PathLike,
               overwrite: bool = False) -> Path:
    """Write the LoRA run `run_dir` as a plain model directory at `out_dir`: each weight
    W + (alpha/r)·B A, no adapters, the run's tokenizer files; it no longer needs the base."""
    from lmlab.model_io import CONFIG_FILE, has_tokenizer_files, write_model_files

    root = Path(run_dir)
    claim = claim_output_dir(out_dir, "lora merge", {"run": absolute(root)}, reads=[root],
                             overwrite=overwrite)
    model = merge_adapters(_load_run(root))
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        log.warning("%s: merging into %s weights rounds each W + ΔW to %s; the unmerged run "
                    "keeps the adapters exact", root, dtype, dtype)
    tokenizer_dir = root if has_tokenizer_files(root) else None
    out = write_dir_atomically(out_dir, lambda d: write_model_files(d, model, tokenizer_dir),
                               last=CONFIG_FILE, replace=True)
    claim.record()
    return out


def _layer_suffix(hf_module: str) -> str:
    """A Hugging Face module's name within its layer (`model.layers.3.self_attn.q_proj` →
    `self_attn.q_proj`): lmlab adapts the same parts in every layer, so it names them all."""
    return re.sub(r"^.*?\.\d+\.", "", hf_module)


def export_peft(run_dir: str | os.PathLike, out_dir: str | os.PathLike,
                overwrite: bool = False, base_model: str | None = None) -> Path:
    """Write the adapters of the LoRA run `run_dir` (a causal LM) as a PEFT adapter directory:
    adapter_config.json and adapter_model.safetensors, which
    `peft.PeftModel.from_pretrained(hf_model, out_dir)` loads on the `lmlab export-hf` of the
    base. `base_model` is what adapter_config.json names as the base (default: the lmlab base
    directory; give the export-hf directory or a hub name)."""
    from lmlab.interop.hf import _tensor_map, hf_config_from

    root = Path(run_dir)
    claim = claim_output_dir(out_dir, "lora export", {"run": absolute(root)}, reads=[root],
                             overwrite=overwrite)
    model = _load_run(root)
    record = model.adapter_config
    if model.kind != "transformer":
        raise InputError(f"{root}: a {model.kind!r} has no PEFT counterpart (PEFT export takes "
                         "a causal LM's adapters); use `lmlab lora merge` for a plain model")
    as_saved = json.loads(json.dumps(model.config_dict()))
    if record["trained"] or record["base"]["config"].get("lmlab_model") != as_saved:
        raise InputError(f"{root}: the run changed more than adapters (trained "
                         f"{record['trained'] or 'the vocabulary'}), which the export-hf of its "
                         "base lacks; merge it (`lmlab lora merge`) and export-hf that")
    spec = record["lora"]
    hf_config = hf_config_from(model.cfg)
    hf_map = {t.ours: t for t in _tensor_map(model.cfg, hf_config)}
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name, adapter in adapters(model):
        hf = (("lm_head",) if name == "lm_head" else
              tuple(n.removesuffix(".weight") for n in hf_map[name + ".weight"].hf))
        if len(hf) == len(adapter.parts):  # one HF module per part: rank r each
            pairs = [(m, adapter.A[p], adapter.B[p])
                     for (p, _), m in zip(adapter.parts, hf) if p in adapter.A]
        else:  # GPT-2's fused c_attn: its parts as one adapter of rank k·r
            a, b = adapter.factors()
            pairs = [(hf[0], a, b)]
            if a.shape[0] != spec["r"]:
                ranks[_layer_suffix(hf[0])] = a.shape[0]
        for module, a, b in pairs:
            key = f"base_model.model.{module}"
            tensors[f"{key}.lora_A.weight"] = a.detach().contiguous().clone()
            tensors[f"{key}.lora_B.weight"] = b.detach().contiguous().clone()
    modules = sorted({_layer_suffix(k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0])
                      for k in tensors})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec["r"],
        "lora_alpha": spec["alpha"], "lora_dropout": spec["dropout"],
        "target_modules": modules, "bias": "none", "inference_mode": True,
        "fan_in_fan_out": hf_config["model_type"] == "gpt2",  # its Conv1D stores (in, out)
        # a fused module's rank k·r keeps the scale alpha/r with alpha k·alpha
        "rank_pattern": ranks,
        "alpha_pattern": {m: spec["alpha"] * k / spec["r"] for m, k in ranks.items()},
        "base_model_name_or_path": base_model or record["base"]["path"],
    }

    def write_files(directory: Path) -> None:
        save_file(tensors, str(directory / PEFT_WEIGHTS), metadata={"format": "pt"})
        (directory / PEFT_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")

    out = write_dir_atomically(out_dir, write_files, last=PEFT_CONFIG, replace=True)
    claim.record()
    return out
