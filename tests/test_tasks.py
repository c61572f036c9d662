"""Every task kind end to end on small demo datasets: multiclass and binary datasets are ingested,
extracted with the real Beam jobs, trained, predicted and scored; thresholds tuned on val are the
ones predict and score apply; scoring takes a `score.dataset` override; a modality renamed in params
keeps its boxes in the report.

The labels are derived from what the demo planted, without noise: Comedy <- the tag `funny`,
Classic <- a year before 1960. Only the fast modalities (tags, meta; OCR for the report) run."""

from __future__ import annotations

import copy
import csv
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO, extract_modality, ingest_config

from pipeline import demo, schema
from pipeline.config import DatasetConfig, DemoConfig, from_dict, load_params, section
from pipeline.extract import JobConfig
from pipeline.ingest import run_ingest
from pipeline.predict import PredictConfig, run_predict
from pipeline.report import ReportConfig, write_report
from pipeline.score import ScoreConfig, run_score
from pipeline.train import TrainConfig, fit

pytestmark = pytest.mark.slow

TRAIN = {
    "epochs": 40,
    "patience": 40,
    "batch_size": 16,
    "lr": 0.01,
    "device": "cpu",
    "model": {"dim": 32, "head_hidden": [32], "dropout": 0.0},
}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, list[dict[str, str]], dict[str, dict[str, str]]]:
    """A 64-item demo dataset without label noise: (folder, manifest rows, planted by id)."""
    root = tmp_path_factory.mktemp("tasks") / "raw"
    demo.generate(from_dict(DemoConfig, {"items": 64, "seed": 11, "label_noise": 0.0}, "demo"), root)
    rows = list(csv.DictReader(open(root / "manifest.csv", encoding="utf-8")))
    planted = {r["id"]: r for r in csv.DictReader(open(root / "planted_items.csv", encoding="utf-8"))}
    return root, rows, planted


def the_class(p: dict[str, str]) -> str:
    return "Comedy" if p["funny_tag"] == "1" else "Classic" if int(p["year"]) < 1960 else "Other"


def write_variant(source, folder: Path, label_of) -> Path:
    """The source dataset with its labels column replaced by label_of(planted row)."""
    root, rows, planted = source
    shutil.copytree(root / "images", folder / "images")
    with open(folder / "manifest.csv", "w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows({**r, "labels": label_of(planted[r["id"]])} for r in rows)
    return folder


def pipeline_params(folder: Path, labels: dict[str, Any], modalities=("tags", "meta")) -> dict[str, Any]:
    params = load_params(REPO / "params.yaml")
    params["dataset"]["dir"] = str(folder)
    params["extract"]["job"]["cache_dir"] = str(folder.parent / "cache")
    params["dataset"]["labels"].update(labels)
    params["extract"]["modalities"] = {m: params["extract"]["modalities"][m] for m in modalities}
    return params


def run_all(params: dict[str, Any], root: Path, train_over: dict[str, Any] | None = None) -> dict[str, Any]:
    """ingest -> extract every modality -> train -> predict, as the stages do; returns the outputs."""
    run_ingest(section(params, "dataset", DatasetConfig), ingest_config(), root / "ingest", root / "ingest.json")
    manifest = root / "ingest" / "manifest.parquet"
    for name in params["extract"]["modalities"]:
        extract_modality(params, name, manifest, root / "features" / name, root / f"{name}.json")
    train = fit(
        from_dict(TrainConfig, {**TRAIN, **(train_over or {})}, "train"),
        manifest,
        root / "features",
        root / "model",
        root / "train.json",
        root / "curve.csv",
    )
    summary = run_predict(
        PredictConfig(device="cpu"), root / "model" / "model.pt", manifest, root / "features", root / "predictions"
    )
    pred = pq.read_table(root / "predictions" / "predictions.parquet").to_pylist()
    return {
        "train": train,
        "summary": summary,
        "pred": pred,
        "manifest": manifest,
        "model": root / "model" / "model.pt",
    }


def write_jsonl_batch(source, folder: Path, n: int = 12) -> Path:
    """An unlabelled batch in JSONL (native lists and numbers), named batch.jsonl: not the contract's manifest."""
    root, rows, _ = source
    shutil.copytree(root / "images", folder / "images")
    with open(folder / "batch.jsonl", "w", encoding="utf-8") as fh:
        for r in rows[:n]:
            item = {k: v for k, v in r.items() if k != "labels"}
            item.update(tags=[t for t in r["tags"].split("|") if t], year=int(r["year"]))
            fh.write(json.dumps(item) + "\n")
    return folder


def score(run: dict[str, Any], folder: Path, out: Path, **over: Any) -> dict[str, Any]:
    cfg = from_dict(ScoreConfig, {"device": "cpu", "write_report": False, **over}, "score")
    return run_score(cfg, run["model"], folder, out, JobConfig(), ingest_config())


# ------------------------------------------------------------------------------------------ multiclass


@pytest.fixture(scope="module")
def multiclass(source, tmp_path_factory):
    root = tmp_path_factory.mktemp("multiclass")
    folder = write_variant(source, root / "data", the_class)
    return run_all(pipeline_params(folder, {"kind": "multiclass"}), root)


def test_multiclass_trains_predicts_one_class_per_item(multiclass, source):
    train, pred = multiclass["train"], multiclass["pred"]
    assert train["task"] == "multiclass" and train["labels"] == ["Classic", "Comedy", "Other"]
    assert train["test"]["accuracy"] > train["test_label_frequency_baseline"]["accuracy"] + 0.2
    assert all(len(p[schema.PREDICTED]) == 1 for p in pred), "multiclass: exactly one class per item"
    probs = np.array([[p[schema.prob_column(c)] for c in train["labels"]] for p in pred])
    assert np.allclose(probs.sum(1), 1, atol=1e-5), "softmax probabilities"
    assert all(p[schema.PREDICTED][0] == train["labels"][int(np.argmax(row))] for p, row in zip(pred, probs))
    truth = {r["id"]: the_class(source[2][r["id"]]) for r in source[1]}
    assert sum(p[schema.PREDICTED][0] == truth[p[schema.ID]] for p in pred) >= 0.8 * len(pred)


def test_multiclass_scores_a_jsonl_batch_through_a_dataset_override(multiclass, source, tmp_path):
    folder = write_jsonl_batch(source, tmp_path / "batch")
    with pytest.raises(Exception, match="manifest.csv"):  # the contract names manifest.csv, in CSV
        score(multiclass, folder, tmp_path / "refused")
    summary = score(multiclass, folder, tmp_path / "out", dataset={"manifest": "batch.jsonl", "format": "jsonl"})
    assert summary["counts"]["read"] == summary["counts"]["scored"] == 12 and summary["counts"]["dead_lettered"] == 0
    scored = pq.read_table(tmp_path / "out" / "predictions.parquet").to_pylist()
    assert all(len(p[schema.PREDICTED]) == 1 and p[schema.SPLIT] == schema.SCORE_SPLIT for p in scored)
    # the same items scored from a new folder get the probabilities predict gave them
    before = {p[schema.ID]: p for p in multiclass["pred"]}
    for p in scored:
        assert p[schema.PREDICTED] == before[p[schema.ID]][schema.PREDICTED]
        assert abs(p[schema.prob_column("Comedy")] - before[p[schema.ID]][schema.prob_column("Comedy")]) < 1e-4


# ------------------------------------------------------------------------------------------ binary


@pytest.fixture(scope="module")
def binary(source, tmp_path_factory):
    root = tmp_path_factory.mktemp("binary")
    folder = write_variant(source, root / "data", lambda p: "yes" if p["funny_tag"] == "1" else "no")
    return run_all(
        pipeline_params(folder, {"kind": "binary", "positive_name": "funny"}), root, {"tune_thresholds": True}
    )


def test_binary_trains_with_tuned_thresholds_and_predicts_the_positive_class(binary, source):
    train, pred = binary["train"], binary["pred"]
    assert train["task"] == "binary" and train["labels"] == ["funny"]
    assert train["test"]["f1_micro"] >= 0.75, train["test"]
    bundle = torch.load(binary["model"], weights_only=True)
    (threshold,) = bundle["thresholds"]
    assert 0.05 <= threshold <= 0.95 and bundle["train_config"]["tune_thresholds"] is True
    for p in pred:
        assert p[schema.PREDICTED] == (["funny"] if p[schema.prob_column("funny")] >= threshold else [])
    truth = {r["id"]: source[2][r["id"]]["funny_tag"] == "1" for r in source[1]}
    assert sum(bool(p[schema.PREDICTED]) == truth[p[schema.ID]] for p in pred) >= 0.9 * len(pred)


def test_predict_and_score_apply_the_bundles_thresholds(binary, source, tmp_path):
    """Whatever thresholds the bundle carries (tuned on val, or set here to 0.9) decide the labels."""
    bundle = torch.load(binary["model"], weights_only=True)
    strict = copy.deepcopy(bundle)
    strict["thresholds"] = [0.9]
    model = tmp_path / "strict.pt"
    torch.save(strict, model)
    root = binary["manifest"].parents[1]
    run_predict(PredictConfig(device="cpu"), model, binary["manifest"], root / "features", tmp_path / "pred")
    pred = pq.read_table(tmp_path / "pred" / "predictions.parquet").to_pylist()
    probs = np.array([p[schema.prob_column("funny")] for p in pred])
    assert ((probs >= 0.5) & (probs < 0.9)).any(), "the check needs items between the two thresholds"
    assert [bool(p[schema.PREDICTED]) for p in pred] == list(probs >= np.float32(0.9))
    folder = write_variant(source, tmp_path / "batch", lambda p: "")
    summary = score({**binary, "model": model}, folder, tmp_path / "scored")
    scored = pq.read_table(tmp_path / "scored" / "predictions.parquet").to_pylist()
    assert summary["counts"]["scored"] == 64
    assert all(bool(p[schema.PREDICTED]) == (p[schema.prob_column("funny")] >= np.float32(0.9)) for p in scored)


# ------------------------------------------------------------------------------------------ renamed modality


def test_a_renamed_ocr_modality_keeps_its_boxes_in_the_report(source, tmp_path):
    folder = write_variant(source, tmp_path / "data", lambda p: "Comedy" if p["funny_tag"] == "1" else "Drama")
    params = pipeline_params(folder, {"kind": "multilabel"}, modalities=("tags",))
    params["extract"]["modalities"]["poster_text"] = {
        **load_params(REPO / "params.yaml")["extract"]["modalities"]["ocr"],
        "device": "cpu",
    }
    run = run_all(params, tmp_path, {"epochs": 5})
    assert run["summary"]["modality_kinds"] == {"poster_text": "ocr", "tags": "list"}
    elements = pq.read_table(tmp_path / "predictions" / "elements.parquet").to_pylist()
    boxed = [e for e in elements if e[schema.MODALITY] == "poster_text" and e[schema.BOX]]
    assert boxed, "the planted words are read as boxed elements of poster_text"
    page = write_report(
        ReportConfig(items=64, split=None), tmp_path / "predictions", run["manifest"], tmp_path / "report"
    ).read_text()
    assert page.count('class="box ocr') == len(boxed), "every OCR box of poster_text is drawn"


# ------------------------------------------------------------------------------------------ image views


def test_the_report_outlines_the_image_view_that_mattered_most(source, tmp_path):
    folder = write_variant(source, tmp_path / "data", lambda p: "Comedy" if p["funny_tag"] == "1" else "Drama")
    params = pipeline_params(folder, {"kind": "multilabel"}, modalities=("tags",))
    params["extract"]["modalities"]["image"] = {
        **load_params(REPO / "params.yaml")["extract"]["modalities"]["image"],
        "views": ["full", "top", "middle", "bottom"],
        "device": "cpu",
    }
    run = run_all(params, tmp_path, {"epochs": 5})
    elements = pq.read_table(tmp_path / "predictions" / "elements.parquet").to_pylist()
    views = [e for e in elements if e[schema.MODALITY] == "image"]
    assert len(views) == 4 * 64 and all(e[schema.BOX] for e in views), "four boxed views per poster"
    page = write_report(
        ReportConfig(items=64, split=None), tmp_path / "predictions", run["manifest"], tmp_path / "report"
    ).read_text()
    cards = page.split('<article class="card"')[1:]
    assert len(cards) == 64
    for card in cards:
        # the three thirds always; the whole-image view only when it is the one outlined
        assert card.count('class="box view top"') == 1
        assert card.count('class="box view') in (3, 4)
        assert "image view" in card
