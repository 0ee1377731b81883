"""Paragraph-level (CCNet-style) deduplication: boilerplate lines go, each page's own text stays."""

from __future__ import annotations

from lmlab.data.pipeline import run_recipe

from .conftest import read_jsonl_dir, write_jsonl
from .synthetic import chinese_prose, english_prose

FOOTER_EN = "Copyright 2024 Example Media Ltd. All rights reserved."
NAV_EN = "Home | News | Sport | Contact us"
FOOTER_ZH = "版权所有 © 2024 示例传媒有限公司，保留所有权利。"


def recipe() -> dict:
    off = {"enabled": False}
    return {"name": "paragraphs", "normalize": off, "language": off, "pii": off,
            "quality": {k: off for k in ("gopher_repetition", "gopher_quality", "c4", "fineweb")},
            "dedup": {"exact": {"enabled": True}, "minhash": {"enabled": False},
                      "paragraph": {"enabled": True}}}


def test_repeated_lines_kept_once_in_input_order(tmp_path):
    import random

    rng = random.Random(0)
    records, bodies = [], {}
    for i in range(40):
        zh = i % 2 == 1
        body = chinese_prose(rng, (2, 3)) if zh else english_prose(rng, (2, 3))
        bodies[f"d{i}"] = body
        lines = [NAV_EN, body, FOOTER_ZH if zh else FOOTER_EN]
        records.append({"id": f"d{i}", "text": "\n".join(lines)})
    records.append({"id": "boiler", "text": f"{NAV_EN}\n\n{FOOTER_EN}"})  # nothing of its own
    records.append({"id": "copy", "text": records[4]["text"]})            # a whole-document copy
    src = write_jsonl(tmp_path / "in.jsonl", records)
    rep = run_recipe(recipe(), [str(src)], str(tmp_path / "out"))
    kept = {r["id"]: r for r in read_jsonl_dir(tmp_path / "out" / "documents")}

    assert "boiler" not in kept and "copy" not in kept
    excluded = read_jsonl_dir(tmp_path / "out" / "excluded" / "paragraph_duplicate")
    assert [r["id"] for r in excluded] == ["boiler"]
    # the first page keeps its navigation and footer; the first Chinese page keeps its footer
    assert kept["d0"]["text"] == f"{NAV_EN}\n{bodies['d0']}\n{FOOTER_EN}"
    assert kept["d1"]["text"] == f"{bodies['d1']}\n{FOOTER_ZH}"
    for i in range(2, 40):  # later pages keep exactly their own text
        assert kept[f"d{i}"]["text"] == bodies[f"d{i}"]
        assert kept[f"d{i}"]["metadata"]["duplicate_lines_removed"] == 2
    assert rep["duplicates"]["duplicate_lines"] == 2 * 38 + 1 + 2  # + d1's nav, boiler's two


def test_lines_of_removed_duplicates_do_not_count(tmp_path):
    # "a2" is an exact copy of "a1" and is removed; "b" shares a line only with the copy's
    # *position*: a line first seen in a removed document must stay in the next kept one
    shared = "This sentence appears in the copy and in document b, nowhere else."
    records = [
        {"id": "a1", "text": f"Original page.\n{shared}"},
        {"id": "a2", "text": f"Original page.\n{shared}"},
        {"id": "b", "text": f"Another page entirely.\n{shared}"},
    ]
    src = write_jsonl(tmp_path / "in.jsonl", records)
    run_recipe(recipe(), [str(src)], str(tmp_path / "out"))
    kept = {r["id"]: r["text"] for r in read_jsonl_dir(tmp_path / "out" / "documents")}
    assert kept == {"a1": f"Original page.\n{shared}", "b": "Another page entirely."}
