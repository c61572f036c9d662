"""Metadata: numeric columns standardised with train-split statistics, categorical columns as ids.

One element per item: for each numeric column its z-score and a missing flag (a missing value is
z = 0, flag = 1). Categorical values become integer ids for learned index embeddings in the model:
0 is "missing or unseen in train", 1.. index the train vocabulary (sorted).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.extractors.base import ItemResult
from pipeline.features import element


@dataclass(frozen=True)
class MetaConfig:
    """Settings of a `meta` modality; null column lists take every such column of the manifest."""

    kind: str = "meta"
    numeric: tuple[str, ...] | None = None
    categorical: tuple[str, ...] | None = None
    max_categories: int = 1000  # most frequent train values kept per column; the rest map to 0


def columns(cfg: MetaConfig, fields: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    """The numeric and categorical columns this modality uses, checked against the manifest."""
    numeric = list(fields["numeric"] if cfg.numeric is None else cfg.numeric)
    categorical = list(fields["categorical"] if cfg.categorical is None else cfg.categorical)
    for col, role in [*((c, "numeric") for c in numeric), *((c, "categorical") for c in categorical)]:
        if col not in fields[role]:
            raise ValueError(f"meta: {col!r} is not a {role} column of the manifest ({fields[role]})")
    return numeric, categorical


def fit(table: pa.Table, split_column: str, numeric: list[str], categorical: list[str], max_categories: int) -> dict[str, Any]:
    """Statistics from the train split only: mean/std per numeric column, vocabulary per categorical."""
    train = table.filter(pc.equal(table[split_column], "train"))
    stats: dict[str, Any] = {"numeric": {}, "categorical": {}}
    for col in numeric:
        values = [v for v in train[col].to_pylist() if v is not None]
        mean = math.fsum(values) / len(values) if values else 0.0
        var = math.fsum((v - mean) ** 2 for v in values) / len(values) if values else 0.0
        stats["numeric"][col] = {"mean": mean, "std": math.sqrt(var) if var > 0 else 1.0, "n": len(values)}
    for col in categorical:
        counts: dict[str, int] = {}
        for v in train[col].to_pylist():
            if v is not None:
                counts[v] = counts.get(v, 0) + 1
        top = sorted(counts, key=lambda v: (-counts[v], v))[:max_categories]
        stats["categorical"][col] = sorted(top)
    return stats


def encode(row: dict[str, Any], numeric: list[str], categorical: list[str], stats: dict[str, Any]) -> ItemResult:
    """One item's meta element (pure): [z, missing] per numeric column, ids per categorical column."""
    vec = []
    for col in numeric:
        v, s = row.get(col), stats["numeric"][col]
        vec += [0.0, 1.0] if v is None else [(v - s["mean"]) / s["std"], 0.0]
    ids = []
    for col in categorical:
        vocab = stats["categorical"][col]
        v = row.get(col)
        ids.append(vocab.index(v) + 1 if v in vocab else 0)
    vectors = np.asarray([vec], dtype=np.float32) if numeric else np.zeros((0, 0), dtype=np.float32)
    elements = [element(index=0, text="numeric")] if numeric else []
    return ItemResult(vectors, elements, ids)


def describe(cfg: MetaConfig, numeric: list[str], stats: dict[str, Any]) -> dict[str, Any]:
    """Provenance: no model; the statistics are the 'weights'."""
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps(stats, sort_keys=True).encode()).hexdigest()
    return {"extractor": "meta", "model_id": "standardise+vocabulary", "weights_sha256": digest,
            "dim": 2 * len(numeric), "stats": stats}


def prepare(row: dict[str, Any], cfg: MetaConfig, root: Path) -> dict[str, Any]:
    """Per-record work: the row itself (encoding needs the fitted statistics)."""
    return row


CONFIG_CLASS = MetaConfig
HANDLER_CLASS = None  # no model: a plain Map after the statistics are fitted
