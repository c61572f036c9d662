"""easyocr's networks on ONNX Runtime / OpenVINO: the same reads as easyocr's torch path, graphs exported
once and rebuilt when damaged, and what runs them in the cache key.

Configuration checks run in the quick loop; everything that loads easyocr is marked slow."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from pipeline import extract, features
from pipeline.config import ConfigError
from pipeline.extractors import base, ocr, ocr_runtime

WORDS = ("FEAR", "The Last Night", "2019", "Coming Soon", "DARK", "A Film By", "hello world", "ESCAPE")


def text_images() -> list[np.ndarray]:
    """Generated posters: words of several sizes and colours on plain and noisy backgrounds, one blank."""
    rng = np.random.default_rng(7)
    out = []
    for i in range(6):
        bg = tuple(int(v) for v in rng.integers(150, 255, 3))
        img = Image.new("RGB", (320 + 40 * i, 240), bg)
        draw = ImageDraw.Draw(img)
        for j in range(2 + i % 3):
            word = WORDS[(i * 3 + j) % len(WORDS)]
            size = int(rng.integers(18, 46))
            draw.text((20 + 10 * j, 20 + 70 * j), word, font=ImageFont.load_default(size=size), fill=(10, 10, 30 * j))
        arr = np.asarray(img).copy()
        if i % 2:
            arr = np.clip(arr.astype(int) + rng.integers(-20, 20, arr.shape), 0, 255).astype(np.uint8)
        out.append(arr)
    out.append(np.full((120, 200, 3), 255, np.uint8))
    return out


def reads(model: ocr.OcrModel, images: list[np.ndarray]) -> list[list[tuple[list[float], str, float]]]:
    return [[(ocr.box_of(p), t, float(c)) for p, t, c in found] for found in model.read(images, 2560, 10)]


def load(tmp_path, **over) -> ocr.OcrModel:
    return ocr.OcrModel(ocr.OcrConfig(device="cpu", **over), "cpu", tmp_path / "graphs")


def assert_same_reads(got, want, conf_tol: float = 1e-4) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert [t for _, t, _ in g] == [t for _, t, _ in w]
        assert len(g) == len(w)
        for (gb, _, gc), (wb, _, wc) in zip(g, w):
            assert np.allclose(gb, wb, atol=1.0)  # whole pixels: one threshold flip at most
            assert abs(gc - wc) <= conf_tol


# ------------------------------------------------------------------ configuration (quick)


@pytest.mark.parametrize(
    "over, match",
    [
        ({"runtime": "tensorrt"}, "not one of"),
        ({"precision": "fp16"}, "not one of"),
        ({"runtime": "torch", "precision": "fp32"}, "runtime torch runs easyocr's own precision"),
        ({"runtime": "onnxruntime", "precision": "bf16"}, "bf16 needs runtime openvino"),
        ({"runtime": "openvino", "precision": "int8"}, "int8 needs runtime onnxruntime"),
        ({"parallel_images": 0}, "ocr.parallel_images: must be >= 1"),
    ],
)
def test_impossible_runtime_settings_are_refused_with_the_param(over, match):
    with pytest.raises(ConfigError, match=match):
        extract.modality("ocr", {"kind": "ocr", **over})


def test_what_runs_the_networks_is_in_the_cache_key_and_the_threads_are_not():
    def key(**over):
        spec = extract.modality("ocr", {"kind": "ocr", "device": "cpu", **over})
        return extract.fingerprint(spec, spec.extractor.describe_files())[0]

    default = key()
    # device is not a cache param: only what runs the networks (easyocr's float recogniser on CUDA) differs
    assert key(device="cuda:0") != default
    assert key(runtime="torch") != default
    assert key(precision="fp32") != default
    assert key(runtime="openvino") != default
    assert key(parallel_images=1) == default == key(parallel_images=2)  # the same reads (tested below)
    runs = ocr.OcrExtractor(ocr.OcrConfig(device="cpu")).describe_files()["runs_on"]
    assert runs["detector"].startswith(f"onnxruntime {ocr_runtime.runtime_version('onnxruntime')} fp32")
    assert "easyocr-dynamic-int8" in runs["recogniser"]
    # on CUDA easyocr's own GPU path runs (float recogniser): a different key from any CPU setting
    assert ocr.runs_on(ocr.OcrConfig(), "cuda:0")["recogniser"].endswith("cuda fp32")


def test_scoring_refuses_features_read_by_other_networks_and_accepts_older_bundles():
    described = ocr.OcrExtractor(ocr.OcrConfig(device="cpu")).describe_files()
    gpu_trained = {**described, "runs_on": ocr.runs_on(ocr.OcrConfig(), "cuda:0")}
    with pytest.raises(features.FeatureMismatchError, match="runs_on"):
        extract.check_extractor("ocr", gpu_trained, described)
    before_runtimes = {k: v for k, v in described.items() if k != "runs_on"}
    extract.check_extractor("ocr", before_runtimes, described)


def test_a_graph_goes_where_it_can_be_written(tmp_path, monkeypatch):
    """A read-only or full cache folder: the graph is exported to the user's cache folder instead."""
    real = ocr_runtime._write_aside
    blocked = tmp_path / "read-only"

    def write(path, build):
        if blocked in path.parents:
            raise PermissionError(13, "Read-only file system")
        real(path, build)

    monkeypatch.setattr(ocr_runtime, "_write_aside", write)
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"not really weights")
    path = ocr_runtime.graph(blocked, weights, "g.onnx", lambda p: p.write_bytes(b"graph"))
    assert path.parent.parent == ocr_runtime.default_folder() and path.read_bytes() == b"graph"


def test_the_graph_folder_changes_with_the_exporter(tmp_path, monkeypatch):
    from pipeline import cache

    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"w")
    tag = ocr_runtime.export_tag(weights)
    real = cache.installed_version
    monkeypatch.setattr(cache, "installed_version", lambda d: "9.9" if d == "onnxruntime" else real(d))
    assert ocr_runtime.export_tag(weights) != tag
    monkeypatch.setattr(cache, "installed_version", real)
    weights.write_bytes(b"other weights")
    assert ocr_runtime.export_tag(weights) != tag


def test_a_worker_running_the_networks_otherwise_refuses_the_job():
    ext = ocr.OcrExtractor(ocr.OcrConfig(device="cpu"))
    planned = {**ext.describe_files(), "runs_on": {"detector": "torch 0.0 fp32", "recogniser": "other"}}
    with pytest.raises(base.MissingModelError, match="runs_on"):
        ext.handler(planned).load_model()


def test_the_job_lends_its_cache_folder_for_graphs(tmp_path):
    ext = ocr.OcrExtractor(ocr.OcrConfig())
    assert ext.graph_folder() == ocr_runtime.default_folder()
    ext.artifacts = tmp_path / ".artifacts"
    assert ext.graph_folder() == tmp_path / ".artifacts" / "ocr-onnx"


# ------------------------------------------------------------------ the graphs against torch (slow)


@pytest.fixture(scope="module")
def images():
    return text_images()


@pytest.fixture(scope="module")
def torch_reads(images, tmp_path_factory):
    """Today's reads: easyocr's torch path, one image at a time."""
    return reads(load(tmp_path_factory.mktemp("torch"), runtime="torch", parallel_images=1), images)


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_exported_graphs_read_what_easyocr_reads(runtime, images, torch_reads, tmp_path):
    assert sum(len(r) for r in torch_reads) >= 8, "the generated images must give boxes to compare"
    model = load(tmp_path, runtime=runtime, parallel_images=2)  # OpenVINO's request pool in use
    assert_same_reads(reads(model, images), torch_reads)


@pytest.mark.slow
def test_images_read_in_parallel_read_the_same(images, torch_reads, tmp_path):
    import torch

    threads = torch.get_num_threads()
    model = load(tmp_path, parallel_images=2)
    assert model.parallel == 2
    parallel = reads(model, images)
    assert torch.get_num_threads() == threads, "the threads are given back after a batch"
    assert_same_reads(parallel, reads(load(tmp_path, parallel_images=1), images))
    assert_same_reads(parallel, torch_reads)


@pytest.mark.slow
def test_float_recogniser_finds_the_same_boxes(images, torch_reads, tmp_path):
    got = reads(load(tmp_path, precision="fp32"), images)
    for g, w in zip(got, torch_reads, strict=True):
        assert np.allclose([b for b, _, _ in g], [b for b, _, _ in w], atol=1e-3)
    assert list((tmp_path / "graphs").rglob("recogniser.onnx"))


@pytest.mark.slow
def test_int8_detector_is_calibrated_once_and_still_finds_the_words(images, torch_reads, tmp_path):
    got = reads(load(tmp_path, precision="int8"), images)
    (graph,) = (tmp_path / "graphs").rglob("detector-int8-canvas2560.onnx")
    assert ocr_runtime.is_intact(graph)
    found = sum(1 for g, w in zip(got, torch_reads) for _, t, _ in w if t in {x for _, x, _ in g})
    assert found >= 0.5 * sum(len(w) for w in torch_reads)  # a lossy mode: most words, not all


@pytest.mark.slow
def test_a_graph_is_exported_once_and_rebuilt_when_damaged(images, torch_reads, tmp_path, monkeypatch, caplog):
    exports = []
    real = ocr_runtime.export_detector
    monkeypatch.setattr(ocr_runtime, "export_detector", lambda w, out: (exports.append(out), real(w, out)))
    load(tmp_path)
    load(tmp_path)
    assert len(exports) == 1
    (graph,) = (tmp_path / "graphs").rglob("detector.onnx")
    assert ocr_runtime.is_intact(graph) and not list(graph.parent.glob(".*partial"))

    blob = bytearray(graph.read_bytes())
    blob[len(blob) // 2 : len(blob) // 2 + 64] = bytes(64)  # damaged in place: the checksum no longer holds
    graph.write_bytes(bytes(blob))
    with caplog.at_level(logging.WARNING, logger="pipeline.extractors.ocr_runtime"):
        model = load(tmp_path)
    assert len(exports) == 2 and "damaged" in caplog.text
    assert ocr_runtime.is_intact(graph)
    assert_same_reads(reads(model, images[:2]), torch_reads[:2])


@pytest.mark.slow
def test_a_half_written_graph_is_not_used(tmp_path):
    folder = tmp_path / "graphs"
    weights = ocr.ocr_model_dir(ocr.OcrConfig()) / "craft_mlt_25k.pth"

    def dies(out):
        out.write_bytes(b"half a graph")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ocr_runtime.graph(folder, weights, "detector.onnx", dies)
    assert not [p for p in folder.rglob("*") if p.is_file()]  # nothing left in place, nothing aside


@pytest.mark.slow
def test_the_ocr_stage_keeps_its_graphs_in_the_extraction_cache(tmp_path):
    from conftest import extract_modality, ingested_demo

    params, manifest = ingested_demo(tmp_path, items=6, seed=5, cache_dir=tmp_path / "cache")
    params["extract"]["modalities"]["ocr"] = dataclasses.asdict(ocr.OcrConfig()) | {"batch_size": 4}
    metrics = extract_modality(params, "ocr", manifest, tmp_path / "out", tmp_path / "m.json")
    assert metrics["written"] == 6
    assert list((tmp_path / "cache" / ".artifacts" / "ocr-onnx").rglob("detector.onnx"))
    _, meta = features.read_features(tmp_path / "out" / "features.parquet")
    assert meta["runs_on"]["detector"].startswith("onnxruntime ")


@pytest.mark.slow
def test_the_demo_planted_words_are_read_as_before(demo_run):
    """The whole demo through the OCR stage with the shipped params (the default runtime): the planted
    word is read exactly on as many posters as with easyocr's torch path (RESULTS.md: 99.6%)."""
    import csv

    import pyarrow.parquet as pq

    planted = {r["id"]: r for r in csv.DictReader((demo_run.root / "raw" / "planted_items.csv").open())}
    table = pq.read_table(demo_run.root / "features" / "ocr" / "features.parquet", columns=["id", "elements"])
    read = {r["id"]: {e["text"] for e in r["elements"]} for r in table.to_pylist()}
    with_word = [i for i, p in planted.items() if p["word"]]
    rate = sum(planted[i]["word"] in read[i] for i in with_word) / len(with_word)
    assert len(with_word) > 100 and rate >= 0.996, rate


def test_exports_killed_long_ago_are_cleaned_up_and_recent_ones_left(tmp_path):
    import os
    import time

    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"w")
    folder = tmp_path / "graphs" / ocr_runtime.export_tag(weights)
    folder.mkdir(parents=True)
    old, recent = folder / ".g.onnx.host.1.2.partial", folder / ".g.onnx.host.3.4.partial"
    for leftover in (old, recent):
        leftover.write_bytes(b"half")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    path = ocr_runtime.graph(tmp_path / "graphs", weights, "g.onnx", lambda p: p.write_bytes(b"graph"))
    assert path.read_bytes() == b"graph" and ocr_runtime.is_intact(path)
    assert not old.exists() and recent.exists()  # a recent one may belong to an export still running
