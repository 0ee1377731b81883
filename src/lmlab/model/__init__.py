"""nn.Modules only: the Transformer and its layers. No I/O, no tokenizers, no training."""

from lmlab.model.config import ModelConfig, preset, PRESETS
from lmlab.model.transformer import Transformer, KVCache

__all__ = ["ModelConfig", "preset", "PRESETS", "Transformer", "KVCache"]
