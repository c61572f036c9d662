"""Feature sets as packed tensors: each modality's vectors in one (N, d) tensor plus CSR offsets.

Loaded once (onto the GPU when it fits); a batch of item indices becomes a SetBatch with tensor
ops only (gather + repeat_interleave), with no per-item Python objects. Imports torch, pyarrow and
numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline import schema
from pipeline.features import CATEGORY_IDS, VECTORS, FeatureMismatchError, read_features, vocabularies
from pipeline.model import ModalityBatch, SetBatch


@dataclass
class PackedModality:
    """All items' elements of one modality: vectors (N, d), offsets (n_items + 1,), category ids."""

    vectors: torch.Tensor
    offsets: torch.Tensor
    category_ids: torch.Tensor | None  # (n_items, C) long


def _packed_from_table(table: pa.Table, ids: list[str], dim: int, n_categories: int) -> PackedModality:
    """Align a feature table to `ids` (missing ids -> empty sets) and pack it."""
    index = {item: i for i, item in enumerate(table[schema.ID].to_pylist())}
    col = table[VECTORS].combine_chunks()
    counts_all = np.diff(col.offsets.to_numpy()) if len(col) else np.zeros(0, dtype=np.int64)
    flat = col.values.values.to_numpy(zero_copy_only=False).reshape(-1, dim) if dim else np.zeros((0, 0), np.float32)
    starts_all = col.offsets.to_numpy()[:-1] if len(col) else np.zeros(0, dtype=np.int64)
    rows = np.array([index.get(i, -1) for i in ids], dtype=np.int64)
    counts = np.where(rows >= 0, counts_all[np.maximum(rows, 0)] if len(counts_all) else 0, 0)
    starts = np.where(rows >= 0, starts_all[np.maximum(rows, 0)] if len(starts_all) else 0, 0)
    take = (
        np.concatenate([np.arange(s, s + c) for s, c in zip(starts, counts)]) if counts.sum() else np.zeros(0, np.int64)
    )
    vectors = (
        torch.from_numpy(np.ascontiguousarray(flat[take], dtype=np.float32))
        if dim
        else torch.zeros(int(counts.sum()), 0)
    )
    offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
    cats = None
    if n_categories:
        raw = table[CATEGORY_IDS].to_pylist()
        cats = torch.tensor(
            [raw[r] if r >= 0 and raw[r] is not None else [0] * n_categories for r in rows], dtype=torch.long
        )
    return PackedModality(vectors, offsets, cats)


class FeatureStore:
    """Every modality of a list of items, packed; `batch(idx)` builds a SetBatch on the store's device."""

    def __init__(self, ids: list[str], modalities: dict[str, PackedModality], meta: dict[str, dict[str, Any]]):
        self.ids = ids
        self.modalities = modalities
        self.meta = meta  # provenance per modality, as recorded by extraction

    @classmethod
    def load(cls, feature_dirs: dict[str, Path], ids: list[str]) -> FeatureStore:
        """Read each modality's features.parquet (checksums verified; one manifest for all)."""
        packed, metas = {}, {}
        manifests = set()
        for name, folder in sorted(feature_dirs.items()):
            table, meta = read_features(Path(folder) / "features.parquet")
            if meta["modality"] != name:
                raise FeatureMismatchError(f"{folder}: holds modality {meta['modality']!r}, expected {name!r}")
            manifests.add(meta["manifest_sha256"])
            n_cat = len(vocabularies(meta, str(folder)))
            packed[name] = _packed_from_table(table, ids, meta["dim"], n_cat)
            metas[name] = meta
        if len(manifests) > 1:
            raise FeatureMismatchError(
                f"feature sets come from different manifests ({sorted(manifests)}); re-run extraction on one manifest"
            )
        return cls(ids, packed, metas)

    @property
    def dims(self) -> dict[str, int]:
        return {m: int(meta["dim"]) for m, meta in self.meta.items()}

    @property
    def categories(self) -> dict[str, list[int]]:
        return {m: [len(values) for _, values in vocabularies(meta)] for m, meta in self.meta.items()}

    def to(self, device: str | torch.device) -> FeatureStore:
        mods = {
            m: PackedModality(
                p.vectors.to(device),
                p.offsets.to(device),
                None if p.category_ids is None else p.category_ids.to(device),
            )
            for m, p in self.modalities.items()
        }
        return FeatureStore(self.ids, mods, self.meta)

    def nbytes(self) -> int:
        return sum(p.vectors.numel() * p.vectors.element_size() for p in self.modalities.values())

    def batch(self, idx: torch.Tensor, drop: set[str] | frozenset = frozenset()) -> SetBatch:
        """The packed batch of items `idx` (a long tensor on the store's device); `drop` removes modalities."""
        out = SetBatch(size=int(idx.numel()))
        for m, p in self.modalities.items():
            if m in drop:
                continue
            starts = p.offsets[idx]
            counts = p.offsets[idx + 1] - starts
            total = int(counts.sum())
            segment = torch.repeat_interleave(torch.arange(idx.numel(), device=idx.device), counts)
            # element index = start of its item + position inside the item
            first = torch.cumsum(counts, 0) - counts
            take = torch.arange(total, device=idx.device) - torch.repeat_interleave(first - starts, counts)
            out.modalities[m] = ModalityBatch(
                p.vectors[take], segment, None if p.category_ids is None else p.category_ids[idx]
            )
        return out


def label_matrix(labels: list[list[str] | None], names: list[str]) -> torch.Tensor:
    """Multi-hot (n, L) float tensor; an unlabelled row is all zeros."""
    pos = {n: i for i, n in enumerate(names)}
    y = torch.zeros(len(labels), len(names))
    for r, labs in enumerate(labels):
        for lab in labs or []:
            if lab in pos:
                y[r, pos[lab]] = 1.0
    return y


def read_manifest_labels(path: Path) -> tuple[list[str], list[str], list[list[str] | None], dict[str, Any]]:
    """(ids, splits, labels, manifest metadata) from a canonical manifest."""
    table, meta = schema.read_manifest(path)
    return (table[schema.ID].to_pylist(), table[schema.SPLIT].to_pylist(), table[schema.LABELS].to_pylist(), meta)


def drop_elements(batch: SetBatch, element_p: float, modality_p: float, gen: torch.Generator | None = None) -> SetBatch:
    """A training batch with elements dropped at random: each element with probability `element_p`,
    each modality of each item (its elements and categorical ids) with probability `modality_p`.
    Regularisation that fits sets: the model learns not to lean on one face, one box or one modality."""
    if not element_p and not modality_p:
        return batch
    out = SetBatch(size=batch.size)
    for m, mb in batch.modalities.items():
        device = mb.segment.device
        keep = torch.ones(mb.segment.numel(), dtype=torch.bool, device=device)
        cats = mb.category_ids
        if element_p:
            keep &= torch.rand(mb.segment.numel(), generator=gen, device=device) >= element_p
        if modality_p:
            present = torch.rand(batch.size, generator=gen, device=device) >= modality_p  # (B,)
            keep &= present[mb.segment]
            if cats is not None:
                cats = cats * present[:, None].to(cats.dtype)  # id 0 = missing
        out.modalities[m] = ModalityBatch(mb.vectors[keep], mb.segment[keep], cats)
    return out
