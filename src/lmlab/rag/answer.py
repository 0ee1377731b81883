"""Answers from your documents: the passages BM25 finds go into the prompt, the answer cites them.

Retrieval-augmented generation in its plainest form: the model is not trained on
the documents; at question time the `k` passages of highest BM25 score for the
question (`DocIndex.search`) are put in front of it, numbered, with the
instruction to answer from them and to cite the ones it used:

    system:    Answer the user's question from the numbered passages below ... [n] ...
               [1] manual.pdf, page 3
               <the passage's text>
               [2] notes/setup.md, lines 10-24
               ...
    user:      the question

The passages go into a system turn (merged into the conversation's own system
turn if it has one); a chat template that refuses a system turn gets them at the
start of the last user turn instead. The instruction is in Chinese when the
question holds Chinese. With a tokenizer and a token budget, passages are dropped
from the lowest-ranked up, and the last one left is shortened, until the rendered
prompt fits the model's context.

`ask` answers one question through the engine (`lmlab.infer.engine.Engine`),
greedily unless told otherwise; `answer_questions` answers many in one batch;
`format_answer` prints an answer with its sources (`[1] manual.pdf, page 3`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Sequence

from lmlab.errors import ConfigError, InputError
from lmlab.eval.metrics import has_cjk

if TYPE_CHECKING:
    from lmlab import LoadedModel
    from lmlab.rag.index import DocIndex, Passage

INSTRUCTION = {
    "en": ("Answer the user's question from the numbered passages below, in a few words. "
           "Cite each passage you use as [n]. If the passages do not hold the answer, say "
           "that you do not know."),
    "zh": "请只根据下面编号的资料简短地回答用户的问题，并用 [n] 标出用到的资料。资料里没有答案时，就说不知道。",
}
NO_PASSAGE = {
    "en": "No passage of the documents matches the question: say that you do not know.",
    "zh": "文档里没有与这个问题相关的资料：请说不知道。",
}


@dataclass
class Answer:
    """The model's answer and the passages it was given, as `augment` returns them."""

    text: str
    sources: list[dict]


def context(passages: Sequence["Passage"], lang: str) -> str:
    """The instruction and the numbered passages, as the model reads them."""
    if not passages:
        return NO_PASSAGE[lang]
    return "\n\n".join([INSTRUCTION[lang]] + [f"[{n}] {p.source}, {p.where}\n{p.text.strip()}"
                                              for n, p in enumerate(passages, 1)])


def _with_context(messages: list[dict], text: str, system: bool) -> list[dict]:
    out = [dict(m) for m in messages]
    if not system:  # the template has no system turn: the passages open the last user turn
        last = max(i for i, m in enumerate(out) if m["role"] == "user")
        out[last]["content"] = f"{text}\n\n{out[last]['content']}"
    elif out[0]["role"] == "system":
        out[0]["content"] = f"{out[0]['content']}\n\n{text}"
    else:
        out.insert(0, {"role": "system", "content": text})
    return out


def _takes_system(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders a system turn (some refuse or drop it)."""
    from lmlab.data.chat import prompt_ids

    probe = "lmlab-system-probe"
    try:
        ids = prompt_ids(tokenizer, [{"role": "system", "content": probe},
                                     {"role": "user", "content": "?"}])
    except InputError:
        return False
    return probe in tokenizer.decode(ids)


def augment(index: "DocIndex", messages: list[dict], k: int = 4, *, tokenizer=None,
            max_prompt_tokens: int | None = None) -> tuple[list[dict], list[dict]]:
    """(messages with the top `k` passages for the last user turn put in the prompt, the
    sources {"n", "source", "where", "text", "score"} of the passages given, JSON-able).

    With `tokenizer`, its chat template decides where the passages go; with
    `max_prompt_tokens` too, they are cut until the rendered prompt fits (see the module
    docstring); a conversation that does not fit alone is an InputError."""
    from lmlab.data.chat import check_messages, prompt_ids

    messages = check_messages(messages, "messages")
    users = [m["content"] for m in messages if m["role"] == "user"]
    if not users:
        raise InputError("messages: no user turn; the last user message is the question")
    if max_prompt_tokens is not None and tokenizer is None:
        raise ConfigError("max_prompt_tokens: needs the tokenizer that renders the prompt")
    query = users[-1]
    lang = "zh" if has_cjk(query) else "en"
    system = tokenizer is None or _takes_system(tokenizer)
    passages = index.search(query, k)

    def render(ps: list["Passage"]) -> tuple[list[dict], bool]:
        out = _with_context(messages, context(ps, lang), system)
        fits = max_prompt_tokens is None or len(prompt_ids(tokenizer, out)) <= max_prompt_tokens
        return out, fits

    out, fits = render(passages)
    while not fits and len(passages) > 1:
        passages = passages[:-1]
        out, fits = render(passages)
    if not fits and passages:  # shorten the one passage left: the longest text that fits
        top, lo, hi = passages[0], 0, len(passages[0].text)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if render([replace(top, text=top.text[:mid] + " …")])[1]:
                lo = mid
            else:
                hi = mid - 1
        if not lo:
            raise InputError(f"messages: no passage fits in the {max_prompt_tokens} prompt "
                             "tokens the model's context leaves; shorten the conversation")
        passages = [replace(top, text=top.text[:lo] + " …")]
        out, fits = render(passages)
    if not fits:
        raise InputError(f"messages: the conversation alone is longer than the "
                         f"{max_prompt_tokens} prompt tokens the model's context leaves; "
                         "shorten it")
    sources = [{"n": n, "source": p.source, "where": p.where, "text": p.text, "score": p.score}
               for n, p in enumerate(passages, 1)]
    return out, sources


def prompt_budget(model, max_tokens: int | None) -> int | None:
    """Prompt tokens a question may take: the context less the answer's room (`max_tokens`,
    at most half the context); None for a model without a context limit."""
    context_len = getattr(model, "max_seq_len", None)
    if context_len is None:
        return None
    room = context_len // 2 if max_tokens is None else min(max_tokens, context_len // 2)
    return context_len - room


def answer_questions(lm: "LoadedModel", index: "DocIndex", questions: Sequence[str], k: int = 4,
                     max_tokens: int = 256, *, max_batch: int = 8, **sampling) -> list[Answer]:
    """Each question answered from `index`'s passages, all in one engine batch; `sampling`:
    SamplingParams' fields (default greedy, temperature 0)."""
    from lmlab.data.chat import prompt_ids
    from lmlab.infer.engine import Engine, SamplingParams

    for q in questions:
        if not isinstance(q, str) or not q.strip():
            raise InputError(f"question {q!r}: give a non-empty question")
    params = SamplingParams(max_tokens=max_tokens, **{"temperature": 0.0, **sampling})
    params.check()
    budget = prompt_budget(lm.model, max_tokens)
    prompts, sources = [], []
    for q in questions:
        messages, found = augment(index, [{"role": "user", "content": q}], k,
                                  tokenizer=lm.tokenizer, max_prompt_tokens=budget)
        prompts.append(prompt_ids(lm.tokenizer, messages))
        sources.append(found)
    engine = Engine(lm.model, lm.tokenizer, max_batch=max_batch)
    try:
        done = engine.generate(prompts, params)
    finally:
        engine.close()
    return [Answer(c.text.strip(), s) for c, s in zip(done, sources)]


def ask(lm: "LoadedModel", index: "DocIndex", question: str, k: int = 4, max_tokens: int = 256,
        **sampling) -> Answer:
    """The answer to `question` from the documents of `index` (what `lmlab ask` prints)."""
    return answer_questions(lm, index, [question], k, max_tokens, **sampling)[0]


def format_answer(answer: Answer) -> str:
    """The answer, then each passage it was given: `[1] manual.pdf, page 3`."""
    lines = [answer.text or "(no answer)", "", "Sources:"]
    lines += [f"[{s['n']}] {s['source']}, {s['where']}" for s in answer.sources] or [
        "(no passage of the documents matches the question)"]
    return "\n".join(lines)
