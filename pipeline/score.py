"""Batch scoring: a trained model bundle applied to a new (usually unlabelled) dataset folder.

    dataset folder -> ingest (the bundle's dataset contract; labels optional; every row in split "score")
        -> the bundle's extractors, each a Beam job (refused up front when this installation's model
           or weights differ from the bundle's; meta reuses the training statistics)
        -> predictions and importances (as the predict stage writes them) -> optional HTML report

Into the output folder: ingest/ (manifest, rejects), features/<modality>/, the prediction tables,
dead_letters.parquet (every row that could not be scored, with its stage and reason),
summary.json with counts that reconcile (read = scored + dead-lettered), and report/.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import extract, runtime, schema
from pipeline.bundle import Bundle, load_bundle, load_scoring_inputs
from pipeline.config import ConfigError, DatasetConfig, IngestConfig, from_dict
from pipeline.extract import JobConfig, run_extraction
from pipeline.features import FeatureMismatchError
from pipeline.ingest import run_ingest
from pipeline.predict import PredictConfig, element_metadata, predict_items, predict_nothing, write_outputs
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


def scoring_contract(bundle: Bundle, input_dir: Path, overrides: dict[str, Any]) -> DatasetConfig:
    """The bundle's dataset contract pointed at `input_dir`, with `overrides` applied (labels optional)."""
    if not bundle.dataset:
        raise UserError("the model bundle records no dataset contract; retrain it to score new datasets")
    raw = runtime.merge(copy.deepcopy(bundle.dataset), overrides)
    raw["dir"] = str(input_dir)
    raw.setdefault("labels", {})["required_in"] = []
    raw.setdefault("split", {})["column"] = None
    return from_dict(DatasetConfig, raw, "score.dataset")


def read_source(
    contract: DatasetConfig, allow_missing: bool, max_field_chars: int = 1_000_000
) -> tuple[DatasetConfig, frozenset[str], list[RawRow]]:
    """Read the folder's rows once and compare its columns with the contract: a missing labels
    column is normal (it is dropped); another missing column is an error unless `allow_missing`
    (then its values are empty). Returns the contract to ingest with, the missing columns, the rows."""
    root = Path(contract.dir)
    if contract.format == "mmimdb":
        return contract, frozenset(), read_rows(contract, root, max_field_chars=max_field_chars)
    if root.is_dir() and not (root / contract.manifest).is_file():
        raise IngestError(
            f"{contract.dir}: no {contract.manifest!r}, the manifest file the model's dataset contract "
            "names; name yours with score.dataset in a --params overlay, e.g. "
            "'score: {dataset: {manifest: new.csv, format: csv}}'"
        )
    rows = read_rows(
        contract,
        root,
        optional=frozenset(required_columns(contract)),  # checks the folder
        max_field_chars=max_field_chars,
    )
    present = set().union(*(r.data.keys() for r in rows if r.data is not None)) if rows else set()
    missing = [c for c in required_columns(contract) if c not in present]
    if contract.labels.column in missing:
        missing.remove(contract.labels.column)
        contract = dataclasses.replace(contract, labels=dataclasses.replace(contract.labels, column=None))
    if contract.id in missing or (contract.image in missing and contract.image_required):
        raise IngestError(
            f"{contract.dir}: the dataset has no {contract.id if contract.id in missing else contract.image!r} "
            f"column, which the model's dataset contract needs; found {sorted(present)}"
        )
    if missing and not allow_missing:
        raise IngestError(
            f"{contract.dir}: column(s) {missing} of the model's dataset contract are not in the dataset "
            f"(found {sorted(present)}). Add them, map them with score.dataset, or set "
            "score.allow_missing_columns: true (--allow-missing-columns) to score with those modalities empty."
        )
    if missing:
        log.warning("scoring without column(s) %s: the modalities that read them are empty for every item", missing)
    return contract, frozenset(missing), rows


def extractor_specs(bundle: Bundle) -> dict[str, extract.Modality]:
    """The bundle's extractors, each checked against this installation (model, weights, dimension)
    before anything is read or extracted, so every mismatch is found up front (a fitted kind, meta,
    describes itself from the bundle's statistics)."""
    specs = {
        m: extract.modality(m, prov.params, f"bundle.provenance.{m}.params") for m, prov in bundle.provenance.items()
    }
    problems = []
    for name, spec in specs.items():
        try:
            extract.describe(spec, expect=bundle.provenance[name].as_dict())
        except (FeatureMismatchError, extract.ExtractionError) as exc:
            problems.append(str(exc))
    if problems:
        raise FeatureMismatchError(" | ".join(problems))
    return specs


def extract_all(
    specs: dict[str, extract.Modality], bundle: Bundle, job: JobConfig, manifest: Path, features_root: Path
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, dict[str, int]]]:
    """Run each of the bundle's extractors on the manifest, as its extract stage would, as a batch job
    (failures are dead letters whatever their share); returns the extraction dead letters by item id
    and, per modality, how many items were computed, reused from the cache and failed."""
    job = dataclasses.replace(job, max_failure_fraction=1.0)
    failed: dict[str, list[dict[str, Any]]] = {}
    done: dict[str, dict[str, int]] = {}
    for name, spec in specs.items():
        folder = features_root / name
        metrics = run_extraction(
            spec, job, manifest, folder, folder / "counts.json", expect=bundle.provenance[name].as_dict()
        )
        done[name] = {k: metrics[k] for k in ("computed", "reused", "failed")}
        for row in pq.read_table(folder / "dead_letters.parquet").to_pylist():
            failed.setdefault(row[schema.ID], []).append(row)
    return failed, done


def run_score(
    cfg: ScoreConfig, model_path: Path, input_dir: Path, out_dir: Path, job: JobConfig, ingest_cfg: IngestConfig
) -> dict[str, Any]:
    """Score every row of the dataset at `input_dir` as a batch job: every valid row is scored, every
    other row is a dead letter with its reason, whatever their share. Outputs are written aside and
    replace `out_dir` only when complete. Returns the summary (with counts that reconcile)."""
    t0 = time.perf_counter()
    model, bundle = load_bundle(model_path)
    specs = extractor_specs(bundle)
    contract, missing, rows = read_source(
        scoring_contract(bundle, input_dir, cfg.dataset), cfg.allow_missing_columns, ingest_cfg.max_field_chars
    )
    with runtime.staged_output(out_dir) as work:
        manifest = work / "ingest" / "manifest.parquet"
        counts = run_ingest(
            contract,
            dataclasses.replace(ingest_cfg, max_reject_fraction=1.0),
            work / "ingest",
            work / "ingest" / "counts.json",
            fixed_split=schema.SCORE_SPLIT,
            vocabulary=bundle.label_names,
            rows=rows,
            check_limits=False,
        )
        log.info("scoring %d items of %s with %s", counts["accepted"], input_dir, model_path)
        failed: dict[str, list[dict[str, Any]]] = {}
        extraction: dict[str, dict[str, int]] = {}
        if counts["accepted"]:
            failed, extraction = extract_all(specs, bundle, job, manifest, work / "features")
            inputs = load_scoring_inputs(model_path, manifest, work / "features", cfg.device)
            positions = np.array([i for i, item in enumerate(inputs.ids) if item not in failed], dtype=np.int64)
            prediction = predict_items(inputs, positions, cfg)
            element_meta = functools.partial(element_metadata, inputs.dirs, bundle)
        else:
            log.warning("no row of %s can be scored: every one is a dead letter", input_dir)
            prediction, element_meta = predict_nothing(model, bundle, cfg), lambda ids: {}
        summary = prediction.summary
        dead = dead_letters(manifest, work / "ingest" / "rejects.parquet", failed)
        pq.write_table(
            pa.Table.from_pylist(dead, schema=schema.SCORE_DEAD_LETTER_SCHEMA),
            work / "dead_letters.parquet",
            compression="zstd",
        )
        summary["counts"] = _counts(counts, failed, len(prediction.scored.ids), dead, missing)
        summary["extraction"] = extraction  # per modality: computed, reused (from the cache), failed
        summary.update(model=str(model_path), input=str(input_dir), seconds=time.perf_counter() - t0)
        write_outputs(prediction, work, element_meta)
        if cfg.write_report:
            write_report(cfg.report, work, manifest, work / "report", title=f"Scores of {input_dir.name}")
    c = summary["counts"]
    log.info(
        "read %d rows: %d scored, %d dead-lettered (%d rejected at ingest, %d failed extraction) in %.1f s; "
        "outputs in %s",
        c["read"],
        c["scored"],
        c["dead_lettered"],
        c["ingest_rejected"],
        c["extract_failed"],
        summary["seconds"],
        out_dir,
    )
    return summary


def _counts(
    ingest_counts: dict[str, Any],
    failed: dict[str, Any],
    scored: int,
    dead: list[dict[str, Any]],
    missing: frozenset[str],
) -> dict[str, Any]:
    """The summary's counts; read = scored + dead-lettered, or the run fails."""
    n_dead = len({d[schema.SOURCE_ROW] for d in dead})
    if ingest_counts["read"] != scored + n_dead:
        raise UserError(
            f"scoring counts do not reconcile: read {ingest_counts['read']}, scored {scored}, dead-lettered {n_dead}"
        )
    return {
        "read": ingest_counts["read"],
        "ingest_rejected": ingest_counts["rejected"],
        "extract_failed": len(failed),
        "scored": scored,
        "dead_lettered": n_dead,
        "rejected_by_reason": {k: v for k, v in ingest_counts["rejected_by_reason"].items() if v},
        "missing_columns": sorted(missing),
    }


def dead_letters(manifest: Path, rejects: Path, failed: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One record per ingest reject and per failed extraction (an item may fail in several modalities)."""
    out = [
        {
            schema.SOURCE_ROW: r[schema.SOURCE_ROW],
            schema.ID: r[schema.ID],
            schema.STAGE: "ingest",
            schema.MODALITY: None,
            schema.REASON: r[schema.REASON],
            schema.DETAIL: r[schema.DETAIL],
        }
        for r in pq.read_table(rejects).to_pylist()
    ]
    table = pq.read_table(manifest, columns=[schema.ID, schema.SOURCE_ROW])
    source = dict(zip(table[schema.ID].to_pylist(), table[schema.SOURCE_ROW].to_pylist()))
    for item, rows in sorted(failed.items()):
        for r in rows:
            out.append(
                {
                    schema.SOURCE_ROW: source[item],
                    schema.ID: item,
                    schema.STAGE: f"extract:{r[schema.STAGE]}",
                    schema.MODALITY: r[schema.MODALITY],
                    schema.REASON: "extraction_failed",
                    schema.DETAIL: r[schema.ERROR],
                }
            )
    return sorted(out, key=lambda d: (d[schema.SOURCE_ROW], d[schema.MODALITY] or ""))
