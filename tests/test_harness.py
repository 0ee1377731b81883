"""lmlab.eval.harness against lm-eval's own Hugging Face backend (HFLM) on the export-hf of
the same model: one local multiple-choice task, rolling log-likelihoods, generation.

Nothing comes from a hub: the model is made here, the task is a YAML and a JSONL in tmp_path.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from lm_eval.api.instance import Instance  # noqa: E402

from lmlab.errors import InputError  # noqa: E402
from lmlab.eval import sequence_logprobs  # noqa: E402
from lmlab.eval import harness  # noqa: E402
from lmlab.eval.harness import LmlabLM, evaluate_tasks, run_harness, task_metrics  # noqa: E402
from lmlab.infer import generate_ids  # noqa: E402
from lmlab.interop import export_hf  # noqa: E402
from lmlab.model import Transformer, preset  # noqa: E402
from lmlab.model_io import save_model_dir  # noqa: E402

from .conftest import CHINESE, stdlib_texts  # noqa: E402

WINDOW = 48  # small, so that long contexts are cut and long texts take several windows
TOL = 1e-4

MC_ROWS = [
    {"context": "Question: what does len([1, 2, 3]) return?\nAnswer:",
     "choices": ["3", "2", "an error", "None"], "answer": 0},
    {"context": "The opposite of hot is", "choices": ["cold", "warm", "red"], "answer": 0},
    {"context": "def add(a, b):\n    return", "choices": ["a + b", "a - b"], "answer": 0},
    {"context": "import", "choices": ["os", "sys", "json", "re"], "answer": 1},
    {"context": "北京是中国的", "choices": ["首都", "河流", "山"], "answer": 0},
    {"context": "语言模型通过预测下一个", "choices": ["词", "天气"], "answer": 0},
    # longer than the window: the rightmost tokens are kept
    {"context": stdlib_texts(1)[0][:700] + "\nThe file above is written in",
     "choices": ["Python", "C", "English prose"], "answer": 0},
    {"context": "1, 2, 3, 4,", "choices": ["5", "7", "100"], "answer": 0},
    {"context": "True or False: 2 > 1.", "choices": ["True", "False"], "answer": 0},
    {"context": "A cat says", "choices": ["meow", "moo", "quack", "woof"], "answer": 0},
]

TASK_YAML = """\
task: lmlab_harness_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: mc.jsonl
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  version: 1.0
"""


@torch.no_grad()
def perturb(module: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tokenizer, tokenizer_dir):
    """An lmlab model directory (GPT-2 style, learned positions: a window too long would
    fail loudly) and its export-hf."""
    root = tmp_path_factory.mktemp("harness")
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=WINDOW))
    perturb(model)
    save_model_dir(model, root / "model", tokenizer_dir=tokenizer_dir)
    export_hf(root / "model", root / "hf")
    return root / "model", root / "hf"


@pytest.fixture(scope="module")
def ours(dirs):
    return LmlabLM(dirs[0], batch_size=8)


@pytest.fixture(scope="module")
def hflm(dirs, tokenizer):
    pytest.importorskip("accelerate")  # lm_eval.models.huggingface imports it
    from lm_eval.models.huggingface import HFLM

    # lmlab's prefix is EOS (what its pretraining puts between documents); HFLM's own
    # default would be the tokenizer's <|bos|>
    return HFLM(pretrained=str(dirs[1]), device="cpu", dtype="float32", batch_size=1,
                prefix_token_id=tokenizer.eos_id)


@pytest.fixture
def task_yaml(tmp_path):
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    (task_dir / "mc.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in MC_ROWS), encoding="utf-8")
    path = task_dir / "mc.yaml"
    path.write_text(TASK_YAML.format(cache=tmp_path / "datasets-cache"), encoding="utf-8")
    return path


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_multiple_choice_task_agrees_with_hflm(ours, hflm, dirs, task_yaml, tmp_path,
                                               monkeypatch):
    ours_res = evaluate_tasks(ours, [task_yaml], log_samples=True)
    hf_res = evaluate_tasks(hflm, [task_yaml], log_samples=True)
    ours_samples = sorted(ours_res["samples"]["lmlab_harness_mc"], key=lambda s: s["doc_id"])
    hf_samples = sorted(hf_res["samples"]["lmlab_harness_mc"], key=lambda s: s["doc_id"])
    assert len(ours_samples) == len(hf_samples) == len(MC_ROWS)
    n_requests = 0
    for a, b in zip(ours_samples, hf_samples):
        assert a["arguments"] == b["arguments"]
        for (ll_a, greedy_a), (ll_b, greedy_b) in zip((r[0] for r in a["resps"]),
                                                      (r[0] for r in b["resps"])):
            assert ll_a == pytest.approx(ll_b, abs=TOL)
            assert greedy_a == greedy_b
            n_requests += 1
    assert n_requests == sum(len(r["choices"]) for r in MC_ROWS)
    ours_metrics, hf_metrics = task_metrics(ours_res), task_metrics(hf_res)
    assert ours_metrics["lmlab_harness_mc"]["acc"] == hf_metrics["lmlab_harness_mc"]["acc"]
    assert ours_metrics["lmlab_harness_mc"]["acc_norm"] == hf_metrics["lmlab_harness_mc"][
        "acc_norm"]

    # run_harness: the same figures; the data file is found beside the YAML from anywhere
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    metrics = run_harness(str(dirs[0]), [str(task_yaml)], device="cpu")
    assert set(metrics) == {"lmlab_harness_mc"}
    assert {"acc", "acc_norm", "acc_stderr"} <= set(metrics["lmlab_harness_mc"])
    for name in ("acc", "acc_norm"):
        assert metrics["lmlab_harness_mc"][name] == ours_metrics["lmlab_harness_mc"][name]
    limited = evaluate_tasks(ours, [task_yaml], limit=3, log_samples=True)
    assert len(limited["samples"]["lmlab_harness_mc"]) == 3


def test_loglikelihood_agrees_with_hflm_and_with_sequence_logprobs(ours, hflm, tokenizer):
    context = "The answer is"  # no trailing space: it would move into the continuation
    ids = tokenizer.encode(context)
    greedy = tokenizer.decode(generate_ids(ours.model, ids, 1, temperature=0))
    assert tokenizer.encode(context + greedy)[:len(ids)] == ids
    pairs = [
        ("The answer is", " yes"),
        ("def f(x):\n    return", " x"),
        ("", "hello world"),  # empty context: the prefix token
        ("语言模型", "通过预测"),
        ("trailing space ", "word"),  # the space moves to the continuation
        (stdlib_texts(1)[0][:600], " end"),  # longer than the window
        ("a", " ".join(["word"] * 12)),  # a long continuation
        (context, greedy),  # the greedy continuation
    ]
    got = ours.loglikelihood(requests("loglikelihood", pairs))
    want = hflm.loglikelihood(requests("loglikelihood", pairs))
    for (ll_a, greedy_a), (ll_b, greedy_b) in zip(got, want):
        assert ll_a == pytest.approx(ll_b, abs=TOL)
        assert greedy_a == greedy_b
    assert got[-1][1] is True and not all(g for _, g in got)
    # the first pair from lmlab's own scorer: Σ log p(" yes" | "The answer is")
    ctx, cont = tokenizer.encode("The answer is"), tokenizer.encode("The answer is yes")
    cont = cont[len(ctx):]
    seq = torch.tensor([ctx + cont])
    targets = torch.tensor([[-100] * (len(ctx) - 1) + cont + [-100]])
    with torch.no_grad():
        direct = sequence_logprobs(ours.model, seq, targets).item()
    assert got[0][0] == pytest.approx(direct, abs=TOL)


def test_rolling_loglikelihood_agrees_with_hflm(ours, hflm, tokenizer):
    long_text = stdlib_texts(3)[2][:1500]
    assert len(tokenizer.encode(long_text)) > 4 * WINDOW  # several windows
    texts = ["hello world", long_text, CHINESE[0], ""]
    got = ours.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in texts]))
    want = hflm.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in texts]))
    assert got == pytest.approx(want, abs=1e-3)  # a sum over ~400 tokens
    assert got[3] == 0.0
    # a text inside one window: log p(text | prefix token)
    ids = [tokenizer.eos_id] + tokenizer.encode("hello world")
    with torch.no_grad():
        direct = sequence_logprobs(ours.model, torch.tensor([ids[:-1]]),
                                   torch.tensor([ids[1:]])).item()
    assert got[0] == pytest.approx(direct, abs=TOL)


def test_generate_until_stops_at_until_and_agrees_with_hflm(ours, hflm, tokenizer):
    contexts = ["def main():\n", "语言", "import os\nimport sys\n"]
    free = {"until": [], "max_gen_toks": 20, "do_sample": False}
    full = ours.generate_until(requests("generate_until", [(c, free) for c in contexts]))
    assert full == hflm.generate_until(requests("generate_until", [(c, free) for c in contexts]))
    # a stop string that first occurs a few characters in
    text = full[0]
    stop = next(text[i:i + 2] for i in range(3, len(text) - 1)
                if text[i:i + 2].strip() and text.find(text[i:i + 2]) == i)
    stopped = ours.generate_until(requests("generate_until", [
        (contexts[0], {"until": [stop], "max_gen_toks": 20, "do_sample": False})]))
    assert stopped == [text[:text.index(stop)]]
    # max_gen_toks: the text of exactly that many greedy tokens
    short = ours.generate_until(requests("generate_until", [
        (contexts[0], {"until": [], "max_gen_toks": 5, "do_sample": False})]))
    ids = generate_ids(ours.model, tokenizer.encode(contexts[0]), 5, temperature=0,
                       eos_id=tokenizer.stop_ids)
    assert short == [tokenizer.decode([t for t in ids if t not in tokenizer.stop_ids],
                                      skip_special_tokens=True)]


def test_full_logits_path_and_chunked_logits_give_the_same_scores(dirs, ours, monkeypatch):
    """A model kind without `return_hidden` is scored from its logits, and the output layer
    runs a few rows at a time where the logits would be large: the same numbers."""
    plain = LmlabLM(dirs[0], batch_size=1)
    plain._use_hidden = False
    pairs = [("The answer is", " yes"), ("语言模型", "通过预测"), ("", "hello"),
             ("a", " ".join(["word"] * 12))]
    a = ours.loglikelihood(requests("loglikelihood", pairs))
    b = plain.loglikelihood(requests("loglikelihood", pairs))
    monkeypatch.setattr(harness, "LOGITS_AT_ONCE", 3 * ours.model.vocab_size)  # 3 rows
    c = ours.loglikelihood(requests("loglikelihood", pairs))
    assert [g for _, g in c] == [g for _, g in a]
    assert [ll for ll, _ in c] == pytest.approx([ll for ll, _ in a], abs=TOL)
    for (ll_a, g_a), (ll_b, g_b) in zip(a, b):
        assert ll_a == pytest.approx(ll_b, abs=TOL) and g_a == g_b


@pytest.mark.parametrize("case", ["missing-data", "bad-yaml", "no-file", "hub-dataset"])
def test_bad_task_files_are_one_line_input_errors(case, tmp_path, task_yaml):
    if case == "missing-data":
        path = task_yaml
        path.write_text(path.read_text().replace("mc.jsonl", "nowhere.jsonl"))
        named = "nowhere.jsonl"
    elif case == "bad-yaml":
        path = tmp_path / "broken.yaml"
        path.write_text("task: [unclosed\n  doc_to_text: {{\n")
        named = "broken.yaml"
    elif case == "no-file":
        path = tmp_path / "absent.yaml"
        named = "absent.yaml"
    else:
        path = task_yaml
        path.write_text(path.read_text().replace("dataset_path: json", "dataset_path: super_glue"))
        named = "super_glue"
    # the task files are read before the model: a bad task fails even with no model here
    with pytest.raises(InputError) as err:
        run_harness(str(tmp_path / "no-model"), [str(path)])
    message = str(err.value)
    assert named in message and "\n" not in message
    assert str(path.name) in message


def test_a_tokenizer_that_adds_bos_is_scored_as_hflm_scores_it(dirs, tmp_path):
    """An imported LLaMA's tokenizer puts BOS before every text: contexts get it, and BOS
    (HFLM's default prefix) is the prefix of an empty context and of a rolling text."""
    import shutil

    from tokenizers import Tokenizer as HFTokenizer, processors

    from lm_eval.models.huggingface import HFLM

    copies = []
    for src in dirs:
        dst = tmp_path / src.name
        shutil.copytree(src, dst)
        tok = HFTokenizer.from_file(str(dst / "tokenizer.json"))
        bos = tok.token_to_id("<|bos|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", bos)])
        tok.save(str(dst / "tokenizer.json"))
        copies.append(dst)
    ours = LmlabLM(copies[0])
    theirs = HFLM(pretrained=str(copies[1]), device="cpu", dtype="float32", batch_size=1)
    assert ours.prefix_token_id == theirs.prefix_token_id == bos
    assert ours.tok_encode("hello") == theirs.tok_encode("hello") == [bos] + ours.tok_encode(
        "hello", add_special_tokens=False)
    pairs = [("The answer is", " yes"), ("", "hello world"), ("语言模型", "通过预测")]
    got = ours.loglikelihood(requests("loglikelihood", pairs))
    want = theirs.loglikelihood(requests("loglikelihood", pairs))
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in want], abs=TOL)
    texts = [(CHINESE[1],), (stdlib_texts(2)[1][:400],)]
    assert ours.loglikelihood_rolling(requests("loglikelihood_rolling", texts)) == pytest.approx(
        theirs.loglikelihood_rolling(requests("loglikelihood_rolling", texts)), abs=1e-3)
