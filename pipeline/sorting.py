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
import pyarrow.compute as pc
import pyarrow.parquet as pq


class ExternalSort:
    """add() tables in any order; sorted() yields them back sorted by `key` in chunks."""

    def __init__(
        self, key: str, max_bytes: int, tmp_dir: Path, chunk_rows: int = 1024, run_rows: int = 1024, fan_in: int = 8
    ):
        # runs are written and read back in row groups of `run_rows`; a merge reads at most `fan_in` runs
        # at once (more are merged in passes), so it holds at most fan_in row groups and file footers
        self.key, self.max_bytes, self.chunk_rows, self.run_rows = key, max_bytes, chunk_rows, run_rows
        self.fan_in = max(2, fan_in)
        self.tmp = Path(tempfile.mkdtemp(prefix="sort-", dir=tmp_dir))
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.runs: list[Path] = []
        self.passes = 0  # merge passes done to bring the runs down to fan_in

    def add(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        self.buffer.append(table)
        self.buffered += table.nbytes
        if self.buffered >= self.max_bytes:
            self._spill()

    def _sorted_buffer(self) -> Iterator[pa.Table]:
        """The buffered rows sorted by key, a chunk at a time, taken by sorted index (memory holds the
        buffer, copied once into one array per column, and one chunk); empties the buffer."""
        if not self.buffer:
            return
        table = pa.concat_tables(self.buffer).combine_chunks()  # a take from many chunks would copy them each time
        self.buffer, self.buffered = [], 0
        order = pc.sort_indices(table, sort_keys=[(self.key, "ascending")])
        for start in range(0, table.num_rows, self.chunk_rows):
            yield table.take(order.slice(start, self.chunk_rows))

    def _spill(self) -> None:
        self._write_run(self._sorted_buffer())

    def _write_run(self, chunks: Iterator[pa.Table]) -> None:
        first = next(chunks, None)
        if first is None:
            return
        path = self.tmp / f"run-{len(self.runs):05d}-{self.passes:02d}.parquet"
        with pq.ParquetWriter(path, first.schema) as writer:
            writer.write_table(first, row_group_size=self.run_rows)
            for chunk in chunks:
                writer.write_table(chunk, row_group_size=self.run_rows)
        self.runs.append(path)

    def sorted(self) -> Iterator[pa.Table]:
        """Every row added, sorted by key, in chunks; removes the runs when done."""
        try:
            if not self.runs:
                yield from self._sorted_buffer()
                return
            self._spill()
            while len(self.runs) > self.fan_in:
                group, self.runs = self.runs[: self.fan_in], self.runs[self.fan_in :]
                self.passes += 1
                self._write_run(self._merge(group))
                for path in group:
                    path.unlink()
            yield from self._merge(self.runs)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _merge(self, runs: list[Path]) -> Iterator[pa.Table]:
        readers = [self._chunks(p) for p in runs]
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
    def _chunks(path: Path) -> Iterator[pa.Table]:
        """A run's row groups (one chunk each), read one at a time: iter_batches would read ahead the
        whole file."""
        pf = pq.ParquetFile(path)
        for g in range(pf.num_row_groups):
            yield pf.read_row_group(g, use_threads=False)

    @staticmethod
    def _next(reader: Iterator[pa.Table]) -> pa.Table | None:
        return next(reader, None)
