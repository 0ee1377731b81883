import pytest
import torch
import torch.nn.functional as F

from lmlab.errors import ConfigError
from lmlab.model import PRESETS, KVCache, ModelConfig, Transformer, preset

FAMILIES = {
    "gpt2": dict(pos_emb="learned"),
    "llama-gqa": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2,
                      tie_embeddings=False),
    "qwen2-like": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, qkv_bias=True,
                       n_kv_head=1, rope_theta=1e6),
}


def small(family: str, **kw) -> Transformer:
    cfg = ModelConfig(vocab_size=97, n_layer=2, n_head=4, d_model=32, max_seq_len=64,
                      **FAMILIES[family], **kw)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_param_count_matches_module(name):
    cfg = preset(name)
    with torch.device("meta"):  # no memory for the 1B preset
        model = Transformer(cfg)
    assert model.num_params() == cfg.num_params()


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_future_does_not_leak(family):
    model = small(family)
    x = torch.randint(0, 97, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_equals_full_forward(family):
    model = small(family)
    x = torch.randint(0, 97, (3, 30))
    with torch.no_grad():
        full = model(x)
        cache = KVCache(model.cfg, batch_size=3, max_len=64)
        parts = [model(x[:, :10], cache=cache), model(x[:, 10:17], cache=cache)]  # prefill, chunk
        parts += [model(x[:, t:t + 1], cache=cache) for t in range(17, 30)]  # one token at a time
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.pos == 30


def test_tied_embeddings_share_storage():
    tied = small("gpt2")
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert tied.lm_head.weight.data_ptr() == tied.tok_emb.weight.data_ptr()
    untied = small("llama-gqa")  # tie_embeddings=False: one model, two matrices
    head, emb = untied.lm_head.weight, untied.tok_emb.weight
    assert head is not emb
    assert head.untyped_storage().data_ptr() != emb.untyped_storage().data_ptr()
    with torch.no_grad():  # writing one leaves the other as it was
        before = emb.clone()
        head.add_(1.0)
    torch.testing.assert_close(emb, before)


def test_kv_cache_full_raises():
    model = small("llama-gqa")
    x = torch.randint(0, 97, (1, 10))
    cache = KVCache(model.cfg, batch_size=1, max_len=8)
    with torch.no_grad():
        model(x[:, :6], cache=cache)
        assert cache.pos == 6
        with pytest.raises(ValueError, match=r"KV cache full: 10 positions > max_len 8"):
            model(x[:, 6:], cache=cache)
        assert cache.pos == 6  # the failed call did not advance the cache
        model(x[:, 6:8], cache=cache)  # what still fits goes in
    assert cache.pos == 8


@pytest.mark.parametrize("family", FAMILIES)
def test_learns_a_sequence(family):
    torch.manual_seed(0)
    model = small(family).train()
    seq = torch.randint(0, 97, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        logits = model(seq[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 97), seq[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 4.0 and losses[-1] < 0.5


def test_init_scales_residual_projections():
    model = Transformer(preset("small"))
    std_qkv = model.blocks[0].attn.qkv.weight.std().item()
    std_proj = model.blocks[0].attn.proj.weight.std().item()
    assert abs(std_qkv - 0.02) < 2e-3
    assert abs(std_proj - 0.02 / (2 * 6) ** 0.5) < 1e-3


def test_bad_configs_are_clear():
    with pytest.raises(ConfigError, match="divisible"):
        ModelConfig(d_model=100, n_head=3)
    with pytest.raises(ConfigError, match="multiple of n_kv_head"):
        ModelConfig(n_head=6, n_kv_head=4)
    with pytest.raises(ConfigError, match="unknown model preset"):
        preset("gpt5")
    with pytest.raises(ConfigError, match="unknown field"):
        ModelConfig.from_dict({"n_layers": 3})


def test_rope_frequencies_stay_float32_under_bf16():
    model = small("llama-gqa").to(torch.bfloat16)
    assert model.inv_freq.dtype == torch.float32
    assert model.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
