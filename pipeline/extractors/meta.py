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

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.ml.inference.base import ModelHandler

from pipeline import schema
from pipeline.extractors.base import Extractor, ItemResult, check_software, column_rows, register
from pipeline.features import element, json_sha256


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


def fit(
    table: pa.Table, split_column: str, numeric: list[str], categorical: list[str], max_categories: int
) -> dict[str, Any]:
    """Statistics from the train split only, in column order: mean/std per numeric column, vocabulary
    per categorical column."""
    train = table.filter(pc.equal(table[split_column], "train"))
    stats: dict[str, Any] = {"numeric": [], "categorical": []}
    for col in numeric:
        values = [v for v in train[col].to_pylist() if v is not None]
        mean = math.fsum(values) / len(values) if values else 0.0
        var = math.fsum((v - mean) ** 2 for v in values) / len(values) if values else 0.0
        stats["numeric"].append(
            {"column": col, "mean": mean, "std": math.sqrt(var) if var > 0 else 1.0, "n": len(values)}
        )
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
        self.categorical = [(s["column"], {v: i + 1 for i, v in enumerate(s["values"])}) for s in stats["categorical"]]

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


def item_input(row_values: list[Any], stats: dict[str, Any]) -> list[list[Any]]:
    """An item's input as the cache sees it: (column, value) pairs in layout order, so two columns whose
    values are swapped never share a key."""
    return [[c, v] for c, v in zip([*numeric_columns(stats), *categorical_columns(stats)], row_values)]


def describe_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """Provenance: no model; the statistics are the 'weights'."""
    return {
        "extractor": "meta",
        "model_id": "standardise+vocabulary",
        "weights_sha256": json_sha256(stats),
        "dim": 2 * len(stats["numeric"]),
        "stats": stats,
    }


class MetaHandler(ModelHandler):
    """A ModelHandler without a model: its 'model' is the Encoder of the fitted statistics."""

    def __init__(self, extractor: MetaExtractor, described: dict[str, Any]):
        super().__init__()
        self.extractor, self.expect, self.stats = extractor, described, described["stats"]

    def load_model(self) -> Encoder:
        check_software(self.extractor, self.expect)  # the worker's code and libraries are the job's
        return Encoder(self.stats)

    def run_inference(
        self, batch: Sequence[Any], model: Encoder, inference_args: dict | None = None
    ) -> list[ItemResult]:
        return [model(row) for row in batch]


@register
class MetaExtractor(Extractor):
    """Metadata columns, standardised (numeric) and indexed (categorical) with train-split statistics.

    Fitted: `describe` fits the statistics on the manifest's train split, or, when scoring new data,
    reuses the bundle's (`expect`), on the columns they were fitted on and in their order."""

    kind = "meta"
    config_class = MetaConfig
    handler_class = MetaHandler
    sources = ("pipeline.extractors.meta", "pipeline.extractors.base")
    libraries = ("numpy", "pyarrow")  # numpy makes the float32 vectors, pyarrow reads the values
    fitted = True
    checks_model_files = False  # no model files: the statistics travel inside the job

    def describe(
        self, manifest: pa.Table | None, fields: dict[str, list[str]] | None, expect: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        cfg = self.cfg
        if expect is not None:  # scoring: the training statistics, on the columns they were fitted on
            stats = expect["stats"]
            cfg = dataclasses.replace(
                cfg, numeric=tuple(numeric_columns(stats)), categorical=tuple(categorical_columns(stats))
            )
            if fields is not None:
                columns(cfg, fields)
            return describe_stats(stats)
        if manifest is None or fields is None:
            raise ValueError("meta: its statistics are fitted on a manifest; none was given")
        numeric, categorical = columns(cfg, fields)
        return describe_stats(fit(manifest, schema.SPLIT, numeric, categorical, cfg.max_categories))

    def input_columns(self) -> list[str]:
        raise NotImplementedError("meta reads the columns of its fitted statistics: see item_inputs")

    def item_inputs(self, manifest: pa.Table, described: dict[str, Any]) -> list[Any]:
        stats = described["stats"]
        columns = [*numeric_columns(stats), *categorical_columns(stats)]
        return [item_input(values, stats) for values in column_rows(manifest, columns)]

    def describe_files(self) -> dict[str, Any]:
        raise NotImplementedError("meta has no model files")

    def prepare(self, row: dict[str, Any], root: Path) -> dict[str, Any]:
        """The row itself (encoding needs the fitted statistics)."""
        return row
