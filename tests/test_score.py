"""Batch scoring of a new, unlabelled folder with a bundle trained on the demo: the CLI end to end,
dead letters with reasons, counts that reconcile, and refusals of what does not match the bundle."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO

from pipeline import cli
from pipeline.config import IngestConfig, from_dict
from pipeline.extract import JobConfig
from pipeline.features import FeatureMismatchError
from pipeline.ingest import IngestError
from pipeline.score import ScoreConfig, run_score

pytestmark = pytest.mark.slow


def score(demo_run, input_dir, out, model=None, **cfg):
    cfg = from_dict(ScoreConfig, {"device": "cpu", "report": {"items": 4}, **cfg}, "score")
    return run_score(
        cfg,
        model or demo_run.model,
        input_dir,
        out,
        JobConfig(),
        from_dict(IngestConfig, {"max_reject_fraction": 0.5}, "ingest"),
    )


def test_score_cli_on_an_unlabelled_folder(demo_run, tmp_path):
    out = tmp_path / "scored"
    overlay = tmp_path / "overlay.yaml"  # 1 broken image in 12 is over the shipped 5% reject limit
    overlay.write_text(
        f"ingest: {{max_reject_fraction: 0.5}}\nextract: {{job: {{cache_dir: '{tmp_path / 'cache'}'}}}}\n"
    )
    args = [
        "score",
        "--params",
        str(REPO / "params.yaml"),
        "--params",
        str(overlay),
        "--model",
        str(demo_run.model),
        "--input",
        str(demo_run.root / "unlabelled"),
        "--metrics",
        str(tmp_path / "score.json"),
    ]
    cli.main([*args, "--output", str(tmp_path / "first")])
    first = json.loads((tmp_path / "score.json").read_text())
    assert {m: (c["computed"], c["reused"]) for m, c in first["extraction"].items()} == {
        m: (11, 0) for m in first["extraction"]
    }, "a new folder: every accepted item computed"
    cli.main([*args, "--output", str(out)])  # the same folder again: every item from the cache
    summary = json.loads((tmp_path / "score.json").read_text())
    assert {m: (c["computed"], c["reused"]) for m, c in summary["extraction"].items()} == {
        m: (0, 11) for m in first["extraction"]
    }
    again = pq.read_table(out / "predictions.parquet").to_pylist()
    for a, b in zip(pq.read_table(tmp_path / "first" / "predictions.parquet").to_pylist(), again):
        assert a["id"] == b["id"] and a["predicted"] == b["predicted"]
        probs = [k for k in a if k.startswith("prob_")]
        assert probs and np.allclose([a[k] for k in probs], [b[k] for k in probs], atol=1e-5)
    counts = summary["counts"]
    truth = {r["id"]: r for r in csv.DictReader(open(demo_run.root / "unlabelled" / "truth.csv"))}
    broken = {i for i, r in truth.items() if r["broken_image"] == "1"}
    assert counts["read"] == 12 and counts["scored"] == 11 and counts["dead_lettered"] == 1
    assert counts["read"] == counts["scored"] + counts["dead_lettered"]
    dead = pq.read_table(out / "dead_letters.parquet").to_pylist()
    assert {d["id"] for d in dead} == broken and dead[0]["stage"] == "ingest" and dead[0]["reason"]
    pred = pq.read_table(out / "predictions.parquet").to_pylist()
    assert {p["id"] for p in pred} == set(truth) - broken
    assert all(p["labels"] is None and p["split"] == "score" for p in pred), "no labels column: no truth"
    # the demo's planted signals carry over to new items
    hits = sum(len(set(p["predicted"]) & set(truth[p["id"]]["labels"].split("|"))) for p in pred)
    total = sum(len(set(p["predicted"]) | set(truth[p["id"]]["labels"].split("|"))) for p in pred)
    assert hits / total > 0.6, f"Jaccard over the batch {hits}/{total}"
    assert pq.read_table(out / "label_importance.parquet").num_rows == 11 * 6
    assert (out / "report" / "index.html").is_file() and len(list((out / "report" / "img").glob("*.jpg"))) == 11
    for m in ("faces", "ocr", "meta"):
        assert json.loads((out / "features" / m / "counts.json").read_text())["items_in"] == 11


def without_column(src, dst, column):
    shutil.copytree(src, dst)
    rows = list(csv.DictReader(open(src / "manifest.csv")))
    with open(dst / "manifest.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, [c for c in rows[0] if c != column], lineterminator="\n")
        w.writeheader()
        w.writerows([{k: v for k, v in r.items() if k != column} for r in rows])
    return dst


def test_a_missing_column_is_refused_unless_allowed(demo_run, tmp_path):
    folder = without_column(demo_run.root / "unlabelled", tmp_path / "no-desc", "description")
    with pytest.raises(IngestError, match=r"\['description'\] of the model's dataset contract are not in the dataset"):
        score(demo_run, folder, tmp_path / "a")
    summary = score(demo_run, folder, tmp_path / "b", allow_missing_columns=True, write_report=False)
    assert summary["counts"]["missing_columns"] == ["description"] and summary["counts"]["scored"] == 11
    desc = pq.read_table(tmp_path / "b" / "features" / "description" / "features.parquet")
    assert all(len(v) == 0 for v in desc["vectors"].to_pylist()), "no description: empty sets"


def test_an_extractor_that_differs_from_the_bundle_is_refused_before_any_work(demo_run, tmp_path):
    bundle = torch.load(demo_run.model, weights_only=True)
    bundle["provenance"]["ocr"]["weights_sha256"] = "0" * 64
    other = tmp_path / "other.pt"
    torch.save(bundle, other)
    with pytest.raises(FeatureMismatchError, match="ocr: the extractor here is not the one the model was trained with"):
        score(demo_run, demo_run.root / "unlabelled", tmp_path / "out", model=other)
    assert not (tmp_path / "out").exists(), "refused before anything was written"


def test_cli_prints_one_clear_line_for_a_refusal(demo_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(
            [
                "score",
                "--params",
                str(REPO / "params.yaml"),
                "--model",
                str(demo_run.model),
                "--input",
                str(tmp_path / "nowhere"),
                "--output",
                str(tmp_path / "out"),
            ]
        )
    assert exc.value.code == 2 and "dataset folder not found" in capsys.readouterr().err


def test_dead_letters_join_ingest_rejects_and_extraction_failures(tmp_path):
    import pyarrow as pa

    from pipeline import schema
    from pipeline.score import dead_letters

    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({schema.ID: ["a", "b"], schema.SOURCE_ROW: [1, 3]}), manifest)
    rejects = tmp_path / "rejects.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            [
                {
                    schema.SOURCE_ROW: 2,
                    schema.ID: None,
                    "reason": "missing_id",
                    "detail": "column 'id' is empty",
                    "row": "{}",
                }
            ],
            schema=schema.REJECTS_SCHEMA,
        ),
        rejects,
    )
    failed = {
        "b": [
            {schema.ID: "b", "modality": "ocr", "stage": "prepare", "error": "OSError: truncated"},
            {schema.ID: "b", "modality": "faces", "stage": "prepare", "error": "OSError: truncated"},
        ]
    }
    dead = dead_letters(manifest, rejects, failed)
    assert [(d[schema.SOURCE_ROW], d["stage"], d["modality"], d["reason"]) for d in dead] == [
        (2, "ingest", None, "missing_id"),
        (3, "extract:prepare", "faces", "extraction_failed"),
        (3, "extract:prepare", "ocr", "extraction_failed"),
    ]
    assert len({d[schema.SOURCE_ROW] for d in dead}) == 2, "an item failing twice is one dead-lettered row"


# ------------------------------------------------------------------------------------------ a batch job


def test_scoring_is_a_batch_job_whatever_the_share_of_bad_rows(demo_run, tmp_path):
    """The shipped ingest limit (5% rejects) would fail a training set; scoring scores every valid row."""
    summary = run_score(
        from_dict(ScoreConfig, {"device": "cpu", "write_report": False}, "score"),
        demo_run.model,
        demo_run.root / "unlabelled",
        tmp_path / "out",
        JobConfig(max_failure_fraction=0.0),
        from_dict(IngestConfig, {}, "ingest"),
    )
    assert summary["counts"]["read"] == 12 and summary["counts"]["scored"] == 11
    assert summary["counts"]["dead_lettered"] == 1


def test_a_folder_with_no_scorable_row_still_gets_its_summary_and_dead_letters(demo_run, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(demo_run.root / "unlabelled", folder)
    for image in (folder / "images").glob("*.jpg"):
        image.write_bytes(b"not an image")
    summary = score(demo_run, folder, tmp_path / "out")
    counts = summary["counts"]
    assert counts["read"] == 12 and counts["scored"] == 0 and counts["dead_lettered"] == 12
    assert counts["rejected_by_reason"] == {"undecodable_image": 12}
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["counts"] == counts
    pred = pq.read_table(tmp_path / "out" / "predictions.parquet")
    assert pred.num_rows == 0 and "prob_Horror" in pred.column_names
    assert pq.read_table(tmp_path / "out" / "dead_letters.parquet").num_rows == 12
    assert (tmp_path / "out" / "report" / "index.html").is_file()


def test_a_scoring_run_that_fails_leaves_the_previous_outputs_whole(demo_run, tmp_path, monkeypatch):
    import errno

    from pipeline import predict

    out = tmp_path / "out"
    score(demo_run, demo_run.root / "unlabelled", out, write_report=False)
    before = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    class DiskFull(predict.pq.ParquetWriter):
        def write_table(self, table, *args, **kwargs):
            if str(self.where).endswith("label_importance.parquet"):  # half-way through writing the tables
                raise OSError(errno.ENOSPC, "No space left on device", str(self.where))
            return super().write_table(table, *args, **kwargs)

    monkeypatch.setattr(predict.pq, "ParquetWriter", DiskFull)
    with pytest.raises(OSError, match="No space left"):
        score(demo_run, demo_run.root / "unlabelled", out, write_report=False)
    after = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert after == before, "the previous run's outputs are untouched"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no partial folder is left behind"


def test_every_extractor_mismatch_is_reported_before_any_work(demo_run, tmp_path):
    bundle = torch.load(demo_run.model, weights_only=True)
    for m in ("ocr", "faces"):
        bundle["provenance"][m]["weights_sha256"] = "0" * 64
    other = tmp_path / "other.pt"
    torch.save(bundle, other)
    with pytest.raises(FeatureMismatchError, match=r"faces: the extractor here.*\| ocr: the extractor here"):
        score(demo_run, demo_run.root / "unlabelled", tmp_path / "out", model=other)
    assert not (tmp_path / "out").exists()
