"""Which modality, and which element, drove a prediction (torch only).

Every importance here starts from one exact decomposition of the pooled vector of an item into
per-element parts, pooled[b] = sum over the item's elements e of A[e]:

- max pooling (flat or hierarchical; both take the maximum over all elements): A[e, d] = pooled[b, d]
  when element e holds the maximum of dimension d, else 0 (the paper's element-wise argmax; a tie,
  within pooling.TIE_RTOL/TIE_ATOL of the maximum, splits the dimension equally). The unconditional importance
  is the share of the D dimensions each modality won ("argmax"), and each element's number of won
  dimensions says which face, text box or sentence mattered.
- sum and mean pooling: A[e] is the element's own (scaled) vector, so no element "wins" a dimension;
  the unconditional importance is each modality's share of the pooled vector's L1 mass
  ("contribution").

Label-conditional importance, for every label l: the gradient of l's logit at the pooled vector
times each element's part, positive part only, summed over dimensions (sum_d relu(g[l, d] * A[e, d])),
as a share of the item's total. So "why Horror?" and "why Comedy?" can differ for one item.
The decomposition itself belongs to the pooling (pipeline.pooling: `Pooling.decompose`), so a new
pooling brings its own. The concat baseline has no set to decompose; prediction falls back to
ablation there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.model import SetBatch, SetModel


@dataclass
class Importance:
    """Importances of a batch of B items over M modalities (model.modalities order), N elements."""

    method: str  # "argmax" (max pooling) | "contribution" (sum or mean pooling)
    modality_share: torch.Tensor  # (B, M); an item with no elements has all zeros
    element_share: torch.Tensor  # (N,): argmax: won dimensions / D; contribution: share of the L1 mass
    element_wins: torch.Tensor | None  # (N,): dimensions won (ties split), argmax only
    element_segment: torch.Tensor  # (N,): the item of each element
    element_modality: torch.Tensor  # (N,): the modality index of each element
    label_modality: torch.Tensor | None = None  # (B, L, M): label-conditional modality shares
    label_element: torch.Tensor | None = None  # (N, L): label-conditional element shares


def decompose(
    model: SetModel, x: torch.Tensor, seg: torch.Tensor, mod: torch.Tensor, size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(pooled (B, D), parts A (N, D) with pooled[b] = sum of A over b's elements, wins (N, D) or None),
    as the model's pooling decomposes it."""
    return model.pooling.decompose(x, seg, mod, size, len(model.modalities), model.cfg.hierarchical)


def label_element_contributions(
    model: SetModel, pooled: torch.Tensor, parts: torch.Tensor, seg: torch.Tensor
) -> torch.Tensor:
    """(N, L): for each element and label, sum_d relu(dlogit_l/dpooled_d * A[e, d])."""
    with torch.enable_grad():
        z = pooled.detach().requires_grad_(True)
        logits = model.head(z)  # (B, L); the head is applied per item, so grads do not mix items
        out = []
        for label in range(logits.shape[1]):
            (grad,) = torch.autograd.grad(logits[:, label].sum(), z, retain_graph=True)
            out.append((grad[seg] * parts).clamp(min=0).sum(1).detach())  # (N,)
    return torch.stack(out, 1) if out else torch.zeros(parts.shape[0], 0, device=parts.device)


def _per_item(values: torch.Tensor, seg: torch.Tensor, size: int) -> torch.Tensor:
    """Sum rows of values (N, ...) per item -> (B, ...)."""
    return torch.zeros(size, *values.shape[1:], dtype=values.dtype, device=values.device).index_add_(0, seg, values)


def _per_item_modality(values: torch.Tensor, seg: torch.Tensor, mod: torch.Tensor, size: int, M: int) -> torch.Tensor:
    """Sum rows of values (N, ...) per item and modality -> (B, M, ...)."""
    flat = _per_item(values, seg * M + mod, size * M)
    return flat.view(size, M, *values.shape[1:])


def explain(
    model: SetModel,
    batch: SetBatch,
    label_conditional: bool = True,
    elements: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> Importance:
    """Element, modality and (optionally) label-conditional importances of a set model's batch;
    `elements` passes model.elements(batch) when the caller has computed it already."""
    if not isinstance(model, SetModel):
        raise ValueError(
            "element importances need a set model (architecture: set); the concat baseline "
            "has no set to decompose: use ablation (predict with drop=...) instead"
        )
    model.eval()
    M, B = len(model.modalities), batch.size
    with torch.no_grad():
        x, seg, mod = elements if elements is not None else model.elements(batch)
        pooled, parts, wins = decompose(model, x, seg, mod, B)
    D = max(model.cfg.dim, 1)
    method = model.pooling.method
    if wins is not None:
        element_wins = wins.sum(1)
        element_share = element_wins / D
    else:
        element_wins = None
        mass = parts.abs().sum(1)
        element_share = mass / _per_item(mass, seg, B).clamp(min=1e-12)[seg]
    modality_share = _per_item_modality(element_share, seg, mod, B, M)
    imp = Importance(method, modality_share, element_share, element_wins, seg, mod)
    if label_conditional:
        c = label_element_contributions(model, pooled, parts, seg)  # (N, L)
        total = _per_item(c, seg, B).clamp(min=1e-12)  # (B, L)
        imp.label_element = c / total[seg]
        imp.label_modality = _per_item_modality(imp.label_element, seg, mod, B, M).transpose(1, 2)  # (B, L, M)
    return imp
