"""A stand-in extractor that costs what you tell it and needs no model: for measuring the machinery.

`kind: synthetic` reads one text column and returns `elements` deterministic vectors of dimension `dim`
per item: a vector seeded by the text's sha256, pushed `rounds` times through a fixed random
`dim x dim` layer (a batched matrix product, as a model's would be). The work per item is therefore
`rounds` small matrix products and nothing else; `rounds: 0` is the hashing alone. It is registered
like any extractor, only when this module is imported (the benchmarks and tests import it; the stages
never do), so it goes through the same manifest, cache, Beam job, merge and write as a real kind.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import ConfigError
from pipeline.extractors.base import Extractor, ItemResult, SetModelHandler, register
from pipeline.features import element


@dataclass(frozen=True)
class SyntheticConfig:
    """Settings of a `synthetic` modality."""

    kind: str = "synthetic"
    column: str = "title"  # the text column whose value seeds each item's vectors
    dim: int = 128
    elements: int = 1  # vectors per item
    rounds: int = 0  # dim x dim layers each vector goes through: the cost per item
    batch_size: int = 64
    fail_prefix: str | None = None  # items whose text starts with this fail in inference (dead letters)


def seed_vectors(text: str, n: int, dim: int) -> np.ndarray:
    """n vectors in [-1, 1) that depend on `text` only."""
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    return rng.uniform(-1.0, 1.0, (n, dim)).astype(np.float32)


class Layer:
    """The fixed random layer every vector goes through (the 'model'; the same in every process)."""

    def __init__(self, dim: int):
        self.weight = np.random.default_rng(0).standard_normal((dim, dim)).astype(np.float32) / np.sqrt(dim)

    def __call__(self, x: np.ndarray, rounds: int) -> np.ndarray:
        for _ in range(rounds):
            x = np.tanh(x @ self.weight)
        return x


def compute(texts: list[str], layer: Layer, cfg: SyntheticConfig) -> list[np.ndarray]:
    """Every text's set of vectors: what the handler does to a batch, and what a bare loop times."""
    x = np.concatenate([seed_vectors(t, cfg.elements, cfg.dim) for t in texts])
    x = layer(x, cfg.rounds)
    return [x[i * cfg.elements : (i + 1) * cfg.elements] for i in range(len(texts))]


class SyntheticHandler(SetModelHandler):
    def load(self) -> Layer:
        return Layer(self.cfg.dim)

    def infer_batch(self, batch: list[str], model: Layer) -> list[ItemResult]:
        prefix = self.cfg.fail_prefix
        if prefix and any(t.startswith(prefix) for t in batch):
            if len(batch) > 1:
                raise ValueError("a planted failure in the batch")  # retried item by item by the base
            raise ValueError(f"planted failure: {batch[0][:40]!r}")
        return [
            ItemResult(v, [element(index=i, text=f"synthetic {i}") for i in range(len(v))])
            for v in compute(batch, model, self.cfg)
        ]


@register
class SyntheticExtractor(Extractor):
    """Deterministic vectors from one text column at a chosen cost (see the module docstring)."""

    kind = "synthetic"
    config_class = SyntheticConfig
    handler_class = SyntheticHandler
    sources = ("pipeline.extractors.synthetic", "pipeline.extractors.base", "pipeline.features")
    libraries = ("numpy",)

    def input_columns(self) -> list[str]:
        return [self.cfg.column]

    def check_columns(self, fields: dict[str, list[str]]) -> None:
        if self.cfg.column not in fields.get("text", []):
            raise ConfigError(f"column: {self.cfg.column!r} is not a text column of the manifest; it has {fields}")

    def describe_files(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "extractor": "synthetic",
            "model_id": f"synthetic-{cfg.dim}x{cfg.rounds}",
            "weights_sha256": None,
            "model_files_sha256": None,
            "dim": cfg.dim,
        }

    def prepare(self, row: dict[str, Any], root: Path) -> str | None:
        return row.get(self.cfg.column)
