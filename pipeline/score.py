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
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import runtime, schema
from pipeline.config import ConfigError, DatasetConfig, IngestConfig, from_dict, section, to_dict
from pipeline.extract import JobConfig, run_extraction
from pipeline.ingest import IngestError, RawRow, read_rows, required_columns, run_ingest
from pipeline.predict import (PredictConfig, element_metadata, load_scoring_inputs, score_store, summarise,
                              write_outputs)
from pipeline.report import ReportConfig, write_report
from pipeline.runtime import UserError
from pipeline.train import load_bundle, rounded

log = logging.getLogger(__name__)

SCORE_SPLIT = "score"
DEAD_LETTERS_SCHEMA = pa.schema([
    (schema.SOURCE_ROW, pa.int64()), (schema.ID, pa.string()), ("stage", pa.string()),
    ("modality", pa.string()), ("reason", pa.string()), ("detail", pa.string()),
])


@dataclass(frozen=True)
class ScoreConfig:
    """Settings of batch scoring (params score)."""

    input: str = "data/demo/unlabelled"  # the dataset folder the score stage scores (the CLI takes --input)
    dataset: dict[str, Any] = field(default_factory=dict)  # overrides of the bundle's dataset contract
    allow_missing_columns: bool = False  # score with a modality empty when the source lacks its column
    batch_size: int = 256
    device: str = "auto"
    label_conditional: bool = True
    ablation: bool = True
    report: ReportConfig = field(default_factory=ReportConfig)
    write_report: bool = True

    def validate(self, where: str) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"{where}.batch_size: expected >= 1, found {self.batch_size}")

    def predict_config(self) -> PredictConfig:
        return PredictConfig(splits=None, batch_size=self.batch_size, device=self.device,
                             label_conditional=self.label_conditional, ablation=self.ablation)


def scoring_contract(bundle: dict[str, Any], input_dir: Path, overrides: dict[str, Any]) -> DatasetConfig:
    """The bundle's dataset contract pointed at `input_dir`, with `overrides` applied (labels optional)."""
    if not bundle.get("dataset"):
        raise UserError("the model bundle records no dataset contract (it was written by an older version); "
                        "retrain it to score new datasets")
    raw = copy.deepcopy(bundle["dataset"])
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
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


def run_score(cfg: ScoreConfig, model_path: Path, input_dir: Path, out_dir: Path, job_params: dict[str, Any],
              ingest_cfg: IngestConfig, extra_beam_args: Sequence[str] = ()) -> dict[str, Any]:
    """Score every row of the dataset at `input_dir`; returns the summary (with reconciled counts)."""
    t0 = time.perf_counter()
    _, bundle = load_bundle(model_path)
    contract, missing, rows = read_source(scoring_contract(bundle, input_dir, cfg.dataset), cfg.allow_missing_columns)
    manifest = out_dir / "ingest" / "manifest.parquet"
    counts = run_ingest(contract, ingest_cfg, out_dir / "ingest", out_dir / "ingest" / "counts.json",
                        fixed_split=SCORE_SPLIT, vocabulary=bundle["label_names"], rows=rows)
    log.info("scoring %d items of %s with %s", counts["accepted"], input_dir, model_path)

    failed: dict[str, list[dict[str, Any]]] = {}
    for modality, prov in bundle["provenance"].items():
        params = {"extract": {"job": job_params, "modalities": {modality: prov["params"]}}}
        folder = out_dir / "features" / modality
        run_extraction(modality, params, manifest, folder, folder / "counts.json", extra_beam_args, expect=prov)
        for row in pq.read_table(folder / "dead_letters.parquet").to_pylist():
            failed.setdefault(row[schema.ID], []).append(row)

    model, bundle, store, dirs, (ids, _, labels) = load_scoring_inputs(model_path, manifest, out_dir / "features",
                                                                      cfg.device)
    positions = np.array([i for i, item in enumerate(ids) if item not in failed], dtype=np.int64)
    scored = score_store(model, bundle, store, positions, [SCORE_SPLIT] * len(positions), cfg.predict_config())
    truth = [labels[i] for i in positions]
    summary = summarise(scored, truth, bundle["task"], bundle["thresholds"])

    dead = dead_letters(manifest, out_dir / "ingest" / "rejects.parquet", failed)
    pq.write_table(pa.Table.from_pylist(dead, schema=DEAD_LETTERS_SCHEMA), out_dir / "dead_letters.parquet",
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
    write_outputs(scored, truth, element_metadata(dirs, bundle, scored.ids), summary, out_dir)
    if cfg.write_report:
        write_report(cfg.report, out_dir, manifest, out_dir / "report", title=f"Scores of {input_dir.name}")
    log.info("read %d rows: %d scored, %d dead-lettered (%d rejected at ingest, %d failed extraction) in %.1f s; "
             "outputs in %s", counts["read"], len(positions), n_dead, counts["rejected"], len(failed),
             summary["seconds"], out_dir)
    return summary


def dead_letters(manifest: Path, rejects: Path, failed: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One record per ingest reject and per failed extraction (an item may fail in several modalities)."""
    out = [{schema.SOURCE_ROW: r[schema.SOURCE_ROW], schema.ID: r[schema.ID], "stage": "ingest", "modality": None,
            "reason": r["reason"], "detail": r["detail"]} for r in pq.read_table(rejects).to_pylist()]
    table = pq.read_table(manifest, columns=[schema.ID, schema.SOURCE_ROW])
    source = dict(zip(table[schema.ID].to_pylist(), table[schema.SOURCE_ROW].to_pylist()))
    for item, rows in sorted(failed.items()):
        for r in rows:
            out.append({schema.SOURCE_ROW: source[item], schema.ID: item, "stage": f"extract:{r['stage']}",
                        "modality": r["modality"], "reason": "extraction_failed", "detail": r["error"]})
    return sorted(out, key=lambda d: (d[schema.SOURCE_ROW], d["modality"] or ""))


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the score stage and of `dmms score`."""
    p = runtime.parser("Score a new dataset folder with a trained model bundle: ingest, extract, predict, report.")
    p.add_argument("--model", required=True, help="model bundle (model.pt) written by train")
    p.add_argument("--input", help="dataset folder to score (default: params score.input)")
    p.add_argument("--output", required=True, help="folder for everything scoring writes")
    p.add_argument("--metrics", help="also write the summary JSON here")
    p.add_argument("--allow-missing-columns", action="store_true",
                   help="score with a modality empty when the dataset lacks its column")
    args, beam_args = p.parse_known_args(argv)  # unknown flags go to Beam
    params, _ = runtime.setup(args.params)
    cfg = section(params, "score", ScoreConfig)
    if args.allow_missing_columns:
        cfg = dataclasses.replace(cfg, allow_missing_columns=True)
    job = to_dict(section(params, "extract.job", JobConfig))
    summary = run_score(cfg, Path(args.model), Path(args.input or cfg.input), Path(args.output), job,
                        section(params, "ingest", IngestConfig), beam_args)
    if args.metrics:
        Path(args.metrics).parent.mkdir(parents=True, exist_ok=True)
        Path(args.metrics).write_text(json.dumps(rounded(summary), indent=2) + "\n", encoding="utf-8")
