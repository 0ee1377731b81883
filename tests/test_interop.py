"""Hugging Face interop: lmlab and `transformers` compute the same logits on the same weights.

Each test builds a tiny random model locally (no downloads), moves it across with
`import_hf` or `export_hf`, and compares logits in float32. Every weight is
perturbed away from its init first, so that a bias or norm weight left at
zero or one, or mapped to the wrong place, changes the logits and fails a test.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmlab.errors import InputError  # noqa: E402
from lmlab.interop import export_hf, import_hf, to_hf_state_dict  # noqa: E402
from lmlab.model import Transformer, preset  # noqa: E402
from lmlab.model_io import load_model_dir, save_model_dir  # noqa: E402

VOCAB, SEQ = 96, 24
TOL = 1e-4


@torch.no_grad()
def perturb(module: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def random_ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def max_logit_diff(lmlab_model: Transformer, hf_model, ids: torch.Tensor) -> float:
    ours = lmlab_model(ids)
    theirs = hf_model(ids).logits
    assert ours.shape == theirs.shape
    return (ours - theirs).abs().max().item()


def make_hf_model(config):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    perturb(model)
    return model.eval()


LLAMA_SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)

HF_CASES = {
    "gpt2-tied": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4),
    "llama-gqa-untied-linear-rope": lambda: transformers.LlamaConfig(
        **LLAMA_SIZES, tie_word_embeddings=False,
        rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "llama-gqa-tied": lambda: transformers.LlamaConfig(**LLAMA_SIZES, tie_word_embeddings=True),
    "llama3-rope-scaling": lambda: transformers.LlamaConfig(
        **LLAMA_SIZES, rope_theta=500000.0,
        # a short original context so that the scaled (long) wavelengths matter at SEQ
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
    "llama-attention-bias": lambda: transformers.LlamaConfig(**LLAMA_SIZES, attention_bias=True),
    "qwen2-qkv-bias": lambda: transformers.Qwen2Config(**LLAMA_SIZES, rope_theta=1e6),
    "mistral-head-dim": lambda: transformers.MistralConfig(
        **LLAMA_SIZES, head_dim=32, sliding_window=SEQ),
    # Qwen3: q/k RMSNorm per head, head_dim ≠ hidden/heads, tied like its small models
    "qwen3-qk-norm-head-dim-tied": lambda: transformers.Qwen3Config(
        **LLAMA_SIZES, head_dim=24, rope_theta=1e6, tie_word_embeddings=True),
    "qwen3-untied-attention-bias": lambda: transformers.Qwen3Config(
        **LLAMA_SIZES, attention_bias=True, tie_word_embeddings=False),
    # a window no shorter than the sequence: the same computation as lmlab's full attention
    "qwen3-sliding-window": lambda: transformers.Qwen3Config(
        **LLAMA_SIZES, use_sliding_window=True, sliding_window=SEQ, max_window_layers=1),
}


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_import_matches_transformers(case, tmp_path):
    hf_model = make_hf_model(HF_CASES[case]())
    # small shards exercise the sharded-index path
    hf_model.save_pretrained(tmp_path / "hf", max_shard_size="40KB" if "mistral" in case else "1GB")
    import_hf(tmp_path / "hf", tmp_path / "lmlab")
    model = load_model_dir(tmp_path / "lmlab")
    assert max_logit_diff(model, hf_model, random_ids()) <= TOL


def test_import_of_sharded_checkpoint_reads_every_shard(tmp_path):
    hf_model = make_hf_model(HF_CASES["mistral-head-dim"]())
    hf_model.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    import_hf(tmp_path / "hf", tmp_path / "lmlab")
    assert load_model_dir(tmp_path / "lmlab").cfg.head_dim == 32


def test_import_of_bare_pytorch_bin_gpt2(tmp_path):
    """An old-style GPT-2 file: pytorch_model.bin, no `transformer.` prefix, mask buffers."""
    hf_model = make_hf_model(HF_CASES["gpt2-tied"]())
    state = {k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items()
             if k != "lm_head.weight"}
    state["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    state["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    (tmp_path / "hf").mkdir()
    torch.save(state, tmp_path / "hf" / "pytorch_model.bin")
    hf_model.config.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "lmlab")
    model = load_model_dir(tmp_path / "lmlab")
    assert model.cfg.tie_embeddings
    assert max_logit_diff(model, hf_model, random_ids()) <= TOL


def lmlab_model(name: str, **overrides) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(preset(name, **{"vocab_size": VOCAB, "max_seq_len": 64, **overrides}))
    perturb(model)
    return model.eval()


LMLAB_CASES = {
    "gpt2": lambda: lmlab_model("tiny"),
    "gpt2-untied-no-bias": lambda: lmlab_model("tiny", tie_embeddings=False, bias=False),
    "llama": lambda: lmlab_model("llama-tiny"),
    "llama-tied-llama3-rope": lambda: lmlab_model(
        "llama-tiny", tie_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
    "llama-with-bias": lambda: lmlab_model("llama-tiny", bias=True, qkv_bias=False),
    "qwen2-like": lambda: lmlab_model("llama-tiny", qkv_bias=True, rope_theta=1e6),
    "qwen3-like": lambda: lmlab_model("llama-tiny", qk_norm=True, head_dim=24, tie_embeddings=True,
                                      rope_theta=1e6),
    "qwen3-qkv-bias": lambda: lmlab_model("llama-tiny", qk_norm=True, qkv_bias=True),
}


@pytest.mark.parametrize("case", sorted(LMLAB_CASES))
def test_export_matches_transformers(case, tmp_path):
    model = LMLAB_CASES[case]()
    save_model_dir(model, tmp_path / "lmlab")
    export_hf(tmp_path / "lmlab", tmp_path / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", attn_implementation="eager").eval()
    expected_class = {"gpt2": "GPT2LMHeadModel", "qwen2": "Qwen2ForCausalLM",
                      "qwen3": "Qwen3ForCausalLM"}.get(
        case.split("-")[0], "LlamaForCausalLM")
    assert type(hf_model).__name__ == expected_class
    assert max_logit_diff(model, hf_model, random_ids()) <= TOL


@pytest.mark.parametrize("case,dtype", [("gpt2", torch.float32), ("llama", torch.float32),
                                        ("qwen2-like", torch.bfloat16),
                                        ("qwen3-like", torch.bfloat16)])
def test_export_then_import_is_bit_identical(case, dtype, tmp_path):
    model = LMLAB_CASES[case]().to(dtype)
    save_model_dir(model, tmp_path / "a")
    export_hf(tmp_path / "a", tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "b")
    back = load_model_dir(tmp_path / "b")
    assert back.cfg.to_dict() == model.cfg.to_dict()
    before, after = model.state_dict(), back.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert after[key].dtype == dtype, key
        assert torch.equal(before[key], after[key]), key


def test_model_dir_stores_tied_weights_once_and_reloads(tmp_path):
    model = lmlab_model("tiny")
    save_model_dir(model, tmp_path / "m")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "m" / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()
    back = load_model_dir(tmp_path / "m")
    assert back.lm_head.weight is back.tok_emb.weight
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))
    # saving again over an existing directory keeps files that are not ours
    (tmp_path / "m" / "metrics.jsonl").write_text("{}\n")
    save_model_dir(back, tmp_path / "m")
    assert (tmp_path / "m" / "metrics.jsonl").is_file()
    assert not [p for p in (tmp_path / "m").iterdir() if p.name.startswith(".")]


def test_tokenizer_files_travel_both_ways(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hello world, 你好世界 🙂"] * 10, trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(tmp_path / "tok")

    save_model_dir(lmlab_model("tiny", vocab_size=max(VOCAB, len(fast))), tmp_path / "m",
                   tokenizer_dir=tmp_path / "tok")
    export_hf(tmp_path / "m", tmp_path / "hf")
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "hello 你好 🙂"
    assert exported.decode(exported.encode(text)) == text
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["eos_token_id"] == fast.eos_token_id
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == fast.eos_token_id

    import_hf(tmp_path / "hf", tmp_path / "back")
    assert (tmp_path / "back" / "tokenizer.json").is_file()
    reimported = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert reimported.encode(text) == exported.encode(text)


def test_export_writes_stop_ids_to_generation_config(tmp_path, tokenizer_dir, tokenizer):
    """transformers' generate must stop where lmlab's does: at <|endoftext|> and <|im_end|>."""
    save_model_dir(lmlab_model("tiny", vocab_size=tokenizer.vocab_size), tmp_path / "m",
                   tokenizer_dir=tokenizer_dir)
    export_hf(tmp_path / "m", tmp_path / "hf")
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (hf_config["bos_token_id"], hf_config["eos_token_id"], hf_config["pad_token_id"]) == (
        tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf_model.generation_config.eos_token_id == tokenizer.stop_ids == [0, 4]
    assert hf_model.generation_config.pad_token_id == tokenizer.pad_id


def test_generation_config_survives_import_and_export(tmp_path):
    hf_model = make_hf_model(HF_CASES["llama-gqa-tied"]())
    hf_model.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [2, 7], "temperature": 0.6, "do_sample": True}))
    import_hf(tmp_path / "hf", tmp_path / "m")
    assert json.loads((tmp_path / "m" / "generation_config.json").read_text())["eos_token_id"] == [
        2, 7]
    export_hf(tmp_path / "m", tmp_path / "back")  # no tokenizer: the file travels as it is
    back = json.loads((tmp_path / "back" / "generation_config.json").read_text())
    assert back == {"eos_token_id": [2, 7], "temperature": 0.6, "do_sample": True}
    # a checkpoint older than generation_config.json names its stop token in config.json
    (tmp_path / "hf" / "generation_config.json").unlink()
    import_hf(tmp_path / "hf", tmp_path / "m2")
    derived = json.loads((tmp_path / "m2" / "generation_config.json").read_text())
    assert derived["eos_token_id"] == hf_model.config.eos_token_id


def test_import_refuses_a_tokenizer_without_its_eos(tmp_path):
    hf_model = make_hf_model(HF_CASES["llama-gqa-tied"]())
    hf_model.save_pretrained(tmp_path / "hf")
    from tokenizers import Tokenizer, models
    Tokenizer(models.BPE()).save(str(tmp_path / "hf" / "tokenizer.json"))
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(InputError, match=r"tokenizer_config.json: eos_token '</s>' is not in"):
        import_hf(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_to_hf_state_dict_needs_no_transformers_objects():
    hf_config, state = to_hf_state_dict(lmlab_model("llama-tiny"))
    assert hf_config["model_type"] == "llama"
    assert state["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 32, 128)
    assert "lm_head.weight" in state  # llama-tiny is untied


# ---------------------------------------------------------------- refusals

def write_hf_config(directory, **fields):
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(fields))
    return directory


def test_import_refuses_unknown_model_type(tmp_path):
    hf_dir = write_hf_config(tmp_path / "hf", model_type="t5")  # (bert is supported: test_bert)
    with pytest.raises(InputError, match=r"'t5'.*supported.*gpt2.*llama.*qwen2.*mistral.*bert"):
        import_hf(hf_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_import_refuses_unsupported_rope_scaling(tmp_path):
    hf_model = make_hf_model(HF_CASES["llama-gqa-tied"]())
    hf_model.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config.pop("rope_parameters", None)
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="'yarn'.*supported"):
        import_hf(tmp_path / "hf", tmp_path / "out")


def test_import_refuses_missing_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    hf_model = make_hf_model(HF_CASES["qwen2-qkv-bias"]())
    hf_model.save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    state = load_file(str(weights))
    del state["model.layers.1.self_attn.k_proj.bias"]
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(InputError, match=r"missing \['model.layers.1.self_attn.k_proj.bias'\]"):
        import_hf(tmp_path / "hf", tmp_path / "out")


def test_load_model_dir_points_hf_dirs_to_import(tmp_path):
    hf_dir = write_hf_config(tmp_path / "hf", model_type="llama")
    with pytest.raises(InputError, match="lmlab import-hf"):
        load_model_dir(hf_dir)


def test_load_model_dir_is_strict_about_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    save_model_dir(lmlab_model("tiny"), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    state = load_file(str(weights))
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(weights))
    with pytest.raises(InputError, match=r"unexpected \['extra.weight'\]"):
        load_model_dir(tmp_path / "m")
