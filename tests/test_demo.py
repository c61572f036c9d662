"""The demo generator: deterministic, labels planted exactly as its map says, valid under the contract."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import REPO, ingest_config

from pipeline import demo
from pipeline.config import DatasetConfig, DemoConfig, from_dict, load_params, section
from pipeline.ingest import run_ingest


def gen(tmp_path: Path, name: str, **over) -> Path:
    cfg = from_dict(DemoConfig, {"items": 24, **over}, "demo")
    out = tmp_path / name
    demo.generate(cfg, out)
    return out


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_dataset(tmp_path):
    a, b = gen(tmp_path, "a"), gen(tmp_path, "b")
    assert (a / "manifest.csv").read_bytes() == (b / "manifest.csv").read_bytes()
    assert tree_bytes(a) == tree_bytes(b)
    c = gen(tmp_path, "c", seed=8)
    assert (a / "manifest.csv").read_bytes() != (c / "manifest.csv").read_bytes()


def test_rerun_rewrites_the_folder_completely(tmp_path):
    out = gen(tmp_path, "a", items=30)
    gen(tmp_path, "a", items=10)
    assert len(list((out / "images").glob("*.jpg"))) == 10 and len(read_csv(out / "manifest.csv")) == 10


def truth_of(item: dict[str, str], summary: dict) -> dict[str, bool]:
    """The labels the planted rules give, recomputed from what was planted."""
    return {
        "Ensemble": int(item["faces"]) >= 2,
        "Horror": item["word"] == summary["planted_word"],
        "Romance": item["romance_sentence"] == "1",
        "Comedy": item["funny_tag"] == "1",
        "Classic": int(item["year"]) < summary["classic_before"],
        "Sci-Fi": item["background"] in summary["space_backgrounds"],
    }


@pytest.mark.parametrize("noise", [0.0, 0.1])
def test_labels_follow_the_planted_map(tmp_path, noise):
    out = gen(tmp_path, "d", items=80, label_noise=noise)
    summary = json.loads((out / "planted_labels.json").read_text())
    assert {k: v["modality"] for k, v in summary["labels"].items()} == {
        "Ensemble": "faces",
        "Horror": "ocr",
        "Romance": "description",
        "Comedy": "tags",
        "Classic": "meta",
        "Sci-Fi": "image",
    }
    rows = {r["id"]: r for r in read_csv(out / "manifest.csv")}
    flips = 0
    for item in read_csv(out / "planted_items.csv"):
        row = rows[item["id"]]
        labels = set(row["labels"].split("|"))
        flipped = set(filter(None, item["noisy_labels"].split("|")))
        flips += len(flipped)
        for name, value in truth_of(item, summary).items():
            assert (name in labels) == (value != (name in flipped)), (item["id"], name)
        # the driving modality really carries the signal in the manifest
        assert ("funny" in row["tags"].split("|")) == (item["funny_tag"] == "1")
        assert ("love" in row["description"]) == (item["romance_sentence"] == "1")
        assert row["year"] == item["year"]
        assert len(json.loads(item["face_boxes"])) == int(item["faces"])
        assert row["labels"], "every item has at least one label"
    assert summary["labels"]["Horror"]["positives"] == sum("Horror" in r["labels"].split("|") for r in rows.values())
    if noise == 0:
        assert flips == 0
    else:
        assert 10 <= flips <= 90, f"{flips} flips for 480 label slots at 10% noise"


def test_repo_mapping_ingests_the_demo_without_rejects(tmp_path):
    out = gen(tmp_path, "d", items=20)
    params = load_params(REPO / "params.yaml")
    params["dataset"]["dir"] = str(out)
    ds = section(params, "dataset", DatasetConfig)
    metrics = run_ingest(ds, ingest_config(max_reject_fraction=0.0), tmp_path / "ing", tmp_path / "m.json")
    assert metrics["read"] == metrics["accepted"] == 20
    assert set(metrics["label_names"]) <= set(demo.PLANTED)
