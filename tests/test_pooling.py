"""A pooling is one class: a toy one defined here alone (nothing under pipeline/ knows it) trains,
predicts and explains, and its decomposition adds up to the pooled vector the model uses."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
from test_importance import random_batch, random_model
from test_model import train_cfg, write_synthetic

from pipeline import pooling
from pipeline.config import ConfigError, from_dict
from pipeline.importance import decompose, explain
from pipeline.model import ModelConfig
from pipeline.pooling import Pooling, register, segment_sum
from pipeline.predict import PredictConfig, run_predict


@register
class SoftMaxPooling(Pooling):
    """A toy: each item's elements weighted by a softmax over their own values, per dimension."""

    name = "toy-softmax"
    method = "contribution"
    unit = "softmax-weighted mass"
    description = "toy softmax pooling: a modality's share is its fraction of the softmax-weighted mass"

    def _weights(self, x: torch.Tensor, segment: torch.Tensor, size: int) -> torch.Tensor:
        top = torch.zeros(size, x.shape[1], dtype=x.dtype, device=x.device).scatter_reduce(
            0, segment[:, None].expand(-1, x.shape[1]), x, reduce="amax", include_self=False
        )
        e = torch.exp(x - top[segment])  # (N, D), stable
        return e / segment_sum(e, segment, size)[segment]

    def reduce(self, x, segment, size):
        return segment_sum(self._weights(x, segment, size) * x, segment, size)

    def combine(self, inner, present):
        return inner.sum(dim=1)

    def decompose(self, x, segment, modality, size, n_modalities, hierarchical):
        if hierarchical:
            raise NotImplementedError("toy-softmax is flat only")
        parts = self._weights(x, segment, size) * x
        return segment_sum(parts, segment, size), parts, None


def test_the_toy_pooling_is_known_by_name_and_validated():
    assert "toy-softmax" in pooling.names() and {"max", "sum", "mean"} <= set(pooling.names())
    from_dict(ModelConfig, {"pooling": "toy-softmax"}, "train.model")
    with pytest.raises(ConfigError, match=r"pooling: expected one of \[.*'toy-softmax'"):
        from_dict(ModelConfig, {"pooling": "median"}, "train.model")


def test_its_parts_add_up_to_the_pooled_vector_the_model_uses():
    model, batch = random_model(pooling="toy-softmax"), random_batch()
    with torch.no_grad():
        x, seg, mod = model.elements(batch)
        pooled, parts, wins = decompose(model, x, seg, mod, batch.size)
        assert wins is None and torch.allclose(pooled, model.pool(x, seg, mod, batch.size), atol=1e-6)
        assert torch.allclose(torch.zeros_like(pooled).index_add_(0, seg, parts), pooled, atol=1e-5)
    imp = explain(model, batch)
    assert imp.method == "contribution"
    shares = imp.modality_share.sum(1)
    assert torch.allclose(shares[shares > 0], torch.ones_like(shares[shares > 0]), atol=1e-5)


def test_it_trains_predicts_and_explains(tmp_path):
    manifest = write_synthetic(tmp_path)
    cfg = train_cfg(epochs=15, model={"dim": 16, "dropout": 0.0, "head_hidden": [16], "pooling": "toy-softmax"})
    from pipeline.train import fit

    result = fit(cfg, manifest, tmp_path / "features", tmp_path / "model", tmp_path / "m.json", tmp_path / "c.csv")
    assert result["pooling"] == "toy-softmax"
    assert result["test"]["mean_average_precision"] > result["test_label_frequency_baseline"]["mean_average_precision"]
    run_predict(
        PredictConfig(device="cpu"), tmp_path / "model" / "model.pt", manifest, tmp_path / "features", tmp_path / "pred"
    )
    summary = json.loads((tmp_path / "pred" / "summary.json").read_text())
    assert summary["method"] == "contribution" and summary["method_unit"] == "softmax-weighted mass"
    assert summary["method_text"].startswith("toy softmax pooling")
    imp = pq.read_table(tmp_path / "pred" / "importance.parquet").to_pylist()
    assert imp and all(abs(r["share_a"] + r["share_b"] - 1) < 1e-4 for r in imp if r["top_modality"])
    # the label driven by modality a is explained by a, the one driven by b by b
    by_label = summary["by_label"]
    assert by_label["A"]["top_modality"] == "a" and by_label["B"]["top_modality"] == "b"
