import json
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmlab.tokenizer import EOS, SPECIAL_TOKENS, Tokenizer, train_tokenizer
from lmlab.errors import InputError

# arbitrary Unicode: every category except lone surrogates (not valid UTF-8)
any_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)
tricky = st.sampled_from([
    "", " ", "\n\n\t", "中文，标点。“引号”", "👨‍👩‍👧‍👦🎉", "e\u0301\u0327", "\x00\x01\x1b[31m",
    "\ufeffBOM", "  leading and trailing  ", "混合 mixed 文本 123456789", "\r\n\r\n", "ｆｕｌｌｗｉｄｔｈ",
    "<|endoftext|>", "tab\tand\u00a0nbsp", "\U0010ffff", "Ελληνικά русский العربية हिन्दी",
])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(any_text, tricky), max_size=5).map("".join))
def test_roundtrip_any_unicode(tokenizer, s):
    ids = tokenizer.encode(s)
    assert tokenizer.decode(ids) == s


def test_special_tokens_have_fixed_ids(tokenizer):
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_id(t) == i
    assert tokenizer.eos_id == 0
    # as in transformers, special-token text maps to the special id (chat templates rely on it)
    assert tokenizer.encode(f"a{EOS}b")[1] == tokenizer.eos_id
    assert tokenizer.decode(tokenizer.encode(f"a{EOS}b")) == f"a{EOS}b"


def test_chinese_is_learned_not_just_bytes(tokenizer):
    s = "语言模型通过预测下一个词来学习语言的规律。"
    n_bytes = len(s.encode("utf-8"))
    # trained on Chinese, so merges cover common characters: far fewer tokens than bytes
    assert len(tokenizer.encode(s)) < n_bytes / 2


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(any_text, tricky), max_size=4).map("".join))
def test_autotokenizer_gives_same_ids(hf_tokenizer, tokenizer, s):
    assert hf_tokenizer(s, add_special_tokens=True)["input_ids"] == tokenizer.encode(s)
    assert hf_tokenizer.decode(tokenizer.encode(s)) == s


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))


def test_autotokenizer_special_tokens_and_chat_template(hf_tokenizer, tokenizer):
    assert hf_tokenizer.eos_token_id == tokenizer.eos_id
    assert hf_tokenizer.bos_token_id == tokenizer.bos_id
    assert hf_tokenizer.pad_token_id == tokenizer.pad_id
    msgs = [{"role": "system", "content": "你是一个助手。"}, {"role": "user", "content": "Hi!"}]
    ours = tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
    theirs = hf_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert ours == theirs
    assert hf_tokenizer(ours)["input_ids"] == tokenizer.encode(ours)


def test_saved_files_and_hash(tokenizer_dir, tokenizer):
    cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == EOS and "chat_template" in cfg
    again = Tokenizer.load(tokenizer_dir)
    assert again.hash == tokenizer.hash and len(tokenizer.hash) == 64


def test_training_is_deterministic(corpus_texts):
    a = train_tokenizer(corpus_texts[:10], 400)
    b = train_tokenizer(corpus_texts[:10], 400)
    assert a.hash == b.hash


def test_bad_inputs_are_clear(tmp_path):
    with pytest.raises(InputError, match="too small"):
        train_tokenizer(["abc"], 100)
    with pytest.raises(InputError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(InputError, match="not a valid tokenizer.json"):
        Tokenizer.load(tmp_path)


def test_cli_train(tmp_path):
    (tmp_path / "a.txt").write_text("hello world, 你好世界。\n" * 50, encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(
        "\n".join(json.dumps({"text": f"document {i} 文档"}) for i in range(20)), encoding="utf-8")
    out = tmp_path / "tok"
    r = subprocess.run([sys.executable, "-m", "lmlab.cli", "tokenizer", "train", "--input",
                        str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"),
                        "--vocab-size", "280", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    tok = Tokenizer.load(out)
    assert tok.vocab_size == 280
    assert tok.decode(tok.encode("你好世界 hello")) == "你好世界 hello"
    # a missing input is one clear line and exit code 2
    r = subprocess.run([sys.executable, "-m", "lmlab.cli", "tokenizer", "train", "--input",
                        str(tmp_path / "missing.txt"), "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "missing.txt" in r.stderr
