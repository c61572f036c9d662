"""Column names, split and reason vocabularies, and Parquet schemas: defined once, used everywhere."""
from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = 1
METADATA_KEY = b"dmms"  # Parquet key-value metadata entry holding this project's JSON provenance

TASK_KINDS = ("multilabel", "multiclass", "binary")
DATASET_FORMATS = ("csv", "jsonl", "mmimdb")
SPLITS = ("train", "val", "test")
# Split names found in the wild that mean one of ours (MM-IMDb calls its validation split "dev").
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val", "test": "test"}

# Canonical manifest columns. Feature columns keep the names the dataset mapping gives them.
ID = "id"
IMAGE = "image"
IMAGE_WIDTH = "image_width"
IMAGE_HEIGHT = "image_height"
IMAGE_SHA256 = "image_sha256"
LABELS = "labels"
SPLIT = "split"
SOURCE_ROW = "source_row"
RESERVED_COLUMNS = (ID, IMAGE, IMAGE_WIDTH, IMAGE_HEIGHT, IMAGE_SHA256, LABELS, SPLIT, SOURCE_ROW)

# Why ingest rejects a row. Every reject carries one of these, a detail text and the raw row.
REJECT_REASONS = (
    "empty_row",
    "malformed_row",
    "invalid_utf8",
    "missing_id",
    "duplicate_id",
    "missing_image",
    "unsafe_path",
    "unreadable_image",
    "undecodable_image",
    "image_too_large",
    "missing_label",
    "bad_label",
    "bad_value",
    "bad_split",
)

REJECTS_SCHEMA = pa.schema(
    [
        pa.field(SOURCE_ROW, pa.int64(), nullable=False),
        pa.field(ID, pa.string()),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string(), nullable=False),
        pa.field("row", pa.string(), nullable=False),  # the raw row as JSON (bad bytes escaped)
    ]
)


def manifest_schema(
    text: tuple[str, ...] | list[str],
    lists: list[str],
    numeric: tuple[str, ...] | list[str],
    categorical: tuple[str, ...] | list[str],
) -> pa.Schema:
    """The canonical manifest schema for a dataset mapping."""
    fields = [
        pa.field(ID, pa.string(), nullable=False),
        pa.field(SPLIT, pa.string(), nullable=False),
        pa.field(SOURCE_ROW, pa.int64(), nullable=False),
        pa.field(IMAGE, pa.string()),  # relative to the dataset folder; null when absent
        pa.field(IMAGE_WIDTH, pa.int32()),
        pa.field(IMAGE_HEIGHT, pa.int32()),
        pa.field(IMAGE_SHA256, pa.string()),
        pa.field(LABELS, pa.list_(pa.string())),  # null when unlabelled; [] is a labelled negative
    ]
    fields += [pa.field(c, pa.string()) for c in text]
    fields += [pa.field(c, pa.list_(pa.string())) for c in lists]
    fields += [pa.field(c, pa.float64()) for c in numeric]
    fields += [pa.field(c, pa.string()) for c in categorical]
    return pa.schema(fields)


def with_metadata(sch: pa.Schema, meta: dict[str, Any]) -> pa.Schema:
    """Attach this project's JSON provenance to a schema."""
    payload = json.dumps({"schema_version": SCHEMA_VERSION, **meta}, sort_keys=True)
    return sch.with_metadata({METADATA_KEY: payload.encode("utf-8")})


def read_metadata(sch: pa.Schema) -> dict[str, Any]:
    """This project's provenance from a schema; a file without it is a clear error."""
    raw = (sch.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError("Parquet file has no 'dmms' metadata: it was not written by this pipeline")
    meta = json.loads(raw)
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(
            f"schema version {meta.get('schema_version')} found, this code reads {SCHEMA_VERSION}"
        )
    return meta
