"""The docs stay true to the code.

A theory page links a concept to the lines that compute it, in one form:

    [`text that appears on that line`](../../src/lmlab/model/transformer.py#L142)

For every such link in docs/**/*.md and README.md this checks that the file
exists, that the line exists, and that the backticked text still occurs on it
(surrounding whitespace ignored). Every other relative link must resolve to a
file or directory of the repository. Fenced code blocks and inline code spans
are not links.

When code moves, run

    python tests/test_docs.py --fix

to move each stale `#L` anchor to the one line of its file that now holds the
text (links whose text is gone, or occurs on several lines, are listed for a
person to fix).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]

# [`text`](target) — a code span as the whole link text; the span may hold brackets
CODE_LINK = re.compile(r"\[`([^`\n]+)`\]\(([^()\s]+)\)")
# any other inline link or image: [text](target) or [text](target "title")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^()\s<>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"`+[^`\n]*`+")
FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
LINE_ANCHOR = re.compile(r"^L(\d+)(?:-L(\d+))?$")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


@dataclass
class Link:
    doc: Path
    line: int  # 1-based line of the doc
    start: int  # offsets of the target in the doc's text
    end: int
    target: str
    text: str | None  # the backticked text of a code link, else None

    def where(self) -> str:
        shown = f"[`{self.text}`]({self.target})" if self.text is not None else f"({self.target})"
        return f"{rel(self.doc)}:{self.line}: {shown}"


def rel(p: Path) -> str:
    try:
        return p.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(p)


def doc_files() -> list[Path]:
    docs = sorted((ROOT / "docs").rglob("*.md")) if (ROOT / "docs").is_dir() else []
    readme = ROOT / "README.md"
    return docs + ([readme] if readme.is_file() else [])


def _blank(text: str, start: int, end: int) -> str:
    """Spaces over text[start:end], newlines kept, so offsets and line numbers survive."""
    return text[:start] + re.sub(r"[^\n]", " ", text[start:end]) + text[end:]


def strip_fences(text: str) -> str:
    """The text with the insides of fenced code blocks blanked."""
    out, fence = [], None
    for line in text.splitlines(keepends=True):
        m = FENCE.match(line)
        if fence is None:
            out.append(line)
            if m:
                fence = m.group(1)
        elif m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) \
                and not line.strip()[len(m.group(1)):].strip():
            fence = None
            out.append(line)
        else:
            out.append(re.sub(r"[^\n]", " ", line))
    return "".join(out)


def find_links(doc: Path, text: str) -> list[Link]:
    text = strip_fences(text)

    def line_of(offset: int) -> int:
        return text.count("\n", 0, offset) + 1

    links = []
    for m in CODE_LINK.finditer(text):
        links.append(Link(doc, line_of(m.start()), m.start(2), m.end(2), m.group(2), m.group(1)))
    for m in CODE_LINK.finditer(text):
        text = _blank(text, m.start(), m.end())
    for m in INLINE_CODE.finditer(text):
        text = _blank(text, m.start(), m.end())
    for m in LINK.finditer(text):
        links.append(Link(doc, line_of(m.start()), m.start(1), m.end(1), m.group(1), None))
    return sorted(links, key=lambda k: k.start)


@lru_cache(maxsize=None)
def file_lines(path: Path) -> tuple[str, ...]:
    return tuple(path.read_text(encoding="utf-8", errors="replace").splitlines())


def lines_holding(path: Path, text: str) -> list[int]:
    return [i for i, line in enumerate(file_lines(path), 1) if text in line]


def resolve(link: Link) -> tuple[Path, str]:
    """(the file or directory the link names, its #fragment)."""
    path, _, frag = link.target.partition("#")
    path = unquote(path.split("?", 1)[0])
    base = ROOT if path.startswith("/") else link.doc.parent
    return (base / path.lstrip("/")).resolve(), frag


def check(link: Link) -> str | None:
    """None if the link is true, else what is wrong, for a person to read."""
    if SCHEME.match(link.target) or link.target.startswith("#"):
        return None  # a web address or an anchor on the same page
    target, frag = resolve(link)
    if not (target == ROOT or ROOT in target.parents):
        return f"{link.where()}\n    points outside the repository ({target})"
    if not target.exists():
        return f"{link.where()}\n    {rel(target)} does not exist"
    anchor = LINE_ANCHOR.match(frag)
    if anchor and link.text is None:
        return (f"{link.where()}\n    a line link needs the line's text in backticks, "
                f"[`text on that line`]({link.target}), so that this test can keep it true")
    if not anchor or link.text is None:
        return None
    if not target.is_file():
        return f"{link.where()}\n    {rel(target)} is not a file"
    first = int(anchor.group(1))
    last = int(anchor.group(2) or first)
    lines = file_lines(target)
    want = link.text.strip()
    if not 1 <= first <= last <= len(lines):
        return (f"{link.where()}\n    {rel(target)} has {len(lines)} lines; "
                f"#{frag} does not exist{moved(target, want)}")
    if any(want in lines[i - 1] for i in range(first, last + 1)):
        return None
    now = lines[first - 1].strip() if first == last else f"lines {first}-{last} (no match)"
    return (f"{link.where()}\n    {rel(target)} line {first} now says: {now!r}"
            f"{moved(target, want)}")


def moved(target: Path, text: str) -> str:
    hits = lines_holding(target, text)
    if not hits:
        return "\n    the text is no longer in that file: rewrite the link"
    return (f"\n    the text is now on line {', '.join(map(str, hits))}"
            + ("  (python tests/test_docs.py --fix moves it)" if len(hits) == 1 else ""))


# ------------------------------------------------------------------ tests

DOCS = doc_files()


@pytest.mark.parametrize("doc", DOCS, ids=[rel(d) for d in DOCS])
def test_links_resolve_and_code_links_match_their_lines(doc):
    links = find_links(doc, doc.read_text(encoding="utf-8"))
    problems = [p for p in map(check, links) if p]
    assert not problems, f"{len(problems)} stale link(s) in {rel(doc)}:\n" + "\n".join(problems)


def test_each_theory_page_links_its_code():
    pages = sorted((ROOT / "docs" / "theory").glob("*.md"))
    for page in pages:
        n = sum(1 for k in find_links(page, page.read_text(encoding="utf-8"))
                if k.text is not None and LINE_ANCHOR.match(k.target.partition("#")[2]))
        assert n, (f"{rel(page)} has no [`text`](path#L<n>) links: a theory page links the "
                   "lines of lmlab that compute each formula")


def test_link_parser():
    """The parser finds the links a reader sees on GitHub, and nothing else."""
    doc = ROOT / "docs" / "theory" / "example.md"
    text = (
        "See [`self.k[layer][:, :, self.pos:end] = k`](../../src/a.py#L104) and\n"
        "[the guide](../guide.md#setup), ![plot](img/loss.png \"loss\").\n"
        "Inline `[not](a-link.md)` is code.\n"
        "  ```python\n"
        "  [not](a-link-either.md)\n"
        "  ```\n"
        "[split\nover lines](two.md) and [web](https://example.com) and [here](#top)\n"
    )
    got = [(k.line, k.target, k.text) for k in find_links(doc, text)]
    assert got == [
        (1, "../../src/a.py#L104", "self.k[layer][:, :, self.pos:end] = k"),
        (2, "../guide.md#setup", None),
        (2, "img/loss.png", None),
        (7, "two.md", None),
        (8, "https://example.com", None),
        (8, "#top", None),
    ]


def test_a_stale_line_is_reported_with_where_the_text_went():
    here = Path(__file__).resolve()
    doc = ROOT / "docs" / "x.md"
    target = Path("..") / "tests" / here.name
    line = next(i for i, s in enumerate(file_lines(here), 1) if s.startswith("def rel("))
    ok = Link(doc, 3, 0, 0, f"{target.as_posix()}#L{line}", "def rel(p: Path) -> str:")
    assert check(ok) is None
    stale = Link(doc, 3, 0, 0, f"{target.as_posix()}#L{line + 1}", "def rel(p: Path) -> str:")
    msg = check(stale)
    assert msg and "docs/x.md:3" in msg and "now says" in msg and f"now on line {line}" in msg
    gone = Link(doc, 3, 0, 0, f"{target.as_posix()}#L1", "no such text anywhere " * 2)
    assert "no longer in that file" in check(gone)
    assert "does not exist" in check(Link(doc, 3, 0, 0, "nowhere.md", None))
    assert "needs the line's text" in check(Link(doc, 3, 0, 0, f"{target.as_posix()}#L1", None))


# ------------------------------------------------------------------ --fix

def fix(docs: list[Path]) -> int:
    """Move stale #L anchors to the one line now holding their text; return links left broken."""
    left = 0
    for doc in docs:
        text = doc.read_text(encoding="utf-8")
        edits = []
        for link in find_links(doc, text):
            problem = check(link)
            if not problem:
                continue
            target, frag = resolve(link)
            hits = lines_holding(target, link.text.strip()) if (
                link.text is not None and LINE_ANCHOR.match(frag) and target.is_file()) else []
            if len(hits) == 1:
                new = f"{link.target.partition('#')[0]}#L{hits[0]}"
                edits.append((link.start, link.end, new))
                print(f"fixed {link.where()} -> #L{hits[0]}")
            else:
                left += 1
                print(problem)
        for start, end, new in sorted(edits, reverse=True):
            text = text[:start] + new + text[end:]
        if edits:
            doc.write_text(text, encoding="utf-8")
    return left


if __name__ == "__main__":
    if sys.argv[1:] != ["--fix"]:
        sys.exit("usage: python tests/test_docs.py --fix   (to check, run pytest tests/test_docs.py)")
    sys.exit(1 if fix(doc_files()) else 0)
