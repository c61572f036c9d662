"""The per-item extraction cache: warm runs equal cold ones, only new items are computed, filters do
not rerun detectors, killed writes are never read back, and the cache can be turned off."""

from __future__ import annotations

import hashlib
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
    soft = cache.software(["numpy"], ["pipeline.extractors.ocr"])
    fp = cache.fingerprint(described, base, ("min_confidence",), soft)
    assert cache.fingerprint(described, {**base, "batch_size": 1, "device": "cpu"}, ("min_confidence",), soft) == fp
    assert cache.fingerprint(described, {**base, "min_confidence": 0.9}, ("min_confidence",), soft) == fp
    assert cache.fingerprint(described, {**base, "canvas_size": 1280}, ("min_confidence",), soft) != fp
    assert cache.fingerprint({**described, "weights_sha256": "other"}, base, ("min_confidence",), soft) != fp
    assert cache.fingerprint({**described, "model_files_sha256": "x"}, base, ("min_confidence",), soft) != fp
    assert cache.item_key(fp, "abc") == cache.item_key(fp, "abc") != cache.item_key(fp, "abd")
    assert cache.item_key(fp, None) != cache.item_key(fp, "None")


def test_a_library_upgrade_gives_new_keys(monkeypatch):
    """The fingerprint reads the installed versions of the extractor's libraries: an upgrade is a new key."""
    from pipeline.extractors.image import ImageExtractor as image

    described = {"extractor": "image", "model_id": "m", "weights_sha256": "w", "dim": 4}
    fp = cache.fingerprint(described, {}, (), cache.software(image.libraries, image.sources))
    real = cache.installed_version
    for dist in image.libraries:
        monkeypatch.setattr(cache, "installed_version", lambda d, dist=dist: "9.9.9" if d == dist else real(d))
        assert cache.fingerprint(described, {}, (), cache.software(image.libraries, image.sources)) != fp, dist
    monkeypatch.setattr(cache, "installed_version", real)
    assert cache.fingerprint(described, {}, (), cache.software(image.libraries, image.sources)) == fp


def test_a_code_change_gives_new_keys_a_comment_does_not(tmp_path, monkeypatch):
    """The code version is the syntax tree of the modules that shape the output, docstrings left out."""
    monkeypatch.syspath_prepend(str(tmp_path))
    module = tmp_path / "dmms_probe_extractor.py"

    def digest(source: str) -> str:
        module.write_text(source)
        cache._module_digest.cache_clear()
        return cache.code_digest(["dmms_probe_extractor"])

    base = digest('"""Doc."""\ndef split(text):\n    return text.split(".")\n')
    assert (
        digest('"""Other doc."""\n# a comment\ndef split(text):\n    """Says."""\n    return text.split(".")\n') == base
    )
    assert digest('"""Doc."""\ndef split(text):\n    return text.split("!")\n') != base
    assert digest('"""Doc."""\ndef split(text):\n    return text.split(".")[:32]\n') != base
    cache._module_digest.cache_clear()


def test_every_project_module_an_extractor_imports_is_in_its_code_version():
    """An extractor's `sources` list every module of this project its module imports that shapes its
    output, so a change to one of them gives new cache keys (runtime, schema, features and config shape
    no vector)."""
    import ast
    import sys

    from pipeline import extractors

    shapes_nothing = {"pipeline.runtime", "pipeline.schema", "pipeline.features", "pipeline.config", "pipeline"}
    for kind in ("image", "faces", "ocr", "text", "list", "meta"):
        cls = extractors.get(kind)
        module = sys.modules[cls.__module__]
        tree = ast.parse(Path(module.__file__).read_text())
        imported = {
            n.module
            for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("pipeline")
        }
        imported |= {
            f"pipeline.{a.name}"
            for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and n.module == "pipeline"
            for a in n.names
        }
        assert imported - shapes_nothing <= set(cls.sources), (kind, imported - set(cls.sources))
        assert module.__name__ in cls.sources
        assert cache.code_digest(cls.sources)


def hk(name: str) -> str:
    """A cache key (32 hex characters) standing for a readable name in these tests."""
    return hashlib.sha256(name.encode()).hexdigest()[:32]


def raw_rows(keys, dim=3):
    return pa.Table.from_pylist(
        [
            {
                cache.KEY: hk(k),
                features.VECTORS: [[float(i)] * dim],
                features.ELEMENTS: [features.element(index=0)],
                features.CATEGORY_IDS: None,
            }
            for i, k in enumerate(keys)
        ],
        schema=cache.raw_schema(dim),
    )


def test_a_failed_part_write_leaves_nothing_readable(tmp_path, caplog):
    store = cache.FeatureCache(tmp_path, "image", "f" * 64, 3)

    def dies_midway():
        yield raw_rows(["a", "b"])
        raise KeyboardInterrupt("killed")  # the process killed between two batches

    with pytest.raises(KeyboardInterrupt):
        store.write_part(dies_midway())
    assert store.parts() == [] and [p.name for p in store.folder.iterdir()] == ["extractor.json"]
    assert named(located(store, ["a", "b"])) == {}
    # what a kill -9 leaves (a half-written file aside) and a damaged part are never read as entries
    (store.folder / ".part-dead.parquet.partial").write_bytes(b"PAR1 half")
    part, n = store.write_part([raw_rows(["a", "b"])])
    assert n == 2 and named(located(store, ["a", "b", "c"])) == {"a": (part, 0), "b": (part, 1)}
    part.write_bytes(part.read_bytes()[:40])  # e.g. a disk that lost its end
    with caplog.at_level(logging.WARNING):
        assert named(located(store, ["a", "b"])) == {}
    assert "unreadable" in caplog.text


def located(store: cache.FeatureCache, keys: list[str], verified: bool = False) -> cache.KeyIndex:
    index = cache.KeyIndex(cache.key_array([hk(k) for k in keys]))
    (store.locate_verified if verified else store.locate)(index)
    index.names = keys
    return index


def named(index: cache.KeyIndex) -> dict[str, tuple[Path, int]]:
    """index.entries() by the names `located` was given."""
    found = index.entries()
    return {k: found[hk(k)] for k in index.names if hk(k) in found}


def gathered(index: cache.KeyIndex, ids: list[str], dim: int = 3) -> pa.Table:
    return pa.concat_tables(cache.gather(index, pa.array(ids), index.found(), dim))


def test_gather_expands_shared_keys_to_every_id(tmp_path):
    store = cache.FeatureCache(tmp_path, "image", "f" * 64, 3)
    part, _ = store.write_part([raw_rows(["k0", "k1", "k2"])])
    got = gathered(located(store, ["k2", "k0", "k2"]), ["y", "x", "z"])
    rows = {r["id"]: r[features.VECTORS][0][0] for r in got.to_pylist()}
    assert rows == {"x": 0.0, "y": 2.0, "z": 2.0}


def test_external_sort_spills_and_merges_in_order(tmp_path):
    rng = random.Random(0)
    ids = [f"id{rng.randrange(10**9):09d}-{i}" for i in range(5000)]
    sorter = ExternalSort(
        "id", max_bytes=20_000, tmp_dir=tmp_path, chunk_rows=97, run_rows=31, fan_in=3
    )  # many runs, merged in passes
    for start in range(0, len(ids), 333):
        chunk = ids[start : start + 333]
        sorter.add(pa.table({"id": chunk, "v": [len(i) for i in chunk]}))
    assert len(sorter.runs) >= 4
    out = list(sorter.sorted())
    assert [i for t in out for i in t["id"].to_pylist()] == sorted(ids)
    assert max(t.num_rows for t in out) <= 97 * len(sorter.runs) + 97
    assert list(tmp_path.iterdir()) == [], "the runs are removed"


def test_streamed_feature_file_checks_order_and_content(tmp_path):
    dim = 2
    rows = [
        {"id": f"i{i:05d}", "vectors": [[1.0, float(i)]], "elements": [], "category_ids": None} for i in range(9000)
    ]
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
    legacy = table.replace_schema_metadata(
        schema.with_metadata(
            features.feature_schema(dim), {"kind_of_file": "features", "content_sha256": features.content_sha256(table)}
        ).metadata
    )
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
    assert (m4["computed"], m4["reused"], m4["items_per_s"]) == (0, 12, 0.0), "items/s counts computed items only"
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
    [folder] = cache.folders(store)  # one cache folder for both thresholds (graphs sit in .artifacts)
    assert json.loads((folder / "extractor.json").read_text())["described"]["extractor"] == "ocr"


@pytest.mark.slow
def test_cache_off_computes_everything_and_writes_no_cache(grown, tmp_path):
    params, first, _, root = grown
    for out in ("a", "b"):
        m, _, _ = run(params, "title", first, tmp_path / out, None)
        assert (m["computed"], m["reused"], m["cache"]) == (8, 0, None)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "dead_letters.parquet",
        "features.parquet",
        "metrics.json",
    ]
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


# ------------------------------------------------------------------ a cache that heals


def test_stale_writes_aside_are_removed_live_ones_kept(tmp_path):
    import os
    import socket
    import time

    store = cache.FeatureCache(tmp_path, "image", "f" * 64, 3)
    store.folder.mkdir(parents=True)
    host = socket.gethostname()
    dead = store.folder / f".part-a.parquet~{host}~{2**22 + 12345}.partial"  # no such process
    live = store.folder / f".part-b.parquet~{host}~{os.getpid()}.partial"  # this process: being written
    elsewhere = store.folder / ".part-c.parquet~otherhost~1.partial"  # another machine's, recent
    old = store.folder / ".part-d.parquet.partial"  # an earlier version's name, untouched for two hours
    for p in (dead, live, elsewhere, old):
        p.write_bytes(b"PAR1")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    removed = store.clean_partials()
    assert sorted(p.name for p in removed) == sorted([dead.name, old.name])
    assert live.exists() and elsewhere.exists()


def test_duplicate_entries_resolve_to_the_first_part_written(tmp_path):
    store = cache.FeatureCache(tmp_path, "image", "f" * 64, 3)
    first, _ = store.write_part([raw_rows(["k0", "k1"])])
    later = raw_rows(["k1", "k2"])
    later = later.set_column(1, features.VECTORS, pa.array([[[9.0] * 3], [[8.0] * 3]], later.schema.field(1).type))
    second, _ = store.write_part([later])
    assert first.name < second.name, "part names sort by the time they were written"
    found = located(store, ["k0", "k1", "k2"])
    assert named(found) == {"k0": (first, 0), "k1": (first, 1), "k2": (second, 1)}
    got = {r["id"]: r[features.VECTORS][0][0] for r in gathered(found, ["a", "b", "c"]).to_pylist()}
    assert got == {"a": 0.0, "b": 1.0, "c": 8.0}
    stats = cache.compact(store)  # one part, one entry per key, the same entries in use
    assert (stats["parts_after"], stats["entries_before"], stats["entries_after"]) == (1, 4, 3)
    [part] = store.parts()
    assert part.name < second.name
    found = located(store, ["k0", "k1", "k2"])
    again = {r["id"]: r[features.VECTORS][0][0] for r in gathered(found, ["a", "b", "c"]).to_pylist()}
    assert again == got


def flip_data_page_bytes(part: Path, column: str = features.VECTORS) -> None:
    """Flip bytes in the middle of a column's first data page (not the footer, not the page header)."""
    pf = pq.ParquetFile(part)
    idx = pf.schema_arrow.get_field_index(column)
    col = pf.metadata.row_group(0).column(idx)
    start = col.data_page_offset
    at = start + col.total_compressed_size // 2
    data = bytearray(part.read_bytes())
    data[at : at + 16] = bytes(b ^ 0xFF for b in data[at : at + 16])
    part.write_bytes(bytes(data))


def test_a_part_with_flipped_bytes_is_quarantined_by_name(tmp_path, caplog):
    store = cache.FeatureCache(tmp_path, "image", "f" * 64, 3)
    part, _ = store.write_part([raw_rows([f"k{i}" for i in range(50)])])
    flip_data_page_bytes(part)
    keys = [f"k{i}" for i in range(50)]
    assert set(named(located(store, keys))) == set(keys), "keys still read"
    with caplog.at_level(logging.WARNING):
        assert named(located(store, keys, verified=True)) == {}
    assert part.name in caplog.text and not part.exists()
    assert (store.folder / cache.QUARANTINE / part.name).exists()
    assert "corrupt" in (store.folder / cache.QUARANTINE / f"{part.name}.reason.txt").read_text()
    assert store.quarantined and store.quarantined[0].startswith(part.name)


@pytest.fixture(scope="module")
def same_titles(tmp_path_factory):
    """100 rows that share one title (and 3 with their own), ingested."""
    from conftest import dataset_config, ingest_config, write_csv

    from pipeline.ingest import run_ingest

    root = tmp_path_factory.mktemp("same_titles")
    rows = [[f"t{k:03d}", "The same title", "A" if k % 2 else "B"] for k in range(100)]
    rows += [[f"u{k}", f"Another title {k}", "A"] for k in range(3)]
    write_csv(root / "raw" / "manifest.csv", ["id", "title", "labels"], rows)
    ds = dataset_config(
        root / "raw", image=None, image_required=False, text=["title"], lists={}, numeric=[], categorical=[]
    )
    run_ingest(ds, ingest_config(), root / "ingest", root / "ingest.json")
    return root / "ingest" / "manifest.parquet"


TITLE = {
    "kind": "text",
    "column": "title",
    "split_sentences": False,
    "max_length": 32,
    "device": "cpu",
}  # as params.yaml


def title_run(manifest, out: Path, cache_dir):
    job = JobConfig(cache_dir=str(cache_dir) if cache_dir else None)
    metrics = run_extraction(modality("title", TITLE), job, manifest, out, out / "metrics.json")
    return metrics, features.read_features(out / "features.parquet")[0]


@pytest.mark.slow
def test_identical_inputs_are_computed_once_and_fanned_out(same_titles, tmp_path):
    m, table = title_run(same_titles, tmp_path / "a", tmp_path / "cache")
    assert (m["items_in"], m["computed"], m["reused"], m["sent_to_job"]) == (103, 103, 0, 4)
    [part] = list((tmp_path / "cache").rglob("part-*.parquet"))
    assert pq.ParquetFile(part).metadata.num_rows == 4, "one entry per distinct title"
    vecs = {r["id"]: np.asarray(r[features.VECTORS]) for r in table.to_pylist()}
    assert all(np.array_equal(vecs[f"t{k:03d}"], vecs["t000"]) for k in range(100))
    assert not np.allclose(vecs["u0"], vecs["t000"])
    _, cold = title_run(same_titles, tmp_path / "b", None)
    assert_same_features(table, cold)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["flipped bytes", "truncated"])
def test_a_damaged_part_is_recomputed_and_the_run_succeeds(same_titles, tmp_path, damage):
    store = tmp_path / "cache"
    _, first = title_run(same_titles, tmp_path / "a", store)
    [part] = list(store.rglob("part-*.parquet"))
    if damage == "flipped bytes":
        flip_data_page_bytes(part)
    else:
        part.write_bytes(part.read_bytes()[: part.stat().st_size * 2 // 3])
    m, again = title_run(same_titles, tmp_path / "b", store)
    assert (m["computed"], m["reused"], m["sent_to_job"]) == (103, 0, 4)
    assert len(m["cache_quarantined"]) == 1 and m["cache_quarantined"][0].startswith(part.name)
    assert_same_features(again, first)
    m, _ = title_run(same_titles, tmp_path / "c", store)  # healed: the recomputed entries are reused
    assert (m["computed"], m["reused"]) == (0, 103) and "cache_quarantined" not in m


def test_a_changed_tokenizer_file_gives_new_keys(tmp_path):
    """A local text model folder is digested whole: same weights, another tokenizer -> another fingerprint."""
    import shutil

    from pipeline.extract import describe, fingerprint
    from pipeline.extractors.text import model_dir

    folder = tmp_path / "model"
    shutil.copytree(model_dir("minilm"), folder)
    spec = modality("title", {**TITLE, "model": str(folder)})
    described = describe(spec)
    fp, _ = fingerprint(spec, described)
    vocab = folder / "vocab.txt"
    vocab.write_text(vocab.read_text().replace("\nthe\n", "\nteh\n", 1))
    changed = describe(spec)
    assert changed["weights_sha256"] == described["weights_sha256"], "the weights did not change"
    assert changed["model_files_sha256"] != described["model_files_sha256"]
    assert fingerprint(spec, changed)[0] != fp


@pytest.mark.slow
def test_an_image_changed_after_ingest_is_never_cached_under_the_old_sha256(grown, tmp_path):
    import copy
    import shutil

    params, first, _, root = grown
    params = copy.deepcopy(params)
    params["extract"]["job"]["max_failure_fraction"] = 1.0
    manifest = pq.read_table(first).to_pylist()
    raw_dir = Path(params["dataset"]["dir"])
    victim, other = raw_dir / manifest[0]["image"], raw_dir / manifest[1]["image"]
    backup = tmp_path / "backup"
    shutil.copy(victim, backup)
    store = tmp_path / "cache"
    try:
        shutil.copy(other, victim)  # a valid image, but not the bytes ingest recorded
        m, table, _ = run(params, "image", first, tmp_path / "a", store)
        assert (m["computed"], m["failed"]) == (7, 1)
        [dead] = pq.read_table(tmp_path / "a" / "dead_letters.parquet").to_pylist()
        assert dead["id"] == manifest[0]["id"] and "changed since ingest" in dead["error"]
        assert manifest[0]["id"] not in table["id"].to_pylist()
        assert sum(pq.ParquetFile(p).metadata.num_rows for p in store.rglob("part-*.parquet")) == 7
    finally:
        shutil.copy(backup, victim)
    m, warm, _ = run(params, "image", first, tmp_path / "b", store)
    assert (m["computed"], m["reused"], m["failed"]) == (1, 7, 0), "the restored image is computed, not served"
    _, cold, _ = run(params, "image", first, tmp_path / "c", None)
    assert_same_features(warm, cold)


def test_every_worker_checks_the_model_files_and_software_it_loads():
    from pipeline.extractors import image
    from pipeline.extractors.base import MissingModelError

    ext = image.ImageExtractor(image.ImageConfig(device="cpu"))
    handler = ext.handler({**ext.describe_files(), "weights_sha256": "0" * 64})  # the job saw other weights
    with pytest.raises(MissingModelError, match="differ from those the job was started with.*weights_sha256"):
        handler.load_model()
    soft = cache.software(ext.libraries, ext.sources)
    assert ext.handler({**ext.describe_files(), "software": soft}).load_model().dim == 1280
    older = {**soft, "libraries": {**soft["libraries"], "torch": "2.0.0"}}  # the job ran another torch
    with pytest.raises(MissingModelError, match="software on worker .* differs.*torch 2.0.0 in the job"):
        ext.handler({**ext.describe_files(), "software": older}).load_model()
    with pytest.raises(MissingModelError, match="code: job 'other'"):
        ext.handler({**ext.describe_files(), "software": {**soft, "code": "other"}}).load_model()
    from pipeline.extractors import meta  # a kind without a model checks its code and libraries too

    stats = {"numeric": [], "categorical": []}
    mext = meta.MetaExtractor(meta.MetaConfig())
    msoft = cache.software(mext.libraries, mext.sources)
    assert mext.handler({**meta.describe_stats(stats), "software": msoft}).load_model() is not None
    with pytest.raises(MissingModelError, match="code: job 'other'"):
        mext.handler({**meta.describe_stats(stats), "software": {**msoft, "code": "other"}}).load_model()


@pytest.mark.slow
def test_dmms_cache_lists_prunes_and_compacts(same_titles, tmp_path, capsys):
    from conftest import REPO

    from pipeline import cli

    store = tmp_path / "cache"
    title_run(same_titles, tmp_path / "a", store)
    title_run(same_titles, tmp_path / "b", store)  # all reused: no second part
    [used] = [p for p in store.iterdir()]
    # a folder of an extractor no longer configured (another model), and a meta folder
    stale = cache.FeatureCache(store, "text", "e" * 64, 3, {"described": {"model_id": "old-model", "dim": 3}})
    stale.write_part([raw_rows(["x", "y"])])
    stale.write_part([raw_rows(["y", "z"])])
    meta_folder = cache.FeatureCache(store, "meta", "d" * 64, 3, {"described": {"model_id": "standardise", "dim": 3}})
    meta_folder.write_part([raw_rows(["m"])])
    overlay = tmp_path / "overlay.yaml"  # the shipped params, with title read the way title_run reads it
    overlay.write_text("extract: {modalities: {title: {device: cpu}}}\n")
    base = ["--params", str(REPO / "params.yaml"), "--params", str(overlay), "--cache-dir", str(store)]
    cli.main(["cache", "list", *base])
    out = capsys.readouterr().out
    assert "3 folder(s), 9 entries" in out
    line = {ln.split()[0]: ln for ln in out.splitlines()[1:-1]}
    assert line[used.name].endswith("title") and line[stale.folder.name].endswith("no")
    assert "give --manifest" in line[meta_folder.folder.name]
    cli.main(["cache", "prune", "--dry-run", *base])
    assert "would delete" in capsys.readouterr().out and stale.folder.exists()
    cli.main(["cache", "compact", *base])
    assert f"{stale.folder.name}: 2 part(s), 4 entries -> 1 part(s), 3 entries" in capsys.readouterr().out
    cli.main(["cache", "prune", *base])
    out = capsys.readouterr().out
    assert "1 folder(s) deleted" in out and not stale.folder.exists()
    assert used.exists() and meta_folder.folder.exists(), "meta is kept when no manifest tells its fingerprint"
    m, _ = title_run(same_titles, tmp_path / "c", store)
    assert m["reused"] == 103, "pruning and compacting kept every entry in use"


@pytest.mark.slow
def test_an_unreadable_copy_of_a_shared_image_fails_alone(tmp_path):
    """Two rows hold the same image bytes at different paths (one key); the first one's file changes after
    ingest. Its failure is its own: the other row reads its own file and is extracted."""
    import shutil

    from conftest import dataset_config, ingest_config, write_csv, write_image

    from pipeline.ingest import run_ingest

    raw = tmp_path / "raw"
    write_image(raw / "a.jpg", seed=1)
    shutil.copy(raw / "a.jpg", raw / "b.jpg")
    write_image(raw / "c.jpg", seed=2)
    write_csv(
        raw / "manifest.csv",
        ["id", "image", "labels"],
        [["x1", "a.jpg", "A"], ["x2", "b.jpg", "A"], ["x3", "c.jpg", "B"]],
    )
    ds = dataset_config(raw, text=[], lists={}, numeric=[], categorical=[])
    run_ingest(ds, ingest_config(min_label_count=1), tmp_path / "ingest", tmp_path / "ingest.json")
    manifest = tmp_path / "ingest" / "manifest.parquet"
    write_image(raw / "a.jpg", seed=3)  # changed after ingest
    job = JobConfig(cache_dir=str(tmp_path / "cache"), max_failure_fraction=1.0)
    m = run_extraction(
        modality("image", {"kind": "image", "device": "cpu"}), job, manifest, tmp_path / "out", tmp_path / "m.json"
    )
    assert (m["written"], m["failed"], m["sent_to_job"]) == (2, 1, 3)
    [dead] = pq.read_table(tmp_path / "out" / "dead_letters.parquet").to_pylist()
    assert dead["id"] == "x1" and "changed since ingest" in dead["error"] and "same input" not in dead["error"]
    table, _ = features.read_features(tmp_path / "out" / "features.parquet")
    assert table["id"].to_pylist() == ["x2", "x3"]
