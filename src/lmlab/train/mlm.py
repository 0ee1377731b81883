"""Masked language modelling (BERT's pretraining objective) on the same token shards.

A causal language model learns p(x_t | x_<t), each token from the ones before it.
A masked one corrupts a random set M of positions and learns each original token
there from the whole corrupted text x̃, both sides of it:

    loss = − (1/|M|) Σ_{t ∈ M} log p(x_t | x̃)

The recipe (Devlin et al. 2019, §3.1 and App. A): M is 15 % of each window's
non-special tokens (round(0.15·n), at least one), drawn uniformly; of those,
80 % become the mask token, 10 % a random token and 10 % stay as they were, and
only M counts in the loss. The mask token never occurs once the encoder is put
to use; had the model only ever to predict at it, nothing would make it keep a
useful representation of the other tokens. Random and kept tokens make every
position a possible question, so each must be represented well. Specials (EOS
between documents, padding, an imported tokenizer's [CLS] / [SEP]: every token
that stands for no text) are never chosen nor drawn as a replacement.

The mask token: lmlab's tokenizers have none (their special ids 0–4 are EOS,
BOS, pad and the chat markers), so a masked LM over one has one row more than
the tokenizer and the mask id is `tokenizer.vocab_size`; a tokenizer with its
own "[MASK]" (or "<mask>"), such as an imported BERT's, keeps its size and id
(`mask_token`). Pretraining checks the model's vocabulary against that size.

Masks are a pure function of (seed, step, the window's tokens): each window's
draws come from a generator seeded with them. So a resumed run masks step s as
the uninterrupted one did, and W ranks mask their slices of a global batch as
one process masks the whole. Validation masks are fixed (seeded without the
step): every evaluation scores the same positions, so val_mlm_loss and
val_mlm_acc (how often the most likely token is the original) are comparable
across steps. There is no perplexity or bits per byte: those price the whole
text, Π_t p(x_t | x_<t), token by token; a masked LM prices 15 % of the tokens
with the other 85 % (and the future) in view, an easier quantity that a causal
model's or a compressor's bits cannot be compared with.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmlab.data.shards import TokenShards
from lmlab.model.loss import IGNORE_INDEX
from lmlab.tokenizer import Tokenizer
from lmlab.train.pretrain import LanguageModelingTask

MASK_RATE = 0.15  # of a window's non-special tokens, chosen for prediction
MASK_SHARE, RANDOM_SHARE = 0.8, 0.1  # of those: the mask id, a random token (the rest kept)
MASK_TOKENS = ("[MASK]", "<mask>")  # BERT's, RoBERTa's
_TRAIN, _VAL = 0, 1  # generator streams


def mask_token(tokenizer: Tokenizer) -> tuple[int, int]:
    """(mask id, vocabulary size of the masked LM) for `tokenizer`: its own mask token if it
    has one, else one id past its last (see the module docstring)."""
    for name in MASK_TOKENS:
        i = tokenizer.hf.token_to_id(name)
        if i is not None:
            return i, tokenizer.vocab_size
    return tokenizer.vocab_size, tokenizer.vocab_size + 1


def _digest(row: np.ndarray) -> int:
    return int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "little")


class Masking:
    """BERT's corruption of token windows: which positions are predicted, and what they show."""

    def __init__(self, tokenizer: Tokenizer, seed: int):
        self.mask_id, self.vocab_size = mask_token(tokenizer)
        self.seed = seed
        # a token that stands for no text is special; so is the mask id itself
        self.special = np.ones(self.vocab_size, dtype=bool)
        self.special[:tokenizer.vocab_size] = np.asarray(tokenizer.token_byte_lengths()) == 0
        self.replacements = np.flatnonzero(~self.special)

    def __call__(self, ids: torch.Tensor, step: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) for windows `ids` (B, T): targets hold the original id at each
        chosen position and -100 elsewhere. `step` None: validation's fixed masks."""
        ids = ids.numpy()
        inputs, targets = ids.copy(), np.full_like(ids, IGNORE_INDEX)
        stream = [self.seed, _VAL] if step is None else [self.seed, _TRAIN, step]
        for x, x_in, y in zip(ids, inputs, targets):
            candidates = np.flatnonzero(~self.special[x])
            if not len(candidates):
                continue
            rng = np.random.default_rng(stream + [_digest(x)])
            chosen = rng.choice(candidates, size=max(1, round(MASK_RATE * len(candidates))),
                                replace=False)
            y[chosen] = x[chosen]
            r = rng.random(len(chosen))
            x_in[chosen[r < MASK_SHARE]] = self.mask_id
            swap = chosen[(r >= MASK_SHARE) & (r < MASK_SHARE + RANDOM_SHARE)]
            x_in[swap] = rng.choice(self.replacements, size=len(swap))
        return torch.from_numpy(inputs), torch.from_numpy(targets)


class MaskedLMTask(LanguageModelingTask):
    """The language-modelling task's windows, masked; loss and metrics at the masked positions."""

    eval_keys = ("loss_sum", "predicted", "correct")

    def __init__(self, train: TokenShards, val: TokenShards | None, seq_len: int,
                 batch_size: int, tokenizer: Tokenizer, seed: int, eval_tokens: int | None):
        super().__init__(train, val, seq_len, batch_size, tokenizer.token_byte_lengths(), seed,
                         eval_tokens)
        self.masking = Masking(tokenizer, seed)

    def train_batch(self, step, micro, accum, rank, world):
        x, _ = super().train_batch(step, micro, accum, rank, world)
        return self.masking(x, step)

    def val_batches(self, rank, world):
        for x, _ in super().val_batches(rank, world):
            yield self.masking(x, None)

    def eval_sums(self, model: nn.Module, batch) -> dict[str, float]:
        x, y = batch
        chosen = y != IGNORE_INDEX
        logits = model.mlm_logits(model(x, return_hidden=True)[chosen]).float()
        return {"loss_sum": F.cross_entropy(logits, y[chosen], reduction="sum").item(),
                "predicted": int(chosen.sum()),
                "correct": int((logits.argmax(-1) == y[chosen]).sum())}

    def eval_metrics(self, s: dict[str, float]) -> dict[str, float]:
        if not s.get("predicted"):
            return {}
        return {"val_mlm_loss": s["loss_sum"] / s["predicted"],
                "val_mlm_acc": s["correct"] / s["predicted"]}
