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
                        str(tmp_path / "missing.txt"), "--out", str(tmp_path / "tok2")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "missing.txt" in r.stderr


# ---------------------------------------------------------------- other families' tokenizers

def test_lmlab_tokenizer_end_of_turn_and_stop_ids(tokenizer, tokenizer_dir):
    assert (tokenizer.bos_id, tokenizer.pad_id, tokenizer.eot_id) == (1, 2, 4)
    assert tokenizer.stop_ids == [tokenizer.eos_id, tokenizer.eot_id] == [0, 4]
    lengths = tokenizer.token_byte_lengths()
    assert lengths[:len(SPECIAL_TOKENS)] == [0] * len(SPECIAL_TOKENS)
    assert all(n > 0 for n in lengths[len(SPECIAL_TOKENS):])


def raw_tokenizer(specials: list[str]):
    """A byte-level BPE with `specials` first, as a Hugging Face model's tokenizer.json holds it."""
    from tokenizers import Tokenizer as RawTokenizer, decoders, models, pre_tokenizers, trainers

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(["hello world, def f(x): return x\n"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return raw


def tokenizer_dir_with(path, specials, **files):
    """A directory with tokenizer.json and the given config files (name_json=dict)."""
    path.mkdir()
    raw_tokenizer(specials).save(str(path / "tokenizer.json"))
    for name, content in files.items():
        (path / name.replace("_json", ".json")).write_text(json.dumps(content))
    return path


LLAMA2 = ["<unk>", "<s>", "</s>"]


def test_special_tokens_come_from_the_directory(tmp_path):
    # transformers writes a token as a string or as an AddedToken dict
    d = tokenizer_dir_with(tmp_path / "llama", LLAMA2, tokenizer_config_json={
        "bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>",
        "pad_token": None, "unk_token": "<unk>"})
    tok = Tokenizer.load(d)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eot_id) == (1, 2, None, None)
    assert tok.stop_ids == [2]
    assert tok.token_byte_lengths()[:3] == [0, 0, 0]
    # an older directory names them in special_tokens_map.json only
    d = tokenizer_dir_with(tmp_path / "old", LLAMA2,
                           special_tokens_map_json={"bos_token": "<s>", "eos_token": "</s>"})
    assert (Tokenizer.load(d).bos_id, Tokenizer.load(d).eos_id) == (1, 2)


def test_generation_config_adds_stop_ids(tmp_path):
    llama3 = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>"]
    d = tokenizer_dir_with(
        tmp_path / "llama3", llama3,
        tokenizer_config_json={"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"},
        generation_config_json={"bos_token_id": 0, "eos_token_id": [1, 3, 2]})
    tok = Tokenizer.load(d)
    assert (tok.bos_id, tok.eos_id, tok.eot_id) == (0, 1, 2)
    assert tok.stop_ids == [1, 2, 3]  # eos, end of turn, then generation_config's others
    # one id, not a list, is as valid; an id the vocabulary lacks (a default left from
    # another vocabulary) is dropped
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 50256}))
    assert Tokenizer.load(d).stop_ids == [1, 2]
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 3}))
    assert Tokenizer.load(d).stop_ids == [1, 2, 3]


def test_eos_named_only_by_generation_config(tmp_path):
    d = tokenizer_dir_with(tmp_path / "t", LLAMA2, tokenizer_config_json={"bos_token": "<s>"},
                           generation_config_json={"eos_token_id": 2})
    tok = Tokenizer.load(d)
    assert tok.eos_id == 2 and tok.stop_ids == [2]


def test_tokenizer_json_alone(tmp_path):
    """Without config files lmlab's names are looked up; other tokens are simply absent."""
    d = tokenizer_dir_with(tmp_path / "foreign", LLAMA2)
    tok = Tokenizer.load(d)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eot_id, tok.stop_ids) == (
        None, None, None, None, [])
    assert tok.decode(tok.encode("hello world")) == "hello world"
    d = tokenizer_dir_with(tmp_path / "lmlab", SPECIAL_TOKENS)
    tok = Tokenizer.load(d / "tokenizer.json")  # the file itself works as well
    assert (tok.eos_id, tok.bos_id, tok.pad_id, tok.eot_id, tok.stop_ids) == (0, 1, 2, 4, [0, 4])


def test_save_writes_a_loaded_tokenizers_files_back(tmp_path, tokenizer_dir):
    qwen = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
              "chat_template": "{{ messages }}"}
    d = tokenizer_dir_with(tmp_path / "qwen", qwen, tokenizer_config_json=config,
                           generation_config_json={"eos_token_id": [2, 0]})
    tok = Tokenizer.load(d)
    assert (tok.eos_id, tok.eot_id, tok.pad_id, tok.bos_id, tok.stop_ids) == (2, 2, 0, None, [2, 0])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "weights.bin").write_text("kept")
    tok.save(tmp_path / "out")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "generation_config.json", "tokenizer.json", "tokenizer_config.json", "weights.bin"]
    assert json.loads((out / "tokenizer_config.json").read_text()) == config
    again = Tokenizer.load(out)
    assert again.hash == tok.hash and again.stop_ids == [2, 0]
    # lmlab's own tokenizer saves the same directory it was loaded from
    Tokenizer.load(tokenizer_dir).save(tmp_path / "copy")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "copy" / name).read_text() == (tokenizer_dir / name).read_text()


def test_chat_template_needs_chatml_tokens(tmp_path):
    tok = Tokenizer.load(tokenizer_dir_with(tmp_path / "t", LLAMA2))
    with pytest.raises(InputError, match="no <\\|im_start\\|> token"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("name,content,match", [
    ("tokenizer_config.json", {"eos_token": "<|missing|>"},
     r"tokenizer_config.json: eos_token '<\|missing\|>' is not in tokenizer.json"),
    ("tokenizer_config.json", {"eos_token": 5}, r"tokenizer_config.json: eos_token must be"),
    ("tokenizer_config.json", ["not", "an", "object"], r"tokenizer_config.json: expected a JSON"),
    ("generation_config.json", {"eos_token_id": "</s>"},
     r"generation_config.json: eos_token_id must be a token id or a list"),
    ("generation_config.json", {"eos_token_id": [2, -1]}, r"generation_config.json: eos_token_id"),
])
def test_bad_config_files_are_clear(tmp_path, name, content, match):
    d = tokenizer_dir_with(tmp_path / "t", LLAMA2, **{name.replace(".json", "_json"): content})
    with pytest.raises(InputError, match=match):
        Tokenizer.load(d)
    (d / name).write_text("{not json")
    with pytest.raises(InputError, match=f"{name}: not valid JSON"):
        Tokenizer.load(d)


def test_missing_optional_token_is_none(tmp_path, caplog):
    d = tokenizer_dir_with(tmp_path / "t", LLAMA2, tokenizer_config_json={
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"})
    tok = Tokenizer.load(d)
    assert tok.pad_id is None and tok.eos_id == 2
    assert "pad_token '<pad>' is not in tokenizer.json" in caplog.text
