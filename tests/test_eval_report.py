"""Tasks and the report card on a tiny model trained in the test.

- multiple choice picks the answers a tiny Transformer was trained to prefer
  (English and Chinese facts repeated), and an untrained one does not;
- the report card (library) has every section, its files, and with --compare the
  deltas (compare − model) and McNemar's test on the paired rows; a model with no
  classifier skips the classification task with a note;
- `lmlab eval` writes the report and prints a summary; bad task rows are one
  line `path:line: problem`, exit 2, and nothing is written;
- the task format: header, type inference, shipped tasks (the stdlib one rebuilds
  to the same bytes on the Python that built it), held-out text read back from shards.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from lmlab.eval.tasks import (build_stdlib_docstring, choice_tokens, evaluate_task, load_task,
                              resolve_tasks, shipped_tasks)
from tests.conftest import run_cli, write_shards

COLORS_EN = [("sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black")]
COLORS_ZH = [("天空", "蓝色"), ("草地", "绿色"), ("雪花", "白色"), ("煤炭", "黑色")]


def fact_en(thing, color):
    return f"the {thing} is {color}."


def fact_zh(thing, color):
    return f"{thing}是{color}的。"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer, tokenizer_dir):
    """{"good": a tiny model trained on the colour facts, "raw": the same, untrained}."""
    from lmlab.model import Transformer, preset
    from lmlab.model_io import save_model_dir

    root = tmp_path_factory.mktemp("eval-models")
    rng = random.Random(0)
    ids: list[int] = []
    for _ in range(300):  # documents of a few facts each, separated by EOS as shards are
        en = [fact_en(*rng.choice(COLORS_EN)) for _ in range(2)]
        zh = [fact_zh(*rng.choice(COLORS_ZH)) for _ in range(2)]
        ids += tokenizer.encode(" ".join(en) + " " + "".join(zh)) + [tokenizer.eos_id]
    data = torch.tensor(ids)
    cfg = preset("tiny", vocab_size=tokenizer.vocab_size, n_layer=2, d_model=64, n_head=4,
                 max_seq_len=64)
    torch.manual_seed(0)
    good = Transformer(cfg)
    opt = torch.optim.AdamW(good.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(80):
        starts = torch.randint(0, len(data) - 33, (16,), generator=g)
        xy = torch.stack([data[s:s + 33] for s in starts])
        loss = good(xy[:, :-1], targets=xy[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.manual_seed(1)
    raw = Transformer(cfg)
    return {"good": save_model_dir(good.eval(), root / "good", tokenizer_dir=tokenizer_dir),
            "raw": save_model_dir(raw.eval(), root / "raw", tokenizer_dir=tokenizer_dir)}


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval-tasks")
    mc = [{"task": "colours", "type": "multiple_choice", "description": "颜色 / colours"}]
    for thing, color in COLORS_EN:
        choices = [f" {c}." for _, c in COLORS_EN]
        mc.append({"context": f"the {thing} is", "choices": choices,
                   "answer": choices.index(f" {color}.")})
        # trailing space in the context: scored as "the coal is" + " black."
        mc.append({"context": f"the {thing} is ", "choices": [c.strip() for c in choices],
                   "answer": f"{color}."})
    for thing, color in COLORS_ZH:
        choices = [f"{c}的。" for _, c in COLORS_ZH]
        mc.append({"context": f"{thing}是", "choices": choices,
                   "answer": choices.index(f"{color}的。")})
    gen = [{"task": "colour-words", "type": "generation", "max_new_tokens": 6, "stop": ["."]}]
    gen += [{"prompt": f"the {t} is", "reference": f" {c}"} for t, c in COLORS_EN]
    gen += [{"prompt": f"{t}是", "reference": f"{c}的"} for t, c in COLORS_ZH]
    cls = [{"text": fact_en(t, c), "label": "en"} for t, c in COLORS_EN]
    cls += [{"text": fact_zh(t, c), "label": "zh"} for t, c in COLORS_ZH]
    held = d / "held-out.txt"
    held.write_text(" ".join(fact_en(t, c) for t, c in COLORS_EN * 3)
                    + "".join(fact_zh(t, c) for t, c in COLORS_ZH * 3) + "\n", encoding="utf-8")
    return {"mc": write_jsonl(d / "colours.jsonl", mc), "gen": write_jsonl(d / "gen.jsonl", gen),
            # no header: the type is read off the rows, the name off the file
            "cls": write_jsonl(d / "language.jsonl", cls), "held": held}


def by_script(texts):
    """A classifier that is right on every row but one kind of mistake: ("zh" | "en", probs)."""
    from lmlab.eval.metrics import has_cjk

    return [("zh", {"zh": 1.0, "en": 0.0}) if has_cjk(t) else ("en", {"zh": 0.0, "en": 1.0})
            for t in texts]


def test_multiple_choice_picks_what_the_model_was_trained_to_prefer(models, task_files):
    import lmlab

    task = load_task(task_files["mc"])
    good = evaluate_task(task, lm=lmlab.load(models["good"]))
    raw = evaluate_task(task, lm=lmlab.load(models["raw"]))
    assert good["n"] == 12 and good["metrics"]["chance"] == 0.25
    assert good["metrics"]["acc"] == 1.0 and good["metrics"]["acc_centered"] == 1.0
    assert good["metrics"]["acc_norm"] == 1.0  # the choices are of equal length
    assert raw["metrics"]["acc"] < 1.0
    row = good["rows"][0]
    assert row["pred"] == row["answer"] and len(row["logprobs"]) == 4
    assert max(row["logprobs"]) == row["logprobs"][row["answer"]] and max(row["logprobs"]) < 0


def test_choice_tokens_move_the_contexts_trailing_space(tokenizer):
    a = choice_tokens(tokenizer, "the sky is ", "blue.")
    b = choice_tokens(tokenizer, "the sky is", " blue.")
    assert a == b and tokenizer.decode(a[1]) == " blue."


def test_report_card_has_every_section_and_compare_gives_deltas(models, task_files, tmp_path):
    from lmlab.eval import report_card

    out = tmp_path / "report"
    r = report_card(models["good"], tasks=[str(task_files[k]) for k in ("mc", "gen", "cls")],
                    text=task_files["held"], out_dir=out, compare=models["raw"],
                    classify=by_script)
    assert {"format", "model", "text", "tasks", "harness", "compare", "notes", "settings",
            "files", "seconds"} <= set(r)
    assert r["model"]["kind"] == "transformer" and r["model"]["params"] > 0
    text = r["text"]
    assert {"loss", "ppl", "bpb", "tokens", "bytes", "baselines"} <= set(text)
    assert set(text["baselines"]) == {"xz", "bz2", "zlib"} and 0 < text["bpb"]
    assert text["ppl"] == pytest.approx(torch.tensor(text["loss"]).exp().item(), rel=1e-5)
    assert set(r["tasks"]) == {"colours", "colour-words", "language"}
    assert r["tasks"]["colours"]["metrics"]["acc"] == 1.0
    gen = r["tasks"]["colour-words"]["metrics"]
    assert {"exact_match", "bleu", "chrf", "rouge1", "rouge2", "rougeL"} <= set(gen)
    assert 0 <= gen["exact_match"] <= 1 and 0 <= gen["chrf"] <= 100
    cls = r["tasks"]["language"]["metrics"]
    assert cls["accuracy"] == 1.0 and cls["macro_f1"] == 1.0
    assert cls["confusion"] == {"labels": ["en", "zh"], "matrix": [[4, 0], [0, 4]]}
    assert r["harness"] == {"skipped": "no lm-eval tasks given (--harness-tasks)"}

    c = r["compare"]
    assert c["model"]["path"] == str(models["raw"])
    assert c["deltas"]["text"]["bpb"] == pytest.approx(c["text"]["bpb"] - text["bpb"])
    d = c["deltas"]["tasks"]["colours"]
    assert d["acc"] == pytest.approx(c["tasks"]["colours"]["metrics"]["acc"] - 1.0) and d["acc"] < 0
    mc = c["mcnemar"]["colours"]
    wrong = sum(not x["correct"] for x in c["tasks"]["colours"]["rows"])
    assert (mc["b"], mc["c"], mc["n"]) == (wrong, 0, 12) and 0 < mc["p_value"] <= 1
    assert "colour-words" in c["mcnemar"]  # generation rows pair on exact match
    # the untrained model has no classifier: its classification task is skipped, with a note
    assert "skipped" in c["tasks"]["language"] and "language" not in c["mcnemar"]
    assert any("language" in n and "skipped" in n for n in r["notes"])

    for name in ("report.json", "report.md", "report.html", "tasks.png", "bpb.png",
                 "confusion-language.png", ".lmlab-output.json"):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert on_disk["compare"]["deltas"] == json.loads(json.dumps(c["deltas"]))
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 3 and "src='tasks.png'" not in page
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "| colours | multiple_choice | 12 | acc | 1.0000 |" in md and "McNemar" in md


def test_cli_eval_prints_a_summary_and_writes_the_report(models, task_files, tmp_path):
    out = tmp_path / "cli-report"
    rc, stdout, stderr = run_cli(["eval", "--model", models["good"], "--tasks", task_files["mc"],
                                  "--text", task_files["held"], "--out", out, "--limit", 4,
                                  "--device", "cpu"])
    assert rc == 0, stderr
    assert "colours (acc)" in stdout and "bits per byte" in stdout
    assert "report.html" in stdout and (out / "report.html").is_file()
    r = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert r["tasks"]["colours"]["n"] == 4 and r["compare"] is None
    # the same output directory for other inputs: refused, one line, exit 2
    rc, _, stderr = run_cli(["eval", "--model", models["raw"], "--tasks", "none",
                             "--text", task_files["held"], "--out", out])
    assert rc == 2 and "--overwrite" in stderr and len(stderr.strip().splitlines()) == 1
    rc, stdout, _ = run_cli(["eval", "--help"])
    assert rc == 0 and "example: lmlab eval" in stdout.replace("\n", " ")


GOOD_MC = {"context": "the sky is", "choices": [" blue", " red"], "answer": 0}


@pytest.mark.parametrize("bad, needle", [
    ({"context": "x", "choices": [" a", " b", " c", " d"], "answer": 4},
     "answer 4 is out of range"),
    ({"context": "x", "choices": [" a", " b"], "answer": -1}, "out of range"),
    ({"context": "x", "choices": [], "answer": 0}, "choices must be a non-empty list"),
    ({"context": "x", "choices": [" a"], "answer": 0}, "at least two"),
    ({"context": "x", "answer": 0}, "missing field 'choices'"),
    ({"choices": [" a", " b"], "answer": 0}, "missing field 'context'"),
    ({"context": "x", "choices": [" a", " b"], "answer": " c"}, "not one of the choices"),
    ('{"context": "x", "choices": [', "not JSON"),
    ({"task": "late-header"}, "may only be the first line"),
])
def test_bad_task_rows_are_one_line_and_exit_2(models, tmp_path, bad, needle):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps({"task": "t", "type": "multiple_choice"}), json.dumps(GOOD_MC),
             bad if isinstance(bad, str) else json.dumps(bad)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "never"
    rc, stdout, stderr = run_cli(["eval", "--model", models["raw"], "--tasks", path, "--out", out])
    assert rc == 2, stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert f"{path}:3: " in stderr and needle in stderr, stderr
    assert not out.exists()


@pytest.mark.parametrize("rows, needle", [
    ([{"text": "好看", "label": "pos"}, {"text": "  ", "label": "neg"}], "text is empty"),
    ([{"text": "好看", "label": "pos"}, {"text": "差"}], "missing field 'label'"),
    ([{"prompt": "a", "reference": "b"}, {"prompt": "a"}], "missing field 'reference'"),
    ([{"context": "a"}], "cannot tell the task type"),
])
def test_bad_rows_of_other_types(tmp_path, rows, needle):
    from lmlab.errors import InputError

    path = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(InputError, match=needle) as e:
        load_task(path)
    assert str(e.value).startswith(f"{path}:{len(rows)}: ") and "\n" not in str(e.value)


def test_header_and_type_inference(task_files):
    gen = load_task(task_files["gen"])
    assert (gen.name, gen.type, gen.max_new_tokens, gen.stop) == ("colour-words", "generation", 6,
                                                                  ["."])
    cls = load_task(task_files["cls"])
    assert (cls.name, cls.type, len(cls.rows), cls.lines[0]) == ("language", "classification", 8, 1)
    mc = load_task(task_files["mc"])
    assert mc.rows[3]["answer"] == 1 and mc.lines[0] == 2  # "green." given as text → its index


def test_shipped_tasks_load_and_the_stdlib_task_rebuilds_to_the_same_rows():
    import sys

    shipped = shipped_tasks()
    assert {"stdlib-docstring", "stdlib-signature", "zh-cloze", "zh-continue"} <= set(shipped)
    tasks = {t.name: t for t in resolve_tasks(None)}
    doc = tasks["stdlib-docstring"]
    assert doc.type == "multiple_choice" and len(doc.rows) == 200
    assert tasks["zh-continue"].type == "generation" and tasks["zh-continue"].stop
    for path in shipped.values():
        assert path.stat().st_size < 200_000
    lines = shipped["stdlib-docstring"].read_text(encoding="utf-8").splitlines()
    if json.loads(lines[0])["python"] != sys.version.split()[0]:
        pytest.skip("the shipped stdlib task was built on another Python")
    assert [json.dumps(r, ensure_ascii=False) for r in build_stdlib_docstring()] == lines


def test_held_out_text_from_shards_is_their_val_split(tmp_path, tokenizer, tokenizer_dir):
    from lmlab.eval.report import held_out_text, text_metrics

    texts = [f"document {i}: {fact_en(*COLORS_EN[i % 4])} {fact_zh(*COLORS_ZH[i % 4])}"
             for i in range(12)]
    shards = write_shards(tmp_path / "shards", tokenizer, tokenizer_dir, texts, val_every=3)
    docs, source = held_out_text(shards, None, [tokenizer])
    assert docs == texts[::3] and "val split" in source
    m = text_metrics(_tiny(tokenizer), docs)
    assert m["tokens"] > 0 and m["bpb"] > 0


def _tiny(tokenizer):
    from lmlab import LoadedModel
    from lmlab.model import Transformer, preset

    model = Transformer(preset("tiny", vocab_size=tokenizer.vocab_size, n_layer=1, d_model=32,
                               n_head=2, max_seq_len=32)).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, path=Path("."))
