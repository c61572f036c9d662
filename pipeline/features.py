"""Feature sets: one Parquet file per modality, one row per item, 0..N vectors per row.

The schema is defined here once for every modality. A row holds the item id, its set of vectors
(an empty set is valid data), per-element metadata and, for the meta modality, categorical ids.
File-level metadata records the extractor, model, weights checksum, dimension, params and the
manifest it came from, so later stages can refuse features that do not belong together.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

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
EXTRACTOR_KEYS = ("extractor", "model_id", "weights_sha256", "dim")
FITTED_KEYS = ("categorical", "stats")  # meta: train vocabulary and standardisation statistics
MATCH_KEYS = (*EXTRACTOR_KEYS, *FITTED_KEYS)  # features used with a model must agree with it on these
PROVENANCE_KEYS = ("modality", "kind", *EXTRACTOR_KEYS, "manifest_sha256", "params", "embedder", *FITTED_KEYS)


class FeatureMismatchError(UserError, ValueError):
    """Feature files whose provenance does not match what the caller expects."""


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
        h.update("".join(values).encode("utf-8", "surrogatepass") if values and isinstance(values[0], str)
                 else b"".join(values))
    else:
        h.update(np.ascontiguousarray(arr.fill_null(0).to_numpy(zero_copy_only=False)))


def content_sha256(table: pa.Table) -> str:
    """sha256 of a table's logical content (columns, types, nulls, values), independent of how Parquet
    or Arrow lays it out, so the value computed before writing can be checked after reading."""
    h = hashlib.sha256()
    for name in table.column_names:
        h.update(name.encode())
        _digest(h, table[name].combine_chunks())
    return h.hexdigest()


class FeaturesUnreadableError(UserError):
    """A feature file that is truncated, corrupted, or not a feature file at all."""


def write_feature_table(table: pa.Table, dim: int, meta: dict[str, Any], path: Path) -> pa.Table:
    """Write a feature table sorted by id with provenance metadata and a checksum of its content;
    returns the table written. The file appears complete or not at all (written aside, then renamed)."""
    table = table.cast(feature_schema(dim)).sort_by(schema.ID)
    meta = {"kind_of_file": "features", **meta, "content_sha256": content_sha256(table)}
    table = table.replace_schema_metadata(schema.with_metadata(feature_schema(dim), meta).metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".{path.name}.partial")
    pq.write_table(table, part, compression="zstd", write_page_checksum=True)
    os.replace(part, path)
    return table


def read_features(path: str | Path, expect: Mapping[str, Any] | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """Read a feature set, verifying its page checksums and its content checksum; refuse it when its
    provenance differs from `expect` (key by key)."""
    try:
        table = pq.read_table(path, page_checksum_verification=True)
        meta = schema.read_metadata(table.schema)
    except FileNotFoundError:
        raise FeaturesUnreadableError(f"{path}: no such feature file") from None
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise FeaturesUnreadableError(f"{path}: cannot read this feature file ({type(exc).__name__}: "
                                      f"{str(exc)[:200]}); it is truncated or corrupted: run its extraction again") from None
    if meta.get("kind_of_file") != "features":
        raise FeatureMismatchError(f"{path}: not a feature set (found {meta.get('kind_of_file')!r})")
    if meta.get("content_sha256") != content_sha256(table):
        raise FeaturesUnreadableError(f"{path}: its content does not match the checksum written with it: the file "
                                      "is corrupted; run its extraction again")
    check_provenance(meta, expect or {}, str(path))
    return table, meta


def provenance_diffs(expect: Mapping[str, Any], found: Mapping[str, Any], keys: Iterable[str],
                     expect_as: str = "expected", found_as: str = "found") -> list[str]:
    """One line per key whose value in `found` differs from `expect`."""
    return [f"{key}: {expect_as} {expect.get(key)!r}, {found_as} {found.get(key)!r}"
            for key in keys if found.get(key) != expect.get(key)]


def check_provenance(meta: Mapping[str, Any], expect: Mapping[str, Any], where: str) -> None:
    """Raise FeatureMismatchError listing every key whose value differs from `expect`."""
    diffs = provenance_diffs(expect, meta, expect)
    if diffs:
        raise FeatureMismatchError(
            f"{where}: features do not match ({'; '.join(diffs)}). Re-run extraction with the same "
            "models and manifest, or retrain on these features."
        )
