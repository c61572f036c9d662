"""Importances are faithful on the demo dataset, whose labels are planted in known modalities
(pipeline/demo.py: Ensemble <- faces, Horror <- ocr, Romance <- description, Comedy <- tags,
Classic <- meta (year), Sci-Fi <- image). The model is trained with the shipped params.yaml."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.bundle import load_scoring_inputs, predict
from pipeline.setdata import label_matrix

pytestmark = pytest.mark.slow


def planted(demo_run) -> dict[str, str]:
    info = json.loads((demo_run.root / "raw" / "planted_labels.json").read_text())
    return {label: v["modality"] for label, v in info["labels"].items()}


def test_the_model_learned_the_demo(demo_run):
    test = demo_run.train["test"]
    assert (
        test["f1_micro"] > 0.75 and test["f1_micro"] > demo_run.train["test_label_frequency_baseline"]["f1_micro"] + 0.3
    )


def test_top_label_conditional_modality_is_the_planted_one(demo_run):
    """Over each label's positive items, the modality with the highest mean label-conditional share."""
    rows = []
    for label, modality in planted(demo_run).items():
        entry = demo_run.summary["by_label"][label]
        rows.append((label, modality, entry["top_modality"], entry["share"]))
    wrong = [
        (lab, want, got, {m: round(v, 3) for m, v in share.items()}) for lab, want, got, share in rows if got != want
    ]
    assert not wrong, f"label, planted, top modality, shares: {wrong}"


def test_removing_the_planted_modality_lowers_the_label_most(demo_run):
    """Ablation computed here through bundle.predict(drop=...), independently of the predict stage."""
    inputs = load_scoring_inputs(demo_run.model, demo_run.manifest, demo_run.root / "features", "cpu")
    model, bundle, store, ids, labels = inputs.model, inputs.bundle, inputs.store, inputs.ids, inputs.labels
    y = label_matrix(labels, bundle.label_names).numpy() > 0
    idx = torch.arange(len(ids))
    full = predict(model, store, idx, bundle.task).numpy()
    drops = {m: full - predict(model, store, idx, bundle.task, drop=frozenset({m})).numpy() for m in model.modalities}
    for label, modality in planted(demo_run).items():
        j = bundle.label_names.index(label)
        mean_drop = {m: float(d[y[:, j], j].mean()) for m, d in drops.items()}
        others = max(v for m, v in mean_drop.items() if m != modality)
        assert mean_drop[modality] > others, f"{label}: planted {modality}, drops {mean_drop}"
        # the predict stage's summary says the same
        stage = demo_run.summary["by_label"][label]["ablation_drop"]
        assert np.allclose([stage[m] for m in mean_drop], list(mean_drop.values()), atol=1e-5)
