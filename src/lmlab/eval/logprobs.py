"""log p(sequence) per row, with gradient (formula: `lmlab.eval`)."""

from __future__ import annotations


def sequence_logprobs(model, ids, targets):
    """Σ log p(target) over each row's counted positions: (B,) from ids and targets (B, T).

    targets are the next tokens (−100 where a position does not count, e.g. the
    prompt before a DPO or multiple-choice completion); a fully masked row gives 0.
    Differentiable: it is −(the model's loss with reduction "row_sum"), so the
    logits are never materialised. The model protocol is `lmlab.model`'s:
    `model(ids, targets=..., reduction=...)`.
    """
    return -model(ids, targets=targets, reduction="row_sum")
