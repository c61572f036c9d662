"""Feature sets: one Parquet file per modality, one row per item, 0..N vectors per row.

The schema is defined here once for every modality. A row holds the item id, its set of vectors
(an empty set is valid data), per-element metadata and, for the meta modality, categorical ids.
File-level metadata records the extractor, model, weights checksum, dimension, params and the
manifest it came from, so later stages can refuse features that do not belong together.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import schema
from pipeline.runtime import UserError

VECTORS = "vectors"
ELEMENTS = "elements"
CATEGORY_IDS = "category_ids"

# An element's record; text, box and score keep their names as columns of elements.parquet.
ELEMENT_TYPE = pa.struct(
    [
        pa.field("index", pa.int32()),  # position in the source (sentence, list item, box order)
        pa.field(schema.TEXT, pa.string()),  # sentence, tag or OCR text
        pa.field(schema.BOX, pa.list_(pa.float32())),  # [x0, y0, x1, y1] in image pixels (faces, OCR)
        pa.field(schema.SCORE, pa.float32()),  # detection probability or OCR confidence
        pa.field("landmarks", pa.list_(pa.float32())),  # 5 face landmarks as x, y pairs
    ]
)
ELEMENT_KEYS = tuple(f.name for f in ELEMENT_TYPE)

# Provenance: the one list of what a feature file records about how it was made. Its subsets:
# what makes two extractions interchangeable (checked before scoring extracts anything), what meta fits
# on the train split, and what a model bundle keeps of each modality (checked again at prediction).
EXTRACTOR_KEYS = ("extractor", "model_id", "weights_sha256", "model_files_sha256", "dim", "runs_on")
FITTED_KEYS = ("stats",)  # meta: standardisation statistics and vocabularies, in column order
MATCH_KEYS = (*EXTRACTOR_KEYS, *FITTED_KEYS)  # features used with a model must agree with it on these
PROVENANCE_KEYS = (
    "modality",
    "kind",
    *EXTRACTOR_KEYS,
    "manifest_sha256",
    "params",
    "embedder",
    *FITTED_KEYS,
    "software",
)
# recorded since model folders are digested whole; a bundle written before lacks it and is checked without it
# (and `runs_on`, what runs an extractor's networks, since OCR could run on other runtimes)
ADDED_KEYS = frozenset({"model_files_sha256", "runs_on"})


def keys_to_match(recorded: Mapping[str, Any], keys: Iterable[str]) -> list[str]:
    """`keys`, less the ones added later that the `recorded` provenance (a bundle's) predates."""
    return [k for k in keys if k in recorded or k not in ADDED_KEYS]


class FeatureMismatchError(UserError, ValueError):
    """Feature files whose provenance does not match what the caller expects."""


def vocabularies(meta: Mapping[str, Any], where: str = "features") -> list[tuple[str, list[str]]]:
    """(column, train vocabulary) of each categorical meta column, in the order of the item's category
    ids; [] for a modality without categorical columns. Statistics in the unordered layout of earlier
    versions are refused: their column order is not recorded."""
    stats = meta.get("stats")
    if not stats:
        return []
    cats = stats.get("categorical")
    if not isinstance(cats, list):
        raise FeatureMismatchError(
            f"{where}: meta statistics in the layout of an earlier version, which does not "
            "record the column order; run the meta extraction again"
        )
    return [(c["column"], list(c["values"])) for c in cats]


def feature_schema(dim: int) -> pa.Schema:
    """The Parquet schema of a feature set with `dim`-dimensional vectors."""
    return pa.schema(
        [
            pa.field(schema.ID, pa.string(), nullable=False),
            pa.field(VECTORS, pa.list_(pa.list_(pa.float32(), dim)), nullable=False),
            pa.field(ELEMENTS, pa.list_(ELEMENT_TYPE), nullable=False),
            pa.field(CATEGORY_IDS, pa.list_(pa.int32())),  # meta only: one id per categorical column
        ]
    )


def element(**values: Any) -> dict[str, Any]:
    """A per-element metadata record with every key present (missing ones null)."""
    unknown = set(values) - set(ELEMENT_KEYS)
    if unknown:
        raise ValueError(f"unknown element keys {sorted(unknown)}; valid: {ELEMENT_KEYS}")
    return {k: values.get(k) for k in ELEMENT_KEYS}


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def json_sha256(value: Any) -> str:
    """sha256 of a JSON value (object keys sorted; lists keep their order)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def file_digests(folder: str | Path) -> dict[str, str]:
    """sha256 of every file under `folder` by relative path, in path order (symlinks followed, as a model
    cache's snapshot links its blobs). Hidden entries and __pycache__ are left out (not model content)."""
    root = Path(folder)
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") or part == "__pycache__" for part in p.relative_to(root).parts)
    )
    return {path.relative_to(root).as_posix(): file_sha256(path) for path in files}


def digests_sha256(digests: dict[str, str]) -> str:
    """The sha256 of a folder from its `file_digests` (relative path and content of each file)."""
    h = hashlib.sha256()
    for rel, sha in digests.items():
        h.update(f"{rel}\x00{sha}\n".encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def tree_sha256(folder: str | Path) -> str:
    """sha256 over every file under `folder` (relative path and content): weights, tokenizer, config and
    code of a model folder alike."""
    return digests_sha256(file_digests(folder))


def _digest(h: Any, arr: pa.Array) -> None:
    """Feed the logical content of `arr` (type, nulls, values; not its memory layout) into hash `h`."""
    t = arr.type
    if pa.types.is_fixed_size_list(t):
        tag = f"fixed_size_list[{t.list_size}]"
    elif pa.types.is_list(t) or pa.types.is_large_list(t):
        tag = "list"  # not str(t): Parquet renames a list's child field ("item" -> "element")
    elif pa.types.is_struct(t):
        tag = "struct:" + ",".join(f.name for f in t)
    else:
        tag = str(t)
    h.update(f"{tag}:{len(arr)}:{arr.null_count}".encode())
    if arr.null_count:
        h.update(np.packbits(arr.is_null().to_numpy(zero_copy_only=False)).tobytes())
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        lengths = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        h.update(np.ascontiguousarray(lengths))
        _digest(h, arr.flatten())
    elif pa.types.is_struct(t):
        for child in arr.flatten():
            _digest(h, child)
    elif pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t):
        values = arr.fill_null("" if pa.types.is_string(t) or pa.types.is_large_string(t) else b"").to_pylist()
        h.update(np.asarray([len(v) for v in values], dtype=np.int64))
        h.update(
            "".join(values).encode("utf-8", "surrogatepass")
            if values and isinstance(values[0], str)
            else b"".join(values)
        )
    else:
        h.update(np.ascontiguousarray(arr.fill_null(0).to_numpy(zero_copy_only=False)))


CHUNK_ROWS = 4096  # rows per digest chunk of content_sha256 (fixed, so it does not depend on row groups)
CONTENT_KEY = b"dmms_content"  # footer metadata written last: content checksum and row count


def content_sha256(table: pa.Table, chunk_rows: int | None = None) -> str:
    """sha256 of a table's logical content (columns, types, nulls, values), independent of how Parquet
    or Arrow lays it out, so the value computed before writing can be checked after reading.

    With `chunk_rows` it is the sha256 of the digests of consecutive chunks of that many rows, which
    a writer can compute while streaming; without it (files written before streaming), one digest."""
    if chunk_rows is None:
        return _table_digest(table).hexdigest()
    digest = ContentDigest(chunk_rows)
    digest.update(table)
    return digest.hexdigest()


def _table_digest(table: pa.Table) -> Any:
    h = hashlib.sha256()
    for name in table.column_names:
        h.update(name.encode())
        _digest(h, table[name].combine_chunks())
    return h


class ContentDigest:
    """content_sha256 computed chunk by chunk as rows stream past (holds at most one chunk)."""

    def __init__(self, chunk_rows: int = CHUNK_ROWS):
        self.chunk_rows, self.rows = chunk_rows, 0
        self.total = hashlib.sha256()
        self.pending: list[pa.Table] = []
        self.pending_rows = 0

    def update(self, table: pa.Table) -> None:
        self.rows += table.num_rows
        while table.num_rows:
            take = min(self.chunk_rows - self.pending_rows, table.num_rows)
            self.pending.append(table.slice(0, take))
            self.pending_rows += take
            table = table.slice(take)
            if self.pending_rows == self.chunk_rows:
                self._flush()

    def _flush(self) -> None:
        if self.pending_rows:
            self.total.update(_table_digest(pa.concat_tables(self.pending)).digest())
        self.pending, self.pending_rows = [], 0

    def hexdigest(self) -> str:
        self._flush()
        return self.total.hexdigest()


class FeaturesUnreadableError(UserError):
    """A feature file that is truncated, corrupted, or not a feature file at all."""


class FeatureWriter:
    """Stream a feature table to `path`, already sorted by id, chunk by chunk, with provenance metadata and,
    in the footer, the content checksum and row count. The file appears complete or not at all (written
    aside, renamed on close); an exception inside the `with` block leaves nothing behind."""

    def __init__(self, path: Path, dim: int, meta: dict[str, Any]):
        self.path, self.sch = path, feature_schema(dim)
        self.part = path.with_name(f".{path.name}.partial")
        path.parent.mkdir(parents=True, exist_ok=True)
        full = schema.with_metadata(self.sch, {"kind_of_file": "features", **meta})
        self.writer = pq.ParquetWriter(self.part, full, compression="zstd", write_page_checksum=True)
        self.digest = ContentDigest()
        self.last_id: str | None = None

    def write(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        table = table.select(self.sch.names).cast(self.sch)
        ids = table[schema.ID]
        if self.last_id is not None and ids[0].as_py() <= self.last_id:
            raise ValueError(f"feature rows out of order: {ids[0].as_py()!r} after {self.last_id!r}")
        self.last_id = ids[-1].as_py()
        self.digest.update(table)
        self.writer.write_table(table, row_group_size=CHUNK_ROWS)

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            self.writer.close()
            self.part.unlink(missing_ok=True)
            return
        content = {
            "content_sha256": self.digest.hexdigest(),
            "content_chunk_rows": self.digest.chunk_rows,
            "items": self.digest.rows,
        }
        self.writer.add_key_value_metadata({CONTENT_KEY: json.dumps(content).encode()})
        self.writer.close()
        os.replace(self.part, self.path)


def read_features(path: str | Path, expect: Mapping[str, Any] | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """Read a feature set, verifying its page checksums and its content checksum; refuse it when its
    provenance differs from `expect` (key by key)."""
    try:
        pf = pq.ParquetFile(path, page_checksum_verification=True)
        table = pf.read()
        meta = schema.read_metadata(table.schema)
        meta.update(json.loads((pf.metadata.metadata or {}).get(CONTENT_KEY, b"{}")))
    except FileNotFoundError:
        raise FeaturesUnreadableError(f"{path}: no such feature file") from None
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise FeaturesUnreadableError(
            f"{path}: cannot read this feature file ({type(exc).__name__}: "
            f"{str(exc)[:200]}); it is truncated or corrupted: run its extraction again"
        ) from None
    if meta.get("kind_of_file") != "features":
        raise FeatureMismatchError(f"{path}: not a feature set (found {meta.get('kind_of_file')!r})")
    if meta.get("content_sha256") != content_sha256(table, meta.get("content_chunk_rows")):
        raise FeaturesUnreadableError(
            f"{path}: its content does not match the checksum written with it: the file "
            "is corrupted; run its extraction again"
        )
    check_provenance(meta, expect or {}, str(path))
    return table, meta


def provenance_diffs(
    expect: Mapping[str, Any],
    found: Mapping[str, Any],
    keys: Iterable[str],
    expect_as: str = "expected",
    found_as: str = "found",
) -> list[str]:
    """One line per key whose value in `found` differs from `expect`."""
    return [
        f"{key}: {expect_as} {expect.get(key)!r}, {found_as} {found.get(key)!r}"
        for key in keys
        if found.get(key) != expect.get(key)
    ]


def check_provenance(meta: Mapping[str, Any], expect: Mapping[str, Any], where: str) -> None:
    """Raise FeatureMismatchError listing every key whose value differs from `expect`."""
    diffs = provenance_diffs(expect, meta, expect)
    if diffs:
        raise FeatureMismatchError(
            f"{where}: features do not match ({'; '.join(diffs)}). Re-run extraction with the same "
            "models and manifest, or retrain on these features."
        )
