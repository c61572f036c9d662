"""An extractor kind is one class: a toy one defined in this file alone (nothing under pipeline/ knows
it) runs through extract (the real Beam job and cache), train, predict and score."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import dataset_config, ingest_config, write_csv

from pipeline import extractors, features
from pipeline.config import IngestConfig, from_dict
from pipeline.extract import JobConfig, modality, run_extraction
from pipeline.extractors.base import Extractor, ItemResult, SetModelHandler, register
from pipeline.ingest import run_ingest
from pipeline.predict import PredictConfig, run_predict
from pipeline.score import ScoreConfig, run_score
from pipeline.train import TrainConfig, fit

DIM = 8


@dataclass(frozen=True)
class WordsConfig:
    kind: str = "toy-words"
    column: str = ""
    batch_size: int = 4
    min_length: int = 1  # words shorter than this are not elements


class HashedWords:
    """A 'model' that needs no file: each word hashed into a fixed random vector."""


class WordsHandler(SetModelHandler):
    def load(self) -> HashedWords:
        return HashedWords()  # an object: Beam keeps a weak reference to the model (a bare dict cannot have one)

    def infer_batch(self, batch: list[list[str]], model: HashedWords) -> list[ItemResult]:
        out = []
        for words in batch:
            vecs = [
                np.random.default_rng(int(hashlib.sha256(w.encode()).hexdigest()[:8], 16)).standard_normal(DIM)
                for w in words
            ]
            out.append(
                ItemResult(
                    np.asarray(vecs, dtype=np.float32).reshape(-1, DIM),
                    [features.element(index=i, text=w) for i, w in enumerate(words)],
                )
            )
        return out


@register
class WordsExtractor(Extractor):
    """Every word of a text column: one element each."""

    kind = "toy-words"
    config_class = WordsConfig
    handler_class = WordsHandler
    sources = (__name__,)
    libraries = ("numpy",)
    filter_params = ("min_length",)

    def input_columns(self) -> list[str]:
        return [self.cfg.column]

    def describe_files(self) -> dict[str, Any]:
        return {"extractor": "toy-words", "model_id": "hashed-words", "weights_sha256": "0" * 64, "dim": DIM}

    def prepare(self, row: dict[str, Any], root: Path) -> list[str] | None:
        words = str(row.get(self.cfg.column) or "").lower().split()
        return words or None

    def select(self, elements: list[dict[str, Any]]) -> list[int]:
        return [i for i, e in enumerate(elements) if len(e["text"]) >= self.cfg.min_length]


WORDS = {"A": ["ghost", "haunted", "night"], "B": ["love", "wedding", "kiss"]}
FILLER = ["the", "a", "story", "of", "city", "man", "day"]


def write_words_dataset(root: Path, n: int = 120, seed: int = 7) -> Path:
    rng = random.Random(seed)
    rows = []
    for k in range(n):
        labels = [lab for lab in ("A", "B") if rng.random() < 0.45] or ["C"]
        words = rng.sample(FILLER, 3) + [rng.choice(WORDS[lab]) for lab in labels if lab in WORDS]
        rng.shuffle(words)
        rows.append([f"w{k:03d}", " ".join(words), "|".join(labels)])
    write_csv(root / "manifest.csv", ["id", "plot", "labels"], rows)
    return root


def test_the_toy_kind_is_registered_from_this_file_alone():
    assert extractors.get("toy-words") is WordsExtractor and "toy-words" in extractors.kinds()
    spec = modality("words", {"kind": "toy-words", "column": "plot"})
    assert spec.kind == "toy-words" and spec.cfg == WordsConfig(column="plot")


@pytest.mark.slow
def test_it_runs_through_extract_train_predict_and_score(tmp_path):
    raw = write_words_dataset(tmp_path / "raw")
    ds = dataset_config(raw, image=None, image_required=False, text=["plot"], lists={}, numeric=[], categorical=[])
    run_ingest(ds, ingest_config(), tmp_path / "ingest", tmp_path / "ingest.json")
    manifest = tmp_path / "ingest" / "manifest.parquet"
    job = JobConfig(cache_dir=str(tmp_path / "cache"))
    raw_params = {"kind": "toy-words", "column": "plot", "min_length": 3}
    m = run_extraction(
        modality("words", raw_params), job, manifest, tmp_path / "features" / "words", tmp_path / "w.json"
    )
    assert (m["items_in"], m["written"], m["failed"]) == (120, 120, 0)
    table, meta = features.read_features(tmp_path / "features" / "words" / "features.parquet")
    assert meta["kind"] == "toy-words" and meta["dim"] == DIM
    assert all(len(e["text"]) >= 3 for es in table["elements"].to_pylist() for e in es), "the kind's filter ran"
    again = run_extraction(
        modality("words", {**raw_params, "min_length": 1}), job, manifest, tmp_path / "features2", tmp_path / "w2.json"
    )
    assert (again["computed"], again["reused"]) == (0, 120), "a filter param reuses the cached sets"

    cfg = from_dict(
        TrainConfig,
        {
            "epochs": 30,
            "batch_size": 16,
            "lr": 0.01,
            "device": "cpu",
            "model": {"dim": 16, "dropout": 0.0, "head_hidden": [16]},
        },
        "train",
    )
    result = fit(cfg, manifest, tmp_path / "features", tmp_path / "model", tmp_path / "train.json", tmp_path / "c.csv")
    assert result["test"]["mean_average_precision"] > result["test_label_frequency_baseline"]["mean_average_precision"]
    run_predict(
        PredictConfig(device="cpu"), tmp_path / "model" / "model.pt", manifest, tmp_path / "features", tmp_path / "pred"
    )
    elements = pq.read_table(tmp_path / "pred" / "elements.parquet").to_pylist()
    assert any(e["text"] in WORDS["A"] for e in elements)

    score_cfg = from_dict(ScoreConfig, {"device": "cpu", "write_report": False}, "score")
    summary = run_score(
        score_cfg,
        tmp_path / "model" / "model.pt",
        raw,
        tmp_path / "scored",
        job,
        from_dict(IngestConfig, {"max_reject_fraction": 1.0}, "ingest"),
    )
    assert summary["counts"]["scored"] == 120 and summary["extraction"]["words"]["reused"] == 120
    predicted = {r["id"]: r for r in pq.read_table(tmp_path / "pred" / "predictions.parquet").to_pylist()}
    for r in pq.read_table(tmp_path / "scored" / "predictions.parquet").to_pylist():
        if r["id"] in predicted:
            assert abs(r["prob_A"] - predicted[r["id"]]["prob_A"]) < 1e-5
