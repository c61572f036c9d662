"""Sorting tables by a string column in bounded memory (an external merge sort with Parquet runs).

Rows are buffered up to `max_bytes`; a full buffer is sorted and written as a run. At the end the
runs are merged chunk by chunk: from every run's current chunk, the rows up to the smallest of the
chunks' last keys are all safe to emit (no later row of any run sorts before them), so each step
emits at least one whole chunk with vectorised sorts and no per-row Python. With a single buffer
and no runs nothing touches the disk.
"""

from __future__ import annotations

import bisect
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


class ExternalSort:
    """add() tables in any order; sorted() yields them back sorted by `key` in chunks."""

    def __init__(self, key: str, max_bytes: int, tmp_dir: Path, chunk_rows: int = 1024):
        self.key, self.max_bytes, self.chunk_rows = key, max_bytes, chunk_rows
        self.tmp = Path(tempfile.mkdtemp(prefix="sort-", dir=tmp_dir))
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.runs: list[Path] = []

    def add(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        self.buffer.append(table)
        self.buffered += table.nbytes
        if self.buffered >= self.max_bytes:
            self._spill()

    def _sorted_buffer(self) -> pa.Table | None:
        if not self.buffer:
            return None
        table = pa.concat_tables(self.buffer).sort_by(self.key)
        self.buffer, self.buffered = [], 0
        return table

    def _spill(self) -> None:
        table = self._sorted_buffer()
        if table is not None:
            path = self.tmp / f"run-{len(self.runs):05d}.parquet"
            pq.write_table(table, path, row_group_size=self.chunk_rows)
            self.runs.append(path)

    def sorted(self) -> Iterator[pa.Table]:
        """Every row added, sorted by key, in chunks; removes the runs when done."""
        try:
            if not self.runs:
                table = self._sorted_buffer()
                if table is not None:
                    for start in range(0, table.num_rows, self.chunk_rows):
                        yield table.slice(start, self.chunk_rows)
                return
            self._spill()
            yield from self._merge()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _merge(self) -> Iterator[pa.Table]:
        readers = [pq.ParquetFile(p).iter_batches(batch_size=self.chunk_rows) for p in self.runs]
        heads: list[pa.Table | None] = [self._next(r) for r in readers]
        while any(h is not None for h in heads):
            live = [h for h in heads if h is not None]
            bound = min(h[self.key][-1].as_py() for h in live)
            out = []
            for i, head in enumerate(heads):
                if head is None:
                    continue
                keys = head[self.key].to_pylist()
                n = bisect.bisect_right(keys, bound)  # the run's rows <= bound
                if n:
                    out.append(head.slice(0, n))
                heads[i] = head.slice(n) if n < head.num_rows else self._next(readers[i])
            yield pa.concat_tables(out).sort_by(self.key)

    @staticmethod
    def _next(reader: Iterator[pa.RecordBatch]) -> pa.Table | None:
        batch = next(reader, None)
        return None if batch is None else pa.Table.from_batches([batch])
