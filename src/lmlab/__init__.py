"""lmlab: build large language models from theory to practice.

    >>> import lmlab
    >>> lm = lmlab.load("runs/quickstart")         # any lmlab model directory
    >>> logits = lm.model(torch.tensor([lm.tokenizer.encode("def ")]))   # (1, T, vocab)
    >>> print(lm.generate("def ", max_new_tokens=40))
    >>> lmlab.load("runs/classify").classify(["这本书太好看了"])   # a classifier's directory
    [('pos', {'neg': 0.03, 'pos': 0.97})]
    >>> lmlab.load("runs/zh-en").seq2seq(["火车站"])   # an encoder–decoder's directory
    ['train station']
"""

from __future__ import annotations

__version__ = "0.1.0"

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # keep `import lmlab` light: torch loads on first use
    from torch import nn

    from lmlab.tokenizer import Tokenizer


@dataclass
class LoadedModel:
    """A model directory in memory: `.model` (a torch.nn.Module of any kind) and `.tokenizer`."""

    model: "nn.Module"
    tokenizer: "Tokenizer"
    path: Path

    def generate(self, prompt: str, max_new_tokens: int = 128, **sampling) -> str:
        """The continuation of `prompt` (sampling: temperature, top_k, top_p, seed)."""
        from lmlab.infer import generate_text

        return generate_text(self.model, self.tokenizer, prompt, max_new_tokens=max_new_tokens,
                             **sampling)

    def chat(self, messages: "str | list[dict]", max_new_tokens: int = 256, system: str | None = None,
             **sampling) -> str:
        """The assistant's reply to `messages` (a user's text, or a conversation as
        [{"role", "content"}, ...]), rendered with the tokenizer's chat template; it ends
        where the model ends its turn."""
        from lmlab.data.chat import as_messages, prompt_ids
        from lmlab.infer import generate_text

        ids = prompt_ids(self.tokenizer, as_messages(messages, system))
        return generate_text(self.model, self.tokenizer, ids, max_new_tokens=max_new_tokens,
                             **sampling)

    def classify(self, texts: "str | list[str]", batch_size: int = 64):
        """For a classifier (`lmlab finetune classify`): (label, {label: probability}) per
        text; one pair for one string."""
        from lmlab.finetune.classify import predict

        one = isinstance(texts, str)
        out = predict(self.model, self.tokenizer, [texts] if one else list(texts), batch_size)
        return out[0] if one else out

    def seq2seq(self, texts: "str | list[str]", beam: int = 4, length_penalty: float = 1.0,
                max_new_tokens: int | None = None, batch_size: int = 32):
        """For an encoder–decoder (`lmlab seq2seq train`): the translation / summary of each
        text, by beam search (`beam=1`: greedy); one string for one string."""
        from lmlab.train.seq2seq import generate_texts, load_tokenizers

        one = isinstance(texts, str)
        source, target = load_tokenizers(self.path, self.model)
        out = generate_texts(self.model, source, target, [texts] if one else list(texts), beam,
                             length_penalty, max_new_tokens, batch_size)
        return out[0] if one else out


def load(path: str | Path, device: str = "cpu", dtype=None) -> LoadedModel:
    """Load an lmlab model directory (config.json, model.safetensors, tokenizer files).

    The model is built as the kind its config.json names (`lmlab.model.model_kinds()`)."""
    from lmlab.model_io import load_model_dir
    from lmlab.tokenizer import Tokenizer

    model = load_model_dir(path, device=device, dtype=dtype).eval()
    return LoadedModel(model=model, tokenizer=Tokenizer.load(path), path=Path(path))


__all__ = ["load", "LoadedModel", "__version__"]
