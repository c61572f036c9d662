"""Which modality, and which element, drove a prediction (torch only).

With max pooling each of the D pooled dimensions is won by exactly one element (the element-wise
argmax of the paper): the share of dimensions each modality won is its importance for the item,
and the number of dimensions each element won says which face, text box or sentence mattered.
Label-conditional importance weights every dimension by its contribution to one label's logit
(gradient x input at the pooled vector), so "why Horror?" and "why Comedy?" can differ.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.model import SetBatch, SetModel, segment_pool


@dataclass
class Importance:
    """Importances of a batch of B items over M modalities (model.modalities order)."""

    modality_share: torch.Tensor  # (B, M): share of the D dimensions won by each modality
    element_wins: torch.Tensor  # (N,): dimensions won by each element (rows of `elements`)
    element_segment: torch.Tensor  # (N,): the item of each element
    element_modality: torch.Tensor  # (N,): the modality index of each element
    label_modality: torch.Tensor | None = None  # (B, L, M): label-conditional modality shares


def max_pool_winners(x: torch.Tensor, segment: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Max-pool (N, D) rows into `size` items; returns (pooled (B, D), winner row (B, D), -1 when empty).

    Ties go to the lowest row index, so the winner is deterministic.
    """
    N, D = x.shape
    pooled, _ = segment_pool(x, segment, size, "max")
    rows = torch.arange(N, device=x.device)[:, None].expand(N, D)
    is_win = x == pooled[segment]
    cand = torch.where(is_win, rows, torch.full_like(rows, N))
    winner = torch.full((size, D), N, dtype=torch.long, device=x.device)
    winner = winner.scatter_reduce(0, segment[:, None].expand(-1, D), cand, reduce="amin", include_self=True)
    return pooled, torch.where(winner == N, torch.full_like(winner, -1), winner)


@torch.no_grad()
def _argmax_importance(model: SetModel, batch: SetBatch) -> tuple[Importance, torch.Tensor, torch.Tensor]:
    x, seg, mod = model.elements(batch)
    pooled, winner = max_pool_winners(x, seg, batch.size)
    M = len(model.modalities)
    won_mod = torch.where(winner >= 0, mod[winner.clamp(min=0)], torch.full_like(winner, M))  # (B, D); M = none
    counts = torch.zeros(batch.size, M + 1, device=x.device).scatter_add_(1, won_mod, torch.ones_like(won_mod, dtype=x.dtype))
    share = counts[:, :M] / x.shape[1] if x.numel() else torch.zeros(batch.size, M, device=x.device)
    flat = winner[winner >= 0]
    wins = torch.bincount(flat, minlength=x.shape[0]).to(x.dtype)
    return Importance(share, wins, seg, mod), pooled, won_mod


def explain(model: SetModel, batch: SetBatch, label_conditional: bool = True) -> Importance:
    """Argmax importances of a set model with (flat) max pooling, and optionally per label."""
    if not isinstance(model, SetModel) or model.cfg.pooling != "max" or model.cfg.hierarchical:
        raise ValueError("argmax importance needs a set model with flat max pooling "
                         "(architecture: set, pooling: max, hierarchical: false)")
    model.eval()
    imp, pooled, won_mod = _argmax_importance(model, batch)
    if label_conditional:
        imp.label_modality = label_modality_share(model, pooled, won_mod, len(model.modalities))
    return imp


def label_modality_share(model: SetModel, pooled: torch.Tensor, won_mod: torch.Tensor, M: int) -> torch.Tensor:
    """(B, L, M): per label, the share of positive logit contribution (gradient x input of each pooled
    dimension) that falls on dimensions each modality won."""
    with torch.enable_grad():
        z = pooled.detach().requires_grad_(True)
        logits = model.head(z)  # (B, L)
        contrib = []
        for label in range(logits.shape[1]):
            (grad,) = torch.autograd.grad(logits[:, label].sum(), z, retain_graph=True)
            contrib.append((grad * z).detach())  # (B, D)
    c = torch.stack(contrib, 1).clamp(min=0)  # (B, L, D): only what pushes the label up
    B, L, D = c.shape
    out = torch.zeros(B, L, M + 1, device=c.device, dtype=c.dtype)
    out.scatter_add_(2, won_mod[:, None, :].expand(B, L, D), c)
    total = c.sum(2, keepdim=True).clamp(min=1e-12)
    return out[:, :, :M] / total
