"""Qwen3 in lmlab: `qk_norm` (an RMSNorm over each query and key head before RoPE).

The logits of imported and exported Qwen3 models against `transformers` are in
tests/test_interop.py (its HF_CASES / LMLAB_CASES), and `lmlab import-hf` then
`lmlab generate` stopping at Qwen's end of turn in tests/test_import_families.py.
Here: the KV-cache decode of a qk_norm model equals its full forward, a config
written before the switch existed still loads, an imported Qwen model keeps its
own chat template, and what export cannot express is refused in one line.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmlab.errors import InputError  # noqa: E402
from lmlab.infer import generate_ids  # noqa: E402
from lmlab.interop import export_hf, import_hf, to_hf_state_dict  # noqa: E402
from lmlab.interop.hf import _ignored_sliding_window  # noqa: E402
from lmlab.model import KVCache, ModelConfig, Transformer  # noqa: E402
from lmlab.model_io import load_model_dir, save_model_dir  # noqa: E402
from lmlab.tokenizer import Tokenizer  # noqa: E402

VOCAB = 97
QWEN3 = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, qk_norm=True,
             n_kv_head=2, head_dim=12, rope_theta=1e6, norm_eps=1e-6)


def qwen3_like(**kw) -> Transformer:
    # init_std 0.3 and perturbed norm gains: confident, varied predictions, so a wrong position
    # or a norm left out changes the tokens instead of hiding in near-uniform logits
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, n_layer=2, n_head=4, d_model=32, max_seq_len=64,
                      init_std=0.3, **{**QWEN3, **kw})
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.5 * torch.randn(p.shape))
    return model


def test_qk_norm_adds_a_gain_per_head_dim_and_changes_the_function():
    model = qwen3_like()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if "_norm" in k}
    assert shapes == {f"blocks.{i}.attn.{n}_norm.weight": (12,) for i in range(2) for n in "qk"}
    assert model.num_params() == model.cfg.num_params()
    plain = Transformer(ModelConfig(**{**model.cfg.to_dict(), "qk_norm": False})).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "_norm." not in k})
    x = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        assert (model(x) - plain(x)).abs().max() > 1e-2


def test_qk_norm_kv_cache_equals_full_forward():
    model = qwen3_like()
    x = torch.randint(0, VOCAB, (3, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(x)
        cache = KVCache(model.cfg, batch_size=3, max_len=64)
        parts = [model(x[:, :10], cache=cache), model(x[:, 10:17], cache=cache)]  # prefill, chunk
        parts += [model(x[:, t:t + 1], cache=cache) for t in range(17, 30)]  # one token at a time
        state = model.new_decode_state(3, 30)
        steps = [model.decode_step(x[:, :5], state)]
        steps += [model.decode_step(x[:, t:t + 1], state) for t in range(5, 30)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 4:], atol=1e-5, rtol=1e-5)
    # left-padded in one batch, each row decodes as it does alone
    prompts = [x[0, :9].tolist(), x[1, :3].tolist(), x[2, :14].tolist()]
    alone = [generate_ids(model, p, 12, temperature=0, eos_id=None) for p in prompts]
    assert generate_ids(model, prompts, 12, temperature=0, eos_id=None) == alone
    assert len(set(alone[0])) > 3  # a varied continuation, not one repeated token


def test_config_written_before_qk_norm_still_loads(tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=VOCAB, n_layer=1, n_head=4, d_model=32,
                                    pos_emb="rope", norm="rmsnorm", mlp="swiglu")).eval()
    save_model_dir(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    del config["lmlab_model"]["qk_norm"]  # as lmlab wrote it before the field existed
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    back = load_model_dir(tmp_path / "m")
    assert back.cfg.qk_norm is False
    assert back.state_dict().keys() == model.state_dict().keys()
    x = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():  # (fast paths timed on first use round differently: not bit-equal)
        torch.testing.assert_close(back(x), model(x))


def test_export_refuses_what_qwen3_cannot_express(tmp_path):
    """Qwen3's attention_bias is lmlab's bias=True with zero MLP biases (how an imported one
    comes in): that exports; MLP biases that training made non-zero do not."""
    model = qwen3_like(bias=True, qkv_bias=True)
    with torch.no_grad():
        model.blocks[0].attn.proj.bias.normal_()
    hf_config, state = to_hf_state_dict(model)
    assert hf_config["attention_bias"] and "model.layers.0.self_attn.o_proj.bias" in state
    assert not any(".mlp." in k and k.endswith(".bias") for k in state)
    hf_model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**hf_config)).eval()
    loaded = hf_model.load_state_dict(state, strict=False)
    assert loaded.missing_keys == ["lm_head.weight"] and not loaded.unexpected_keys  # tied
    x = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(x).logits, model(x), atol=1e-4, rtol=1e-4)
        model.blocks[1].mlp.fc.bias[3] = 0.5
    with pytest.raises(InputError, match=r"blocks.1.mlp.fc.bias is not zero and Qwen3ForCausalLM "
                                         r"has no such bias"):
        to_hf_state_dict(model)
    learned = Transformer(ModelConfig(vocab_size=VOCAB, n_layer=1, n_head=4, d_model=32,
                                      qk_norm=True))
    with pytest.raises(InputError, match=r"GPT-2, which cannot express qk_norm=True"):
        to_hf_state_dict(learned)
    save_model_dir(learned, tmp_path / "m")
    with pytest.raises(InputError, match=r"qk_norm=True"):
        export_hf(tmp_path / "m", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("hf,window", [
    (dict(model_type="mistral", sliding_window=4096), 4096),
    (dict(model_type="qwen3", use_sliding_window=False, sliding_window=None), None),
    # transformers v4 configs keep the window even when it is off
    (dict(model_type="qwen2", use_sliding_window=False, sliding_window=4096), None),
    (dict(model_type="qwen3", use_sliding_window=True, sliding_window=64,
          layer_types=["full_attention", "sliding_attention"]), 64),
    (dict(model_type="qwen3", use_sliding_window=True, sliding_window=64,
          layer_types=["full_attention", "full_attention"]), None),
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=64), 64),
])
def test_sliding_window_is_reported_where_transformers_would_apply_it(hf, window):
    assert _ignored_sliding_window(hf) == window


# ---------------------------------------------------------------- the chat template

# Qwen2.5's template (tools left out): a default system prompt when none is given, which
# lmlab's own ChatML template does not add
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CONVERSATIONS = [
    [{"role": "system", "content": "你是一个乐于助人的助手。"},
     {"role": "user", "content": "把“你好”翻译成英文。"},
     {"role": "assistant", "content": "hello"},
     {"role": "user", "content": "What does `json.dumps` do?"},
     {"role": "assistant", "content": "Serialize ``obj`` to a JSON formatted ``str``."}],
    [{"role": "user", "content": "判断这条评论的情感（正面/负面）：质量很好，很满意"},
     {"role": "assistant", "content": "正面"}],
]


def qwen_hf_dir(out, template_in: str):
    """A tiny Qwen3 chat model directory: byte-level BPE with Qwen's special tokens, the
    template in tokenizer_config.json (as Qwen ships it) or in chat_template.jinja (as
    transformers 5 saves it)."""
    from tokenizers import Tokenizer as RawTokenizer, decoders, models, pre_tokenizers, trainers

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    text = " ".join(m["content"] for c in CONVERSATIONS for m in c) + " system user assistant"
    raw.train_from_iterator([text] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"])
    config = transformers.Qwen3Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tok.save_pretrained(out)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    if template_in == "chat_template.jinja":
        (out / "chat_template.jinja").write_text(QWEN_TEMPLATE, encoding="utf-8")
    else:
        config_file = out / "tokenizer_config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                           "chat_template": QWEN_TEMPLATE}))
    return transformers.AutoTokenizer.from_pretrained(out)


def chat_ids(tok, messages, add_generation_prompt=False) -> list[int]:
    return tok.apply_chat_template(messages, tokenize=True, return_dict=False,
                                   add_generation_prompt=add_generation_prompt)


@pytest.fixture(scope="module", params=["tokenizer_config.json", "chat_template.jinja"])
def imported_qwen(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen-chat")
    source = qwen_hf_dir(root / "hf", request.param)
    import_hf(root / "hf", root / "lmlab")
    return source, root


def test_imported_qwen_keeps_its_own_chat_template(imported_qwen):
    source, root = imported_qwen
    assert source.chat_template == QWEN_TEMPLATE
    for directory in ("lmlab", "back"):
        if directory == "back":  # and export-hf hands it on again
            export_hf(root / "lmlab", root / "back")
        tok = transformers.AutoTokenizer.from_pretrained(root / directory)
        assert tok.chat_template == QWEN_TEMPLATE
        for messages in CONVERSATIONS:
            for prompt in (False, True):
                assert chat_ids(tok, messages, prompt) == chat_ids(source, messages, prompt)
    # the template that travelled is Qwen's: without a system turn it adds its default one
    text = tok.apply_chat_template(CONVERSATIONS[1], tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are Qwen")
    lm_tok = Tokenizer.load(root / "lmlab")
    im_end = source.convert_tokens_to_ids("<|im_end|>")
    assert (lm_tok.eos_id, lm_tok.eot_id) == (im_end, im_end)
    assert lm_tok.decode(chat_ids(source, CONVERSATIONS[0])) == source.apply_chat_template(
        CONVERSATIONS[0], tokenize=False)


def test_render_chat_renders_an_imported_template(imported_qwen):
    """lmlab's renderer (lmlab.data.chat) gives transformers' ids on the imported directory."""
    chat = pytest.importorskip("lmlab.data.chat")
    source, root = imported_qwen
    lm_tok = Tokenizer.load(root / "lmlab")
    for messages in CONVERSATIONS:
        ids, mask = chat.render_chat(lm_tok, messages)
        assert ids == chat_ids(source, messages)
        assert len(mask) == len(ids) and any(mask)
        assert chat.prompt_ids(lm_tok, messages[:-1]) == chat_ids(source, messages[:-1], True)
