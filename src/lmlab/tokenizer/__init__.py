"""Byte-level BPE tokenizer: training, loading, special tokens and the chat template."""

from lmlab.tokenizer.bpe import (
    BOS, EOS, IM_END, IM_START, PAD, SPECIAL_TOKENS, Tokenizer, train_tokenizer,
)

__all__ = ["Tokenizer", "train_tokenizer", "SPECIAL_TOKENS", "EOS", "BOS", "PAD", "IM_START", "IM_END"]
