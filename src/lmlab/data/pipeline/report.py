"""The run report: report.json (numbers) and report.html (tables, PNG charts, samples).

Everything comes from files the phases left under `<out>/work` and `<out>/excluded`,
so a report can be rebuilt from a finished (or resumed) run at any time:

- documents and bytes in/out per stage: the meters' final counts;
- removals per filter with their reasons: datatrove's per-task stats
  (`dropped_<reason>` counters);
- histograms: document length at input and output (bytes, powers of two),
  language score, duplicate-cluster sizes;
- read problems ("path:line: what") from lmlab's readers;
- a few removed documents per filter from `excluded/`.
"""

from __future__ import annotations

import gzip
import html
import json
from pathlib import Path

from lmlab.data.pipeline.language import SCORE_BINS


def _load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _sum_counts(dicts) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def _stages(work: Path) -> list[dict]:
    sums: dict[str, dict] = {}
    for d in sorted((work / "meters").glob("*")):
        for f in sorted(d.glob("*.json")):
            m = _load_json(f)
            if not m:
                continue
            s = sums.setdefault(m["stage"], {"stage": m["stage"], "order": m["order"], "documents": 0,
                                             "bytes": 0, "length_hist": []})
            s["documents"] += m["documents"]
            s["bytes"] += m["bytes"]
            h = m.get("length_hist") or []
            s["length_hist"] = [a + b for a, b in zip(s["length_hist"], h)] if s["length_hist"] else list(h)
    rows = sorted(sums.values(), key=lambda s: s["order"])
    prev = None
    for s in rows:
        s["documents_in"] = prev["documents"] if prev else s["documents"]
        s["bytes_in"] = prev["bytes"] if prev else s["bytes"]
        s["removed"] = s["documents_in"] - s["documents"]
        s["documents_out"], s["bytes_out"] = s.pop("documents"), s.pop("bytes")
        prev = {"documents": s["documents_out"], "bytes": s["bytes_out"]}
    return rows


def _reasons(work: Path) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for f in sorted((work / "logs").glob("*/stats/*.json")):
        for step in _load_json(f) or []:
            for key, v in (step.get("stats") or {}).items():
                if key.startswith("dropped_"):
                    total = v.get("total", 0) if isinstance(v, dict) else v
                    name = step["name"].split(": ", 1)[-1]
                    r = out.setdefault(name, {})
                    r[key.removeprefix("dropped_")] = r.get(key.removeprefix("dropped_"), 0) + int(total)
    return out


def _samples(excluded: Path, k: int) -> dict[str, list[dict]]:
    out = {}
    for d in sorted(p for p in excluded.glob("*") if p.is_dir()):
        docs = []
        for f in sorted(d.glob("*.jsonl.gz")):
            try:
                with gzip.open(f, "rt", encoding="utf-8") as fh:
                    for line in fh:
                        rec = json.loads(line)
                        docs.append({"id": rec.get("id"), "reason": rec.get("metadata", {}).get("filter_reason"),
                                     "text": rec.get("text", "")[:600]})
                        if len(docs) >= k:
                            break
            except (OSError, EOFError, ValueError):
                continue
            if len(docs) >= k:
                break
        out[d.name] = docs
    return out


def build_report(out: Path, recipe: dict, token_meta: dict | None = None,
                 seconds: dict | None = None) -> dict:
    work = out / "work"
    reads = [r for r in (_load_json(f) for f in sorted((work / "read").glob("*.json"))) if r]
    score_hist = [0] * SCORE_BINS
    for f in (work / "language").glob("*.json"):
        h = (_load_json(f) or {}).get("score_hist") or []
        score_hist = [a + b for a, b in zip(score_hist, h)] if h else score_hist
    stages = _stages(work)
    clusters = _load_json(work / "dedup" / "clusters" / "clusters.json") or {}
    first, last = (stages[0], stages[-1]) if stages else ({}, {})
    return {
        "recipe": recipe["name"],
        "seconds": seconds or {},  # wall time per phase in this invocation (skipped tasks cost ~0)
        "documents_in": first.get("documents_out", 0),
        "bytes_in": first.get("bytes_out", 0),
        "documents_out": last.get("documents_out", 0),
        "bytes_out": last.get("bytes_out", 0),
        "read": {
            "files": sum(r["files"] for r in reads),
            "skipped_records": sum(r["skipped"] for r in reads),
            "skipped_by_reason": _sum_counts(r.get("skipped_by_reason", {}) for r in reads),
            "problems": [p for r in reads for p in r["problems"]][:200],
        },
        "stages": [{k: v for k, v in s.items() if k != "length_hist"} for s in stages],
        "removals": _reasons(work),
        "histograms": {
            "length_in_log2_bytes": first.get("length_hist", []),
            "length_out_log2_bytes": last.get("length_hist", []),
            "language_score": score_hist,
            "duplicate_cluster_size": clusters.get("size_hist", {}),
        },
        # all keys even when dedup is off (no clusters.json): readers index them
        "duplicates": {"clusters": 0, "documents_in_clusters": 0, "removed_exact": 0,
                       "removed_near": 0, "duplicate_lines": 0,
                       **{k: v for k, v in clusters.items() if k != "size_hist"}},
        "tokens": token_meta or {},
        "samples": _samples(out / "excluded", int(recipe["output"]["report_samples"])),
    }


def _charts(rep: dict, folder: Path) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    made = []

    def save(name, title):
        plt.title(title)
        plt.tight_layout()
        plt.savefig(folder / name, dpi=90)
        plt.close()
        made.append((f"charts/{name}", title))

    st = rep["stages"]
    if st:
        plt.figure(figsize=(8, 3.5))
        plt.bar([s["stage"] for s in st], [s["documents_out"] for s in st])
        plt.xticks(rotation=40, ha="right")
        plt.ylabel("documents")
        save("stages.png", "documents after each stage")
    h = rep["histograms"]
    if h["length_in_log2_bytes"]:
        plt.figure(figsize=(6, 3.5))
        xs = range(len(h["length_in_log2_bytes"]))
        plt.bar(xs, h["length_in_log2_bytes"], alpha=0.5, label="input")
        if h["length_out_log2_bytes"]:
            plt.bar(xs, h["length_out_log2_bytes"], alpha=0.5, label="kept")
        plt.xlabel("log2(document bytes)")
        plt.legend()
        save("length.png", "document length")
    if any(h["language_score"]):
        plt.figure(figsize=(6, 3.5))
        plt.bar([i / SCORE_BINS for i in range(SCORE_BINS)], h["language_score"], width=1 / SCORE_BINS,
                align="edge")
        plt.xlabel("language score")
        save("language_score.png", "language identification score")
    if h["duplicate_cluster_size"]:
        plt.figure(figsize=(6, 3.5))
        items = sorted((int(k), v) for k, v in h["duplicate_cluster_size"].items())
        plt.bar([str(k) for k, _ in items], [v for _, v in items])
        plt.xlabel("cluster size (documents)")
        plt.ylabel("clusters")
        save("clusters.png", "duplicate clusters")
    return made


def _html(rep: dict, charts: list[tuple[str, str]]) -> str:
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(s['stage'])}</td><td>{s['documents_in']:,}</td><td>{s['documents_out']:,}</td>"
        f"<td>{s['removed']:,}</td><td>{s['bytes_in']:,}</td><td>{s['bytes_out']:,}</td></tr>"
        for s in rep["stages"])
    reasons = "".join(
        f"<tr><td>{e(step)}</td><td>{e(r)}</td><td>{n:,}</td></tr>"
        for step, rs in rep["removals"].items() for r, n in sorted(rs.items(), key=lambda x: -x[1]))
    imgs = "".join(f'<figure><img src="{e(p)}" alt="{e(t)}"><figcaption>{e(t)}</figcaption></figure>'
                   for p, t in charts)
    samples = "".join(
        f"<h3>{e(name)}</h3>" + "".join(
            f"<details><summary>{e(str(d['id']))} — {e(str(d['reason'] or name))}</summary>"
            f"<pre>{e(d['text'])}</pre></details>" for d in docs)
        for name, docs in rep["samples"].items())
    problems = "".join(f"<li>{e(p)}</li>" for p in rep["read"]["problems"][:50])
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>lmlab data report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}td:first-child{{text-align:left}}
figure{{display:inline-block;margin:0 1em 1em 0}}pre{{white-space:pre-wrap;background:#f6f6f6}}</style>
</head><body><h1>lmlab data report — recipe {e(rep['recipe'])}</h1>
<p>{rep['documents_in']:,} documents ({rep['bytes_in']:,} bytes) in, {rep['documents_out']:,}
({rep['bytes_out']:,} bytes) kept. Read problems: {rep['read']['skipped_records']:,} record(s) skipped.</p>
<h2>Stages</h2><table><tr><th>stage</th><th>docs in</th><th>docs out</th><th>removed</th>
<th>bytes in</th><th>bytes out</th></tr>{rows}</table>
<h2>Removals by reason</h2><table><tr><th>step</th><th>reason</th><th>documents</th></tr>{reasons}</table>
<h2>Charts</h2>{imgs}
<h2>Read problems</h2><ul>{problems}</ul>
<h2>Removed documents (samples)</h2>{samples}
</body></html>"""


def write_report(out: Path, recipe: dict, token_meta: dict | None = None,
                 seconds: dict | None = None) -> dict:
    from lmlab.fileio import atomic_write_text

    rep = build_report(out, recipe, token_meta, seconds)
    charts = _charts(rep, out / "charts")
    atomic_write_text(out / "report.json", json.dumps(rep, indent=2, ensure_ascii=False))
    atomic_write_text(out / "report.html", _html(rep, charts))
    return rep
