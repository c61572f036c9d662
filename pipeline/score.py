"""Batch scoring: a trained model bundle applied to a new (usually unlabelled) dataset folder.

    dataset folder -> ingest (the bundle's dataset contract; labels optional; every row in split "score")
        -> the bundle's extractors, each a Beam job (refused up front when this installation's model
           or weights differ from the bundle's; meta reuses the training statistics)
        -> predictions and importances (as the predict stage writes them) -> optional HTML report

Under --output: ingest/ (manifest, rejects), features/<modality>/, the prediction tables,
dead_letters.parquet (every row that could not be scored, with its stage and reason),
summary.json with counts that reconcile (read = scored + dead-lettered), and report/.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import extract, runtime, schema
from pipeline.bundle import load_bundle, load_scoring_inputs
from pipeline.config import ConfigError, DatasetConfig, IngestConfig, from_dict
from pipeline.extract import JobConfig, run_extraction
from pipeline.ingest import run_ingest
from pipeline.predict import PredictConfig, predict_items, write_outputs
from pipeline.readers import IngestError, RawRow, read_rows, required_columns
from pipeline.report import ReportConfig, write_report
from pipeline.runtime import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreConfig(PredictConfig):
    """Settings of batch scoring (params score): the prediction settings (batch_size, device,
    label_conditional, ablation; every row is scored, so `splits` stays null) plus these."""

    input: str = "data/demo/unlabelled"  # the dataset folder the score stage scores (the CLI takes --input)
    dataset: dict[str, Any] = field(default_factory=dict)  # overrides of the bundle's dataset contract
    allow_missing_columns: bool = False  # score with a modality empty when the source lacks its column
    report: ReportConfig = field(default_factory=ReportConfig)
    write_report: bool = True

    def validate(self, where: str) -> None:
        super().validate(where)
        if self.splits is not None:
            raise ConfigError(f"{where}.splits: scoring scores every row of the folder; remove the key")


def scoring_contract(bundle: dict[str, Any], input_dir: Path, overrides: dict[str, Any]) -> DatasetConfig:
    """The bundle's dataset contract pointed at `input_dir`, with `overrides` applied (labels optional)."""
    if not bundle.get("dataset"):
        raise UserError("the model bundle records no dataset contract (it was written by an older version); "
                        "retrain it to score new datasets")
    raw = runtime.merge(copy.deepcopy(bundle["dataset"]), overrides)
    raw["dir"] = str(input_dir)
    raw.setdefault("labels", {})["required_in"] = []
    raw.setdefault("split", {})["column"] = None
    return from_dict(DatasetConfig, raw, "score.dataset")


def read_source(contract: DatasetConfig, allow_missing: bool) -> tuple[DatasetConfig, frozenset[str], list[RawRow]]:
    """Read the folder's rows once and compare its columns with the contract: a missing labels
    column is normal (it is dropped); another missing column is an error unless `allow_missing`
    (then its values are empty). Returns the contract to ingest with, the missing columns, the rows."""
    root = Path(contract.dir)
    if contract.format == "mmimdb":
        return contract, frozenset(), read_rows(contract, root)
    if root.is_dir() and not (root / contract.manifest).is_file():
        raise IngestError(f"{contract.dir}: no {contract.manifest!r}, the manifest file the model's dataset contract "
                          "names; name yours with score.dataset in a --params overlay, e.g. "
                          "'score: {dataset: {manifest: new.csv, format: csv}}'")
    rows = read_rows(contract, root, optional=frozenset(required_columns(contract)))  # checks the folder
    present = set().union(*(r.data.keys() for r in rows if r.data is not None)) if rows else set()
    missing = [c for c in required_columns(contract) if c not in present]
    if contract.labels.column in missing:
        missing.remove(contract.labels.column)
        contract = dataclasses.replace(contract, labels=dataclasses.replace(contract.labels, column=None))
    if contract.id in missing or (contract.image in missing and contract.image_required):
        raise IngestError(f"{contract.dir}: the dataset has no {contract.id if contract.id in missing else contract.image!r} "
                          f"column, which the model's dataset contract needs; found {sorted(present)}")
    if missing and not allow_missing:
        raise IngestError(
            f"{contract.dir}: column(s) {missing} of the model's dataset contract are not in the dataset "
            f"(found {sorted(present)}). Add them, map them with score.dataset, or set "
            "score.allow_missing_columns: true (--allow-missing-columns) to score with those modalities empty.")
    if missing:
        log.warning("scoring without column(s) %s: the modalities that read them are empty for every item", missing)
    return contract, frozenset(missing), rows


def extract_all(bundle: dict[str, Any], job: JobConfig, manifest: Path, features_root: Path,
                extra_beam_args: Sequence[str] = ()) -> dict[str, list[dict[str, Any]]]:
    """Run each of the bundle's extractors on the manifest, as its extract stage would; returns the
    extraction dead letters by item id. Every extractor is checked against the bundle first."""
    specs = {m: extract.modality(m, prov["params"], f"bundle.provenance.{m}.params")
             for m, prov in bundle["provenance"].items()}
    table, mmeta = schema.read_manifest(manifest)
    for name, spec in specs.items():  # all refusals before any extraction starts
        extract.describe(spec, table, mmeta, expect=bundle["provenance"][name])
    failed: dict[str, list[dict[str, Any]]] = {}
    for name, spec in specs.items():
        folder = features_root / name
        run_extraction(spec, job, manifest, folder, folder / "counts.json", extra_beam_args,
                       expect=bundle["provenance"][name])
        for row in pq.read_table(folder / "dead_letters.parquet").to_pylist():
            failed.setdefault(row[schema.ID], []).append(row)
    return failed


def run_score(cfg: ScoreConfig, model_path: Path, input_dir: Path, out_dir: Path, job: JobConfig,
              ingest_cfg: IngestConfig, extra_beam_args: Sequence[str] = ()) -> dict[str, Any]:
    """Score every row of the dataset at `input_dir`; returns the summary (with reconciled counts)."""
    t0 = time.perf_counter()
    _, bundle = load_bundle(model_path)
    contract, missing, rows = read_source(scoring_contract(bundle, input_dir, cfg.dataset), cfg.allow_missing_columns)
    manifest = out_dir / "ingest" / "manifest.parquet"
    counts = run_ingest(contract, ingest_cfg, out_dir / "ingest", out_dir / "ingest" / "counts.json",
                        fixed_split=schema.SCORE_SPLIT, vocabulary=bundle["label_names"], rows=rows)
    log.info("scoring %d items of %s with %s", counts["accepted"], input_dir, model_path)
    failed = extract_all(bundle, job, manifest, out_dir / "features", extra_beam_args)

    inputs = load_scoring_inputs(model_path, manifest, out_dir / "features", cfg.device)
    positions = np.array([i for i, item in enumerate(inputs.ids) if item not in failed], dtype=np.int64)
    prediction = predict_items(inputs, positions, cfg)
    summary = prediction.summary

    dead = dead_letters(manifest, out_dir / "ingest" / "rejects.parquet", failed)
    pq.write_table(pa.Table.from_pylist(dead, schema=schema.SCORE_DEAD_LETTER_SCHEMA), out_dir / "dead_letters.parquet",
                   compression="zstd")
    n_dead = len({d[schema.SOURCE_ROW] for d in dead})
    summary["counts"] = {
        "read": counts["read"], "ingest_rejected": counts["rejected"], "extract_failed": len(failed),
        "scored": len(positions), "dead_lettered": n_dead,
        "rejected_by_reason": {k: v for k, v in counts["rejected_by_reason"].items() if v},
        "missing_columns": sorted(missing),
    }
    summary["model"] = str(model_path)
    summary["input"] = str(input_dir)
    summary["seconds"] = time.perf_counter() - t0
    if counts["read"] != len(positions) + n_dead:
        raise UserError(f"scoring counts do not reconcile: read {counts['read']}, scored {len(positions)}, "
                        f"dead-lettered {n_dead}")
    write_outputs(prediction, inputs, out_dir)
    if cfg.write_report:
        write_report(cfg.report, out_dir, manifest, out_dir / "report", title=f"Scores of {input_dir.name}")
    log.info("read %d rows: %d scored, %d dead-lettered (%d rejected at ingest, %d failed extraction) in %.1f s; "
             "outputs in %s", counts["read"], len(positions), n_dead, counts["rejected"], len(failed),
             summary["seconds"], out_dir)
    return summary


def dead_letters(manifest: Path, rejects: Path, failed: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One record per ingest reject and per failed extraction (an item may fail in several modalities)."""
    out = [{schema.SOURCE_ROW: r[schema.SOURCE_ROW], schema.ID: r[schema.ID], schema.STAGE: "ingest",
            schema.MODALITY: None, schema.REASON: r[schema.REASON], schema.DETAIL: r[schema.DETAIL]}
           for r in pq.read_table(rejects).to_pylist()]
    table = pq.read_table(manifest, columns=[schema.ID, schema.SOURCE_ROW])
    source = dict(zip(table[schema.ID].to_pylist(), table[schema.SOURCE_ROW].to_pylist()))
    for item, rows in sorted(failed.items()):
        for r in rows:
            out.append({schema.SOURCE_ROW: source[item], schema.ID: item, schema.STAGE: f"extract:{r[schema.STAGE]}",
                        schema.MODALITY: r[schema.MODALITY], schema.REASON: "extraction_failed",
                        schema.DETAIL: r[schema.ERROR]})
    return sorted(out, key=lambda d: (d[schema.SOURCE_ROW], d[schema.MODALITY] or ""))
