"""Malformed datasets: every case is a reject of that record only (or one clear refusal of the whole
file), counts reconcile (read = accepted + rejected, every record once), and exactly the valid rows
survive. Nothing hangs and nothing crashes the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import HEADER, REPO, dataset_config, write_csv, write_image
from PIL import Image
from test_ingest import assert_reconciled, ingest, png_header_only

from pipeline import records
from pipeline.ingest import IngestError

OK = ["T", "a|b", "2000", "US", "x"]  # title, tags, year, country, labels of a valid row


def csv_dataset(root: Path, lines: list[str], n_images: int = 6) -> Path:
    """A dataset whose manifest.csv is `lines` verbatim (after the header), with images img/0..n.jpg."""
    for i in range(n_images):
        write_image(root / "img" / f"{i}.jpg", seed=i)
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.csv").write_text(",".join(HEADER) + "\n" + "".join(lines), encoding="utf-8")
    return root


def row(i: int, title: str = "T") -> str:
    return f"r{i},img/{i}.jpg,{title},a|b,2000,US,x\n"


def reasons(rejects) -> list[tuple[int, str]]:
    return [(r["source_row"], r["reason"]) for r in rejects]


# ------------------------------------------------------------------------------------------ CSV records


def test_an_unterminated_quote_rejects_its_row_only(tmp_path):
    root = csv_dataset(tmp_path / "ds", [row(0), 'r1,img/1.jpg,"Never closed,a|b,2000,US,x\n', row(2), row(3)])
    metrics, manifest, rejects = ingest(dataset_config(root), tmp_path)
    assert_reconciled(metrics, manifest, rejects)
    assert [r["id"] for r in manifest] == ["r0", "r2", "r3"] and metrics["read"] == 4
    assert reasons(rejects) == [(2, "malformed_row")] and "line 3" in rejects[0]["detail"]


def test_a_stray_quote_that_pairs_with_a_later_one_does_not_swallow_rows(tmp_path):
    lines = [
        row(0),
        'r1,img/1.jpg,"Opened here,a|b,2000,US,x\n',
        row(2),
        'r3,img/3.jpg,"Quoted" title,a|b,2000,US,x\n',
        row(4),
    ]
    root = csv_dataset(tmp_path / "ds", lines)
    metrics, manifest, rejects = ingest(dataset_config(root), tmp_path)
    assert_reconciled(metrics, manifest, rejects)
    assert [r["id"] for r in manifest] == ["r0", "r2", "r4"]
    assert [r["reason"] for r in rejects] == ["malformed_row", "malformed_row"], "r1 and the malformed r3 only"


def test_a_quoted_field_may_span_lines(tmp_path):
    root = csv_dataset(tmp_path / "ds", [row(0), 'r1,img/1.jpg,"Two\nlines",a|b,2000,US,x\n', row(2)])
    metrics, manifest, rejects = ingest(dataset_config(root), tmp_path)
    assert metrics["read"] == metrics["accepted"] == 3 and not rejects
    assert manifest[1]["title"] == "Two\nlines"


def test_blank_lines_are_not_records(tmp_path):
    root = csv_dataset(tmp_path / "ds", ["\n", row(0), "\n", "   \n", row(1), "\r\n", "\n", "\n"])
    metrics, manifest, rejects = ingest(dataset_config(root), tmp_path, max_reject_fraction=0.0)
    assert metrics["read"] == metrics["accepted"] == 2 and not rejects


def test_a_field_longer_than_the_csv_modules_limit_is_read_whole(tmp_path):
    long_title = "x" * 140_000  # over the csv module's default 131,072 characters
    root = csv_dataset(tmp_path / "ds", [row(0), row(1, long_title), row(2, "y" * 200_001), row(3)])
    metrics, manifest, rejects = ingest(dataset_config(root), tmp_path, max_field_chars=200_000)
    assert_reconciled(metrics, manifest, rejects)
    assert [r["id"] for r in manifest] == ["r0", "r1", "r3"] and len(manifest[1]["title"]) == 140_000
    assert reasons(rejects) == [(3, "field_too_large")] and "max_field_chars=200000" in rejects[0]["detail"]


def test_a_duplicated_header_name_is_refused(tmp_path):
    root = tmp_path / "ds"
    write_csv(root / "manifest.csv", [*HEADER, "title"], [["r0", "img/0.jpg", "T", "a", "2000", "US", "x", "U"]])
    with pytest.raises(IngestError, match=r"line 1: the header names column\(s\) \['title'\] more than once"):
        ingest(dataset_config(root), tmp_path)


def test_crlf_and_lone_cr_line_endings(tmp_path):
    root = csv_dataset(tmp_path / "ds", [row(0).replace("\n", "\r\n"), row(1).replace("\n", "\r"), row(2)])
    metrics, manifest, rejects = ingest(dataset_config(root), tmp_path)
    assert metrics["read"] == metrics["accepted"] == 3 and not rejects


# ------------------------------------------------------------------------------------------ paths and files


def test_bad_paths_and_files_are_rejects_not_crashes(tmp_path):
    root = tmp_path / "ds"
    for i in range(3):
        write_image(root / "img" / f"{i}.jpg", seed=i)
    os.mkfifo(root / "img" / "fifo.jpg")
    os.symlink("loop.jpg", root / "img" / "loop.jpg")
    (root / "img" / "dev.jpg").symlink_to("/dev/zero")  # outside the folder: unsafe before anything is read
    lines = [
        row(0),
        "p1,img/fifo.jpg,T,,2000,US,x\n",
        "p2,img/loop.jpg,T,,2000,US,x\n",
        "p3,img/a\x00b.jpg,T,,2000,US,x\n",
        f"p4,img/{'n' * 300}.jpg,T,,2000,US,x\n",
        row(1),
        "p6,img/dev.jpg,T,,2000,US,x\n",
        row(2),
    ]
    (root / "manifest.csv").write_text(",".join(HEADER) + "\n" + "".join(lines), encoding="utf-8")
    metrics, manifest, rejects = ingest(dataset_config(root), tmp_path)
    assert_reconciled(metrics, manifest, rejects)
    assert [r["id"] for r in manifest] == ["r0", "r1", "r2"]
    assert {r["id"]: r["reason"] for r in rejects} == {
        "p1": "unreadable_image",
        "p2": "unreadable_image",
        "p3": "unsafe_path",
        "p4": "unreadable_image",
        "p6": "unsafe_path",
    }
    by_id = {r["id"]: r["detail"] for r in rejects}
    assert "FIFO" in by_id["p1"] and "NUL" in by_id["p3"] and "too long" in by_id["p4"].lower()


def test_a_fifo_manifest_or_image_never_hangs_the_command(tmp_path):
    root = tmp_path / "ds"
    write_image(root / "img" / "0.jpg")
    os.mkfifo(root / "img" / "fifo.jpg")
    write_csv(root / "manifest.csv", HEADER, [["a", "img/0.jpg", *OK], ["b", "img/fifo.jpg", *OK]])
    overlay = tmp_path / "over.yaml"
    overlay.write_text("ingest: {max_reject_fraction: 0.5}\ndataset: {text: [title]}\n")
    cmd = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "ingest",
        "--params",
        str(REPO / "params.yaml"),
        "--params",
        str(overlay),
        "--dataset-dir",
        str(root),
        "--out",
        str(tmp_path / "o"),
        "--metrics",
        str(tmp_path / "m.json"),
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "m.json").read_text())["accepted"] == 1
    (root / "manifest.csv").unlink()
    os.mkfifo(root / "manifest.csv")
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].endswith("the manifest is not a regular file")


def test_image_size_is_checked_from_the_header_before_reading(tmp_path, monkeypatch):
    root = tmp_path / "ds"
    root.mkdir(parents=True)
    png_header_only(root / "bomb.png", 30000, 30000)
    with open(root / "bomb.png", "ab") as fh:
        fh.write(os.urandom(1 << 20))  # a large body behind the header
    write_image(root / "0.jpg")
    write_csv(root / "manifest.csv", HEADER, [["big", "bomb.png", *OK], ["a", "0.jpg", *OK]])
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail(f"{self} read whole"))
    metrics, manifest, rejects = ingest(dataset_config(root), tmp_path)
    assert [r["id"] for r in manifest] == ["a"] and reasons(rejects) == [(1, "image_too_large")]


# ------------------------------------------------------------------------------------------ JSONL values


def jsonl_dataset(root: Path, lines: list[bytes]) -> Path:
    for i in range(4):
        write_image(root / f"{i}.jpg", seed=i)
    (root / "items.jsonl").write_bytes(b"".join(lines))
    return root


def item(i: int, **over) -> bytes:
    obj = {
        "id": f"j{i}",
        "image": f"{i}.jpg",
        "title": "T",
        "tags": ["a"],
        "year": 2000,
        "country": "US",
        "labels": ["x"],
        **over,
    }
    return json.dumps(obj).encode() + b"\n"


def test_jsonl_bom_surrogates_huge_integers_and_nested_values(tmp_path):
    lines = [
        b"\xef\xbb\xbf" + item(0),  # 1 a BOM: the first row is valid
        item(1, title="\ud800 broken"),  # 2 a lone surrogate: invalid_utf8
        b'{"id": "j2", "image": "2.jpg", "year": ' + b"9" * 5000 + b"}\n",  # 3 an integer over Python's limit
        item(3, year=10**30, title=[["Part", "one"], "two"], country=7),  # 4 valid: nested lists flatten
        item(9, title={"en": "An object"}),  # 5 an object is no text
        b"[1, 2]\n",  # 6 not an object
        b"\n",  # not a record
    ]
    root = jsonl_dataset(tmp_path / "ds", lines)
    metrics, manifest, rejects = ingest(dataset_config(root, format="jsonl", manifest="items.jsonl"), tmp_path)
    assert_reconciled(metrics, manifest, rejects)
    assert metrics["read"] == 6 and [r["id"] for r in manifest] == ["j0", "j3"]
    assert manifest[1]["title"] == "Part\none\ntwo" and manifest[1]["year"] == 1e30 and manifest[1]["country"] == "7"
    assert reasons(rejects) == [(2, "invalid_utf8"), (3, "malformed_row"), (5, "bad_value"), (6, "malformed_row")]
    assert "lone surrogate" in rejects[0]["detail"] and "JSON object" in rejects[2]["detail"]
    json.dumps(rejects)  # every reject is storable text


def test_any_unexpected_error_in_a_row_is_that_rows_reject(tmp_path, monkeypatch):
    root = csv_dataset(tmp_path / "ds", [row(0), row(1), row(2)])
    real = records.parse_category

    def flaky(value, column="category"):
        if value == "US" and flaky.calls == 1:
            flaky.calls += 1
            raise MemoryError("simulated")
        flaky.calls += 1
        return real(value, column)

    flaky.calls = 0
    monkeypatch.setattr(records, "parse_category", flaky)
    metrics, manifest, rejects = ingest(dataset_config(root), tmp_path, workers=1)
    assert_reconciled(metrics, manifest, rejects)
    assert len(manifest) == 2 and [r["reason"] for r in rejects] == ["unexpected_error"]
    assert "MemoryError: simulated" in rejects[0]["detail"]


# ------------------------------------------------------------------------------------------ pixels


def test_high_bit_depth_palette_and_transparent_images_decode_to_the_right_pixels(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    rgb = np.asarray(records.load_rgb(tmp_path / "g16.png"))
    assert rgb.shape == (64, 64, 3) and rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255
    assert abs(rgb.mean() - 127.5) < 2, "a 16-bit ramp stays a ramp (a plain conversion clips it to white)"
    Image.fromarray((ramp / 65535).astype(np.float32)).save(tmp_path / "f.tiff")
    assert abs(np.asarray(records.load_rgb(tmp_path / "f.tiff")).mean() - 127.5) < 2
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:4, :, 3] = 255  # top half opaque red, bottom half fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    out = np.asarray(records.load_rgb(tmp_path / "t.png"))
    assert out[0, 0].tolist() == [200, 0, 0] and out[-1, -1].tolist() == [255, 255, 255]
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.save(tmp_path / "p.png")
    assert np.asarray(records.load_rgb(tmp_path / "p.png"))[0, 0].tolist() == [10, 20, 30]


def test_a_media_folder_that_leads_outside_is_one_error_up_front(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    for i in range(3):
        write_image(elsewhere / f"{i}.jpg", seed=i)
    root = tmp_path / "ds"
    root.mkdir()
    (root / "img").symlink_to(elsewhere)
    write_csv(root / "manifest.csv", HEADER, [[f"r{i}", f"img/{i}.jpg", *OK] for i in range(3)])
    with pytest.raises(
        IngestError,
        match=r"the media folder .*/ds/img resolves to .*/elsewhere, outside the dataset "
        r"folder .*Point dataset.dir at a folder that holds the media",
    ):
        ingest(dataset_config(root), tmp_path)
    (root / "img").unlink()
    write_image(root / "real" / "0.jpg")
    (root / "inside").symlink_to(root / "real")  # a link that stays inside is fine
    write_csv(root / "manifest.csv", HEADER, [["r0", "inside/0.jpg", *OK]])
    metrics, manifest, rejects = ingest(dataset_config(root), tmp_path)
    assert metrics["accepted"] == 1 and not rejects
