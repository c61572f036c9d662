"""The per-item extraction cache: what an extractor made of one item's input, reused by every later run.

An entry's key is sha256(extractor fingerprint, item input). The fingerprint covers everything that
changes an extractor's output: kind, model id, weights checksum, dimension, its output-changing
params and (meta) the fitted statistics; not batch sizes or the device, and not the params that only
filter results (OCR confidence, face probability, how many are kept), because entries hold the
unfiltered result and the filters run when the features are assembled. The item input is the image
sha256 the manifest records, or the text / list / meta values.

Layout: <root>/<kind>-<fingerprint[:16]>/part-<uuid>.parquet, one part per run that computed
something, rows (key, vectors, elements, category_ids), and extractor.json saying which extractor
and params the folder holds (a folder of an extractor no longer used can be deleted). A part is written aside and renamed when
complete, so a killed or failed write never leaves a readable part; readers see only `part-*.parquet`.
The whole folder can be deleted at any time (the next run computes everything again).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import features, schema

log = logging.getLogger(__name__)

KEY = "key"
# params that change how fast an extractor runs, never what it outputs
RUNTIME_PARAMS = frozenset({"batch_size", "text_batch_size", "crop_batch_size", "device"})
PART_ROW_GROUP = 1024


def fingerprint(described: dict[str, Any], params: dict[str, Any], filter_params: Iterable[str]) -> str:
    """sha256 over an extractor's provenance (`described`: kind, model, weights, dim, statistics) and
    its params minus the runtime-only and filter-only ones."""
    skip = RUNTIME_PARAMS | set(filter_params)
    payload = {"described": described, "params": {k: v for k, v in params.items() if k not in skip}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def item_key(fp: str, value: Any) -> str:
    """The cache key of one item: the extractor's fingerprint and the item's input value."""
    blob = json.dumps(value, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(f"{fp}\x00{blob}".encode("utf-8", "surrogatepass")).hexdigest()[:32]


def raw_schema(dim: int) -> pa.Schema:
    """A cache part's schema: the feature schema with the key in place of the id."""
    sch = features.feature_schema(dim)
    return pa.schema([pa.field(KEY, pa.string(), nullable=False), *[f for f in sch if f.name != schema.ID]])


class FeatureCache:
    """One extractor's folder of cache parts."""

    def __init__(self, root: Path, kind: str, fp: str, dim: int, about: dict[str, Any] | None = None):
        self.folder = Path(root) / f"{kind}-{fp[:16]}"
        self.fp, self.dim, self.about = fp, dim, about or {}

    def parts(self) -> list[Path]:
        return sorted(self.folder.glob("part-*.parquet")) if self.folder.is_dir() else []

    def locate(self, keys: Iterable[str], parts: list[Path] | None = None) -> dict[str, tuple[Path, int]]:
        """Where each of `keys` is stored (part, row), for the keys present (in `parts`, default all); reads
        the key columns only. A part that cannot be read is skipped with a warning (computed again)."""
        wanted = pa.array(sorted(set(keys)), pa.string())
        found: dict[str, tuple[Path, int]] = {}
        if not len(wanted):
            return found
        for part in self.parts() if parts is None else parts:
            try:
                part_keys = pq.read_table(part, columns=[KEY])[KEY]
            except (pa.ArrowException, OSError, ValueError) as exc:
                log.warning("cache part %s is unreadable (%s); its items are computed again", part, exc)
                continue
            hits = np.flatnonzero(pc.is_in(part_keys, value_set=wanted).to_numpy(zero_copy_only=False))
            for row, key in zip(hits.tolist(), part_keys.take(pa.array(hits)).to_pylist()):
                found.setdefault(key, (part, row))
        return found

    def write_part(self, tables: Iterable[pa.Table]) -> tuple[Path | None, int]:
        """Write one part from a stream of raw tables (key first); returns (part, rows) or (None, 0) when
        the stream is empty. Complete or absent: written aside, renamed when closed."""
        self.folder.mkdir(parents=True, exist_ok=True)
        about = self.folder / "extractor.json"  # for people: which extractor and params this folder holds
        if not about.exists():
            aside_about = self.folder / f".extractor-{uuid.uuid4().hex}.json"
            aside_about.write_text(json.dumps({"fingerprint": self.fp, **self.about}, indent=1, sort_keys=True, default=str))
            os.replace(aside_about, about)
        name = f"part-{uuid.uuid4().hex}.parquet"
        aside = self.folder / f".{name}.partial"
        sch, rows, writer = raw_schema(self.dim), 0, None
        try:
            for table in tables:
                if not table.num_rows:
                    continue
                if writer is None:
                    writer = pq.ParquetWriter(aside, sch, compression="zstd", write_page_checksum=True)
                writer.write_table(table.select(sch.names).cast(sch), row_group_size=PART_ROW_GROUP)
                rows += table.num_rows
            if writer is None:
                return None, 0
            writer.close()
            writer = None
            os.replace(aside, self.folder / name)
        finally:
            if writer is not None:
                writer.close()
            aside.unlink(missing_ok=True)
        return self.folder / name, rows


def gather(locations: dict[str, tuple[Path, int]], ids_by_key: dict[str, list[str]], dim: int,
           batch_rows: int = PART_ROW_GROUP) -> Iterator[pa.Table]:
    """The raw rows of `locations` as feature tables (key replaced by every id that has that key), part by
    part and row group by row group: memory holds one row group, not the modality."""
    by_part: dict[Path, list[tuple[int, str]]] = {}
    for key, (part, row) in locations.items():
        by_part.setdefault(part, []).append((row, key))
    for part in sorted(by_part):
        wanted = sorted(by_part[part])
        pf = pq.ParquetFile(part, page_checksum_verification=True)
        starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
        groups = (np.searchsorted(starts, [r for r, _ in wanted], side="right") - 1).tolist()
        for g, members in itertools.groupby(zip(groups, wanted), key=lambda gw: gw[0]):
            table = pf.read_row_group(g).cast(raw_schema(dim))
            take, ids = [], []
            for _, (row, key) in members:
                r = row - int(starts[g])
                for item_id in ids_by_key[key]:
                    take.append(r)
                    ids.append(item_id)
            for start in range(0, len(take), batch_rows):
                chunk = table.take(pa.array(take[start:start + batch_rows])).drop_columns([KEY])
                yield chunk.add_column(0, schema.ID, pa.array(ids[start:start + batch_rows], pa.string()))
