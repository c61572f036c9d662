"""Metadata: numeric columns standardised with train-split statistics, categorical columns as ids.

One element per item: for each numeric column its z-score and a missing flag (a missing value is
z = 0, flag = 1). Categorical values become integer ids for learned index embeddings in the model:
0 is "missing or unseen in train", 1.. index the train vocabulary (sorted).

The layout is defined by column name and order, once: the fitted statistics are ordered lists
(`{"numeric": [{"column", "mean", "std", "n"}, ...], "categorical": [{"column", "values"}, ...]}`),
so the vector slots and the categorical ids follow that order in extraction, training, prediction
and scoring alike (a JSON object would come back with its keys sorted, in another order).
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
from pipeline.features import element, json_sha256

# the output's code: this module (libraries: numpy for the float32 vectors, pyarrow for the values read)
SOURCES = ("pipeline.extractors.meta", "pipeline.extractors.base")
LIBRARIES = ("numpy", "pyarrow")


@dataclass(frozen=True)
class MetaConfig:
    """Settings of a `meta` modality; null column lists take every such column of the manifest."""

    kind: str = "meta"
    numeric: tuple[str, ...] | None = None
    categorical: tuple[str, ...] | None = None
    max_categories: int = 1000  # most frequent train values kept per column; the rest map to 0


def columns(cfg: MetaConfig, fields: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    """The numeric and categorical columns this modality uses, in the configured order, checked
    against the manifest."""
    numeric = list(fields["numeric"] if cfg.numeric is None else cfg.numeric)
    categorical = list(fields["categorical"] if cfg.categorical is None else cfg.categorical)
    for col, role in [*((c, "numeric") for c in numeric), *((c, "categorical") for c in categorical)]:
        if col not in fields[role]:
            raise ValueError(f"meta: {col!r} is not a {role} column of the manifest ({fields[role]})")
    twice = sorted({c for c in numeric + categorical if (numeric + categorical).count(c) > 1})
    if twice:
        raise ValueError(f"meta: column(s) {twice} listed more than once")
    return numeric, categorical


def fit(table: pa.Table, split_column: str, numeric: list[str], categorical: list[str], max_categories: int) -> dict[str, Any]:
    """Statistics from the train split only, in column order: mean/std per numeric column, vocabulary
    per categorical column."""
    train = table.filter(pc.equal(table[split_column], "train"))
    stats: dict[str, Any] = {"numeric": [], "categorical": []}
    for col in numeric:
        values = [v for v in train[col].to_pylist() if v is not None]
        mean = math.fsum(values) / len(values) if values else 0.0
        var = math.fsum((v - mean) ** 2 for v in values) / len(values) if values else 0.0
        stats["numeric"].append({"column": col, "mean": mean, "std": math.sqrt(var) if var > 0 else 1.0,
                                 "n": len(values)})
    for col in categorical:
        counts: dict[str, int] = {}
        for v in train[col].to_pylist():
            if v is not None:
                counts[v] = counts.get(v, 0) + 1
        top = sorted(counts, key=lambda v: (-counts[v], v))[:max_categories]
        stats["categorical"].append({"column": col, "values": sorted(top)})
    return stats


def numeric_columns(stats: dict[str, Any]) -> list[str]:
    """The numeric columns of fitted statistics, in slot order."""
    return [s["column"] for s in stats["numeric"]]


def categorical_columns(stats: dict[str, Any]) -> list[str]:
    """The categorical columns of fitted statistics, in id order."""
    return [s["column"] for s in stats["categorical"]]


class Encoder:
    """Fitted statistics as an encoder of rows (vocabularies as dicts: one lookup per value)."""

    def __init__(self, stats: dict[str, Any]):
        self.numeric = [(s["column"], float(s["mean"]), float(s["std"])) for s in stats["numeric"]]
        self.categorical = [(s["column"], {v: i + 1 for i, v in enumerate(s["values"])})
                            for s in stats["categorical"]]

    def __call__(self, row: dict[str, Any]) -> ItemResult:
        """One item's meta element (pure): [z, missing] per numeric column, ids per categorical column."""
        vec: list[float] = []
        for col, mean, std in self.numeric:
            v = row.get(col)
            vec += [0.0, 1.0] if v is None else [(v - mean) / std, 0.0]
        ids = [vocab.get(row.get(col), 0) for col, vocab in self.categorical]
        vectors = np.asarray([vec], dtype=np.float32) if self.numeric else np.zeros((0, 0), dtype=np.float32)
        elements = [element(index=0, text="numeric")] if self.numeric else []
        return ItemResult(vectors, elements, ids)


def encode(row: dict[str, Any], stats: dict[str, Any]) -> ItemResult:
    """One item's meta element under `stats` (see Encoder; build one Encoder for many rows)."""
    return Encoder(stats)(row)


def item_input(row_values: list[Any], stats: dict[str, Any]) -> list[list[Any]]:
    """An item's input as the cache sees it: (column, value) pairs in layout order, so two columns whose
    values are swapped never share a key."""
    return [[c, v] for c, v in zip([*numeric_columns(stats), *categorical_columns(stats)], row_values)]


def describe(cfg: MetaConfig, stats: dict[str, Any]) -> dict[str, Any]:
    """Provenance: no model; the statistics are the 'weights'."""
    return {"extractor": "meta", "model_id": "standardise+vocabulary", "weights_sha256": json_sha256(stats),
            "dim": 2 * len(stats["numeric"]), "stats": stats}


def prepare(row: dict[str, Any], cfg: MetaConfig, root: Path) -> dict[str, Any]:
    """Per-record work: the row itself (encoding needs the fitted statistics)."""
    return row


CONFIG_CLASS = MetaConfig
HANDLER_CLASS = None  # no model: a plain Map after the statistics are fitted
