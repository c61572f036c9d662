"""Ingest: the dataset contract for CSV, JSONL and MM-IMDb, every reject reason, reconciled counts."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import HEADER, dataset_config, ingest_config, write_csv, write_image, write_jsonl

from pipeline import schema
from pipeline.ingest import IngestError, run_ingest
from pipeline.schema import read_manifest


def ingest(cfg, tmp_path: Path, **ingest_over):
    out = tmp_path / "out"
    metrics = run_ingest(cfg, ingest_config(**ingest_over), out, out / "metrics.json")
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    return metrics, manifest, rejects


def assert_reconciled(metrics, manifest, rejects):
    assert metrics["read"] == metrics["accepted"] + metrics["rejected"]
    assert metrics["accepted"] == len(manifest)
    assert metrics["rejected"] == len(rejects) == sum(metrics["rejected_by_reason"].values())
    rows = sorted([r[schema.SOURCE_ROW] for r in manifest] + [r[schema.SOURCE_ROW] for r in rejects])
    assert rows == list(range(1, metrics["read"] + 1)), "every source row is accepted or rejected exactly once"


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that declares width x height but carries almost no data (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def test_clean_csv_is_accepted_whole(good_dataset, tmp_path):
    metrics, manifest, rejects = ingest(dataset_config(good_dataset), tmp_path)
    assert_reconciled(metrics, manifest, rejects)
    assert metrics["accepted"] == 10 and rejects == []
    first = manifest[0]
    assert first["id"] == "item0" and first["image"] == "img/0.jpg"
    assert (first["image_width"], first["image_height"]) == (32, 48)
    assert len(first["image_sha256"]) == 64
    assert first["tags"] == [] and manifest[1]["tags"] == ["a", "b"]
    assert first["year"] == 1990.0 and first["country"] == "US"
    assert manifest[1]["labels"] == ["x", "y"]
    assert [r["id"] for r in manifest] == sorted(r["id"] for r in manifest)
    _, meta = read_manifest(tmp_path / "out" / "manifest.parquet")
    assert meta["label_names"] == ["x", "y"] and meta["task"] == "multilabel"
    assert meta["fields"] == {"text": ["title"], "lists": ["tags"], "numeric": ["year"], "categorical": ["country"]}


def test_every_reject_reason_is_counted_and_reconciles(tmp_path):
    root = tmp_path / "ds"
    outside = write_image(tmp_path / "outside.jpg")
    for i in range(3):
        write_image(root / "img" / f"ok{i}.jpg", seed=i)
    write_image(root / "img" / "big.jpg", size=(100, 100))
    png_header_only(root / "img" / "bomb.png", 30000, 30000)
    (root / "img" / "garbage.jpg").write_bytes(b"this is not an image")
    good = (root / "img" / "ok0.jpg").read_bytes()
    (root / "img" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "img" / "adir.jpg").mkdir()
    os.symlink(outside, root / "img" / "link.jpg")
    ok = ["img/ok1.jpg", "T", "", "2000", "US", "x"]
    rows = [
        ["a1", "img/ok0.jpg", "Fine", "t1|t2", "1999", "FR", "x|y"],  # 1 accepted
        ["", "", "", "", "", "", ""],  # 2 empty_row
        ["", *ok],  # 3 missing_id
        ["a1", *ok],  # 4 duplicate_id
        ["a5", "", "T", "", "2000", "US", "x"],  # 5 missing_image (blank)
        ["a6", "img/nope.jpg", "T", "", "2000", "US", "x"],  # 6 missing_image (no file)
        ["a7", "../outside.jpg", "T", "", "2000", "US", "x"],  # 7 unsafe_path (..)
        ["a8", str(outside), "T", "", "2000", "US", "x"],  # 8 unsafe_path (absolute)
        ["a9", "img/link.jpg", "T", "", "2000", "US", "x"],  # 9 unsafe_path (symlink out)
        ["a10", "img/adir.jpg", "T", "", "2000", "US", "x"],  # 10 unreadable_image
        ["a11", "img/garbage.jpg", "T", "", "2000", "US", "x"],  # 11 undecodable_image
        ["a12", "img/truncated.jpg", "T", "", "2000", "US", "x"],  # 12 undecodable_image
        ["a13", "img/big.jpg", "T", "", "2000", "US", "x"],  # 13 image_too_large
        ["a14", "img/bomb.png", "T", "", "2000", "US", "x"],  # 14 image_too_large (bomb)
        ["a15", "img/ok2.jpg", "T", "", "2000", "US", ""],  # 15 missing_label
        ["a16", "img/ok2.jpg", "T", "", "nineteen", "US", "x"],  # 16 bad_value
        ["a17", "img/ok2.jpg", "T", "", "2000", "US", "x", "extra"],  # 17 malformed_row
        ["a18", "img/ok2.jpg", "T", "", "2000", "US", "y"],  # 18 accepted
    ]
    path = write_csv(root / "manifest.csv", HEADER, rows)
    # row 19: bytes that are not UTF-8 in the title
    with path.open("ab") as fh:
        fh.write(b"a19,img/ok2.jpg,Caf\xe9,,2000,US,x\n")
    metrics, manifest, rejects = ingest(dataset_config(root), tmp_path, max_image_pixels=5000)
    assert_reconciled(metrics, manifest, rejects)
    assert [r["id"] for r in manifest] == ["a1", "a18"]
    by_row = {r[schema.SOURCE_ROW]: r["reason"] for r in rejects}
    assert by_row == {
        2: "empty_row",
        3: "missing_id",
        4: "duplicate_id",
        5: "missing_image",
        6: "missing_image",
        7: "unsafe_path",
        8: "unsafe_path",
        9: "unsafe_path",
        10: "unreadable_image",
        11: "undecodable_image",
        12: "undecodable_image",
        13: "image_too_large",
        14: "image_too_large",
        15: "missing_label",
        16: "bad_value",
        17: "malformed_row",
        19: "invalid_utf8",
    }
    utf8 = next(r for r in rejects if r["reason"] == "invalid_utf8")
    assert "row 19" in utf8["detail"] and "title" in utf8["detail"] and utf8["id"] == "a19"
    assert "\\xe9" in utf8["row"], "the raw row is kept, with the bad byte escaped"
    assert next(r for r in rejects if r[schema.SOURCE_ROW] == 4)["id"] == "a1"
    counts = metrics["rejected_by_reason"]
    assert counts["unsafe_path"] == 3 and counts["image_too_large"] == 2 and counts["empty_row"] == 1
    assert set(counts) == set(schema.REJECT_REASONS)
    on_disk = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert on_disk == metrics


def test_split_and_label_rejects(tmp_path):
    root = tmp_path / "ds"
    write_image(root / "i.jpg")
    rows = [
        ["b1", "i.jpg", "yes", "train"],
        ["b2", "i.jpg", "maybe", "test"],
        ["b3", "i.jpg", "0", "holdout"],
        ["b4", "i.jpg", "", "test"],
        ["b5", "i.jpg", "no", "dev"],
    ]
    write_csv(root / "manifest.csv", ["id", "image", "target", "part"], rows)
    cfg = dataset_config(
        root,
        text=[],
        lists={},
        numeric=[],
        categorical=[],
        labels={"column": "target", "kind": "binary", "positive_name": "hit", "required_in": ["train", "val"]},
        split={"column": "part"},
    )
    metrics, manifest, rejects = ingest(cfg, tmp_path)
    assert_reconciled(metrics, manifest, rejects)
    assert {r["id"]: r["reason"] for r in rejects} == {"b2": "bad_label", "b3": "bad_split"}
    got = {r["id"]: (r["split"], r["labels"]) for r in manifest}
    # b4 has no label but its split does not require one; "dev" means val
    assert got == {"b1": ("train", ["hit"]), "b4": ("test", None), "b5": ("val", [])}


def test_rejects_over_the_limit_fail_the_stage_with_a_clear_message(good_dataset, tmp_path):
    with (good_dataset / "manifest.csv").open("a", encoding="utf-8") as fh:
        fh.write("item0,img/0.jpg,dup,,2000,US,x\n,,,,,,\n")
    out = tmp_path / "out"
    with pytest.raises(IngestError, match=r"2 of 12 rows rejected .*max_reject_fraction=10.0%.*duplicate_id=1"):
        run_ingest(dataset_config(good_dataset), ingest_config(max_reject_fraction=0.1), out, out / "m.json")
    # the evidence is written before the stage fails
    assert pq.read_table(out / "rejects.parquet").num_rows == 2
    assert json.loads((out / "m.json").read_text())["rejected"] == 2


def test_header_without_a_mapped_column_is_a_mapping_error(good_dataset, tmp_path):
    with pytest.raises(IngestError, match=r"\['genre'\] named in params.yaml"):
        run_ingest(
            dataset_config(good_dataset, labels={"column": "genre"}),
            ingest_config(),
            tmp_path / "o",
            tmp_path / "m.json",
        )


def test_jsonl_contract_with_native_lists(tmp_path):
    root = tmp_path / "ds"
    write_image(root / "a.jpg")
    path = write_jsonl(
        root / "items.jsonl",
        [
            {
                "id": "j1",
                "image": "a.jpg",
                "title": "One",
                "tags": ["p", "q", "p"],
                "year": 2001,
                "country": 7,
                "labels": ["x", "z"],
            },
            {"id": "j2", "image": "a.jpg", "title": "Two", "tags": "p|r", "year": None, "country": "GB", "labels": "x"},
        ],
    )
    with path.open("ab") as fh:
        fh.write(b"{not json}\n\n[1, 2]\n")
        fh.write(b'{"id": "j6", "image": "a.jpg", "title": "\xff", "labels": "x"}\n')
    metrics, manifest, rejects = ingest(dataset_config(root, format="jsonl", manifest="items.jsonl"), tmp_path)
    assert_reconciled(metrics, manifest, rejects)
    assert [(r["id"], r["tags"], r["year"], r["country"], r["labels"]) for r in manifest] == [
        ("j1", ["p", "q"], 2001.0, "7", ["x", "z"]),
        ("j2", ["p", "r"], None, "GB", ["x"]),
    ]
    # the blank line is not a record: records are numbered without it, details name the physical line
    assert [(r[schema.SOURCE_ROW], r["reason"]) for r in rejects] == [
        (3, "malformed_row"),
        (4, "malformed_row"),
        (5, "invalid_utf8"),
    ]
    assert "line 6" in rejects[-1]["detail"]


def make_mmimdb(root: Path) -> None:
    data = root / "dataset"
    items = {
        "0000001": {
            "genres": ["Drama", "Romance"],
            "plot": ["First plot.", "Second summary."],
            "title": "A",
            "year": 1999,
        },
        "0000002": {"genres": ["Comedy"], "plot": ["Funny."], "title": "B", "year": 2005},
        "0000003": {"genres": ["Drama"], "plot": ["Dark."], "title": "C", "year": 2010},
        "0000004": {"genres": ["Drama"], "plot": ["No poster."], "title": "D", "year": 2011},
    }
    for i, (item_id, obj) in enumerate(items.items()):
        data.mkdir(parents=True, exist_ok=True)
        (data / f"{item_id}.json").write_text(json.dumps(obj), encoding="utf-8")
        if item_id != "0000004":
            write_image(data / f"{item_id}.jpeg", seed=i)
    split = {"train": ["0000001", "0000004"], "dev": ["0000002"], "test": ["0000003", "0000009"]}
    (root / "split.json").write_text(json.dumps(split), encoding="utf-8")


def test_mmimdb_layout_needs_no_conversion(tmp_path):
    root = tmp_path / "mmimdb"
    make_mmimdb(root)
    cfg = dataset_config(
        root,
        format="mmimdb",
        text=["plot", "title"],
        lists={},
        numeric=["year"],
        categorical=[],
        labels={"column": "genres", "kind": "multilabel"},
        split={"column": "split"},
    )
    metrics, manifest, rejects = ingest(cfg, tmp_path)
    assert_reconciled(metrics, manifest, rejects)
    got = {r["id"]: (r["split"], r["labels"], r["plot"], r["image"]) for r in manifest}
    assert got == {
        "0000001": ("train", ["Drama", "Romance"], "First plot.\nSecond summary.", "dataset/0000001.jpeg"),
        "0000002": ("val", [], "Funny.", "dataset/0000002.jpeg"),  # Comedy is not in train
        "0000003": ("test", ["Drama"], "Dark.", "dataset/0000003.jpeg"),
    }
    assert {r["id"]: r["reason"] for r in rejects} == {"0000004": "missing_image", "0000009": "malformed_row"}
    assert metrics["label_names"] == ["Drama", "Romance"], "labels come from the train split only"
    assert metrics["labels_dropped"] == {"Comedy": 1}


def test_same_input_gives_byte_identical_manifest(good_dataset, tmp_path):
    cfg = dataset_config(good_dataset)
    run_ingest(cfg, ingest_config(), tmp_path / "a", tmp_path / "a.json")
    run_ingest(cfg, ingest_config(workers=1), tmp_path / "b", tmp_path / "b.json")
    assert (tmp_path / "a" / "manifest.parquet").read_bytes() == (tmp_path / "b" / "manifest.parquet").read_bytes()


def test_split_depends_on_id_only_not_on_row_order(good_dataset, tmp_path):
    lines = (good_dataset / "manifest.csv").read_text(encoding="utf-8").splitlines()
    run_ingest(dataset_config(good_dataset), ingest_config(), tmp_path / "a", tmp_path / "a.json")
    (good_dataset / "manifest.csv").write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n", encoding="utf-8")
    run_ingest(dataset_config(good_dataset), ingest_config(), tmp_path / "b", tmp_path / "b.json")

    def split(d):
        return {r["id"]: r["split"] for r in pq.read_table(tmp_path / d / "manifest.parquet").to_pylist()}

    assert split("a") == split("b")


def test_min_label_count_drops_rare_labels_and_multiclass_rows(tmp_path):
    root = tmp_path / "ds"
    write_image(root / "i.jpg")
    rows = [[f"c{i}", "i.jpg", "common" if i < 8 else "rare"] for i in range(10)]
    write_csv(root / "manifest.csv", ["id", "image", "cls"], rows)
    cfg = dataset_config(
        root,
        text=[],
        lists={},
        numeric=[],
        categorical=[],
        labels={"column": "cls", "kind": "multiclass"},
        split={"fractions": {"train": 1.0, "val": 0.0, "test": 0.0}},
    )
    metrics, manifest, rejects = ingest(cfg, tmp_path, min_label_count=3)
    assert_reconciled(metrics, manifest, rejects)
    assert metrics["label_names"] == ["common"]
    assert sorted(r["id"] for r in rejects) == ["c8", "c9"] and {r["reason"] for r in rejects} == {"bad_label"}
