"""The Deep Multi-Modal Sets model, its late-fusion concatenation baseline, and packed set batches.

Every element of every modality is re-encoded into one D-dimensional space, all elements of an
item form one set, the set is pooled (max, sum or mean) into a fixed vector, and an MLP predicts.
Sets are packed, not padded: a batch is each modality's elements concatenated, plus the index of
the item each element belongs to (segment ids), and pooling is a scatter reduction, so a batch
costs what its elements cost. The pooling is an object (pipeline.pooling) chosen by name.
Imports torch (and this package's torch-only modules), so it runs on a machine with nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline import pooling as poolings
from pipeline.pooling import Pooling

ARCHITECTURES = ("set", "concat")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture settings (params train.model)."""

    architecture: str = "set"  # set | concat (the paper's late-fusion baseline)
    dim: int = 256  # D: the common space
    encoder_depth: int = 2  # layers of each modality's encoder MLP
    activation: str = "relu"  # relu | gelu | tanh
    pooling: str = "max"  # max | sum | mean, or any pooling registered in pipeline.pooling
    hierarchical: bool = False  # pool inside each modality first, then across modalities
    head_hidden: tuple[int, ...] = (256,)
    dropout: float = 0.2

    def validate(self, where: str) -> None:
        from pipeline.config import ConfigError

        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"{where}.architecture: expected one of {ARCHITECTURES}, found {self.architecture!r}")
        if self.pooling not in poolings.REGISTRY:
            raise ConfigError(f"{where}.pooling: expected one of {poolings.names()}, found {self.pooling!r}")
        if self.activation not in _ACTIVATIONS:
            raise ConfigError(f"{where}.activation: expected one of {sorted(_ACTIVATIONS)}, found {self.activation!r}")
        if self.dim < 1 or self.encoder_depth < 1 or not 0 <= self.dropout < 1:
            raise ConfigError(f"{where}: dim and encoder_depth must be >= 1 and dropout in [0, 1)")


_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


@dataclass
class ModalityBatch:
    """One modality's elements of a batch, packed: vectors (N, d) and their item index (N,)."""

    vectors: torch.Tensor  # (N, d) float
    segment: torch.Tensor  # (N,) long, values in [0, B)
    category_ids: torch.Tensor | None = None  # (B, C) long, meta only (0 = missing/unseen)


@dataclass
class SetBatch:
    """A packed batch of B items: per modality its elements and their segment ids."""

    size: int  # B
    modalities: dict[str, ModalityBatch] = field(default_factory=dict)


def mlp(sizes: list[int], activation: str, dropout: float, last_activation: bool) -> nn.Sequential:
    """Linear layers through `sizes`, with activation (and dropout) between them."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or last_activation:
            layers.append(_ACTIVATIONS[activation]())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class SetModel(nn.Module):
    """Per-modality encoders into one D-dim space, set pooling over all elements, an MLP head.

    Invariant to the order of elements and of modalities. Categorical meta ids become elements
    through learned index embeddings (one table per categorical column).
    """

    def __init__(self, cfg: ModelConfig, dims: dict[str, int], categories: dict[str, list[int]], n_labels: int):
        super().__init__()
        self.cfg = cfg
        self.pooling: Pooling = poolings.get(cfg.pooling)
        self.modalities = sorted(dims)
        self.encoders = nn.ModuleDict(
            {
                m: mlp([dims[m]] + [cfg.dim] * cfg.encoder_depth, cfg.activation, 0.0, last_activation=True)
                for m in self.modalities
                if dims[m] > 0
            }
        )
        # categories[m]: vocabulary size (without the 0 = missing id) of each categorical column of m
        self.embeddings = nn.ModuleDict(
            {
                m: nn.ModuleList([nn.Embedding(n + 1, cfg.dim) for n in sizes])
                for m, sizes in categories.items()
                if sizes
            }
        )
        self.head = mlp([cfg.dim, *cfg.head_hidden, n_labels], cfg.activation, cfg.dropout, last_activation=False)

    def elements(self, batch: SetBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All elements of the batch in the common space: (N, D), their segment (N,), modality (N,)."""
        x, seg, mod, _ = self._elements(batch, positions=False)
        return x, seg, mod

    def element_positions(self, batch: SetBatch) -> torch.Tensor:
        """(N,): each element's position in its item's set of its modality, in `elements` order.

        Vector elements keep the order of the feature set (0, 1, ...); the c-th categorical column
        of a modality comes after them (position = number of vector elements of the item + c).
        """
        return self._elements(batch, positions=True)[3]

    def _elements(self, batch: SetBatch, positions: bool):
        xs, segs, mods, pos = [], [], [], []
        for i, m in enumerate(self.modalities):
            mb = batch.modalities.get(m)
            if mb is None:
                continue
            n_vec = torch.zeros(batch.size, dtype=torch.long, device=mb.segment.device)
            if m in self.encoders and mb.vectors.shape[0]:
                xs.append(self.encoders[m](mb.vectors) if not positions else None)  # (N_m, D)
                segs.append(mb.segment)
                mods.append(torch.full_like(mb.segment, i))
                if positions:  # rank inside the item: the store keeps each item's elements contiguous
                    n_vec = n_vec.index_add(0, mb.segment, torch.ones_like(mb.segment))
                    first = torch.cumsum(n_vec, 0) - n_vec
                    pos.append(torch.arange(mb.segment.numel(), device=n_vec.device) - first[mb.segment])
            if m in self.embeddings and mb.category_ids is not None:
                items = torch.arange(batch.size, device=mb.category_ids.device)
                for c, table in enumerate(self.embeddings[m]):
                    xs.append(table(mb.category_ids[:, c]) if not positions else None)  # (B, D): one per column
                    segs.append(items)
                    mods.append(torch.full_like(items, i))
                    pos.append(n_vec + c)
        device = next(self.parameters()).device
        if not segs:
            empty = torch.zeros(0, dtype=torch.long, device=device)
            return torch.zeros(0, self.cfg.dim, device=device), empty, empty, empty
        return (
            (None if positions else torch.cat(xs)),
            torch.cat(segs),
            torch.cat(mods),
            (torch.cat(pos) if positions else None),
        )

    def pool(self, x: torch.Tensor, segment: torch.Tensor, modality: torch.Tensor, size: int) -> torch.Tensor:
        """(N, D) elements -> (B, D) pooled vectors (flat, or hierarchical by modality)."""
        return self.pooling.pool(x, segment, modality, size, len(self.modalities), self.cfg.hierarchical)

    def forward(self, batch: SetBatch) -> torch.Tensor:
        """Logits (B, n_labels)."""
        x, seg, mod = self.elements(batch)
        return self.head(self.pool(x, seg, mod, batch.size))


class ConcatModel(nn.Module):
    """The paper's late-fusion baseline: each modality mean-pooled (zeros when missing), concatenated, MLP."""

    def __init__(self, cfg: ModelConfig, dims: dict[str, int], categories: dict[str, list[int]], n_labels: int):
        super().__init__()
        self.cfg = cfg
        self.modalities = sorted(dims)
        self.dims = dims
        self.embeddings = nn.ModuleDict(
            {
                m: nn.ModuleList([nn.Embedding(n + 1, cfg.dim) for n in sizes])
                for m, sizes in categories.items()
                if sizes
            }
        )
        width = sum(dims.values()) + sum(cfg.dim * len(s) for s in categories.values())
        self.head = mlp([width, *cfg.head_hidden, n_labels], cfg.activation, cfg.dropout, last_activation=False)

    def forward(self, batch: SetBatch) -> torch.Tensor:
        parts = []
        device = next(self.parameters()).device
        for m in self.modalities:
            mb = batch.modalities.get(m)
            if self.dims[m]:
                if mb is None or not mb.vectors.shape[0]:
                    parts.append(torch.zeros(batch.size, self.dims[m], device=device))
                else:
                    parts.append(poolings.MeanPooling().reduce(mb.vectors, mb.segment, batch.size))
            if m in self.embeddings:
                for c, table in enumerate(self.embeddings[m]):
                    ids = (
                        mb.category_ids[:, c]
                        if mb is not None and mb.category_ids is not None
                        else torch.zeros(batch.size, dtype=torch.long, device=device)
                    )
                    parts.append(table(ids))
        return self.head(torch.cat(parts, dim=1))


def build_model(cfg: ModelConfig, dims: dict[str, int], categories: dict[str, list[int]], n_labels: int) -> nn.Module:
    """The model the config names."""
    cls = SetModel if cfg.architecture == "set" else ConcatModel
    return cls(cfg, dims, categories, n_labels)
