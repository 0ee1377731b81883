"""`lmlab.quickstart.quickstart` end to end, at a tiny budget on a few small stdlib files."""

import json
import math
import sysconfig
from pathlib import Path

import pytest

SMALL_FILES = ["colorsys.py", "genericpath.py", "reprlib.py", "stat.py", "linecache.py",
               "fnmatch.py", "getopt.py", "copy.py"]  # ~55 KB of the running Python's source


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    import lmlab
    from lmlab.quickstart import quickstart, split_text_bytes

    root = Path(sysconfig.get_paths()["stdlib"])
    corpus = [str(root / f) for f in SMALL_FILES]
    assert all(Path(f).is_file() for f in corpus)
    out = tmp_path / "qs"
    # the shortest pretraining quickstart does is 0.2 minutes, whatever the budget
    summary = quickstart(corpus=corpus, minutes=0.3, out=str(out), device="cpu")

    on_disk = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    for s in (summary, on_disk):
        for key in ("val_bpb", "xz_bpb", "params"):
            assert isinstance(s[key], (int, float)) and math.isfinite(s[key]) and s[key] > 0, key
        assert isinstance(s["steps"], int) and s["steps"] >= 1
        assert s["status"] in ("finished", "time limit")
    assert on_disk["val_bpb"] == pytest.approx(summary["val_bpb"])
    assert on_disk["steps"] == summary["steps"]
    # a user's corpus is prompted with its own held-out text, one sample per prompt
    held_out = split_text_bytes(out / "shards", lm_tokenizer(out), "val").decode("utf-8")
    assert summary["prompts"] and all(p in held_out for p in summary["prompts"])
    assert len(summary["samples"]) == len(summary["prompts"])

    lm = lmlab.load(out)  # the output directory is a model directory
    assert sum(p.numel() for p in lm.model.parameters()) == summary["params"]
    assert isinstance(lm.generate("def ", max_new_tokens=8, temperature=0), str)


def lm_tokenizer(out):
    from lmlab.tokenizer import Tokenizer

    return Tokenizer.load(out / "tokenizer")


def test_corpus_prompts_come_from_held_out_lines():
    from lmlab.quickstart import corpus_prompts

    text = "今天天气很好，我们去公园散步吧。\n短\n北京上海和深圳的天气今天都很好\n第三行的文本也足够长\n"
    assert corpus_prompts(text) == ["今天天气很好，我", "北京上海和深圳的", "第三行的文本也足"]
    assert corpus_prompts("") == ["def "]


def test_a_corpus_without_held_out_text_stops_before_training(tmp_path):
    from lmlab.errors import InputError
    from lmlab.quickstart import quickstart

    one = tmp_path / "one.py"
    one.write_text("def hello():\n    return 'one document only'\n" * 20)
    with pytest.raises(InputError, match="no held-out documents"):
        quickstart(corpus=[str(one)], minutes=0.3, out=str(tmp_path / "qs"), device="cpu")
    assert not (tmp_path / "qs" / "checkpoints").exists()  # no training time was spent
