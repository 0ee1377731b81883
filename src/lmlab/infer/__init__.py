"""Inference: the one generation loop (KV-cache decode, sampling, streaming text).

`generate` is what `lmlab generate`, `chat`, the server and evaluation all call.
"""

from lmlab.infer.generate import (
    GenerationError, TextStreamer, generate, generate_ids, generate_text, stream_text,
)
from lmlab.infer.sampling import sample_next, top_k_filter, top_p_filter

__all__ = [
    "generate", "generate_ids", "generate_text", "stream_text", "TextStreamer",
    "GenerationError", "sample_next", "top_k_filter", "top_p_filter",
]
