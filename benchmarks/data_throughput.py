"""Data pipeline throughput: lmlab's web-en recipe and MinHash dedup beside datatrove's stock blocks.

Generates a planted web-like corpus (English and Chinese prose, junk, exact and
near copies; `tests/data_pipeline/synthetic.py`, the tests' fixture) and measures,
in one run:

1. the full `web-en` recipe through `run_recipe`, 1 and 2 workers;
2. the web-en quality filters (lmlab: datatrove's rules with a regex word
   splitter and a vectorised Gopher repetition rule) against datatrove's stock
   Gopher repetition → Gopher quality → C4 → FineWeb chain (spaCy words), on the
   same English documents, with the share of documents given the same keep/drop
   decision;
3. MinHash dedup alone (lmlab recipe: 3-grams, 40×4, verified) through
   `run_recipe`, 1 and 2 workers, against datatrove's default MinHash pipeline
   (5-grams, 14×8, spaCy words) — speed and recall/precision on the planted copies.

datatrove's stock blocks are slow (tens of documents/s), so they run on a
subsample (`--stock-docs`); lmlab runs on the same subsample for the ratios and
on the whole corpus for its own figures. Needs spaCy and xxhash for the stock
blocks (`pip install spacy xxhash`).

    python benchmarks/data_throughput.py [--docs 100000] [--stock-docs 3000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from datatrove.data import Document

from lmlab.data.pipeline import load_recipe, run_recipe
from lmlab.data.pipeline.normalize import Normalizer
from lmlab.data.pipeline.quality import build_quality_filters


def _load_synthetic():
    """The tests' corpus generator, loaded from its file (it is fixture code, not part of lmlab)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "tests" / "data_pipeline" / "synthetic.py"
    spec = importlib.util.spec_from_file_location("lmlab_bench_synthetic", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


planted_corpus = _load_synthetic().planted_corpus


def write_shards(records: list[dict], folder: Path, n_files: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_files):
        p = folder / f"part{i:02d}.jsonl"
        with open(p, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records[i::n_files])
        paths.append(str(p))
    return paths


def mb(records) -> float:
    return sum(len(r["text"].encode()) for r in records) / 1e6


def line(name: str, docs: int, mbytes: float, seconds: float, workers: int = 1, extra: str = "") -> dict:
    dps, mbps = docs / seconds / workers, mbytes / seconds / workers
    print(f"{name:<52} {workers:>2}  {dps:>10,.0f}  {mbps:>8.2f}  {seconds:>8.1f}  {extra}")
    return {"docs_per_s_per_worker": dps, "mb_per_s_per_worker": mbps, "seconds": seconds}


def decisions(filters, texts: list[str]) -> list[bool]:
    out = []
    for i, t in enumerate(texts):
        doc = Document(text=t, id=str(i))
        out.append(all(f.filter(doc) is True for f in filters))  # stops at the first drop
    return out


def dedup_only_recipe() -> dict:
    off = {"enabled": False}
    return {"name": "minhash-only", "normalize": off, "language": off, "pii": off,
            "quality": {k: off for k in ("gopher_repetition", "gopher_quality", "c4", "fineweb")},
            "dedup": {"exact": off, "minhash": {"unit": "auto"}},  # words for English, characters for Chinese
            "output": {"exclusions": True, "documents": False}}


def planted_scores(docs, removed: set[str]) -> tuple[float, float]:
    """Recall and precision on the planted (original, copy) pairs of prose.

    A pair is found when exactly one of its two documents is removed (which one depends
    on input order: the corpus is dealt round-robin into files, so a copy can be read
    before its original). Precision: found pairs / removed documents. Junk pages are left
    out: the generator makes many identical junk pages ("Click here to continue."),
    which are real duplicates but not planted ones.
    """
    ids = {d.id for d in docs}
    junk = {d.id for d in docs if d.kind.startswith("junk")}
    pairs = [(d.id, d.dup_of) for d in docs if d.dup_of and d.dup_of in ids]
    found = sum((a in removed) != (b in removed) for a, b in pairs)
    return found / max(1, len(pairs)), found / max(1, len(removed - junk))


def removed_ids(out: Path) -> set[str]:
    import gzip

    ids = set()
    for f in (out / "excluded").glob("*_duplicate/*.jsonl.gz"):
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            ids |= {json.loads(x)["id"] for x in fh}
    return ids


def datatrove_minhash(src: Path, work: Path) -> set[str]:
    """datatrove's default 4-stage MinHash; returns the ids it removes."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    cfg = MinhashConfig()

    def read():
        return JsonlReader(str(src), add_file_path=False)

    sig = MinhashDedupSignature(str(work / "sigs"), config=cfg)
    try:
        sig._hash_func("数据")
    except TypeError:  # datatrove hands str to xxhash, which xxhash 4 refuses: encode first
        import xxhash

        sig._hash_func = lambda s: xxhash.xxh64_intdigest(s.encode("utf-8"))
    for name, pipe, tasks in [
        ("sig", [read(), sig], 1),
        ("buckets", [MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"), config=cfg)], cfg.num_buckets),
        ("cluster", [MinhashDedupCluster(str(work / "buckets"), str(work / "remove"), config=cfg)], 1),
        ("filter", [read(), MinhashDedupFilter(str(work / "remove"),
                                               exclusion_writer=JsonlWriter(str(work / "removed")))], 1),
    ]:
        LocalPipelineExecutor(pipe, tasks=tasks, workers=1, logging_dir=str(work / "logs" / name)).run()
    import gzip

    ids = set()
    for f in (work / "removed").glob("*.jsonl.gz"):
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            ids |= {json.loads(x)["id"] for x in fh}
    return ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--stock-docs", type=int, default=3000, help="subsample for datatrove's stock blocks")
    ap.add_argument("--files", type=int, default=8, help="input files (tasks are spread over files)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--parts", default="recipe,filters,minhash", help="which measurements to run")
    a = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)

    tmp = Path(tempfile.mkdtemp(prefix="lmlab-bench-"))
    t0 = time.time()
    docs = planted_corpus(a.docs, seed=0, zh_fraction=0.3, junk_fraction=0.1,
                          exact_fraction=0.03, near_fraction=0.07)
    records = [d.record() for d in docs]
    inputs = write_shards(records, tmp / "corpus", a.files)
    total_mb = mb(records)
    print(f"corpus: {len(docs):,} documents, {total_mb:.1f} MB, {a.files} files "
          f"(generated in {time.time() - t0:.0f} s) in {tmp}\n")
    print(f"{'measurement':<52} {'w':>2}  {'docs/s/w':>10}  {'MB/s/w':>8}  {'seconds':>8}")
    results: dict = {}

    parts = set(a.parts.split(","))
    # 1. the full recipe
    for w in ((1, 2) if "recipe" in parts else ()):
        out = tmp / f"web-en-{w}"
        t = time.perf_counter()
        rep = run_recipe("web-en", inputs, str(out), workers=w)
        results[f"web-en_{w}w"] = line("lmlab web-en recipe (all stages)", len(docs), total_mb,
                                       time.perf_counter() - t, w, f"kept {rep['documents_out']:,}")
        shutil.rmtree(out / "work", ignore_errors=True)

    if "filters" in parts:
        filters(docs, a, results)
    if "minhash" in parts:
        minhash(docs, inputs, total_mb, tmp, a, results)
    if "recipe" in parts and "minhash" in parts:
        sr = results["web-en_2w"]["docs_per_s_per_worker"] / results["web-en_1w"]["docs_per_s_per_worker"]
        sm = results["minhash_2w"]["docs_per_s_per_worker"] / results["minhash_1w"]["docs_per_s_per_worker"]
        print(f"  → scaling 1 → 2 workers (per-worker efficiency): recipe {sr:.2f}, MinHash {sm:.2f}")
    print("\n" + json.dumps(results))
    if not a.keep:
        shutil.rmtree(tmp, ignore_errors=True)


def filters(docs, a, results: dict) -> None:
    """Quality filters, ours vs datatrove's stock chain, on the same English documents."""
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    norm = Normalizer()
    en = [norm.normalize(d.text) for d in docs if d.lang == "en"]
    sub = en[: a.stock_docs]
    sub_mb = sum(len(t.encode()) for t in sub) / 1e6
    ours_f = build_quality_filters(load_recipe("web-en")["quality"])
    stock_f = [GopherRepetitionFilter(), GopherQualityFilter(), C4QualityFilter(), FineWebQualityFilter()]
    decisions(stock_f, sub[:20])  # load spaCy outside the timing
    t = time.perf_counter()
    mine = decisions(ours_f, sub)
    r_ours = line("lmlab web-en filters (subsample)", len(sub), sub_mb, time.perf_counter() - t)
    t = time.perf_counter()
    theirs = decisions(stock_f, sub)
    r_stock = line("datatrove stock Gopher→Gopher→C4→FineWeb (subsample)", len(sub), sub_mb,
                   time.perf_counter() - t)
    agree = sum(x == y for x, y in zip(mine, theirs)) / len(sub)
    all_mb = sum(len(x.encode()) for x in en) / 1e6
    t = time.perf_counter()
    decisions(ours_f, en)
    results["filters_all_en"] = line("lmlab web-en filters (all English docs)", len(en), all_mb,
                                     time.perf_counter() - t)
    speedup = r_ours["docs_per_s_per_worker"] / r_stock["docs_per_s_per_worker"]
    print(f"  → filters: {speedup:.1f}× datatrove's stock chain; same keep/drop decision on "
          f"{agree:.2%} of {len(sub):,} documents\n")
    results.update(filters_ours=r_ours, filters_stock=r_stock, filters_speedup=speedup, filters_agreement=agree)



def minhash(docs, inputs, total_mb, tmp: Path, a, results: dict) -> None:
    """MinHash alone: lmlab on everything (1, 2 workers) and on a subsample; datatrove's default on the subsample."""
    for w in (() if "no-full-minhash" in a.parts else (1, 2)):
        out = tmp / f"minhash-{w}"
        t = time.perf_counter()
        run_recipe(dedup_only_recipe(), inputs, str(out), workers=w)
        sec = time.perf_counter() - t
        rec, prec = planted_scores(docs, removed_ids(out))
        results[f"minhash_{w}w"] = line("lmlab MinHash dedup (3-gram, 40×4, verified)", len(docs), total_mb,
                                        sec, w, f"recall {rec:.3f} precision {prec:.3f}")
        shutil.rmtree(out, ignore_errors=True)
    n_sub = min(len(docs), a.stock_docs * 2)
    sub_docs = docs[:n_sub]
    sub_src = tmp / "minhash-sub"
    write_shards([d.record() for d in sub_docs], sub_src, 1)
    sub_mb = mb([d.record() for d in sub_docs])
    t = time.perf_counter()
    run_recipe(dedup_only_recipe(), [str(sub_src)], str(tmp / "mh-ours-sub"), workers=1)
    sec = time.perf_counter() - t
    rec_o, prec_o = planted_scores(sub_docs, removed_ids(tmp / "mh-ours-sub"))
    r_mo = line("lmlab MinHash dedup (subsample)", n_sub, sub_mb, sec, 1,
                f"recall {rec_o:.3f} precision {prec_o:.3f}")
    t = time.perf_counter()
    removed = datatrove_minhash(sub_src, tmp / "mh-datatrove")
    sec = time.perf_counter() - t
    rec_d, prec_d = planted_scores(sub_docs, removed)
    r_md = line("datatrove default MinHash (5-gram, 14×8) (subsample)", n_sub, sub_mb, sec, 1,
                f"recall {rec_d:.3f} precision {prec_d:.3f}")
    ms = r_mo["docs_per_s_per_worker"] / r_md["docs_per_s_per_worker"]
    print(f"  → MinHash: {ms:.1f}× datatrove's default per worker (subsample), recall {rec_o:.3f} vs {rec_d:.3f}")
    results.update(minhash_ours_sub=r_mo, minhash_datatrove_sub=r_md, minhash_speedup=ms,
                   minhash_recall=(rec_o, rec_d))


if __name__ == "__main__":
    main()
