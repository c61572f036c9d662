"""Set pooling: one object per kind that pools a set of D-dim elements into one vector and decomposes
that vector exactly into per-element parts (the importances). Imports torch only.

A pooling is a subclass of `Pooling` registered under a name (`@register`); `train.model.pooling`
names it, the set model calls it, `pipeline.importance` asks it for the decomposition and the report
for its description. Adding one is one class (README "Add a pooling"):

- `reduce(x, segment, size)`: rows of x (N, D) pooled per segment into (size, D); a segment with no
  rows pools to zeros (an item without elements gets a defined output).
- `combine(inner, present)`: hierarchical pooling, across the modalities of each item: inner (B, M, D)
  per-modality pooled vectors, present (B, M) which of them had elements -> (B, D).
- `decompose(x, segment, modality, size, n_modalities, hierarchical)`: (pooled (B, D), parts (N, D),
  wins (N, D) or None) with pooled[b] = the sum of the parts of b's elements, exactly; `wins` is each
  element's (fractional on ties) ownership of each dimension, for poolings where elements win
  dimensions (max).
"""

from __future__ import annotations

from typing import ClassVar

import torch

# Max-pooling ties: elements within this distance of a dimension's maximum share it equally. Float noise
# between kernels is ~1e-7 relative, so equal inputs always tie; values 1e-4 apart never do. The parts
# still add up exactly to the pooled vector (each tied element gets its share of the maximum itself).
TIE_RTOL = 1e-5
TIE_ATOL = 1e-6


def segment_counts(segment: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    """(size,): how many rows each segment has."""
    return torch.zeros(size, dtype=dtype, device=segment.device).index_add_(
        0, segment, torch.ones_like(segment, dtype=dtype)
    )


def segment_sum(x: torch.Tensor, segment: torch.Tensor, size: int) -> torch.Tensor:
    """(size, D): the sum of x's rows per segment (zeros for an empty one)."""
    return torch.zeros(size, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, segment, x)


class Pooling:
    """A set pooling and its exact decomposition (see the module docstring)."""

    name: ClassVar[str]
    method: ClassVar[str] = "contribution"  # what the importance shares are: "argmax" or "contribution"
    unit: ClassVar[str] = "pooled mass"  # what an element's share counts, for tables and the report
    description: ClassVar[str] = ""  # one sentence for the report: what a modality's share means

    def reduce(self, x: torch.Tensor, segment: torch.Tensor, size: int) -> torch.Tensor:
        raise NotImplementedError

    def combine(self, inner: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decompose(
        self,
        x: torch.Tensor,
        segment: torch.Tensor,
        modality: torch.Tensor,
        size: int,
        n_modalities: int,
        hierarchical: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def pool(
        self,
        x: torch.Tensor,
        segment: torch.Tensor,
        modality: torch.Tensor,
        size: int,
        n_modalities: int,
        hierarchical: bool,
    ) -> torch.Tensor:
        """(N, D) elements -> (B, D): flat over all elements, or inside each modality then across them."""
        if not hierarchical:
            return self.reduce(x, segment, size)
        key = segment * n_modalities + modality
        inner = self.reduce(x, key, size * n_modalities)  # (B*M, D)
        present = segment_counts(key, size * n_modalities, x.dtype) > 0
        return self.combine(inner.view(size, n_modalities, -1), present.view(size, n_modalities))


REGISTRY: dict[str, type[Pooling]] = {}
L1_SHARE = "a modality's share is its fraction of the pooled vector's L1 mass (argmax importance needs max pooling)"


def register(cls: type[Pooling]) -> type[Pooling]:
    """Class decorator: make a pooling available by its `name` (train.model.pooling)."""
    if not getattr(cls, "name", None):
        raise ValueError(f"{cls.__name__} has no `name`")
    REGISTRY[cls.name] = cls
    return cls


def names() -> list[str]:
    """The registered pooling names."""
    return sorted(REGISTRY)


def get(name: str) -> Pooling:
    """The pooling registered as `name`."""
    if name not in REGISTRY:
        raise ValueError(f"unknown pooling {name!r}; registered: {names()}")
    return REGISTRY[name]()


@register
class MaxPooling(Pooling):
    """The element-wise maximum: each dimension is won by one element (the paper's importance)."""

    name = "max"
    method = "argmax"
    unit = "dimensions won"
    description = (
        "max pooling: a modality's share is the fraction of the D pooled dimensions whose maximum "
        "came from one of its elements (element-wise argmax)"
    )

    def reduce(self, x: torch.Tensor, segment: torch.Tensor, size: int) -> torch.Tensor:
        D = x.shape[1]
        pooled = torch.zeros(size, D, dtype=x.dtype, device=x.device)
        return pooled.scatter_reduce(0, segment[:, None].expand(-1, D), x, reduce="amax", include_self=False)

    def combine(self, inner: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        masked = inner.masked_fill(~present[:, :, None], float("-inf"))  # an absent modality must not win
        out = masked.amax(dim=1)
        return torch.where(torch.isinf(out), torch.zeros_like(out), out)

    def decompose(self, x, segment, modality, size, n_modalities, hierarchical):
        # hierarchical max is the maximum over all elements too: the same decomposition
        pooled = self.reduce(x, segment, size)
        top = pooled[segment]
        # a tie is a value within float noise of the maximum, not exact equality: the same input in two rows
        # of one matmul can come out a few ulps apart, depending on the CPU's kernel (seen: 6e-8)
        hit = (x >= top - (TIE_ATOL + TIE_RTOL * top.abs())).to(x.dtype)  # (N, D)
        ties = torch.zeros_like(pooled).index_add_(0, segment, hit)
        wins = hit / ties[segment].clamp(min=1)
        return pooled, wins * pooled[segment], wins


@register
class SumPooling(Pooling):
    """The sum of the elements: every element contributes its own vector."""

    name = "sum"
    description = f"sum pooling: {L1_SHARE}"

    def reduce(self, x: torch.Tensor, segment: torch.Tensor, size: int) -> torch.Tensor:
        return segment_sum(x, segment, size)

    def combine(self, inner: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        return inner.sum(dim=1)  # an absent modality's inner vector is zeros

    def decompose(self, x, segment, modality, size, n_modalities, hierarchical):
        return segment_sum(x, segment, size), x, None  # a sum of sums is the sum


@register
class MeanPooling(Pooling):
    """The mean of the elements (hierarchical: the mean over the present modalities of their means)."""

    name = "mean"
    description = f"mean pooling: {L1_SHARE}"

    def reduce(self, x: torch.Tensor, segment: torch.Tensor, size: int) -> torch.Tensor:
        return segment_sum(x, segment, size) / segment_counts(segment, size, x.dtype).clamp(min=1)[:, None]

    def combine(self, inner: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        return inner.sum(dim=1) / present.sum(1).clamp(min=1).to(inner.dtype)[:, None]

    def decompose(self, x, segment, modality, size, n_modalities, hierarchical):
        if not hierarchical:
            scale = 1 / segment_counts(segment, size, x.dtype).clamp(min=1)[segment]
        else:
            key = segment * n_modalities + modality
            counts = segment_counts(key, size * n_modalities, x.dtype)  # (B*M,)
            present = (counts.view(size, n_modalities) > 0).sum(1).to(x.dtype)  # (B,)
            scale = 1 / (counts[key].clamp(min=1) * present[segment].clamp(min=1))
        parts = x * scale[:, None]
        return segment_sum(parts, segment, size), parts, None
