"""Deduplication: exact (hash of the simplified text) and near (MinHash LSH), one cluster pass.

Three phases, each a datatrove pipeline (see run.py):

1. `DedupSignatures` (end of the filter phase, one per task): for every document,
   a 64-bit hash of its simplified text (lower case, no punctuation, one space)
   and its MinHash signature. It *passes documents through*, so the same phase
   writes them to the intermediate JSONL in the same order the signatures
   number them. Signatures are written in datatrove's MinHash format.
2. `BandBuckets`: the colliding pairs per band, in datatrove's pair format
   (what its `MinhashDedupBuckets` computes, by a numpy sort instead of a Python heap).
3. `DuplicateClusters` (one task): union-find over the MinHash pairs *and* the
   exact-hash groups together, so that one cluster keeps exactly one document —
   the first in input order (lowest task, then position). Two separate passes
   could each keep a different member and together remove all of them.
4. `DuplicateFilter` (start of the last phase): drops the others, reason
   "exact_duplicate" when an earlier document has the identical simplified text,
   else "near_duplicate".

Why our own signature step: datatrove's stage 1 splits words with spaCy and
hashes each n-gram string in Python (~4 ms a page). `text.shingles` hashes words
once and combines them into n-gram hashes with numpy, which is what makes
MinHash ≥ 5× faster here; the permutation/min step is datatrove's own
`get_signature`. For Chinese, shingles are character n-grams.

LSH settings: with b bands of r rows a pair of Jaccard similarity s becomes a
candidate with probability 1 − (1 − s^r)^b. FineWeb uses 5-grams, 14 × 8
(threshold ≈ 0.72); the recipes here use 3-grams and 40 × 4 (≈ 0.40), because
documents with 5–10 % of their words (or Chinese characters) edited have
3-gram Jaccard of only 0.55–0.75 and must still be caught (tests/data_pipeline
measure recall). So low a threshold also lets unrelated pages collide in a band
now and then; each candidate pair is therefore verified on its whole signature
(`min_similarity`) before it joins a cluster.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import numpy as np
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
from datatrove.utils.hashing import HashConfig
from datatrove.utils.typeshelper import StatHints

from lmlab.data.pipeline.text import RegexWordTokenizer, shingles, simplify
from lmlab.fileio import atomic_write_bytes, atomic_write_text

KEEP, EXACT, NEAR, PARAGRAPH = 0, 1, 2, 3  # PARAGRAPH: every line was seen in an earlier document
REASONS = {EXACT: "exact_duplicate", NEAR: "near_duplicate", PARAGRAPH: "paragraph_duplicate"}
_CLUSTER_DTYPE = np.dtype([("doc", "<u4"), ("action", "u1"), ("size", "<u4")])
_EXACT_DTYPE = np.dtype([("hash", "<u8"), ("doc", "<u4")])
_PARA_DTYPE = np.dtype([("hash", "<u8"), ("doc", "<u4"), ("line", "<u4")])
_DROP_DTYPE = np.dtype([("doc", "<u4"), ("line", "<u4")])


def minhash_config(bands: int, rows: int, seed: int = 1, ngram: int = 3) -> MinhashConfig:
    # 32-bit hashes (our signature is multiply-shift, 32 bits); sha1 is only named so that
    # datatrove does not require xxhash: our shingles bring their own hashes
    return MinhashConfig(n_grams=ngram, num_buckets=bands, hashes_per_bucket=rows, seed=seed,
                         hash_config=HashConfig(precision=32, hash_fc="sha1"))


def _hash64(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little")


def exact_hash(text: str) -> int:
    return _hash64(simplify(text))


def paragraph_hashes(text: str) -> list[tuple[int, int]]:
    """(line index, 64-bit hash of its simplified text) for each line with any words.

    CCNet (Wenzek et al. 2020) deduplicates at this level: a web page's
    navigation, cookie banner and copyright lines recur on thousands of pages
    whose body is unique, so whole-document dedup never removes them.
    """
    simple = (simplify(line) for line in text.split("\n"))
    return [(i, _hash64(s)) for i, s in enumerate(simple) if s]


class DedupSignatures(MinhashDedupSignature):
    """Pass-through: records exact hashes and/or MinHash signatures of the documents it forwards."""

    name = "🔖 Dedup signatures"

    def __init__(self, exact_folder: str | None, minhash_folder: str | None,
                 bands: int = 32, rows: int = 4, ngram: int = 3, unit: str = "word", seed: int = 1,
                 paragraph_folder: str | None = None):
        super().__init__(minhash_folder or exact_folder or paragraph_folder,
                         config=minhash_config(bands, rows, seed, ngram), language=RegexWordTokenizer("en"))
        self.exact_folder = exact_folder
        self.paragraph_folder = paragraph_folder
        self.minhash = minhash_folder is not None
        self.unit = unit

    def get_shingles(self, text: str) -> np.ndarray:
        return shingles(text, self.config.n_grams, self.unit).reshape((-1, 1))

    @property
    def parameters(self):
        """Multipliers (odd) and offsets of the multiply-shift hash family, one pair per permutation."""
        if self._parameters is None:
            gen = np.random.RandomState(self.config.seed)
            a = gen.randint(1, 2**62, size=(1, self.num_hashes), dtype=np.uint64) * np.uint64(2) + np.uint64(1)
            b = gen.randint(0, 2**62, size=(1, self.num_hashes), dtype=np.uint64)
            self._parameters = (a, b)
        return self._parameters

    def signature(self, shingles: np.ndarray) -> np.ndarray:
        """num_hashes uint32 minima of (a·x + b) >> 32 over the shingles x.

        Multiply-shift (Dietzfelbinger et al.) needs no modulo, which is what makes it
        several times cheaper than datatrove's (a·x + b) mod (2^61 − 1) in numpy.
        """
        a, b = self.parameters
        h = shingles * a  # (n, 1) × (1, H): one (n, H) array, then updated in place
        h += b
        h >>= np.uint64(32)
        return h.min(axis=0).astype(np.uint32)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        cfg = self.config
        exact: list[tuple[int, int]] = []
        paragraphs: list[tuple[int, int, int]] = []
        docs: list[int] = []
        sigs: list[np.ndarray] = []
        doc_idx = 0
        for doc in data:
            if not doc.text:  # readers drop empty texts, which would shift positions
                continue
            with self.track_time():
                self.stat_update(StatHints.total)
                if self.exact_folder:
                    exact.append((exact_hash(doc.text), doc_idx))
                if self.paragraph_folder:
                    paragraphs.extend((h, doc_idx, line) for line, h in paragraph_hashes(doc.text))
                if self.minhash:
                    sh = self.get_shingles(doc.text)
                    if sh.size:
                        docs.append(doc_idx)
                        sigs.append(self.signature(sh))
            doc_idx += 1
            yield doc
        if self.minhash:
            sig = np.stack(sigs) if sigs else np.zeros((0, self.num_hashes), np.uint32)
            doc_ids = np.array(docs, dtype=np.uint32)
            # one file per band in datatrove's record layout (r hashes, then the document
            # position); datatrove sorts and verifies them and MinhashDedupBuckets reads them
            r = cfg.hashes_per_bucket
            rec = np.dtype([(f"h{i}", "<u4") for i in range(r)] + [("doc", "<u4")])
            for band in range(cfg.num_buckets):
                out = np.zeros(len(doc_ids), dtype=rec)
                for i in range(r):
                    out[f"h{i}"] = sig[:, band * r + i]
                out["doc"] = doc_ids
                with self.output_folder.open(f"bucket_{band:03d}/{rank:05d}.minhash.sig", "wb") as f:
                    f.write(out.tobytes())
            self.skip_existing_sigs = True
            super().run(iter(()), rank, world_size)
            # whole signatures, to verify LSH candidates
            full = Path(self.output_folder.path) / "full"
            full.mkdir(parents=True, exist_ok=True)
            np.savez(full / f"{rank:05d}.npz", doc=doc_ids, sig=sig)
        if self.exact_folder:
            out_dir = Path(self.exact_folder)
            out_dir.mkdir(parents=True, exist_ok=True)
            np.save(out_dir / f"{rank:05d}.npy", np.array(exact, dtype=_EXACT_DTYPE))
        if self.paragraph_folder:
            out_dir = Path(self.paragraph_folder)
            out_dir.mkdir(parents=True, exist_ok=True)
            np.save(out_dir / f"{rank:05d}.npy", np.array(paragraphs, dtype=_PARA_DTYPE))


class BandBuckets(PipelineStep):
    """Stage 2 of MinHash: the documents whose band hashes collide, band by band, in numpy.

    Reads datatrove's signature files (`bucket_BBB/TTTTT.minhash.sig`: per
    document `rows` uint32 hashes and its uint32 position, sorted) and writes
    datatrove's pair files (`BBBBB_00.dups`: `<4I` task, position, task,
    position for each signature equal to the one before it in sorted order) —
    what datatrove's `MinhashDedupBuckets` writes. datatrove merges the sorted
    files through a Python heap, ~5 µs a signature (2.4 s of a 30,000-document
    run with 40 bands, and it needs one task per band); a lexicographic sort of
    each band's whole table does the same in ~1 % of that. Bands are dealt over
    the tasks (band b to task b mod T), so the phase needs only as many tasks as
    there are workers. Tested against datatrove's stage on the same files.
    """

    type = "🫂 - DEDUP"
    name = "🎯 MinHash band buckets"

    def __init__(self, sig_folder: str, pairs_folder: str, config: MinhashConfig):
        super().__init__()
        self.sig_folder, self.pairs_folder = Path(sig_folder), Path(pairs_folder)
        self.bands, self.rows = config.num_buckets, config.hashes_per_bucket

    def band_pairs(self, band: int) -> np.ndarray:
        rec = np.dtype([("h", "<u4", (self.rows,)), ("doc", "<u4")])
        hashes, tasks, docs = [], [], []
        for f in sorted((self.sig_folder / f"bucket_{band:03d}").glob("*.minhash.sig")):
            a = np.fromfile(f, dtype=rec)
            hashes.append(a["h"])
            docs.append(a["doc"])
            tasks.append(np.full(len(a), int(f.name.removesuffix(".minhash.sig")), dtype=np.uint32))
        if not hashes:
            return np.zeros((0, 4), dtype="<u4")
        h, t, d = np.concatenate(hashes), np.concatenate(tasks), np.concatenate(docs)
        order = np.lexsort((d, t) + tuple(h[:, j] for j in reversed(range(self.rows))))
        h, t, d = h[order], t[order], d[order]
        same = np.nonzero((h[1:] == h[:-1]).all(axis=1))[0]
        return np.stack([t[same], d[same], t[same + 1], d[same + 1]], axis=1).astype("<u4")

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1):
        self.pairs_folder.mkdir(parents=True, exist_ok=True)
        for band in range(rank, self.bands, world_size):
            with self.track_time():
                pairs = self.band_pairs(band)
                # a crashed task leaves no half-written pair file
                atomic_write_bytes(self.pairs_folder / f"{band:05d}_00.dups", pairs.tobytes())
                self.stat_update("total_matches", value=len(pairs))
        return iter(())


class DuplicateClusters(PipelineStep):
    """One task: union-find over MinHash pairs and exact-hash groups; one kept per cluster."""

    type = "🫂 - DEDUP"
    name = "🧮 Duplicate clusters"

    def __init__(self, exact_folder: str | None, pairs_folder: str | None, out_folder: str,
                 sigs_folder: str | None = None, min_similarity: float = 0.0,
                 paragraph_folder: str | None = None):
        super().__init__()
        self.exact_folder, self.pairs_folder, self.out_folder = exact_folder, pairs_folder, out_folder
        self.sigs_folder, self.min_similarity = sigs_folder, min_similarity
        self.paragraph_folder = paragraph_folder

    def _paragraph_drops(self, removed: np.ndarray, out: Path) -> int:
        """Mark every line whose text a kept document showed earlier; write per-task (doc, line) lists.

        Lines of documents removed as duplicates do not count: the line stays in
        the first *kept* document that has it.
        """
        parts = []
        for f in sorted(Path(self.paragraph_folder).glob("*.npy")):
            a = np.load(f)
            parts.append((a, np.full(len(a), int(f.stem), dtype=np.uint64)))
        if not parts:
            return 0
        a = np.concatenate([p[0] for p in parts])
        task = np.concatenate([p[1] for p in parts])
        key = task << np.uint64(32) | a["doc"].astype(np.uint64)
        alive = ~np.isin(key, removed)
        a, task, key = a[alive], task[alive], key[alive]
        order = np.lexsort((a["line"], key, a["hash"]))  # by hash, then input order
        h = a["hash"][order]
        repeat = np.zeros(len(h), dtype=bool)
        repeat[1:] = h[1:] == h[:-1]
        drop = order[repeat]
        for t in np.unique(task).tolist():
            sel = drop[task[drop] == t]
            rec = np.zeros(len(sel), dtype=_DROP_DTYPE)
            rec["doc"], rec["line"] = a["doc"][sel], a["line"][sel]
            rec.sort(order=["doc", "line"])
            np.save(out / f"paragraphs_{t:05d}.npy", rec)
        return int(len(drop))

    def _verify(self, edges: np.ndarray) -> np.ndarray:
        """Keep the LSH candidate pairs whose whole signatures agree on ≥ min_similarity of hashes.

        A band collision says "these may be similar"; the share of equal MinHash values
        over all permutations estimates their Jaccard similarity (±0.05 at 128 hashes),
        so unrelated pages that collide in one band by chance are not merged.
        """
        if not edges.size or not self.sigs_folder or self.min_similarity <= 0:
            return edges
        keys, sigs = [], []
        for f in sorted((Path(self.sigs_folder) / "full").glob("*.npz")):
            z = np.load(f)
            keys.append(np.uint64(int(f.stem)) << np.uint64(32) | z["doc"].astype(np.uint64))
            sigs.append(z["sig"])
        keys, sigs = np.concatenate(keys), np.concatenate(sigs)
        order = np.argsort(keys)
        keys, sigs = keys[order], sigs[order]
        a, b = np.searchsorted(keys, edges[:, 0]), np.searchsorted(keys, edges[:, 1])
        sim = np.empty(len(edges))
        for i in range(0, len(edges), 65536):  # bounded memory
            sl = slice(i, i + 65536)
            sim[sl] = (sigs[a[sl]] == sigs[b[sl]]).mean(axis=1)
        self.stat_update("lsh_candidates", value=len(edges))
        self.stat_update("lsh_rejected", value=int((sim < self.min_similarity).sum()))
        return edges[sim >= self.min_similarity]

    def _pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """Edges as (a, b) arrays of node keys (task << 32 | position), and each node's exact hash."""
        edges = [np.zeros((0, 2), dtype=np.uint64)]
        hashes = {}
        if self.pairs_folder:
            lsh = [np.zeros((0, 2), dtype=np.uint64)]
            for f in sorted(Path(self.pairs_folder).glob("*.dups")):
                rec = np.fromfile(f, dtype="<u4").reshape(-1, 4).astype(np.uint64)
                lsh.append(np.stack([rec[:, 0] << np.uint64(32) | rec[:, 1],
                                     rec[:, 2] << np.uint64(32) | rec[:, 3]], axis=1))
            edges.append(self._verify(np.unique(np.concatenate(lsh), axis=0)))
        if self.exact_folder:
            parts = []
            for f in sorted(Path(self.exact_folder).glob("*.npy")):
                a = np.load(f)
                keys = np.uint64(int(f.stem)) << np.uint64(32) | a["doc"].astype(np.uint64)
                parts.append((a["hash"], keys))
            if parts:
                h = np.concatenate([p[0] for p in parts])
                k = np.concatenate([p[1] for p in parts])
                order = np.lexsort((k, h))
                h, k = h[order], k[order]
                same = np.nonzero(h[1:] == h[:-1])[0] + 1  # positions equal to their predecessor
                if same.size:
                    # link each repeat to the first of its run of equal hashes
                    run_start = np.maximum.accumulate(np.where(np.r_[True, h[1:] != h[:-1]],
                                                               np.arange(h.size), 0))
                    edges.append(np.stack([k[run_start[same]], k[same]], axis=1))
                    hashes = {"keys": k, "first": k[run_start]}
        return np.unique(np.concatenate(edges), axis=0), hashes

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        edges, exact = self._pairs()
        nodes, inv = np.unique(edges, return_inverse=True)
        inv = inv.reshape(-1, 2)
        parent = list(range(nodes.size))

        def find(x: int) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for a, b in inv.tolist():
            ra, rb = find(a), find(b)
            if ra != rb:  # the smaller key (earlier document) becomes the root: it is kept
                parent[max(ra, rb)] = min(ra, rb)
        roots = np.array([find(i) for i in range(nodes.size)], dtype=np.int64)
        sizes = np.bincount(roots, minlength=nodes.size) if nodes.size else np.zeros(0, np.int64)
        # a removed node is an exact duplicate when an earlier node has its exact text
        exact_dup = np.zeros(nodes.size, dtype=bool)
        if exact:
            first = dict(zip(exact["keys"].tolist(), exact["first"].tolist()))
            exact_dup = np.array([first.get(k, k) != k for k in nodes.tolist()], dtype=bool)
        is_root = roots == np.arange(nodes.size)
        action = np.where(is_root, KEEP, np.where(exact_dup, EXACT, NEAR)).astype(np.uint8)

        out = Path(self.out_folder)
        out.mkdir(parents=True, exist_ok=True)
        tasks = (nodes >> np.uint64(32)).astype(np.int64)
        for old in out.glob("*.npy"):  # a re-run of this phase starts clean
            old.unlink()
        for t in np.unique(tasks).tolist():
            sel = tasks == t
            rec = np.zeros(int(sel.sum()), dtype=_CLUSTER_DTYPE)
            rec["doc"] = (nodes[sel] & np.uint64(0xFFFFFFFF)).astype(np.uint32)
            rec["action"] = action[sel]
            rec["size"] = sizes[roots[sel]]
            rec.sort(order="doc")
            np.save(out / f"{t:05d}.npy", rec)
        hist = np.bincount(sizes[is_root]) if nodes.size else np.zeros(0, np.int64)
        lines_dropped = 0
        if self.paragraph_folder:
            lines_dropped = self._paragraph_drops(nodes[action != KEEP], out)
        atomic_write_text(out / "clusters.json", json.dumps({
            "duplicate_lines": lines_dropped,
            "clusters": int(is_root.sum()),
            "documents_in_clusters": int(nodes.size),
            "removed_exact": int((action == EXACT).sum()),
            "removed_near": int((action == NEAR).sum()),
            "size_hist": {str(s): int(c) for s, c in enumerate(hist.tolist()) if c},
        }))
        self.stat_update("clusters", value=int(is_root.sum()))
        return
        yield


class DuplicateFilter(PipelineStep):
    """Drops the documents DuplicateClusters marked; writes them to per-reason exclusion writers."""

    type = "🫂 - DEDUP"
    name = "🫂 Duplicates"

    def __init__(self, clusters_folder: str, exclusion_writers: dict | None = None):
        super().__init__()
        self.clusters_folder = clusters_folder
        self.exclusion_writers = exclusion_writers or {}

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        path = Path(self.clusters_folder) / f"{rank:05d}.npy"
        rec = np.load(path) if path.is_file() else np.zeros(0, dtype=_CLUSTER_DTYPE)
        marks = {int(d): (int(a), int(s)) for d, a, s in zip(rec["doc"], rec["action"], rec["size"])}
        lines: dict[int, set[int]] = {}
        para = Path(self.clusters_folder) / f"paragraphs_{rank:05d}.npy"
        if para.is_file():
            for d, line in np.load(para).tolist():
                lines.setdefault(d, set()).add(line)
        with contextlib.ExitStack() as stack:
            writers = {r: stack.enter_context(w) for r, w in self.exclusion_writers.items() if w}
            for idx, doc in enumerate(data):
                self.stat_update(StatHints.total)
                action, size = marks.get(idx, (KEEP, 1))
                if action == KEEP and idx in lines:
                    kept = [t for i, t in enumerate(doc.text.split("\n")) if i not in lines[idx]]
                    self.stat_update("duplicate_lines_removed", value=len(lines[idx]))
                    if "".join(kept).strip():
                        doc.text = "\n".join(kept)
                        doc.metadata["duplicate_lines_removed"] = len(lines[idx])
                    else:
                        action = PARAGRAPH  # nothing of its own left
                if action == KEEP:
                    if size > 1:
                        doc.metadata["duplicate_cluster_size"] = size
                    self.stat_update(StatHints.forwarded)
                    yield doc
                    continue
                reason = REASONS[action]
                self.stat_update(StatHints.dropped, f"dropped_{reason}")
                if reason in writers:
                    doc.metadata["filter_reason"] = reason
                    writers[reason].write(doc, rank)
