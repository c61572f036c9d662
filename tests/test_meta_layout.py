"""Meta features whose layout is defined by column name and order: any number of numeric and
categorical columns in any order train, predict and score identically, and the cache key separates
columns whose values are swapped."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import dataset_config, ingest_config, write_csv

from pipeline import bundle as bundle_mod
from pipeline import features
from pipeline.config import IngestConfig, from_dict
from pipeline.extract import JobConfig, modality, run_extraction
from pipeline.extractors import meta
from pipeline.ingest import run_ingest
from pipeline.predict import PredictConfig, run_predict
from pipeline.score import ScoreConfig, run_score
from pipeline.train import TrainConfig, fit

NUMERIC = ["zeta", "alpha", "mid"]  # not alphabetical, on purpose
CATEGORICAL = ["studio", "country"]
STUDIOS = ["north", "east", "south", "west", "lab"]
COUNTRIES = ["US", "FR", "JP"]


def write_meta_dataset(root: Path, n: int = 90, seed: int = 3) -> Path:
    """A folder whose labels follow its metadata: A from `alpha` (a numeric column that is not first),
    B from `studio` (a categorical column that is not first alphabetically)."""
    rng = random.Random(seed)
    rows = []
    for k in range(n):
        zeta, alpha, mid = rng.gauss(100, 20), rng.gauss(0, 1), rng.uniform(-5, 5)
        studio, country = rng.choice(STUDIOS), rng.choice(COUNTRIES)
        labels = [name for name, on in (("A", alpha > 0), ("B", studio in ("north", "lab"))) if on] or ["C"]
        cells = [None if rng.random() < 0.1 else round(v, 4) for v in (zeta, alpha, mid)]
        rows.append([f"m{k:03d}", *["" if v is None else v for v in cells], studio, country, "|".join(labels)])
    write_csv(root / "manifest.csv", ["id", *NUMERIC, *CATEGORICAL, "labels"], rows)
    return root


def dataset(root: Path):
    return dataset_config(
        root, image=None, image_required=False, text=[], lists={}, numeric=NUMERIC, categorical=CATEGORICAL
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("meta_layout")
    raw = write_meta_dataset(root / "raw")
    run_ingest(dataset(raw), ingest_config(), root / "ingest", root / "ingest.json")
    manifest = root / "ingest" / "manifest.parquet"
    job = JobConfig(cache_dir=str(root / "cache"))
    run_extraction(modality("meta", {"kind": "meta"}), job, manifest, root / "features" / "meta", root / "meta.json")
    cfg = from_dict(
        TrainConfig,
        {"epochs": 8, "batch_size": 16, "device": "cpu", "model": {"dim": 8, "dropout": 0.0, "head_hidden": [8]}},
        "train",
    )
    fit(cfg, manifest, root / "features", root / "model", root / "train.json", root / "curve.csv", seed=0)
    return root, raw, manifest, job


def predict_all(root: Path, manifest: Path, out: Path) -> None:
    run_predict(PredictConfig(device="cpu", splits=None), root / "model" / "model.pt", manifest, root / "features", out)


def test_the_layout_follows_the_configured_column_order(trained):
    root, _, _, _ = trained
    table, fmeta = features.read_features(root / "features" / "meta" / "features.parquet")
    assert [s["column"] for s in fmeta["stats"]["numeric"]] == NUMERIC
    assert [c for c, _ in features.vocabularies(fmeta)] == CATEGORICAL
    assert features.vocabularies(fmeta)[0][1] == sorted({s for s in STUDIOS})  # the studio vocabulary, first
    _, bundle = bundle_mod.load_bundle(root / "model" / "model.pt")
    assert bundle.categories["meta"] == [len(STUDIOS), len(COUNTRIES)]
    assert [s["column"] for s in bundle.provenance["meta"].stats["numeric"]] == NUMERIC
    assert [c for c, _ in bundle.provenance["meta"].vocabularies()] == CATEGORICAL


def test_scoring_the_training_rows_gives_predicts_probabilities(trained, tmp_path):
    root, raw, manifest, job = trained
    predict_all(root, manifest, tmp_path / "pred")
    cfg = from_dict(ScoreConfig, {"device": "cpu", "write_report": False}, "score")
    run_score(
        cfg,
        root / "model" / "model.pt",
        raw,
        tmp_path / "scored",
        job,
        from_dict(IngestConfig, {"max_reject_fraction": 1.0}, "ingest"),
    )
    predicted = {r["id"]: r for r in pq.read_table(tmp_path / "pred" / "predictions.parquet").to_pylist()}
    scored = {r["id"]: r for r in pq.read_table(tmp_path / "scored" / "predictions.parquet").to_pylist()}
    assert set(scored) == set(predicted) and len(scored) == 90
    for item, row in scored.items():
        for key in ("prob_A", "prob_B", "prob_C"):
            assert abs(row[key] - predicted[item][key]) <= 1e-5, (item, key, row[key], predicted[item][key])
    # the scored features equal the training features element for element (same slots, same ids)
    train_rows = {r["id"]: r for r in pq.read_table(root / "features" / "meta" / "features.parquet").to_pylist()}
    for r in pq.read_table(tmp_path / "scored" / "features" / "meta" / "features.parquet").to_pylist():
        assert r["category_ids"] == train_rows[r["id"]]["category_ids"]
        assert np.allclose(r["vectors"], train_rows[r["id"]]["vectors"], atol=1e-6)


def test_element_records_name_each_categorical_value_under_its_own_column(trained, tmp_path):
    root, _, manifest, _ = trained
    predict_all(root, manifest, tmp_path / "pred")
    source = {r["id"]: r for r in pq.read_table(manifest).to_pylist()}
    elements = pq.read_table(tmp_path / "pred" / "elements.parquet").to_pylist()
    texts = [(e["id"], e["text"]) for e in elements if e.get("text") and ": " in (e["text"] or "")]
    assert texts
    for item, text in texts:
        column, value = text.split(": ", 1)
        assert value == source[item][column], (item, text)


def test_the_cache_key_separates_swapped_columns(tmp_path):
    """Two items whose values are each other's under swapped column names never share a key."""
    stats = {
        "numeric": [{"column": "a", "mean": 0.0, "std": 1.0, "n": 2}, {"column": "b", "mean": 0.0, "std": 1.0, "n": 2}],
        "categorical": [],
    }
    swapped = {"numeric": stats["numeric"][::-1], "categorical": []}
    assert meta.item_input([1.0, 2.0], stats) != meta.item_input([2.0, 1.0], swapped)
    from pipeline import cache

    fp = cache.fingerprint(meta.describe_stats(stats), {}, (), {})
    fp_swapped = cache.fingerprint(meta.describe_stats(swapped), {}, (), {})
    assert fp != fp_swapped, "the column order is part of the fingerprint"
    assert cache.item_key(fp, meta.item_input([1.0, 2.0], stats)) != cache.item_key(
        fp, meta.item_input([2.0, 1.0], stats)
    )
    r1, r2 = meta.Encoder(stats)({"a": 1.0, "b": 2.0}), meta.Encoder(swapped)({"a": 1.0, "b": 2.0})
    assert r1.vectors.tolist() == [[1.0, 0.0, 2.0, 0.0]] and r2.vectors.tolist() == [[2.0, 0.0, 1.0, 0.0]]


def test_reordering_columns_never_serves_the_other_orders_vectors(tmp_path):
    """Extract with numeric [alpha, zeta], then with [zeta, alpha] on the same cache: every vector follows
    its own order (the second run computes, it does not reuse the first's entries)."""
    raw = write_meta_dataset(tmp_path / "raw", n=30)
    run_ingest(dataset(raw), ingest_config(), tmp_path / "ingest", tmp_path / "ingest.json")
    manifest, job = tmp_path / "ingest" / "manifest.parquet", JobConfig(cache_dir=str(tmp_path / "cache"))
    got = {}
    for order in (["alpha", "zeta"], ["zeta", "alpha"]):
        name = "-".join(order)
        spec = modality("meta", {"kind": "meta", "numeric": order, "categorical": []})
        m = run_extraction(spec, job, manifest, tmp_path / name, tmp_path / f"{name}.json")
        got[name] = (
            m,
            {r["id"]: r["vectors"] for r in pq.read_table(tmp_path / name / "features.parquet").to_pylist()},
        )
    assert got["zeta-alpha"][0]["reused"] == 0
    for item, vecs in got["alpha-zeta"][1].items():
        a = np.asarray(vecs[0])
        b = np.asarray(got["zeta-alpha"][1][item][0])
        assert np.allclose(a[[2, 3, 0, 1]], b), item


def test_a_format_1_bundle_is_migrated_in_the_order_it_was_trained(trained, tmp_path):
    """Bundles of the previous format kept meta statistics as objects (read back sorted); loading one puts
    them in the order extraction used (the params', else the manifest's), so scoring stays right."""
    root, _, _, _ = trained
    raw = torch.load(root / "model" / "model.pt", weights_only=True)
    rec = raw["provenance"]["meta"]
    old_stats = {
        "numeric": {s["column"]: {k: v for k, v in s.items() if k != "column"} for s in rec["stats"]["numeric"]},
        "categorical": {s["column"]: s["values"] for s in rec["stats"]["categorical"]},
    }
    old = {
        **raw,
        "format": 1,
        "provenance": {
            "meta": {
                **rec,
                "stats": dict(sorted(old_stats.items())),
                "categorical": dict(sorted(old_stats["categorical"].items())),
            }
        },
    }
    torch.save(old, tmp_path / "old.pt")
    _, migrated = bundle_mod.load_bundle(tmp_path / "old.pt")
    assert migrated.format == bundle_mod.BUNDLE_FORMAT
    assert migrated.provenance["meta"].stats == rec["stats"]
    assert migrated.provenance["meta"].weights_sha256 == rec["weights_sha256"]
