"""Imported Hugging Face models work end to end, each with its own end-of-text token.

A LLaMA or Mistral tokenizer ends text with `</s>`, GPT-2's with `<|endoftext|>`,
a Qwen chat model's with `<|im_end|>` (and its generation_config.json lists
`<|endoftext|>` as a second stop). For each family the test builds a tiny
model and a byte-level BPE tokenizer with that family's special tokens, saves
them as `transformers` does, and runs the real `lmlab import-hf` and
`lmlab generate` commands and `lmlab.load(...).generate`.

To make stopping testable, the model must produce the stop token a few steps
into a greedy continuation. Swapping two rows of the embedding and of the
output head relabels two tokens and leaves the function otherwise the same, so
swapping the stop token with the token the untouched model would produce at
step k makes the model produce the stop token exactly there. The greedy ids
must then equal `transformers`' own `generate` on the same weights, stop
included, and the text must end before it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lmlab  # noqa: E402
from lmlab.infer.generate import generate_ids  # noqa: E402
from lmlab.tokenizer import Tokenizer  # noqa: E402

PROMPT = "def read(self, path):\n    "
MAX_NEW = 16
SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)

# family -> (special tokens in id order, tokenizer roles, stop token the model is made to emit)
FAMILIES = {
    "llama": (["<unk>", "<s>", "</s>"], dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>"),
              "</s>"),
    "mistral": (["<unk>", "<s>", "</s>"],
                dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>"), "</s>"),
    "gpt2": (["<|endoftext|>"], dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>"),
             "<|endoftext|>"),
    # a Qwen chat model: the tokenizer's EOS is the end of turn; generation_config also
    # stops at <|endoftext|>, which is the token this model ends with
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"), "<|endoftext|>"),
    "qwen3": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"), "<|endoftext|>"),
}
QWEN = ("qwen2", "qwen3")


def sample_text() -> str:
    """A few KB of Python source: enough for a tokenizer with real merges."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return "".join(f.read_text(encoding="utf-8")[:3000] for f in sorted(root.glob("*.py"))[:4])


def hf_tokenizer(family: str):
    from tokenizers import Tokenizer as RawTokenizer, decoders, models, pre_tokenizers, trainers

    specials, roles, _ = FAMILIES[family]
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator([sample_text()], trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=raw, **roles)


def hf_config(family: str, tok):
    vocab, bos, eos, pad = len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    ids = dict(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2,
                                       n_head=4, **ids)
    config_class = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                    "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[family]
    # Qwen's small models tie the head to the embedding; the others keep a separate head
    return config_class(vocab_size=vocab, tie_word_embeddings=family in QWEN, **SIZES, **ids)


@torch.no_grad()
def greedy_without_stopping(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    for _ in range(n):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()


@torch.no_grad()
def swap_tokens(model, a: int, b: int) -> None:
    """Relabel tokens a and b in the embedding and the output head (once if they are tied)."""
    weights = {id(w): w for w in (model.get_input_embeddings().weight,
                                  model.get_output_embeddings().weight)}
    for w in weights.values():
        w[[a, b]] = w[[b, a]]


def build_hf_dir(family: str, out: Path) -> dict:
    """A Hugging Face directory whose model greedily emits its stop token a few steps in."""
    tok = hf_tokenizer(family)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        hf_config(family, tok), attn_implementation="eager").eval()
    with torch.no_grad():  # larger weights than the init: a varied continuation, not a loop
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    stop_token = FAMILIES[family][2]
    stop_id = tok.convert_tokens_to_ids(stop_token)
    prompt = tok(PROMPT, add_special_tokens=False)["input_ids"]
    special_ids = set(tok.all_special_ids) | {stop_id}
    assert not special_ids & set(prompt)
    plain = greedy_without_stopping(model, prompt, MAX_NEW)
    # the latest step k whose token is new (not in the prompt, not earlier) and not special
    k = max((i for i, t in enumerate(plain[:MAX_NEW - 2])
             if t not in special_ids and t not in prompt and t not in plain[:i]
             and not special_ids & set(plain[:i])), default=-1)
    assert k >= 2, f"no step to make the stop at in {plain}; change the seed"
    swap_tokens(model, plain[k], stop_id)
    if family in QWEN:  # as Qwen2.5's and Qwen3's instruct models ship it
        model.generation_config.eos_token_id = [tok.eos_token_id, stop_id]
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return dict(tok=tok, prompt=prompt, expected=plain[:k] + [stop_id], stop_token=stop_token)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmlab.cli", *args], capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict[str, dict]:
    """Every family built, imported with `lmlab import-hf` and run with `lmlab generate`.

    Each command starts a Python that imports torch, so they run two at a time, each
    family's as soon as its directory is written, while the next one is built.
    """
    root = tmp_path_factory.mktemp("families")

    def run_cli(case: dict) -> None:
        case["import"] = cli("import-hf", str(case["hf"]), str(case["out"]))
        if case["import"].returncode == 0:
            case["generate"] = cli("generate", "--model", str(case["out"]), "--prompt", PROMPT,
                                   "--max-new-tokens", str(MAX_NEW), "--temperature", "0")

    cases, runs = {}, []
    with ThreadPoolExecutor(2) as pool:
        for family in FAMILIES:
            hf, out = root / f"{family}-hf", root / f"{family}-lmlab"
            cases[family] = {**build_hf_dir(family, hf), "hf": hf, "out": out, "generate": None}
            runs.append(pool.submit(run_cli, cases[family]))
        for run in runs:
            run.result()  # a timeout raises here
    return cases


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_imported_model_stops_at_its_own_eos(imported, family):
    case = imported[family]
    imp, gen = case["import"], case["generate"]
    assert imp.returncode == 0, imp.stderr
    assert f"lmlab generate --model {case['out']}" in imp.stdout
    assert (case["out"] / "generation_config.json").is_file()

    tok = case["tok"]
    expected_text = tok.decode(case["expected"][:-1])
    assert gen is not None and gen.returncode == 0, gen and gen.stderr
    assert case["stop_token"] not in gen.stdout
    assert gen.stdout == PROMPT + expected_text + "\n"

    lm = lmlab.load(case["out"])
    assert lm.tokenizer.eos_id == tok.eos_token_id
    assert lm.tokenizer.bos_id == tok.bos_token_id
    assert lm.tokenizer.pad_id == tok.pad_token_id
    stop_id = tok.convert_tokens_to_ids(case["stop_token"])
    assert stop_id in lm.tokenizer.stop_ids
    text = lm.generate(PROMPT, max_new_tokens=MAX_NEW, temperature=0)
    assert text == expected_text and case["stop_token"] not in text

    # token for token what transformers' generate gives on the same weights, stop included
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        case["hf"], attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor([case["prompt"]]), max_new_tokens=MAX_NEW,
                                   do_sample=False, pad_token_id=stop_id)
    theirs = theirs[0, len(case["prompt"]):].tolist()
    assert theirs == case["expected"]
    ours = generate_ids(lm.model, lm.tokenizer.encode(PROMPT), MAX_NEW, temperature=0,
                        eos_id=lm.tokenizer.stop_ids)
    assert ours == theirs
    assert len(ours) < MAX_NEW


def test_qwen_stop_ids_come_from_generation_config(imported):
    """<|im_end|> is the tokenizer's EOS and end of turn; <|endoftext|> stops only because
    generation_config.json lists it."""
    case = imported["qwen2"]
    tokenizer = Tokenizer.load(case["out"])
    tok = case["tok"]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    endoftext = tok.convert_tokens_to_ids("<|endoftext|>")
    assert (tokenizer.eos_id, tokenizer.eot_id, tokenizer.bos_id) == (im_end, im_end, None)
    assert tokenizer.stop_ids == [im_end, endoftext]
    generation = json.loads((case["out"] / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [im_end, endoftext]
    llama = Tokenizer.load(imported["llama"]["out"])
    assert llama.eot_id is None and llama.stop_ids == [llama.eos_id]
