"""Evaluation measures: how well a model predicts text, and what to compare it with.

Everything here is stated in one unit, the nat (natural-log cross-entropy), and
converted once:

    perplexity        = e^(mean nats per token)
    bits per byte     = Σ nats / (ln 2 · number of UTF-8 bytes of the text)
    compressor bpb    = 8 · len(compressed bytes) / len(data)
    log p(sequence)   = −Σ nats over the counted (target ≠ −100) positions

Perplexity is per *token*, so it depends on the tokenizer; bits per byte
divides the same total by the bytes of the text, which makes a model
comparable with another tokenizer's model and with a general-purpose
compressor on the same bytes. The compressor baselines (xz -9e, bzip2 -9,
zlib -9) are that yardstick: a model that spends fewer bits per byte than
xz has learned more about the text than repetition.

`sequence_logprobs` gives log p(sequence) per row with its gradient, for the
scores DPO and multiple-choice evaluation need; it goes through the model's
loss (`reduction="row_sum"` of `lmlab.model.loss.linear_cross_entropy`), so
the full logits are never made.

The modules: `measures` (perplexity, bits_per_byte), `baselines` (the
compressors), `logprobs` (sequence_logprobs), `metrics` (classification,
McNemar, exact match, BLEU, chrF, ROUGE: scikit-learn, scipy, sacrebleu,
rouge-score), `tasks` (the JSONL task format, multiple-choice / generation /
classification scoring, the shipped tasks), `report` (`report_card`: all of
it for one model or two, as JSON, Markdown and HTML). Nothing here imports
torch at import time (nor the `lmlab[eval]` libraries: each loads on first use).
"""

from lmlab.eval.baselines import COMPRESSORS, baselines, compress, compressor_bits_per_byte
from lmlab.eval.logprobs import sequence_logprobs
from lmlab.eval.measures import bits_per_byte, perplexity
from lmlab.eval.metrics import (bleu, chrf, classification_metrics, exact_match,
                                generation_metrics, mcnemar, rouge)
from lmlab.eval.report import report_card
from lmlab.eval.tasks import Task, build_shipped_tasks, evaluate_task, load_task, shipped_tasks

__all__ = ["COMPRESSORS", "Task", "baselines", "bits_per_byte", "bleu", "build_shipped_tasks",
           "chrf", "classification_metrics", "compress", "compressor_bits_per_byte",
           "evaluate_task", "exact_match", "generation_metrics", "load_task", "mcnemar",
           "perplexity", "report_card", "rouge", "sequence_logprobs", "shipped_tasks"]
