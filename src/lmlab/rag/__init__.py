"""Answers from your documents: BM25 over a folder of text, Markdown and PDF files, the top
passages put in the prompt, the answer with its sources cited.

    >>> import lmlab
    >>> from lmlab.rag import DocIndex, ask, format_answer
    >>> index = DocIndex.build("my-docs/")              # .txt .md .markdown .rst .pdf
    >>> index.search("火车站的英文", k=4)                 # [Passage(text, source, where, score)]
    >>> print(format_answer(ask(lmlab.load("runs/sft"), index, "How do I install it?")))

`index` reads and scores (`DocIndex`), `answer` builds the prompt and answers
(`augment`, `ask`), `qa` is a local question set and its recall@k / exact match.
"""

from lmlab.rag.answer import Answer, answer_questions, ask, augment, format_answer
from lmlab.rag.index import DocIndex, Passage, chunk_spans, terms
from lmlab.rag.qa import build_docs_qa, load_docs_qa, normalize_answer, score_docs_qa

__all__ = ["DocIndex", "Passage", "chunk_spans", "terms", "Answer", "augment", "ask",
           "answer_questions", "format_answer", "build_docs_qa", "load_docs_qa",
           "normalize_answer", "score_docs_qa"]
