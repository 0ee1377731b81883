"""Readers: lmlab's one set of input readers (`lmlab.data.sources`) as datatrove steps.

`SourceReader` gives each task every world_size-th input file and reads them with
`iter_documents`, which understands txt/md/py, JSONL (.gz/.zst), Parquet, WARC
and HTML and reports-and-skips malformed records. The problems it reports
("path:line: what") are saved per task and collected into the run report.

`RankJsonlReader` reads back the one intermediate JSONL file that the same rank
wrote in an earlier phase, so that document positions line up with the
positions recorded by the deduplication signatures.
"""

from __future__ import annotations

import os
from pathlib import Path

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.readers import JsonlReader

from lmlab.data.pipeline.meter import write_json
from lmlab.errors import InputError


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files named, and the readable files under directories named — the files
    `iter_documents` would read, listed so that tasks can share them out."""
    from lmlab.data.sources import detect_format

    files: list[str] = []
    for p in inputs:
        path = Path(p)
        if path.is_dir():
            for dirpath, dirnames, names in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                files += [os.path.join(dirpath, n) for n in sorted(names)
                          if not n.startswith(".") and detect_format(n)[0] is not None]
        elif path.is_file():
            files.append(str(path))
        else:
            raise InputError(f"{p}: no such file or directory")
    if not files:
        raise InputError(f"no input files in {', '.join(inputs)}")
    return files


class SourceReader(PipelineStep):
    type = "📖 - READER"
    name = "lmlab sources"

    def __init__(self, files: list[str], problems_folder: str, text_field: str = "text",
                 id_field: str = "id", strict: bool = False, max_line_bytes: int | None = None):
        super().__init__()
        self.files = list(files)
        self.problems_folder = problems_folder
        self.text_field, self.id_field, self.strict = text_field, id_field, strict
        self.max_line_bytes = max_line_bytes  # None: lmlab.data.sources.MAX_LINE_BYTES

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from lmlab.data.sources import MAX_LINE_BYTES, ReadStats, iter_documents

        shard = self.files[rank::world_size]
        stats = ReadStats()
        limit = MAX_LINE_BYTES if self.max_line_bytes is None else self.max_line_bytes
        try:
            docs = iter_documents(shard, text_field=self.text_field, id_field=self.id_field,
                                  strict=self.strict, stats=stats,
                                  max_line_bytes=limit) if shard else iter(())
            for d in docs:
                self.stat_update("documents")
                meta = dict(d.metadata or {})
                meta.setdefault("source", d.source)
                if d.line is not None:
                    meta.setdefault("line", d.line)
                doc_id = d.id if d.id not in (None, "") else f"{os.path.basename(str(d.source))}:{d.line}"
                yield Document(text=d.text, id=str(doc_id), metadata=meta)
        except InputError:
            # iter_documents raises when a whole call yields nothing; one task's share of
            # bad files is not the whole run (run_recipe checks the total)
            if self.strict or stats.documents:
                raise
        finally:
            write_json(Path(self.problems_folder) / f"{rank:05d}.json", {
                "files": len(shard),
                "documents": stats.documents,
                "bytes": stats.bytes,
                "skipped": stats.skipped_total,
                "skipped_by_reason": dict(stats.skipped),
                "problems": list(stats.problems)[:1000],
            })


class RankJsonlReader(JsonlReader):
    """Reads `<folder>/<rank>.jsonl` only: the file this rank wrote in an earlier phase."""

    name = "lmlab intermediate"

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        name = f"{rank:05d}.jsonl"
        if not self.data_folder.isfile(name):
            return
        yield from self.read_files_shard([name])
