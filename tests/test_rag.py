"""Answers from your documents: reading, chunking, BM25, the prompt, the answer, the QA set."""

from __future__ import annotations

import json
import logging
import math
import re
import sysconfig
from collections import Counter
from pathlib import Path

import pytest

from lmlab.errors import ConfigError, InputError
from lmlab.rag import (DocIndex, augment, build_docs_qa, chunk_spans, format_answer,
                       load_docs_qa, normalize_answer, score_docs_qa, terms)
from lmlab.rag.answer import ask
from lmlab.rag.index import B, K1

ROOT = Path(__file__).resolve().parents[1]
TOY = {  # three short documents: one passage each
    "a.txt": "The cat sat on the mat. The cat purred.",
    "b.txt": "A dog chased the cat across the garden and barked at the gate.",
    "c.md": "Gardens need water, sunlight and patient gardeners who water them.",
}
CHINESE_DOC = "北京是中国的首都。北京的火车站在城市的南边，每天有很多旅客。"


def write_files(root: Path, files: dict[str, str | bytes]) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return root


def write_pdf(path: Path, pages: list[str]) -> Path:
    """A PDF with a text layer (Helvetica, one line a page; "" = a page without text)."""
    from pypdf import PdfWriter
    from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

    font = DictionaryObject({NameObject("/Type"): NameObject("/Font"),
                             NameObject("/Subtype"): NameObject("/Type1"),
                             NameObject("/BaseFont"): NameObject("/Helvetica")})
    writer = PdfWriter()
    for text in pages:
        page = writer.add_blank_page(612, 792)
        if text:
            stream = DecodedStreamObject()
            stream.set_data(f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode("latin-1"))
            page.replace_contents(stream)
            page[NameObject("/Resources")] = DictionaryObject(
                {NameObject("/Font"): DictionaryObject({NameObject("/F1"): font})})
    with open(path, "wb") as f:
        writer.write(f)
    return path


def headings(text: str) -> list[int]:
    """Offsets of the Markdown heading lines outside fenced code (an independent scan)."""
    out, pos, fence = [], 0, False
    for line in text.splitlines(keepends=True):
        if line.lstrip().startswith(("```", "~~~")):
            fence = not fence
        elif not fence and re.match(r"#{1,6} ", line):
            out.append(pos)
        pos += len(line)
    return out


# ------------------------------------------------------------------ chunking

def real_texts() -> dict[str, str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return {
        "theory page": (ROOT / "docs/theory/ngram.md").read_text(encoding="utf-8"),
        "python source": (stdlib / "textwrap.py").read_text(encoding="utf-8"),
        # one paragraph far longer than a passage: cut at sentence ends (。)
        "chinese": "".join(t * 3 for t in (
            "语言模型通过预测下一个词来学习语言的规律。", "数据的质量决定了模型的上限。",
            "注意力机制让每个位置都能看到前面所有的位置。")) * 8,
    }


@pytest.mark.parametrize("chunk_chars,overlap", [(200, 0), (800, 0), (300, 80)])
def test_chunks_keep_every_character_once(chunk_chars, overlap):
    for name, text in real_texts().items():
        spans = chunk_spans(text, chunk_chars, overlap)
        assert spans[0][1] == 0 and spans[-1][2] == len(text), name
        assert "".join(text[core:end] for _, core, end, _ in spans) == text, name
        for (_, _, prev_end, _), (start, core, end, _) in zip(spans, spans[1:]):
            assert core == prev_end  # the cores tile the text, in order
        for i, (start, core, end, _) in enumerate(spans):
            assert 0 <= core - start <= overlap and end - core <= chunk_chars, (name, i)
            if i:
                assert start >= spans[i - 1][1]  # an overlap repeats the passage before only
        if overlap:
            assert any(start < core for start, core, _, _ in spans), name
        cores = {core for _, core, _, _ in spans}
        assert set(headings(text)) <= cores, name  # a heading opens its passage


def test_long_chinese_paragraph_is_cut_at_sentence_ends():
    text = real_texts()["chinese"]
    spans = chunk_spans(text, 100)
    assert len(spans) > 5
    assert all(text[core:end].endswith("。") for _, core, end, _ in spans)


def test_passages_keep_source_lines_and_section(tmp_path):
    page = (ROOT / "docs/theory/ngram.md").read_text(encoding="utf-8")
    index = DocIndex.build(write_files(tmp_path, {"sub/ngram.md": page}))
    assert index.sources == ["sub/ngram.md"]
    lines = page.splitlines()
    for p in index.passages:
        a, _, b = p.where.removeprefix("lines ").removeprefix("line ").partition("-")
        first, last = lines[int(a) - 1], lines[int(b or a) - 1]
        body = p.text.strip().splitlines()
        assert body[0] in first and body[-1] in last, p.where  # a long paragraph is cut mid-line
        assert p.text.strip() in "\n".join(lines[int(a) - 1:int(b or a)])
    assert "".join(p.text for p in index.passages) == page  # overlap 0: the file, once


# ------------------------------------------------------------------ BM25

def lucene_bm25(query: list[str], docs: list[list[str]]) -> list[float]:
    """Lucene's BM25 by hand: Σ IDF(q) · f / (f + k1 · (1 − b + b · |D| / avgdl))."""
    n, avgdl = len(docs), sum(map(len, docs)) / len(docs)
    out = []
    for d in docs:
        tf, score = Counter(d), 0.0
        for q in query:
            df = sum(q in other for other in docs)
            if df:
                idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
                score += idf * tf[q] / (tf[q] + K1 * (1 - B + B * len(d) / avgdl))
        out.append(score)
    return out


def test_bm25_scores_equal_lucene_formula(tmp_path):
    index = DocIndex.build(write_files(tmp_path, TOY))
    assert [p.source for p in index.passages] == ["a.txt", "b.txt", "c.md"]
    docs = [terms(TOY[name]) for name in ("a.txt", "b.txt", "c.md")]
    assert docs[0] == ["cat", "sat", "mat", "cat", "purred"]  # stopwords out, lowercased
    for query in ("cat garden", "the cat", "water gardens gate", "purred"):
        expected = lucene_bm25(terms(query), docs)
        got = {p.source: p.score for p in index.search(query, k=3)}
        for name, want in zip(("a.txt", "b.txt", "c.md"), expected):
            if want > 0:
                assert got[name] == pytest.approx(want, rel=1e-5), (query, name)
            else:
                assert name not in got, (query, name)  # a passage scoring 0 is not returned
        ranked = [p.source for p in index.search(query, k=3)]
        assert ranked == sorted(got, key=lambda s: -got[s])
    assert index.search("zebra", k=3) == []


@pytest.mark.parametrize("chinese", ["jieba", "chars"])
def test_chinese_query_finds_chinese_document(tmp_path, chinese):
    index = DocIndex.build(write_files(tmp_path, {**TOY, "zh/北京.md": CHINESE_DOC}),
                           chinese=chinese)
    hits = index.search("北京的火车站在哪里？", k=2)
    assert hits[0].source == "zh/北京.md" and hits[0].where == "line 1"
    mixed = index.search("Where is the 火车站 for the cat?", k=4)  # mixed text
    assert {p.source for p in mixed} >= {"zh/北京.md", "a.txt"}


def test_terms_mixed_text():
    assert terms("`textwrap.wrap` 的参数 width") == ["textwrap", "wrap", "参数", "width"]
    assert terms("火车站", chinese="chars") == ["火", "车", "站"]
    assert set(terms("火车站")) == {"火车", "车站", "火车站"}


# ------------------------------------------------------------------ reading

def test_pdf_pages_and_skipped_files(tmp_path, caplog):
    docs = tmp_path / "docs"
    write_files(docs, {**TOY, "latin1.txt": "caf\xe9 cr\xe8me".encode("latin-1"),
                       "broken.pdf": b"%PDF-1.4 this is not a pdf", "empty.md": "\n\n",
                       "notes.py": "print('not a document')", ".hidden/x.md": "secret cat"})
    write_pdf(docs / "manual.pdf", ["Installation guide for the gadget.",
                                    "The secret code is AZURE 42 for the gadget."])
    write_pdf(docs / "scan.pdf", ["", ""])
    before = sorted(p.relative_to(docs) for p in docs.rglob("*"))
    with caplog.at_level(logging.WARNING, logger="lmlab.rag.index"):
        index = DocIndex.build(docs, cache_dir=tmp_path / "cache")
    hit = index.search("What is the secret code?", k=1)[0]
    assert (hit.source, hit.where) == ("manual.pdf", "page 2") and "AZURE 42" in hit.text
    assert index.sources == ["a.txt", "b.txt", "c.md", "manual.pdf"]
    warned = " | ".join(r.getMessage() for r in caplog.records)
    for name, why in (("latin1.txt", "not UTF-8"), ("broken.pdf", "unreadable PDF"),
                      ("scan.pdf", "no text layer"), ("empty.md", "no text")):
        assert f"{name}: {why}" in warned
        assert any(s.startswith(f"{name}: {why}") for s in index.skipped)
    assert sorted(p.relative_to(docs) for p in docs.rglob("*")) == before  # nothing written


def test_cache_reused_until_a_file_changes(tmp_path):
    docs, cache = write_files(tmp_path / "docs", TOY), tmp_path / "cache"
    first = DocIndex.build(docs, cache_dir=cache)
    (entry,) = cache.iterdir()
    again = DocIndex.build(docs, cache_dir=cache)
    assert again.passages == first.passages
    assert again.search("cat garden", 3) == first.search("cat garden", 3)
    (docs / "b.txt").write_text("A zebra grazed beside the river bank all afternoon long.")
    changed = DocIndex.build(docs, cache_dir=cache)
    assert changed.search("zebra", 1)[0].source == "b.txt"
    assert list(cache.iterdir()) == [entry]  # one entry per folder, replaced whole
    other = DocIndex.build(docs, cache_dir=cache, chinese="chars")  # other settings: rebuilt
    assert other.chinese == "chars" and other.search("zebra", 1)[0].source == "b.txt"


def test_bad_inputs_are_one_line(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    pdf = write_pdf(tmp_path / "manual.pdf", ["A page."])
    write_files(tmp_path / "code", {"x.py": "print(1)"})
    write_files(tmp_path / "bad", {"x.txt": b"\xff\xfe\x00bad", "y.md": " \n"})
    cases = [
        (InputError, lambda: DocIndex.build(tmp_path / "missing"), "no such folder"),
        (InputError, lambda: DocIndex.build(tmp_path / "empty"), "it is empty"),
        (InputError, lambda: DocIndex.build(tmp_path / "code"), "only 1 other file"),
        (InputError, lambda: DocIndex.build(tmp_path / "bad"), "none of its 2 document"),
        (ConfigError, lambda: DocIndex.build(tmp_path / "code", chunk_chars=10), "chunk_chars"),
        (ConfigError, lambda: DocIndex.build(tmp_path / "code", overlap=900), "overlap"),
        (ConfigError, lambda: DocIndex.build(tmp_path / "code", chinese="pinyin"), "chinese"),
    ]
    index = DocIndex.build(write_files(tmp_path / "toy", TOY))
    cases += [
        (ConfigError, lambda: index.search("cat", k=0), "k 0"),
        (InputError, lambda: index.augment([{"role": "system", "content": "hi"}]), "no user turn"),
        (InputError, lambda: index.augment([{"role": "robot", "content": "hi"}]), "role"),
    ]
    qa = write_files(tmp_path, {"qa.jsonl": '{"task": "x"}\n{"question": "q", "answer": "a", '
                                            '"source": "a.txt"}\n{"question": "q2"}\n'})
    cases.append((InputError, lambda: load_docs_qa(qa / "qa.jsonl"), 'qa.jsonl:3: "answer"'))
    for error, call, words in cases:
        with pytest.raises(error) as e:
            call()
        assert words in str(e.value) and "\n" not in str(e.value), str(e.value)

    def missing(name):  # an optional package not installed
        raise ModuleNotFoundError(name)

    monkeypatch.setattr("lmlab.rag.index.importlib.import_module", missing)
    with pytest.raises(ConfigError, match=r"need pypdf, .* pip install 'lmlab\[rag\]'$"):
        DocIndex.build(pdf)


# ------------------------------------------------------------------ the prompt and the answer

@pytest.fixture(scope="module")
def lm(chat_model_dir):
    import lmlab

    return lmlab.load(chat_model_dir)


def test_augment_puts_numbered_passages_in_a_system_turn(tmp_path, lm):
    from lmlab.data.chat import prompt_ids

    index = DocIndex.build(write_files(tmp_path, {**TOY, "zh/北京.md": CHINESE_DOC}))
    messages, sources = index.augment([{"role": "user", "content": "Where did the cat sit?"}], k=2)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"].startswith("Answer the user's question")
    assert "[1] a.txt, line 1\nThe cat sat on the mat." in messages[0]["content"]
    assert [s["n"] for s in sources] == [1, 2] and sources[0]["source"] == "a.txt"
    json.dumps(sources)  # JSON-able, as the server sends them
    text = lm.tokenizer.decode(prompt_ids(lm.tokenizer, messages))
    assert text.startswith("<|im_start|>system\nAnswer") and "[2] b.txt" in text
    assert text.endswith("<|im_start|>user\nWhere did the cat sit?<|im_end|>\n"
                         "<|im_start|>assistant\n")
    # a system turn of the user's own is kept, the passages after it; Chinese question, Chinese
    # instruction
    zh, found = augment(index, [{"role": "system", "content": "你是助手。"},
                                {"role": "user", "content": "火车站在哪里？"}], k=4)
    assert zh[0]["content"].startswith("你是助手。\n\n请只根据下面编号的资料")
    assert found[0]["source"] == "zh/北京.md" and len(zh) == 2


def test_template_without_system_turn_gets_passages_in_the_user_turn(tmp_path, chat_model_dir):
    import shutil

    from lmlab.data.chat import prompt_ids
    from lmlab.tokenizer import Tokenizer

    tok_dir = tmp_path / "tok"
    shutil.copytree(chat_model_dir, tok_dir, ignore=shutil.ignore_patterns("*.safetensors"))
    (tok_dir / "chat_template.jinja").write_text(  # as Gemma's: a system turn is refused
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = Tokenizer.load(tok_dir)
    index = DocIndex.build(write_files(tmp_path / "docs", TOY))
    messages, sources = index.augment([{"role": "user", "content": "Where did the cat sit?"}],
                                      k=2, tokenizer=tok, max_prompt_tokens=250)
    assert [m["role"] for m in messages] == ["user"] and sources[0]["source"] == "a.txt"
    assert messages[0]["content"].startswith("Answer the user's question")
    assert messages[0]["content"].endswith("\n\nWhere did the cat sit?")
    assert len(prompt_ids(tok, messages)) <= 250


def test_augment_fits_the_model_context(tmp_path, lm):
    from lmlab.data.chat import prompt_ids

    long = "\n\n".join(f"The gadget manual, part {i}: the cat sat on the mat near gadget {i}."
                       * 6 for i in range(8))
    index = DocIndex.build(write_files(tmp_path, {"manual.md": long}), chunk_chars=400)
    question = [{"role": "user", "content": "Where did the cat sit near the gadget?"}]
    full, all_four = index.augment(question, k=4)
    assert len(all_four) == 4 and len(prompt_ids(lm.tokenizer, full)) > 200
    for budget in (200, 130):
        fitted, kept = index.augment(question, k=4, tokenizer=lm.tokenizer,
                                     max_prompt_tokens=budget)
        assert 1 <= len(kept) < 4 and len(prompt_ids(lm.tokenizer, fitted)) <= budget
        assert fitted[0]["content"].endswith(kept[-1]["text"].strip())
    assert kept[0]["text"].endswith(" …")  # the one passage left, shortened
    with pytest.raises(InputError, match="no passage fits in the 60 prompt tokens"):
        index.augment(question, k=4, tokenizer=lm.tokenizer, max_prompt_tokens=60)
    with pytest.raises(InputError, match="alone is longer than the 5 prompt tokens"):
        index.augment([{"role": "user", "content": "zebra?"}], k=4, tokenizer=lm.tokenizer,
                      max_prompt_tokens=5)


def test_ask_answers_through_the_engine(tmp_path, lm):
    docs = tmp_path / "docs"
    write_files(docs, TOY)
    write_pdf(docs / "manual.pdf", ["Installation guide.", "The secret code is AZURE 42."])
    index = DocIndex.build(docs)
    question = "What is the secret code?"
    answer = ask(lm, index, question, k=2, max_tokens=12)
    assert answer.sources[0]["source"] == "manual.pdf" and answer.sources[0]["where"] == "page 2"
    messages, _ = index.augment([{"role": "user", "content": question}], k=2,
                                tokenizer=lm.tokenizer)
    assert answer.text == lm.chat(messages, max_new_tokens=12, temperature=0).strip()  # greedy
    shown = format_answer(answer)
    assert shown.startswith(answer.text or "(no answer)")
    assert "Sources:\n[1] manual.pdf, page 2" in shown


# ------------------------------------------------------------------ the QA set

@pytest.fixture(scope="module")
def docs_qa(tmp_path_factory):
    out = tmp_path_factory.mktemp("docs-qa") / "qa"
    return build_docs_qa(out)


def test_qa_set_is_deterministic_and_answerable(docs_qa):
    from lmlab.rag.qa import docs_qa_rows

    rows = load_docs_qa(docs_qa["qa"])
    assert docs_qa["questions"] == {"default": 50, "lookup": 50, "cedict": 50}
    pages, again = docs_qa_rows()
    assert [{k: r[k] for k in again[0]} for r in rows] == again  # same rows when rebuilt
    docs = Path(docs_qa["docs"])
    for r in rows:  # the answer lies in the gold document (the question's key text in no other)
        assert (docs / r["source"]).read_text(encoding="utf-8") == pages[r["source"]]
        assert r["answer"] in pages[r["source"]] or r["kind"] == "cedict"
    assert Counter(r["lang"] for r in rows)["zh"] > 50


def test_recall_on_the_shipped_qa_set(docs_qa):
    rows = load_docs_qa(docs_qa["qa"])
    for chinese in ("jieba", "chars"):
        index = DocIndex.build(docs_qa["docs"], chinese=chinese)
        s = score_docs_qa(None, index, rows, k=4)
        print(f"docs-qa recall ({chinese}, {len(index)} passages): @1 {s['recall@1']:.3f}  "
              f"@4 {s['recall@4']:.3f}  by language "
              + "  ".join(f"{lang} @1 {v['recall@1']:.3f} @4 {v['recall@4']:.3f}"
                          for lang, v in s["by_lang"].items()))
        assert s["exact_match"] is None and s["n"] == len(rows) == len(s["rows"])
        assert s["recall@4"] >= 0.9 and s["recall@1"] >= 0.85  # measured ≥ 0.99 / ≥ 0.95


def test_exact_match_with_a_model(docs_qa, lm):
    rows = load_docs_qa(docs_qa["qa"])[:: 50][:3]
    index = DocIndex.build(docs_qa["docs"])
    s = score_docs_qa(lm, index, rows, k=2, max_tokens=6)
    assert 0 <= s["exact_match"] <= 1 and all(isinstance(r["answer"], str) for r in s["rows"])
    assert s["exact_match"] == sum(normalize_answer(r["answer"]) == normalize_answer(r["gold"])
                                   for r in s["rows"]) / 3
    with pytest.raises(InputError, match="no gold source"):
        score_docs_qa(None, DocIndex.build(write_files(Path(docs_qa["docs"]).parent.parent
                                                       / "toy", TOY)), rows)


def test_normalize_answer():
    assert normalize_answer("The train station [1].") == "train station"
    assert normalize_answer("A Train-Station!") == "trainstation"  # SQuAD deletes punctuation
    assert normalize_answer("  火车 站。[2]") == "火车站"
    assert normalize_answer("'70'") == "70"
