"""What each modality is worth: leave-one-out over seeds beside its extraction cost, on generated
data where one modality carries the labels and one is noise."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, write_generated

from pipeline import cli, worth
from pipeline.compare import Run

MODALITIES = {"signal": 6, "noise": 4}


def write_signal_and_noise(root: Path, n: int = 300, seed: int = 0) -> Path:
    """Labels A and B live in modality `signal` (one element stands out in dimension 0 or 1); `noise`
    holds random elements only."""
    rng = np.random.default_rng(seed)
    ids = [f"i{k:04d}" for k in range(n)]
    ya, yb = rng.random(n) < 0.4, rng.random(n) < 0.4
    labels = [[name for name, on in (("A", a), ("B", b)) if on] for a, b in zip(ya, yb)]
    split = ["train" if k % 10 < 6 else "val" if k % 10 < 8 else "test" for k in range(n)]
    sets = {}
    for name, dim in MODALITIES.items():
        vectors = []
        for a, b in zip(ya, yb):
            vecs = rng.normal(size=(int(rng.integers(1, 4)), dim)).astype(np.float32)
            if name == "signal":
                vecs[0, 0] += 4.0 * a
                vecs[-1, 1] += 4.0 * b
            vectors.append(vecs)
        sets[name] = (dim, vectors)
    manifest = write_generated(root, ids, split, labels, sets)
    costs = {"signal": (300, 3.0, 2.4), "noise": (300, 30.0, 57.6)}  # the noise is the expensive one
    for name, (items, seconds, cpu) in costs.items():
        path = root / "metrics" / "extract" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps(
                {
                    "modality": name,
                    "items_in": items,
                    "computed": items,
                    "reused": 0,
                    "seconds": seconds,
                    "cpu_seconds": cpu,
                    "torch_threads": 2,
                }
            )
        )
    return manifest


def test_costs_come_from_the_extract_metrics(tmp_path):
    write_signal_and_noise(tmp_path, n=20)
    costs = worth.read_costs(tmp_path / "metrics" / "extract", ["noise", "signal", "absent"])
    assert set(costs) == {"noise", "signal"}
    assert costs["noise"].per_item == pytest.approx(57.6 / 300) and costs["noise"].unit == "core-s"
    assert costs["noise"].share == pytest.approx(57.6 / 60.0) and costs["signal"].share == pytest.approx(0.04)


def test_leave_one_out_separates_the_carrying_modality_from_the_noise(tmp_path):
    manifest = write_signal_and_noise(tmp_path)
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(
        "train: {epochs: 20, patience: 20, batch_size: 32, lr: 0.01, device: cpu, "
        "model: {dim: 16, dropout: 0.0, head_hidden: [16]}}\n"
    )
    out = tmp_path / "worth"
    cli.main(
        [
            "compare",
            "--params",
            str(REPO / "params.yaml"),
            "--params",
            str(overlay),
            "--leave-one-out",
            "--manifest",
            str(manifest),
            "--features",
            str(tmp_path / "features"),
            "--seeds",
            "5",
            "--extract-metrics",
            str(tmp_path / "metrics" / "extract"),
            "--out",
            str(out),
        ]
    )
    data = json.loads((out / "worth.json").read_text())
    assert data["split"] == "test" and data["chosen_on"] == "val" and data["seeds"] == 5
    assert data["verdict_split"] == "val"
    by = {m["modality"]: m for m in data["modalities"]}
    signal, noise = by["signal"]["drop"]["mean_average_precision"], by["noise"]["drop"]["mean_average_precision"]
    assert signal["n"] == noise["n"] == 5
    assert signal["low"] > 0, signal
    assert noise["low"] <= 0 <= noise["high"], noise
    assert (
        by["signal"]["val_drop"]["low"] > 0 and by["noise"]["val_drop"]["low"] <= 0 <= by["noise"]["val_drop"]["high"]
    )
    assert by["signal"]["verdict"].startswith("worth it")
    assert (
        by["noise"]["verdict"].startswith("no measurable value at this cost")
        and "96% of the extraction" in by["noise"]["verdict"]
    )
    assert by["noise"]["cost"]["per_item"] == pytest.approx(0.192) and by["noise"]["cost"]["per_item_unit"] == "core-s"
    table = (out / "table.md").read_text()
    assert "| signal |" in table and "| noise |" in table and "verdicts decided on val" in table
    svg = (out / "chart.svg").read_text()
    assert svg.startswith("<svg") and ">signal<" in svg and ">noise<" in svg
    assert (out / "variants" / "runs.json").is_file()
    runs = json.loads((out / "variants" / "runs.json").read_text())["runs"]
    assert {r["variant"] for r in runs} == {worth.FULL, "without signal", "without noise"} and len(runs) == 15


def test_a_dvc_sweep_is_read_as_the_same_variants():
    """Runs of `dvc exp run --queue -S train.modalities=[...]` are named by the modalities they kept."""
    runs = [
        Run("baseline", 0, {}, {}, {"train.modalities": None}),
        Run("x", 0, {}, {}, {"train.modalities": ["a", "b", "c"]}),
        Run("y", 0, {}, {}, {"train.modalities": ["a", "c"]}),
        Run("z", 0, {}, {}, {"train.modalities": ["c"]}),
    ]  # two left out: not a leave-one-out run
    got = [r.variant for r in worth.label_experiments(runs, ["a", "b", "c"])]
    assert got == [worth.FULL, worth.FULL, "without b"]


def test_runs_that_differ_in_more_than_the_modalities_are_refused():
    """Two 'all modalities, seed 0' runs (a sweep that also varied the learning rate) cannot be paired."""
    from pipeline.runtime import UserError

    test = {m: 0.5 for m in ("f1_micro", "f1_macro", "f1_weighted", "f1_samples", "mean_average_precision")}
    runs = [Run(worth.FULL, 0, test), Run(worth.FULL, 0, test), Run("without a", 0, test)]
    with pytest.raises(UserError, match="more than one run for"):
        worth.assess(runs, ["a"], {}, "mean_average_precision")
