"""Extraction: handlers on known inputs, the Beam job, empty sets, dead letters, schema, provenance.

Pure per-record functions run in the quick loop; real models and Beam jobs are marked slow."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from conftest import extract_modality, ingested_demo
from PIL import Image

from pipeline import cache, features, records, schema
from pipeline.config import ConfigError, from_dict, section
from pipeline.extract import ExtractionError, JobConfig, JobPlan, Run, beam_options, build, modality
from pipeline.extractors import base, faces, image, meta, ocr, text

MODALITIES = ("image", "faces", "ocr", "title", "description", "tags", "meta")


# ------------------------------------------------------------------ pure per-record functions


def test_image_to_array_resizes_crops_and_normalises():
    img = Image.new("RGB", (300, 150), (124, 116, 104))  # ~ the ImageNet mean colour
    arr = image.image_to_array(img, 256, 224)
    assert arr.shape == (3, 224, 224) and arr.dtype == np.float32
    assert np.abs(arr).max() < 0.01
    white = image.image_to_array(Image.new("RGB", (50, 80), (255, 255, 255)), 256, 224)
    assert np.allclose(white[:, 0, 0], (1 - image.IMAGENET_MEAN) / image.IMAGENET_STD, atol=1e-5)


def test_face_selection_thresholds_orders_and_caps():
    boxes = np.array([[0, 0, 10, 10], [50, 0, 60, 10], [20, 0, 30, 10], [90, 0, 99, 9]], dtype=float)
    probs = np.array([0.95, 0.99, 0.5, 0.95])
    assert faces.select_faces(boxes, probs, 0.9, 10) == [1, 0, 3]
    assert faces.select_faces(boxes, probs, 0.9, 2) == [1, 0]
    assert faces.select_faces(None, [None], 0.9, 10) == []
    # the same filter on a cached (unfiltered) set's element records
    elements = [{"box": b.tolist(), "score": p} for b, p in zip(boxes, probs)]
    assert faces.FacesExtractor(faces.FacesConfig(min_probability=0.9, max_faces=2)).select(elements) == [1, 0]


def test_ocr_box_selection_and_reading_order():
    found = [
        ([[50, 100], [90, 100], [90, 120], [50, 120]], "WORLD", 0.9),
        ([[0, 101], [40, 101], [40, 121], [0, 121]], "HELLO", 0.8),
        ([[0, 0], [40, 0], [40, 20], [0, 20]], "TOP", 0.95),
        ([[0, 200], [40, 200], [40, 220], [0, 220]], "faint", 0.1),
        ([[0, 300], [40, 300], [40, 320], [0, 320]], "  ", 0.99),
    ]
    boxes = [(ocr.box_of(p), t, c) for p, t, c in found]
    kept = ocr.select_boxes(boxes, 0.3, 10)
    assert [found[i][1] for i in kept] == ["TOP", "HELLO", "WORLD"]
    assert ocr.box_of(found[0][0]) == [50.0, 100.0, 90.0, 120.0]
    assert len(ocr.select_boxes(boxes, 0.3, 2)) == 2
    # the same filter on a cached (unfiltered) set's element records
    elements = [{"box": b, "text": t, "score": c} for b, t, c in boxes]
    assert ocr.OcrExtractor(ocr.OcrConfig(min_confidence=0.85, max_boxes=10)).select(elements) == [2, 0]


def test_meta_statistics_come_from_train_only():
    import pyarrow as pa

    table = pa.table(
        {
            "split": ["train", "train", "test", "train"],
            "year": [1990.0, 2010.0, 5000.0, None],
            "country": ["US", "FR", "XX", "US"],
        }
    )
    stats = meta.fit(table, "split", ["year"], ["country"], 10)
    assert stats["numeric"] == [{"column": "year", "mean": 2000.0, "std": 10.0, "n": 2}]
    assert stats["categorical"] == [{"column": "country", "values": ["FR", "US"]}]
    r = meta.Encoder(stats)({"year": 2020.0, "country": "XX"})
    assert r.vectors.tolist() == [[2.0, 0.0]] and r.category_ids == [0]
    r = meta.Encoder(stats)({"year": None, "country": "US"})
    assert r.vectors.tolist() == [[0.0, 1.0]] and r.category_ids == [2]


def test_sentence_split():
    assert records.split_sentences("Dr. Who returns. He wins!\n\nThe end", 0) == [
        "Dr. Who returns.",
        "He wins!",
        "The end",
    ]
    assert records.split_sentences("short one", 0) == ["short one"]
    assert records.split_sentences("A a. B b. C c. D d.", 2) == ["A a.", "B b. C c. D d."]
    assert records.split_sentences(None, 5) == [] and records.split_sentences(" \n ", 5) == []


def test_load_rgb_applies_exif_orientation(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(tmp_path / "r.jpg", exif=exif.tobytes())
    gray = Image.new("L", (8, 8), 7)
    gray.save(tmp_path / "g.png")
    assert records.load_rgb(tmp_path / "r.jpg").size == (20, 40)
    assert records.load_rgb(tmp_path / "g.png").mode == "RGB"


# ------------------------------------------------------------------ the handler base, hand-made model


class Doubler(base.SetModelHandler):
    """A model set by hand: each input number x becomes one element [x, 2x]; x < 0 fails."""

    def load(self):
        return np.array([1.0, 2.0], dtype=np.float32)

    def infer_batch(self, batch, model):
        if any(x < 0 for x in batch):
            raise ValueError("negative input")
        return [base.ItemResult(np.float32(x) * model[None, :], [features.element(index=0)]) for x in batch]


class DoublerExtractor(base.Extractor):
    """The extractor of the hand-made model (not registered: used directly)."""

    kind = "doubler"
    config_class = object
    handler_class = Doubler
    checks_model_files = False


def test_a_failing_item_does_not_take_its_batch_down():
    from types import SimpleNamespace

    h = DoublerExtractor(SimpleNamespace(batch_size=4)).handler({"dim": 2})
    assert h.batch_elements_kwargs() == {"min_batch_size": 4, "max_batch_size": 4}
    out = h.run_inference([1.0, -1.0, 3.0], h.load_model())
    assert out[0].vectors.tolist() == [[1.0, 2.0]] and out[2].vectors.tolist() == [[3.0, 6.0]]
    assert isinstance(out[1], base.ItemError) and "negative input" in out[1].error and out[1].stage == "inference"


def test_missing_weights_and_unknown_kind_are_clear_errors(tmp_path):
    with pytest.raises(base.MissingModelError, match=r"weights file not found: .*nope\.pth"):
        image.backbone_weights("torchvision:resnet50", str(tmp_path / "nope.pth"))
    with pytest.raises(base.MissingModelError, match="needs params 'weights'"):
        image.backbone_weights("torchvision:resnet50", None)
    with pytest.raises(base.MissingModelError, match="not a local folder and not in the local Hugging Face cache"):
        text.TextExtractor(text.TextConfig(column="t", model="roberta-base-not-here/xyz")).describe_files()
    with pytest.raises(base.MissingModelError, match=r"model folder .*no-such-folder not found"):
        text.TextExtractor(text.TextConfig(column="t", model=str(tmp_path / "no-such-folder"))).describe_files()
    with pytest.raises(base.MissingModelError, match="'legacy-bare-id' is not a local folder and not in the local"):
        text.TextExtractor(text.TextConfig(column="t", model="legacy-bare-id")).describe_files()
    with pytest.raises(base.MissingModelError, match="vggface2"):
        faces.embedder_choice(faces.FacesConfig(embedder="vggface2", vggface2_weights=str(tmp_path / "v.pt")))
    with pytest.raises(ConfigError, match=r"extract.modalities.x.kind: unknown extractor kind 'sound'"):
        modality("x", {"kind": "sound"})


# ------------------------------------------------------------------ real models on known inputs


@pytest.fixture(scope="module")
def text_encoder():
    return text.TextEncoder(text.PACKAGED_MINILM, 64, "cpu")


@pytest.mark.slow
def test_text_encoder_puts_paraphrases_closer(text_encoder):
    v = text_encoder(["Two strangers fall in love.", "A couple falls deeply in love.", "Soldiers hold a bridge."], 2)
    assert v.shape == (3, 384) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2
    sets = text.encode_sets(text_encoder, [["a"], [], ["b", "c"]], 2)
    assert [s.shape[0] for s in sets] == [1, 0, 2]
    assert np.allclose(sets[2][0], text_encoder(["b"], 1)[0], atol=1e-5)


@pytest.mark.slow
def test_faces_handler_finds_the_astronaut():
    from skimage import data as skd

    ext = faces.FacesExtractor(faces.FacesConfig(device="cpu"))
    h = ext.handler(ext.describe_files())
    model = h.load_model()
    astronaut = np.asarray(skd.astronaut(), dtype=np.uint8)
    empty = np.full((200, 200, 3), 128, dtype=np.uint8)
    res = h.run_inference([astronaut, empty], model)
    assert len(res[0].elements) == 1 and res[0].vectors.shape == (1, 1280)
    x0, y0, x1, y1 = res[0].elements[0]["box"]
    assert abs(x0 - 181) < 12 and abs(y0 - 62) < 12 and abs(x1 - 268) < 12 and abs(y1 - 172) < 12
    assert len(res[0].elements[0]["landmarks"]) == 10 and res[0].elements[0]["score"] > 0.99
    assert res[1].vectors.shape == (0, 1280) and res[1].elements == []


def test_a_faces_checkpoint_that_is_not_vggface2_is_refused(tmp_path):
    import torch

    from pipeline.extractors.base import MissingModelError

    bad = tmp_path / "other.pt"
    torch.save({"conv.weight": torch.zeros(2, 2)}, bad)
    with pytest.raises(MissingModelError, match="lacks .* InceptionResnetV1 weights"):
        faces.FaceModel(faces.FacesConfig(embedder="vggface2", vggface2_weights=str(bad)), "cpu")


@pytest.mark.slow
def test_ocr_handler_reads_a_drawn_word():
    from PIL import ImageDraw, ImageFont

    img = Image.new("RGB", (256, 128), (240, 240, 235))
    ImageDraw.Draw(img).text((30, 35), "FEAR", font=ImageFont.load_default(size=44), fill=(10, 10, 10))
    ext = ocr.OcrExtractor(ocr.OcrConfig(device="cpu"))
    h = ext.handler(ext.describe_files())
    res = h.run_inference([np.asarray(img), np.full((64, 64, 3), 255, np.uint8)], h.load_model())
    assert [e["text"] for e in res[0].elements] == ["FEAR"] and res[0].vectors.shape == (1, 384)
    assert res[1].vectors.shape == (0, 384)


# ------------------------------------------------------------------ the Beam job on a tiny dataset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny demo dataset, ingested: (params, manifest path)."""
    root = tmp_path_factory.mktemp("tiny")
    return ingested_demo(root, items=10, seed=3, cache_dir=root / "cache")


@pytest.mark.slow
def test_beam_job_in_a_test_pipeline(tiny, tmp_path):
    """The job alone: every work-file row is committed to the cache with its key, nothing fails."""
    params, manifest = tiny
    spec = modality("tags", params["extract"]["modalities"]["tags"])
    job = dataclasses.replace(section(params, "extract.job", JobConfig), commit_items=3, partition_items=4)
    run = Run(spec, job, manifest, tmp_path / "out", None)
    total = run.write_todo(np.ones(len(run.ids), dtype=bool), tmp_path / "todo")
    ids = run.ids.to_pylist()
    (tmp_path / "dead").mkdir()
    with TestPipeline(runner="FnApiRunner") as p:
        plan = JobPlan(
            spec,
            run.job_described,
            str(tmp_path / "todo"),
            params["dataset"]["dir"],
            run.store,
            str(tmp_path / "dead"),
            total,
        )
        committed, dead_prepare, dead_inference = build(p, plan, job)
        assert_that(committed, equal_to(ids), label="committed")
        assert_that(dead_prepare, equal_to([]), label="dead_prepare")
        assert_that(dead_inference, equal_to([]), label="dead_inference")
    assert len(list((tmp_path / "todo").glob("todo-*.parquet"))) == 3  # 10 items, 4 per work file
    parts = run.store.parts()
    assert len(parts) >= 4  # at most 3 items per commit
    stored = pa.concat_tables([pq.read_table(part) for part in parts])
    keys = dict(zip(ids, cache.key_text(run.index.uniq[run.index.inv]).astype(str).tolist()))
    tags = dict(zip(ids, pq.read_table(manifest)["tags"].to_pylist()))
    texts = {k: [e["text"] for e in el] for k, el in zip(stored["key"].to_pylist(), stored["elements"].to_pylist())}
    assert {i: texts[keys[i]] for i in ids} == {i: tags[i] or [] for i in ids}


def extract(params, manifest, modality, out: Path):
    metrics = extract_modality(params, modality, manifest, out / modality, out / f"{modality}.json")
    table, meta_ = features.read_features(out / modality / "features.parquet")
    return metrics, table, meta_


@pytest.mark.slow
@pytest.mark.parametrize("modality", MODALITIES)
def test_every_modality_writes_reconciled_sets(tiny, tmp_path, modality):
    params, manifest = tiny
    metrics, table, meta_ = extract(params, manifest, modality, tmp_path)
    ids = pq.read_table(manifest)[schema.ID].to_pylist()
    assert table[schema.ID].to_pylist() == sorted(ids), "one row per manifest id, sorted"
    assert metrics["items_in"] == metrics["written"] + metrics["failed"] == len(ids) and metrics["failed"] == 0
    n = [len(v) for v in table[features.VECTORS].to_pylist()]
    assert metrics["elements"] == sum(n) and metrics["empty_sets"] == n.count(0)
    assert all(len(e) == k for e, k in zip(table[features.ELEMENTS].to_pylist(), n))
    assert (
        meta_["modality"] == modality and meta_["dim"] == table.schema.field(features.VECTORS).type.value_type.list_size
    )
    assert meta_["manifest_sha256"] == features.file_sha256(manifest) and len(meta_["weights_sha256"]) >= 64
    planted = {
        r["id"]: r for r in __import__("csv").DictReader(open(Path(params["dataset"]["dir"]) / "planted_items.csv"))
    }
    rows = {r["id"]: r for r in table.to_pylist()}
    if modality == "faces":
        assert meta_["embedder"] == "backbone"
        assert sum(len(rows[i]["vectors"]) == int(p["faces"]) for i, p in planted.items()) >= 8
    if modality == "ocr":
        assert sum(
            any(p["word"] == e["text"] for e in rows[i]["elements"]) for i, p in planted.items() if p["word"]
        ) >= 0.8 * sum(1 for p in planted.values() if p["word"])
    if modality == "tags":
        src = {r["id"]: r["tags"] for r in pq.read_table(manifest).to_pylist()}
        assert all([e["text"] for e in rows[i]["elements"]] == src[i] for i in rows)
        assert metrics["empty_sets"] == sum(1 for t in src.values() if not t), "an item with no tags is an empty set"
    if modality == "meta":
        assert all(len(r["category_ids"]) == 1 for r in rows.values()) and meta_["stats"]["numeric"][0]["n"] > 0


@pytest.mark.slow
def test_output_is_identical_twice_and_readable_everywhere(tiny, tmp_path):
    params, manifest = tiny
    for name in ("image", "description"):
        extract(params, manifest, name, tmp_path / "a")
        extract(params, manifest, name, tmp_path / "b")
        a = tmp_path / "a" / name / "features.parquet"
        assert a.read_bytes() == (tmp_path / "b" / name / "features.parquet").read_bytes()
    import duckdb
    import pandas as pd

    df = pd.read_parquet(a)
    assert list(df.columns) == ["id", "vectors", "elements", "category_ids"] and len(df) == 10
    n = duckdb.sql(f"select count(*), sum(len(vectors)) from read_parquet('{a}')").fetchall()[0]
    assert n[0] == 10 and n[1] == sum(len(v) for v in df["vectors"])


@pytest.mark.slow
def test_mismatched_provenance_is_refused(tiny, tmp_path):
    params, manifest = tiny
    extract(params, manifest, "title", tmp_path)
    path = tmp_path / "title" / "features.parquet"
    _, meta_ = features.read_features(path, {"modality": "title", "dim": 384})
    with pytest.raises(
        features.FeatureMismatchError, match=r"model_id: expected 'roberta-base', found 'minilm'.*dim: expected 768"
    ):
        features.read_features(path, {"model_id": "roberta-base", "dim": 768})
    with pytest.raises(features.FeatureMismatchError, match="not a feature set"):
        features.read_features(manifest)


@pytest.mark.slow
def test_corrupt_image_goes_to_dead_letters_and_counts_reconcile(tiny, tmp_path):
    params, manifest = tiny
    params = copy.deepcopy(params)
    params["extract"]["job"]["cache_dir"] = None  # the manifest records the good image's sha256
    raw = Path(params["dataset"]["dir"])
    first = pq.read_table(manifest).to_pylist()[0]
    victim = raw / first["image"]
    good = victim.read_bytes()
    try:
        victim.write_bytes(good[:200])  # corrupted after ingest accepted it
        with pytest.raises(ExtractionError, match="1 of 10 items failed"):
            extract_modality(params, "image", manifest, tmp_path / "image", tmp_path / "image.json")
        metrics = json.loads((tmp_path / "image.json").read_text())
        assert metrics["written"] == 9 and metrics["failed"] == 1 and metrics["items_in"] == 10
        assert not (tmp_path / "image" / "features.parquet").exists(), "a failed extraction leaves no features"
        dead = pq.read_table(tmp_path / "image" / "dead_letters.parquet").to_pylist()
        assert [(d["id"], d["modality"], d["stage"]) for d in dead] == [(first["id"], "image", "prepare")]
        assert "changed since ingest" in dead[0]["error"], "the bytes are checked against ingest's sha256 first"
        params["extract"]["job"]["max_failure_fraction"] = 0.5
        metrics = extract_modality(params, "image", manifest, tmp_path / "image", tmp_path / "image.json")
        assert metrics["written"] + metrics["failed"] == metrics["items_in"]
    finally:
        victim.write_bytes(good)


def test_beam_options_pass_through():
    job = from_dict(
        JobConfig,
        {"runner": "FlinkRunner", "options": {"flink_master": "localhost:8081", "save_main_session": True}},
        "j",
    )
    opts = beam_options(dataclasses.replace(job, flags=("--parallelism=4",))).get_all_options()
    assert opts["runner"] == "FlinkRunner" and opts["flink_master"] == "localhost:8081"
    assert opts["save_main_session"] is True and opts["parallelism"] == 4


@pytest.mark.slow
def test_degenerate_images_give_empty_sets_or_real_pixels_in_every_image_extractor(tmp_path):
    """Tiny, extreme-aspect, 16-bit and palette images: never an extraction failure."""
    images = {
        "one_pixel": Image.new("RGB", (1, 1), (200, 10, 10)),
        "strip": Image.new("RGB", (3000, 3), (9, 9, 9)),
        "tower": Image.new("RGB", (2, 4000), (9, 9, 9)),
        "grey16": Image.fromarray(np.linspace(0, 65535, 96 * 96).reshape(96, 96).astype(np.uint16)),
        "palette": Image.new("P", (40, 40), 0),
    }
    for name, img in images.items():
        img.save(tmp_path / f"{name}.png")
    rows = [{"id": n, "image": f"{n}.png"} for n in images]
    for ext in (
        image.ImageExtractor(image.ImageConfig(device="cpu")),
        faces.FacesExtractor(faces.FacesConfig(device="cpu")),
        ocr.OcrExtractor(ocr.OcrConfig(device="cpu")),
    ):
        handler = ext.handler(ext.describe_files())
        model = handler.load_model()
        results = handler.run_inference([ext.prepare(r, tmp_path) for r in rows], model)
        failed = {r["id"]: res.error for r, res in zip(rows, results) if isinstance(res, base.ItemError)}
        assert not failed, f"{ext.kind}: {failed}"
        sizes = [res.vectors.shape[0] for res in results]
        assert sizes == ([1] * len(rows) if ext.kind == "image" else [0] * len(rows)), (ext.kind, sizes)
