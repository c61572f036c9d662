"""The per-item extraction cache: warm runs equal cold ones, only new items are computed, filters do
not rerun detectors, killed writes are never read back, and the cache can be turned off."""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ingested_demo
from pipeline import cache, features, schema
from pipeline.config import from_dict
from pipeline.extract import JobConfig, modality, run_extraction
from pipeline.sorting import ExternalSort

# ------------------------------------------------------------------ pieces, no models


def test_fingerprint_ignores_runtime_and_filter_params_only():
    described = {"extractor": "ocr", "model_id": "m", "weights_sha256": "w", "dim": 4}
    base = {"kind": "ocr", "min_confidence": 0.3, "canvas_size": 2560, "batch_size": 8, "device": "auto"}
    fp = cache.fingerprint(described, base, ("min_confidence",))
    assert cache.fingerprint(described, {**base, "batch_size": 1, "device": "cpu"}, ("min_confidence",)) == fp
    assert cache.fingerprint(described, {**base, "min_confidence": 0.9}, ("min_confidence",)) == fp
    assert cache.fingerprint(described, {**base, "canvas_size": 1280}, ("min_confidence",)) != fp
    assert cache.fingerprint({**described, "weights_sha256": "other"}, base, ("min_confidence",)) != fp
    assert cache.item_key(fp, "abc") == cache.item_key(fp, "abc") != cache.item_key(fp, "abd")
    assert cache.item_key(fp, None) != cache.item_key(fp, "None")


def raw_rows(keys, dim=3):
    return pa.Table.from_pylist(
        [{cache.KEY: k, features.VECTORS: [[float(i)] * dim], features.ELEMENTS: [features.element(index=0)],
          features.CATEGORY_IDS: None} for i, k in enumerate(keys)], schema=cache.raw_schema(dim))


def test_a_failed_part_write_leaves_nothing_readable(tmp_path, caplog):
    store = cache.FeatureCache(tmp_path, "image", "f" * 64, 3)

    def dies_midway():
        yield raw_rows(["a", "b"])
        raise KeyboardInterrupt("killed")  # the process killed between two batches

    with pytest.raises(KeyboardInterrupt):
        store.write_part(dies_midway())
    assert store.parts() == [] and [p.name for p in store.folder.iterdir()] == ["extractor.json"]
    assert store.locate(["a", "b"]) == {}
    # what a kill -9 leaves (a half-written file aside) and a damaged part are never read as entries
    (store.folder / ".part-dead.parquet.partial").write_bytes(b"PAR1 half")
    part, n = store.write_part([raw_rows(["a", "b"])])
    assert n == 2 and store.locate(["a", "b", "c"]) == {"a": (part, 0), "b": (part, 1)}
    part.write_bytes(part.read_bytes()[:40])  # e.g. a disk that lost its end
    with caplog.at_level(logging.WARNING):
        assert store.locate(["a", "b"]) == {}
    assert "unreadable" in caplog.text


def test_gather_expands_shared_keys_to_every_id(tmp_path):
    store = cache.FeatureCache(tmp_path, "image", "f" * 64, 3)
    part, _ = store.write_part([raw_rows(["k0", "k1", "k2"])])
    got = pa.concat_tables(cache.gather(store.locate(["k2", "k0"]), {"k0": ["x"], "k2": ["y", "z"]}, 3))
    rows = {r["id"]: r[features.VECTORS][0][0] for r in got.to_pylist()}
    assert rows == {"x": 0.0, "y": 2.0, "z": 2.0}


def test_external_sort_spills_and_merges_in_order(tmp_path):
    rng = random.Random(0)
    ids = [f"id{rng.randrange(10**9):09d}-{i}" for i in range(5000)]
    sorter = ExternalSort("id", max_bytes=20_000, tmp_dir=tmp_path, chunk_rows=97)  # many runs
    for start in range(0, len(ids), 333):
        chunk = ids[start:start + 333]
        sorter.add(pa.table({"id": chunk, "v": [len(i) for i in chunk]}))
    assert len(sorter.runs) >= 4
    out = list(sorter.sorted())
    assert [i for t in out for i in t["id"].to_pylist()] == sorted(ids)
    assert max(t.num_rows for t in out) <= 97 * len(sorter.runs) + 97
    assert list(tmp_path.iterdir()) == [], "the runs are removed"


def test_streamed_feature_file_checks_order_and_content(tmp_path):
    dim = 2
    rows = [{"id": f"i{i:05d}", "vectors": [[1.0, float(i)]], "elements": [], "category_ids": None} for i in range(9000)]
    table = pa.Table.from_pylist(rows, schema=features.feature_schema(dim))
    path = tmp_path / "features.parquet"
    with features.FeatureWriter(path, dim, {"modality": "x"}) as w:
        for start in range(0, 9000, 2500):
            w.write(table.slice(start, 2500))
    got, meta = features.read_features(path)
    assert got.num_rows == meta["items"] == 9000 and meta["content_chunk_rows"] == features.CHUNK_ROWS
    with pytest.raises(ValueError, match="out of order"):
        with features.FeatureWriter(tmp_path / "bad.parquet", dim, {}) as w:
            w.write(table.slice(10, 5))
            w.write(table.slice(0, 5))
    assert not list(tmp_path.glob("*bad*")), "a failed write leaves nothing"
    # files written before streaming (one digest over the whole table) still read
    legacy = table.replace_schema_metadata(schema.with_metadata(
        features.feature_schema(dim), {"kind_of_file": "features", "content_sha256": features.content_sha256(table)}
    ).metadata)
    pq.write_table(legacy, tmp_path / "legacy.parquet")
    assert features.read_features(tmp_path / "legacy.parquet")[0].num_rows == 9000


# ------------------------------------------------------------------ real extractors on a tiny dataset

MODALITIES = ("image", "ocr", "title")


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """A tiny demo dataset ingested twice: its first 8 items, then all 12 (8 old + 4 new)."""
    root = tmp_path_factory.mktemp("grown")
    params, full = ingested_demo(root, items=12, seed=5, cache_dir=None)  # run() sets each run's cache
    table = pq.read_table(full)
    first = root / "first" / "manifest.parquet"
    first.parent.mkdir()
    pq.write_table(table.slice(0, 8), first)  # same schema and provenance metadata, fewer rows
    return params, first, full, root


def run(params, name, manifest, out: Path, cache_dir, **overrides):
    raw = {**params["extract"]["modalities"][name], **overrides}
    job = from_dict(JobConfig, {**params["extract"]["job"], "cache_dir": str(cache_dir) if cache_dir else None}, "job")
    metrics = run_extraction(modality(name, raw), job, manifest, out, out / "metrics.json")
    table, meta = features.read_features(out / "features.parquet")
    return metrics, table, meta


def assert_same_features(a: pa.Table, b: pa.Table):
    assert a[schema.ID].to_pylist() == b[schema.ID].to_pylist()
    for x, y in zip(a[features.VECTORS].to_pylist(), b[features.VECTORS].to_pylist()):
        assert np.asarray(x).shape == np.asarray(y).shape
        assert np.allclose(np.asarray(x), np.asarray(y), atol=1e-4)
    assert a[features.CATEGORY_IDS].to_pylist() == b[features.CATEGORY_IDS].to_pylist()
    for ea, eb in zip(a[features.ELEMENTS].to_pylist(), b[features.ELEMENTS].to_pylist()):
        assert [(e["index"], e["text"]) for e in ea] == [(e["index"], e["text"]) for e in eb]
        for e, f in zip(ea, eb):
            for k in ("box", "score", "landmarks"):
                assert (e[k] is None) == (f[k] is None) and (e[k] is None or np.allclose(e[k], f[k], atol=1e-4))


@pytest.mark.slow
@pytest.mark.parametrize("name", MODALITIES)
def test_warm_runs_compute_only_new_items_and_equal_a_cold_run(grown, tmp_path, name):
    params, first, full, _ = grown
    store = tmp_path / "cache"
    m1, _, _ = run(params, name, first, tmp_path / "a", store)
    assert (m1["computed"], m1["reused"], m1["items_in"]) == (8, 0, 8)
    m2, warm, meta = run(params, name, full, tmp_path / "b", store)
    assert (m2["computed"], m2["reused"], m2["failed"]) == (4, 8, 0)
    assert m2["computed"] + m2["reused"] + m2["failed"] == m2["items_in"] == 12
    m3, cold, _ = run(params, name, full, tmp_path / "c", None)  # no cache at all
    assert (m3["computed"], m3["reused"], m3["cache"]) == (12, 0, None)
    assert_same_features(warm, cold)
    assert meta["manifest_sha256"] == features.file_sha256(full)
    m4, again, _ = run(params, name, full, tmp_path / "d", store)
    assert (m4["computed"], m4["reused"]) == (0, 12)
    assert_same_features(again, cold)
    assert not (tmp_path / "d" / "_work").exists() and not (tmp_path / "c" / "_work").exists()


@pytest.mark.slow
def test_a_filter_param_reuses_the_unfiltered_detections(grown, tmp_path):
    params, _, full, _ = grown
    store = tmp_path / "cache"
    m1, loose, _ = run(params, "ocr", full, tmp_path / "a", store, min_confidence=0.0)
    assert m1["computed"] == 12
    m2, strict, meta = run(params, "ocr", full, tmp_path / "b", store, min_confidence=0.9, max_boxes=1)
    assert (m2["computed"], m2["reused"]) == (0, 12), "the OCR detector did not run again"
    assert meta["params"]["min_confidence"] == 0.9
    _, cold, _ = run(params, "ocr", full, tmp_path / "c", None, min_confidence=0.9, max_boxes=1)
    assert_same_features(strict, cold)
    sizes = [len(e) for e in strict[features.ELEMENTS].to_pylist()]
    assert max(sizes) <= 1 and sum(sizes) <= sum(len(e) for e in loose[features.ELEMENTS].to_pylist())
    assert all(e["score"] >= 0.9 - 1e-6 for es in strict[features.ELEMENTS].to_pylist() for e in es)
    [folder] = list(store.iterdir())  # one cache folder for both thresholds
    assert json.loads((folder / "extractor.json").read_text())["described"]["extractor"] == "ocr"


@pytest.mark.slow
def test_cache_off_computes_everything_and_writes_no_cache(grown, tmp_path):
    params, first, _, root = grown
    for out in ("a", "b"):
        m, _, _ = run(params, "title", first, tmp_path / out, None)
        assert (m["computed"], m["reused"], m["cache"]) == (8, 0, None)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["dead_letters.parquet", "features.parquet", "metrics.json"]
    assert not any(p.name == "cache" for p in tmp_path.rglob("*")) and not (root / "cache").exists()


@pytest.mark.slow
def test_a_killed_cache_write_is_recomputed_not_read(grown, tmp_path):
    params, first, _, _ = grown
    store = tmp_path / "cache"
    _, cold, _ = run(params, "image", first, tmp_path / "a", store)
    [part] = list(store.rglob("part-*.parquet"))
    part.rename(part.with_name(f".{part.name}.partial"))  # as if killed before the rename
    m, again, _ = run(params, "image", first, tmp_path / "b", store)
    assert (m["computed"], m["reused"]) == (8, 0)
    assert_same_features(again, cold)
    m, _, _ = run(params, "image", first, tmp_path / "c", store)
    assert (m["computed"], m["reused"]) == (0, 8)
    json.loads((tmp_path / "c" / "metrics.json").read_text())
