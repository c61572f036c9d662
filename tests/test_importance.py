"""Argmax importances: winners are the elements that hold each pooled maximum; shares add up."""
from __future__ import annotations

import pytest
import torch

from pipeline.config import from_dict
from pipeline.importance import explain, max_pool_winners
from pipeline.model import ModalityBatch, ModelConfig, SetBatch, build_model


def test_winners_hold_the_maximum_and_ties_go_to_the_first_row():
    x = torch.tensor([[1.0, 5.0], [3.0, 5.0], [2.0, 0.0], [-1.0, -2.0]])
    seg = torch.tensor([0, 0, 1, 1])
    pooled, winner = max_pool_winners(x, seg, 3)
    assert pooled.tolist() == [[3.0, 5.0], [2.0, 0.0], [0.0, 0.0]]
    assert winner.tolist() == [[1, 0], [2, 2], [-1, -1]]


def test_modality_shares_and_element_wins_add_up():
    torch.manual_seed(0)
    model = build_model(from_dict(ModelConfig, {"dim": 16, "dropout": 0.0}, "m"), {"a": 5, "b": 3}, {}, 2).eval()
    batch = SetBatch(size=3, modalities={
        "a": ModalityBatch(torch.randn(4, 5), torch.tensor([0, 0, 1, 2])),
        "b": ModalityBatch(torch.randn(2, 3), torch.tensor([0, 2])),
    })
    imp = explain(model, batch)
    assert torch.allclose(imp.modality_share.sum(1), torch.ones(3))
    assert imp.modality_share[1].tolist() == [1.0, 0.0], "item 1 has only modality a"
    per_item = torch.zeros(3).index_add_(0, imp.element_segment, imp.element_wins)
    assert per_item.tolist() == [16.0, 16.0, 16.0]
    assert imp.label_modality.shape == (3, 2, 2)
    assert torch.all(imp.label_modality >= 0) and torch.all(imp.label_modality.sum(2) <= 1 + 1e-5)


def test_argmax_importance_needs_max_pooling():
    model = build_model(from_dict(ModelConfig, {"dim": 4, "pooling": "mean"}, "m"), {"a": 2}, {}, 1)
    with pytest.raises(ValueError, match="needs a set model with flat max pooling"):
        explain(model, SetBatch(size=1))
