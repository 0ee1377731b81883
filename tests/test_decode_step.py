"""The CPU decode step (`transformer._decode_lean`) is the module path's arithmetic, exactly.

Reference: the same step through `Transformer.forward` (every nn.Module called), on the
same slots. The lean step must give identical logits and identical cache contents, for
every block layout the Transformer has, with rows at equal and at different lengths, and
must step aside (the module path runs) wherever it could differ: autograd, train mode,
forward hooks, a layer replaced or given another class, a model moved to another dtype.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmlab.model import Transformer, fastpath, preset
from lmlab.model import transformer as tr

CONFIGS = {
    "gpt2": dict(name="tiny"),
    "llama-gqa": dict(name="llama-tiny"),
    "qwen3-qk-norm": dict(name="llama-tiny", qk_norm=True),
    "bert-gelu": dict(name="tiny", mlp="gelu_exact"),
    "rope-layernorm-nobias": dict(name="llama-tiny", norm="layernorm", mlp="gelu", bias=False),
}


def make(name: str, **kw) -> Transformer:
    torch.manual_seed(0)
    cfg = preset(name, vocab_size=97, d_model=64, n_head=4, max_seq_len=64, **kw)
    return Transformer(cfg).eval()


def module_step(model: Transformer, ids: torch.Tensor, slots) -> torch.Tensor:
    """What decode_slots computed before the lean step: every module called."""
    rows = slots.rows(ids.shape[0])
    h = model(ids[:, None], cache=rows, attn_mask=rows.mask, positions=rows.positions,
              return_hidden=True)
    return model.lm_head(h[:, -1])


def prefilled(model: Transformer, prompts: list[list[int]]):
    slots = model.new_slots(len(prompts), 32)
    with torch.no_grad():
        for i, p in enumerate(prompts):
            model.prefill_slot(torch.tensor(p), slots, i)
    return slots


@pytest.fixture(params=["plain", "fast"])
def ops(request, monkeypatch):
    """Both of the fast-path choices (plain ops; the blocked products and two-matmul
    attention), forced so that both steps take the same ones."""
    monkeypatch.setenv(fastpath.ENV, request.param)
    fastpath.clear()
    yield request.param
    fastpath.clear()


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("lengths", [[5, 5, 5], [3, 9, 1]], ids=["equal", "ragged"])
def test_the_lean_step_equals_the_module_step(config, lengths, ops):
    model = make(**CONFIGS[config])
    prompts = [[(7 * i + j) % 97 for j in range(n)] for i, n in enumerate(lengths)]
    lean, ref = prefilled(model, prompts), prefilled(model, prompts)
    ids = torch.tensor([3, 50, 96])
    with torch.no_grad():
        assert tr._lean_plan(model, ids) is not None  # the lean step is what runs below
        for step in range(4):
            a, b = model.decode_slots(ids, lean), module_step(model, ids, ref)
            assert torch.equal(a, b), f"step {step}: max diff {(a - b).abs().max()}"
            ids = a.argmax(-1)
    assert lean.lens == ref.lens
    for x, y in zip(lean.k + lean.v, ref.k + ref.v):
        assert torch.equal(x, y)


def test_an_empty_slot_decodes_as_the_module_path_does(ops):
    model = make("llama-tiny")
    lean, ref = model.new_slots(1, 8), model.new_slots(1, 8)
    ids = torch.tensor([5])
    with torch.no_grad():
        assert torch.equal(model.decode_slots(ids, lean), module_step(model, ids, ref))


def steps_through_modules(model: Transformer, slots, ids) -> bool:
    """Whether a decode step called the blocks' forward (the module path)."""
    called = []
    orig = tr.Block.forward

    def spy(self, *a, **kw):
        called.append(1)
        return orig(self, *a, **kw)

    tr.Block.forward = spy
    try:
        model.decode_slots(ids, slots)
    finally:
        tr.Block.forward = orig
    return bool(called)


def test_the_module_path_runs_under_autograd_train_mode_and_hooks(plain_ops):
    model = make("tiny")
    slots = prefilled(model, [[1, 2, 3]])
    ids = torch.tensor([4])
    with torch.no_grad():
        assert not steps_through_modules(model, slots, ids)
    assert steps_through_modules(model, slots, ids)  # autograd on
    with torch.no_grad():
        model.train()
        assert steps_through_modules(model, slots, ids)
        model.eval()
        seen = []
        handle = model.blocks[1].mlp.register_forward_hook(lambda m, i, o: seen.append(o))
        assert steps_through_modules(model, slots, ids) and len(seen) == 1
        handle.remove()
        assert not steps_through_modules(model, slots, ids)


def test_a_replaced_layer_or_a_new_class_or_dtype_is_followed(ops):
    model = make("tiny")
    prompts = [[1, 2, 3], [4, 5]]
    lean, ref = prefilled(model, prompts), prefilled(model, prompts)
    ids = torch.tensor([6, 7])
    with torch.no_grad():
        assert torch.equal(model.decode_slots(ids, lean), module_step(model, ids, ref))
        # a new layer assigned: the plan is rebuilt around it
        new = tr.Linear(64, 256)
        nn.init.normal_(new.weight)
        model.blocks[0].mlp.fc = new
        assert torch.equal(model.decode_slots(ids, lean), module_step(model, ids, ref))

        # a layer whose class changes in place (what LoRA does): the module path runs it
        class Shifted(tr.Linear):
            def forward(self, x):
                return super().forward(x) + 1.0

        model.blocks[1].attn.proj.__class__ = Shifted
        assert steps_through_modules(model, prefilled(model, prompts), ids)
        assert torch.equal(model.decode_slots(ids, lean), module_step(model, ids, ref))
        model.blocks[1].attn.proj.__class__ = tr.Linear
        assert not steps_through_modules(model, prefilled(model, prompts), ids)

        # moved to another dtype: the plan holds the new tensors
        model.double()
        lean, ref = prefilled(model, prompts), prefilled(model, prompts)
        a = model.decode_slots(ids, lean)
        assert a.dtype == torch.float64 and torch.equal(a, module_step(model, ids, ref))
