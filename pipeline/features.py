"""Feature sets: one Parquet file per modality, one row per item, 0..N vectors per row.

The schema is defined here once for every modality. A row holds the item id, its set of vectors
(an empty set is valid data), per-element metadata and, for the meta modality, categorical ids.
File-level metadata records the extractor, model, weights checksum, dimension, params and the
manifest it came from, so later stages can refuse features that do not belong together.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schema
from pipeline.runtime import UserError

VECTORS = "vectors"
ELEMENTS = "elements"
CATEGORY_IDS = "category_ids"

ELEMENT_TYPE = pa.struct(
    [
        pa.field("index", pa.int32()),  # position in the source (sentence, list item, box order)
        pa.field("text", pa.string()),  # sentence, tag or OCR text
        pa.field("box", pa.list_(pa.float32())),  # [x0, y0, x1, y1] in image pixels (faces, OCR)
        pa.field("score", pa.float32()),  # detection probability or OCR confidence
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


def write_feature_table(table: pa.Table, dim: int, meta: dict[str, Any], path: Path) -> pa.Table:
    """Write a feature table sorted by id with provenance metadata; returns the table written."""
    sch = schema.with_metadata(feature_schema(dim), {"kind_of_file": "features", **meta})
    table = table.cast(feature_schema(dim)).sort_by(schema.ID).replace_schema_metadata(sch.metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="zstd")
    return table


def read_features(path: str | Path, expect: Mapping[str, Any] | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """Read a feature set; refuse it when its provenance differs from `expect` (key by key)."""
    table = pq.read_table(path)
    meta = schema.read_metadata(table.schema)
    if meta.get("kind_of_file") != "features":
        raise FeatureMismatchError(f"{path}: not a feature set (found {meta.get('kind_of_file')!r})")
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
