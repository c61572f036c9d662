"""Shared fixtures: tiny generated datasets, written fresh into tmp_path by each test."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipeline.config import DatasetConfig, IngestConfig, from_dict

REPO = Path(__file__).resolve().parents[1]


def write_image(path: Path, size: tuple[int, int] = (32, 48), seed: int = 0, fmt: str = "JPEG") -> Path:
    """A small random RGB image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format=fmt)
    return path


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def dataset_config(root: Path, **over: Any) -> DatasetConfig:
    """The mapping used by the fixtures; keyword arguments override keys."""
    raw: dict[str, Any] = {
        "dir": str(root),
        "format": "csv",
        "manifest": "manifest.csv",
        "id": "id",
        "image": "image",
        "text": ["title"],
        "lists": {"tags": "|"},
        "numeric": ["year"],
        "categorical": ["country"],
        "labels": {"column": "labels", "kind": "multilabel", "separator": "|"},
    }
    raw.update(over)
    return from_dict(DatasetConfig, raw, "dataset")


def ingest_config(**over: Any) -> IngestConfig:
    return from_dict(IngestConfig, {"max_reject_fraction": 1.0, "workers": 2, **over}, "ingest")


def copy_project(root: Path, **params_over: dict[str, Any]) -> Path:
    """A copy of the pipeline (dvc.yaml, params.yaml, pipeline/, stages/) in `root`, with params
    sections updated key by key from `params_over` (e.g. demo={"items": 16})."""
    import shutil

    import yaml

    root.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    for folder in ("pipeline", "stages"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in params_over.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def ingested_demo(root: Path, items: int, seed: int, cache_dir: Path | None) -> tuple[dict[str, Any], Path]:
    """A tiny demo dataset generated under `root` and ingested with the shipped params (extractors on
    the CPU, the per-item cache at `cache_dir`): (params, manifest path)."""
    from pipeline import demo
    from pipeline.config import DemoConfig, load_params, section
    from pipeline.ingest import run_ingest

    demo.generate(from_dict(DemoConfig, {"items": items, "seed": seed}, "demo"), root / "raw")
    params = load_params(REPO / "params.yaml")
    params["dataset"]["dir"] = str(root / "raw")
    params["extract"]["job"]["cache_dir"] = str(cache_dir) if cache_dir else None
    for m in params["extract"]["modalities"].values():
        if "device" in m:
            m["device"] = "cpu"
    run_ingest(section(params, "dataset", DatasetConfig), ingest_config(), root / "ingest", root / "ingest.json")
    return params, root / "ingest" / "manifest.parquet"


def extract_modality(params: dict[str, Any], name: str, manifest: Path, out_dir: Path, metrics: Path) -> dict[str, Any]:
    """Run the extraction of modality `name` as its stage does, with the typed sections of `params`."""
    from pipeline import extract
    from pipeline.config import section

    spec = section(params, f"extract.modalities.{name}", lambda raw, where: extract.modality(name, raw, where))
    return extract.run_extraction(spec, section(params, "extract.job", extract.JobConfig), manifest, out_dir, metrics)


HEADER = ["id", "image", "title", "tags", "year", "country", "labels"]


@pytest.fixture
def good_dataset(tmp_path: Path) -> Path:
    """A clean CSV dataset of 10 items."""
    root = tmp_path / "ds"
    rows = []
    for i in range(10):
        write_image(root / "img" / f"{i}.jpg", seed=i)
        rows.append(
            [f"item{i}", f"img/{i}.jpg", f"Title {i}", "a|b" if i % 2 else "", 1990 + i, "US", "x|y" if i % 3 else "x"]
        )
    write_csv(root / "manifest.csv", HEADER, rows)
    return root


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The whole pipeline, with the shipped params.yaml, on the embedded demo dataset (300 items and
    an unlabelled batch of 12 with one cut-short image): generate, ingest, extract every modality
    with Beam, train, predict. Shared by the faithfulness, scoring and report tests (a few minutes)."""
    from types import SimpleNamespace

    from pipeline import demo
    from pipeline.config import BaseConfig, DemoConfig, load_params, section
    from pipeline.ingest import run_ingest
    from pipeline.predict import PredictConfig, run_predict
    from pipeline.train import TrainConfig, fit

    root = tmp_path_factory.mktemp("demo_run")
    params = load_params(REPO / "params.yaml")
    params["demo"].update(unlabelled=12, unlabelled_broken=1)
    params["extract"]["job"]["cache_dir"] = str(root / "cache")
    demo.generate(section(params, "demo", DemoConfig), root / "raw", root / "unlabelled")
    dataset = section({"dataset": {**params["dataset"], "dir": str(root / "raw")}}, "dataset", DatasetConfig)
    run_ingest(dataset, section(params, "ingest", IngestConfig), root / "ingest", root / "metrics" / "ingest.json")
    manifest = root / "ingest" / "manifest.parquet"
    for modality in params["extract"]["modalities"]:
        extract_modality(
            params, modality, manifest, root / "features" / modality, root / "metrics" / f"{modality}.json"
        )
    train = fit(
        section(params, "train", TrainConfig),
        manifest,
        root / "features",
        root / "model",
        root / "metrics" / "train.json",
        root / "metrics" / "curve.csv",
        seed=section(params, "base", BaseConfig).seed,
    )
    summary = run_predict(
        section(params, "predict", PredictConfig),
        root / "model" / "model.pt",
        manifest,
        root / "features",
        root / "predictions",
    )
    return SimpleNamespace(
        root=root, params=params, manifest=manifest, model=root / "model" / "model.pt", train=train, summary=summary
    )


@pytest.fixture(scope="session", autouse=True)
def repo_data_untouched():
    """No test may write the repository's own per-item cache (params.yaml's relative cache_dir resolves
    against the working directory): each sets cache_dir under its tmp_path."""
    cache = REPO / "data" / "cache"
    existed = cache.exists()
    yield
    assert existed or not cache.exists(), f"a test wrote {cache}; give it a cache_dir under tmp_path"


@pytest.fixture(scope="session", autouse=True)
def user_cache_in_tmp(tmp_path_factory):
    """What extractors keep in the user's cache folder when a run has no extraction cache (OCR's exported
    graphs) goes to a folder of this test session, not the home directory."""
    saved = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("user-cache"))
    yield
    if saved is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = saved


def write_features(table, dim: int, meta: dict[str, Any], path: Path):
    """Write a whole feature table (sorted by id here) as extraction writes one; returns the table written."""
    from pipeline import features, schema

    table = table.cast(features.feature_schema(dim)).sort_by(schema.ID)
    with features.FeatureWriter(path, dim, meta) as writer:
        writer.write(table)
    return table


def write_generated(
    root: Path, ids: list[str], splits: list[str], labels: list[list[str]], sets: dict[str, tuple[int, list[Any]]]
) -> Path:
    """A multilabel manifest of generated items (labels A and B) and one synthetic feature set per
    modality (`sets`: name -> (dim, the item's vectors, one (n, dim) array per item)); returns the manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import features, schema

    msch = schema.with_metadata(
        schema.manifest_schema([], [], [], []), {"kind": "manifest", "task": "multilabel", "label_names": ["A", "B"]}
    )
    manifest = root / "manifest.parquet"
    rows = [
        {"id": i, "split": s, "source_row": k + 1, "labels": lab}
        for k, (i, s, lab) in enumerate(zip(ids, splits, labels))
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=msch), manifest)
    sha = features.file_sha256(manifest)
    for name, (dim, vectors) in sets.items():
        rows = [
            {
                "id": i,
                "vectors": v.tolist(),
                "elements": [features.element(index=j) for j in range(len(v))],
                "category_ids": None,
            }
            for i, v in zip(ids, vectors)
        ]
        meta = {
            "modality": name,
            "kind": "text",
            "extractor": "synthetic",
            "model_id": f"gen-{name}",
            "weights_sha256": "0" * 64,
            "dim": dim,
            "manifest_sha256": sha,
        }
        write_features(
            pa.Table.from_pylist(rows, schema=features.feature_schema(dim)),
            dim,
            meta,
            root / "features" / name / "features.parquet",
        )
    return manifest
