"""Importances: the pooled vector decomposes exactly over elements; argmax winners hold the maxima;
shares add up; label-conditional shares follow the head's weights."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import from_dict
from pipeline.importance import decompose, explain
from pipeline.model import ModalityBatch, ModelConfig, SetBatch, build_model


def test_winners_hold_the_maximum_and_ties_are_split():
    x = torch.tensor([[1.0, 5.0], [3.0, 5.0], [2.0, 0.0], [-1.0, -2.0]])
    seg = torch.tensor([0, 0, 1, 1])
    model = build_model(from_dict(ModelConfig, {"dim": 2}, "m"), {"a": 1}, {}, 1)
    pooled, parts, wins = decompose(model, x, seg, torch.zeros_like(seg), 3)
    assert pooled.tolist() == [[3.0, 5.0], [2.0, 0.0], [0.0, 0.0]]
    assert wins.tolist() == [[0.0, 0.5], [1.0, 0.5], [1.0, 1.0], [0.0, 0.0]], (
        "row 1 wins dim 0; rows 0 and 1 tie on dim 1"
    )
    assert parts.tolist() == [[0.0, 2.5], [3.0, 2.5], [2.0, 0.0], [0.0, 0.0]]


def test_ties_are_decided_within_float_noise_not_by_exact_equality():
    """Two rows of one matmul holding the same input can differ by a few ulps on some CPUs: such values
    tie (and split the dimension) on every CPU, while a real difference (1e-4 here) still decides."""
    x = torch.tensor([[1.0, 2.0], [1.0 + 1.2e-7, 2.0 - 1e-4], [0.0, 0.0]])
    seg = torch.tensor([0, 0, 0])
    model = build_model(from_dict(ModelConfig, {"dim": 2}, "m"), {"a": 1}, {}, 1)
    pooled, parts, wins = decompose(model, x, seg, torch.zeros_like(seg), 1)
    assert wins.tolist() == [[0.5, 1.0], [0.5, 0.0], [0.0, 0.0]]
    assert torch.allclose(parts.sum(0), pooled[0], rtol=0, atol=1e-7), "the parts still add up to the pooled vector"


def random_model(**over):
    torch.manual_seed(0)
    cfg = from_dict(ModelConfig, {"dim": 16, "dropout": 0.0, **over}, "m")
    return build_model(cfg, {"a": 5, "b": 3, "meta": 2}, {"meta": [4]}, 2).eval()


def random_batch() -> SetBatch:
    g = torch.Generator().manual_seed(1)
    return SetBatch(
        size=4,
        modalities={
            "a": ModalityBatch(torch.randn(4, 5, generator=g), torch.tensor([0, 0, 1, 2])),
            "b": ModalityBatch(torch.randn(2, 3, generator=g), torch.tensor([0, 2])),
            "meta": ModalityBatch(
                torch.randn(3, 2, generator=g), torch.tensor([0, 1, 2]), torch.tensor([[1], [0], [3], [0]])
            ),
        },
    )


@pytest.mark.parametrize(
    "over",
    [
        {"pooling": "max"},
        {"pooling": "sum"},
        {"pooling": "mean"},
        {"pooling": "max", "hierarchical": True},
        {"pooling": "sum", "hierarchical": True},
        {"pooling": "mean", "hierarchical": True},
    ],
)
def test_the_parts_add_up_to_the_pooled_vector_the_model_uses(over):
    model, batch = random_model(**over), random_batch()
    with torch.no_grad():
        x, seg, mod = model.elements(batch)
        pooled, parts, wins = decompose(model, x, seg, mod, batch.size)
        assert torch.allclose(pooled, model.pool(x, seg, mod, batch.size), atol=1e-6)
        summed = torch.zeros_like(pooled).index_add_(0, seg, parts)
        assert torch.allclose(summed, pooled, atol=1e-5)
    imp = explain(model, batch)
    assert imp.method == ("argmax" if over["pooling"] == "max" else "contribution")
    assert torch.allclose(imp.modality_share.sum(1), torch.ones(4), atol=1e-5), "every item has elements"
    assert (wins is not None) == (over["pooling"] == "max")
    shares = torch.zeros(4, 2).index_add_(0, imp.element_segment, imp.label_element)
    assert torch.allclose(shares, torch.ones(4, 2), atol=1e-4)
    assert torch.allclose(imp.label_modality.sum(2), torch.ones(4, 2), atol=1e-4)


def test_argmax_wins_count_dimensions_and_split_ties():
    model, batch = random_model(), random_batch()
    imp = explain(model, batch)
    per_item = torch.zeros(4).index_add_(0, imp.element_segment, imp.element_wins)
    assert torch.allclose(per_item, torch.full((4,), 16.0))
    assert torch.allclose(imp.element_share, imp.element_wins / 16)
    # item 1 has a vector of `a`, the meta vector and an embedded meta value: no `b`
    assert imp.modality_share[1, 1] == 0
    # two identical elements tie on every dimension and split it
    twin = SetBatch(size=1, modalities={"a": ModalityBatch(torch.ones(2, 5), torch.tensor([0, 0]))})
    t = explain(model, twin)
    assert t.element_wins.tolist() == [8.0, 8.0]


def two_channel_model() -> torch.nn.Module:
    """Modality a writes dimension 0 only, b dimension 1 only; label 0 reads dim 0, label 1 dim 1."""
    cfg = from_dict(ModelConfig, {"dim": 2, "encoder_depth": 1, "dropout": 0.0, "head_hidden": []}, "m")
    model = build_model(cfg, {"a": 1, "b": 1}, {}, 2).eval()
    with torch.no_grad():
        model.encoders["a"][0].weight.copy_(torch.tensor([[1.0], [0.0]]))
        model.encoders["b"][0].weight.copy_(torch.tensor([[0.0], [1.0]]))
        for enc in model.encoders.values():
            enc[0].bias.zero_()
        model.head[0].weight.copy_(torch.eye(2))
        model.head[0].bias.zero_()
    return model


def test_label_conditional_shares_follow_the_head():
    model = two_channel_model()
    batch = SetBatch(
        size=1,
        modalities={
            "a": ModalityBatch(torch.tensor([[2.0], [1.0]]), torch.tensor([0, 0])),
            "b": ModalityBatch(torch.tensor([[3.0]]), torch.tensor([0])),
        },
    )
    imp = explain(model, batch)
    assert imp.modality_share.tolist() == [[0.5, 0.5]]  # one dimension each
    assert imp.label_modality[0].tolist() == [[1.0, 0.0], [0.0, 1.0]], "why label 0: a; why label 1: b"
    assert imp.element_wins.tolist() == [1.0, 0.0, 1.0], "the larger a element wins dimension 0"
    assert imp.label_element[:, 0].tolist() == [1.0, 0.0, 0.0]


def test_concat_baseline_has_no_element_importance():
    model = build_model(from_dict(ModelConfig, {"dim": 4, "architecture": "concat"}, "m"), {"a": 2}, {}, 1)
    with pytest.raises(ValueError, match="need a set model"):
        explain(model, SetBatch(size=1))
