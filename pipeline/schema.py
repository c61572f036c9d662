"""Column names, split and reason vocabularies, and Parquet schemas: defined once, used everywhere.

The manifest (ingest), the rejects and dead letters (ingest, extraction, scoring) and the four
prediction tables (predict, score; read by the report) are defined here; the feature-set schema and
its provenance live in `pipeline.features`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
METADATA_KEY = b"dmms"  # Parquet key-value metadata entry holding this project's JSON provenance

TASK_KINDS = ("multilabel", "multiclass", "binary")
DATASET_FORMATS = ("csv", "jsonl", "mmimdb")
SPLITS = ("train", "val", "test")
SCORE_SPLIT = "score"  # the split of every row of a folder scored with a trained model
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
    "field_too_large",  # a field longer than ingest.max_field_chars
    "unexpected_error",  # a check of this row raised an error no rule above anticipated (detail says which)
)

# Rejects and dead letters: what could not be used, where, and why.
REASON = "reason"
DETAIL = "detail"
ROW = "row"
MODALITY = "modality"
STAGE = "stage"
ERROR = "error"

REJECTS_SCHEMA = pa.schema(
    [
        pa.field(SOURCE_ROW, pa.int64(), nullable=False),
        pa.field(ID, pa.string()),
        pa.field(REASON, pa.string(), nullable=False),
        pa.field(DETAIL, pa.string(), nullable=False),
        pa.field(ROW, pa.string(), nullable=False),  # the raw row as JSON (bad bytes escaped)
    ]
)

# An item one extraction job could not process (a corrupt image, a decoder or model error).
EXTRACT_DEAD_LETTER_SCHEMA = pa.schema(
    [
        pa.field(ID, pa.string(), nullable=False),
        pa.field(MODALITY, pa.string(), nullable=False),
        pa.field(STAGE, pa.string(), nullable=False),  # prepare | inference
        pa.field(ERROR, pa.string(), nullable=False),
    ]
)

# A row scoring could not score: an ingest reject or an extraction failure (one record per failing modality).
SCORE_DEAD_LETTER_SCHEMA = pa.schema(
    [
        pa.field(SOURCE_ROW, pa.int64()),
        pa.field(ID, pa.string()),
        pa.field(STAGE, pa.string()),  # ingest | extract:prepare | extract:inference
        pa.field(MODALITY, pa.string()),
        pa.field(REASON, pa.string()),
        pa.field(DETAIL, pa.string()),
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
        raise ValueError(f"schema version {meta.get('schema_version')} found, this code reads {SCHEMA_VERSION}")
    return meta


class UnreadableFileError(ValueError):
    """A pipeline file that is missing, truncated, corrupted or of another kind."""


def _manifest(path: str | Path, read: Any) -> Any:
    try:
        found = read(path)
        meta = read_metadata(found.schema if isinstance(found, pa.Table) else found)
    except FileNotFoundError:
        raise UnreadableFileError(f"manifest not found: {path}") from None
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise UnreadableFileError(
            f"{path}: cannot read the manifest ({type(exc).__name__}: {str(exc)[:200]}); run ingest again"
        ) from None
    if meta.get("kind") != "manifest":
        raise UnreadableFileError(f"{path}: expected a canonical manifest, found a {meta.get('kind')!r} file")
    return found, meta


def read_manifest(path: str | Path) -> tuple[pa.Table, dict[str, Any]]:
    """Read a canonical manifest and its provenance (a file not written by ingest is refused)."""
    return _manifest(path, pq.read_table)


def read_manifest_schema(path: str | Path) -> tuple[pa.Schema, dict[str, Any]]:
    """A canonical manifest's schema and provenance, without its rows."""
    return _manifest(path, pq.read_schema)


# --------------------------------------------------------------------------------------------
# The prediction tables (predict and score write them, the report reads them)
# --------------------------------------------------------------------------------------------

PREDICTED = "predicted"  # predictions: the labels over their threshold; label_importance: this label's decision
METHOD = "method"  # argmax | contribution | ablation: what the share columns mean
TOP_MODALITY = "top_modality"
LABEL = "label"
PROBABILITY = "probability"
TRUE = "true"
POSITION = "position"  # an element's position in its item's set of its modality
SHARE = "share"
WINS = "wins"
TOP_LABEL = "top_label"
TOP_LABEL_SHARE = "top_label_share"
TEXT = "text"
BOX = "box"
SCORE = "score"
PREDICTION_TABLES = ("predictions", "importance", "label_importance", "elements")


def prob_column(label: str) -> str:
    """predictions.parquet: the probability of `label`."""
    return f"prob_{label}"


def share_column(modality: str) -> str:
    """importance and label_importance: the share of `modality`."""
    return f"share_{modality}"


def drop_column(modality: str) -> str:
    """label_importance: the drop in probability when `modality` is removed."""
    return f"drop_{modality}"


def predictions_schema(labels: Sequence[str]) -> pa.Schema:
    """predictions.parquet: one row per item."""
    return pa.schema(
        [
            pa.field(ID, pa.string()),
            pa.field(SPLIT, pa.string()),
            pa.field(PREDICTED, pa.list_(pa.string())),
            pa.field(LABELS, pa.list_(pa.string())),
            *(pa.field(prob_column(lab), pa.float32()) for lab in labels),
        ]
    )


def importance_schema(modalities: Sequence[str]) -> pa.Schema:
    """importance.parquet: one row per item."""
    return pa.schema(
        [
            pa.field(ID, pa.string()),
            pa.field(SPLIT, pa.string()),
            pa.field(METHOD, pa.string()),
            pa.field(TOP_MODALITY, pa.string()),
            *(pa.field(share_column(m), pa.float32()) for m in modalities),
        ]
    )


def label_importance_schema(modalities: Sequence[str]) -> pa.Schema:
    """label_importance.parquet: one row per item and label."""
    return pa.schema(
        [
            pa.field(ID, pa.string()),
            pa.field(SPLIT, pa.string()),
            pa.field(LABEL, pa.string()),
            pa.field(PROBABILITY, pa.float32()),
            pa.field(PREDICTED, pa.bool_()),
            pa.field(TRUE, pa.bool_()),
            *(pa.field(share_column(m), pa.float32()) for m in modalities),
            *(pa.field(drop_column(m), pa.float32()) for m in modalities),
        ]
    )


ELEMENTS_TABLE_SCHEMA = pa.schema(
    [  # elements.parquet: one row per element (face, text box, sentence, ...)
        pa.field(ID, pa.string()),
        pa.field(MODALITY, pa.string()),
        pa.field(POSITION, pa.int32()),
        pa.field(SHARE, pa.float32()),
        pa.field(WINS, pa.float32()),
        pa.field(TOP_LABEL, pa.string()),
        pa.field(TOP_LABEL_SHARE, pa.float32()),
        pa.field(TEXT, pa.string()),
        pa.field(BOX, pa.list_(pa.float32())),
        pa.field(SCORE, pa.float32()),
    ]
)
