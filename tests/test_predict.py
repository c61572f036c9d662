"""The predict stage on generated feature sets: tables that reconcile, each importance method, splits,
and refusal of features that do not match the bundle."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from test_model import train_cfg, write_synthetic

from pipeline import schema
from pipeline.bundle import load_bundle, predict
from pipeline.features import FeatureMismatchError
from pipeline.predict import PredictConfig, run_predict
from pipeline.report import choose
from pipeline.setdata import FeatureStore
from pipeline.train import fit


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Generated sets (label A lives in modality a, B in b) and three bundles: max, sum, concat."""
    root = tmp_path_factory.mktemp("predict")
    manifest = write_synthetic(root)
    bundles = {}
    for name, model in (("max", {}), ("sum", {"pooling": "sum"}), ("concat", {"architecture": "concat"})):
        cfg = train_cfg(model={"dim": 16, "dropout": 0.0, "head_hidden": [16], **model})
        res = fit(cfg, manifest, root / "features", root / name, root / f"{name}.json", root / f"{name}.csv")
        bundles[name] = (root / name / "model.pt", res)
    return root, manifest, bundles


def predict_with(trained, name, out, **cfg):
    root, manifest, bundles = trained
    summary = run_predict(
        PredictConfig(device="cpu", **cfg),
        bundles[name][0],
        manifest,
        root / "features",
        out,
        out / "summary-copy.json",
        out / "plot.csv",
    )
    return summary, {
        t: pq.read_table(out / f"{t}.parquet") for t in ("predictions", "importance", "label_importance", "elements")
    }


def test_argmax_outputs_reconcile_and_point_at_the_driving_modality(trained, tmp_path):
    root, manifest, bundles = trained
    summary, t = predict_with(trained, "max", tmp_path)
    n = pq.read_table(manifest).num_rows
    assert t["predictions"].num_rows == n and t["importance"].num_rows == n
    assert t["label_importance"].num_rows == 2 * n
    n_elements = sum(
        sum(len(v) for v in pq.read_table(root / "features" / m / "features.parquet")["vectors"].to_pylist())
        for m in ("a", "b")
    )
    assert t["elements"].num_rows == n_elements
    imp = t["importance"].to_pandas()
    assert (imp["method"] == "argmax").all()
    shares = imp[["share_a", "share_b"]].to_numpy()
    has_elements = shares.sum(1) > 0
    assert np.allclose(shares[has_elements].sum(1), 1, atol=1e-5)
    el = t["elements"].to_pandas()
    assert np.allclose(el.groupby("id")["wins"].sum(), 16, atol=1e-3), "each item's elements win all D dimensions"
    # the same probabilities and metrics as training computed on the test split
    assert summary["metrics"]["test"]["f1_micro"] == pytest.approx(bundles["max"][1]["test"]["f1_micro"], abs=1e-9)
    pred = t["predictions"].to_pandas()
    thresholds = dict(zip(("A", "B"), torch.load(bundles["max"][0], weights_only=True)["thresholds"]))
    assert all(
        set(p) == {lab for lab in ("A", "B") if row[f"prob_{lab}"] >= np.float32(thresholds[lab])}
        for p, (_, row) in zip(pred["predicted"], pred.iterrows())
    ), "the bundle's (tuned) thresholds decide"
    # generated so that A is carried by modality a and B by b: both views must say so
    assert summary["by_label"]["A"]["top_modality"] == "a" and summary["by_label"]["B"]["top_modality"] == "b"
    assert summary["by_label"]["A"]["top_ablation"] == "a" and summary["by_label"]["B"]["top_ablation"] == "b"
    # ablation re-pools the encoded elements without a modality: the same as predicting without it
    net, bundle = load_bundle(bundles["max"][0])
    ids = pq.read_table(manifest)["id"].to_pylist()
    store = FeatureStore.load({m: root / "features" / m for m in ("a", "b")}, ids)
    full = predict(net, store, torch.arange(n), "multilabel")
    li = t["label_importance"].to_pandas()
    for m in ("a", "b"):
        without = predict(net, store, torch.arange(n), "multilabel", drop=frozenset({m}))
        assert np.allclose(li[f"drop_{m}"].to_numpy().reshape(n, 2), (full - without).numpy(), atol=1e-5)
    assert json.loads((tmp_path / "summary.json").read_text())["items"] == n
    assert (tmp_path / "importance_by_label.svg").read_text().startswith("<svg")
    assert (tmp_path / "plot.csv").read_text().splitlines()[0] == "label,modality,share,ablation_drop"


def test_sum_pooling_reports_contributions(trained, tmp_path):
    summary, t = predict_with(trained, "sum", tmp_path)
    imp = t["importance"].to_pandas()
    assert (imp["method"] == "contribution").all() and summary["method"] == "contribution"
    assert t["elements"].column("wins").null_count == t["elements"].num_rows, "no winners without max pooling"
    assert summary["by_label"]["A"]["top_modality"] == "a" and summary["by_label"]["B"]["top_modality"] == "b"


def test_concat_baseline_gets_ablation_only(trained, tmp_path):
    summary, t = predict_with(trained, "concat", tmp_path)
    imp = t["importance"].to_pandas()
    assert (imp["method"] == "ablation").all() and imp["share_a"].isna().all()
    assert t["elements"].num_rows == 0
    li = t["label_importance"].to_pandas()
    assert li["share_a"].isna().all() and li["drop_a"].notna().all()
    assert summary["by_label"]["A"]["top_ablation"] == "a" and "share" not in summary["by_label"]["A"]


def test_splits_and_switches(trained, tmp_path):
    summary, t = predict_with(trained, "max", tmp_path, splits=("test",), ablation=False, label_conditional=False)
    assert set(t["predictions"]["split"].to_pylist()) == {"test"} and list(summary["splits"]) == ["test"]
    li = t["label_importance"].to_pandas()
    assert li["drop_a"].isna().all() and li["share_a"].isna().all()


def test_features_that_do_not_match_the_bundle_are_refused(trained, tmp_path):
    root, manifest, bundles = trained
    other = tmp_path / "other.pt"
    raw = torch.load(bundles["max"][0], weights_only=True)
    raw["provenance"]["b"]["weights_sha256"] = "f" * 64
    torch.save(raw, other)
    with pytest.raises(FeatureMismatchError, match=r"b\.weights_sha256: model has 'fff"):
        run_predict(PredictConfig(device="cpu"), other, manifest, root / "features", tmp_path / "out")
    # features of another manifest
    moved = tmp_path / "manifest.parquet"
    table = pq.read_table(manifest)
    pq.write_table(table.slice(0, 10).replace_schema_metadata(table.schema.metadata), moved)
    with pytest.raises(FeatureMismatchError, match="another manifest"):
        run_predict(PredictConfig(device="cpu"), bundles["max"][0], moved, root / "features", tmp_path / "out2")
    shutil.rmtree(tmp_path / "out", ignore_errors=True)


def test_report_sample_covers_every_predicted_label_first():
    pred = [
        {schema.ID: f"i{k}", "predicted": labs, "prob_A": pa, "prob_B": pb}
        for k, (labs, pa, pb) in enumerate([(["A"], 0.9, 0.1), (["A"], 0.95, 0.2), ([], 0.1, 0.1), (["B"], 0.2, 0.7)])
    ]
    picked = choose(pred, ["A", "B"], 3)
    assert picked[:2] == [1, 3], "the most confident A, then the most confident B"
    assert len(picked) == 3 and len(set(picked)) == 3
    assert choose(pred, ["A", "B"], 10) == choose(pred, ["A", "B"], 10) and len(choose(pred, ["A", "B"], 10)) == 4


def test_tables_written_in_chunks_equal_one_chunk(trained, tmp_path, monkeypatch):
    """predict writes its tables a chunk of items at a time; the chunking changes nothing."""
    import pipeline.predict as P

    _, whole = predict_with(trained, "max", tmp_path / "whole")
    original = P.write_outputs
    monkeypatch.setattr(P, "write_outputs", lambda pred, out, meta: original(pred, out, meta, chunk_items=7))
    _, chunked = predict_with(trained, "max", tmp_path / "chunked")
    for name in whole:
        a, b = whole[name].to_pylist(), chunked[name].to_pylist()
        assert len(a) == len(b) and len(a) > 7, name
        for ra, rb in zip(a, b):
            assert ra.keys() == rb.keys()
            for k in ra:
                if isinstance(ra[k], float):
                    assert np.isclose(ra[k], rb[k], atol=1e-6, equal_nan=True), (name, k)
                else:
                    assert ra[k] == rb[k], (name, k)
    assert len(pq.ParquetFile(tmp_path / "chunked" / "elements.parquet").metadata.to_dict()["row_groups"]) > 1
