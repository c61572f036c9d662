"""The Beam extraction job: canonical manifest -> one modality's variable-length feature sets.

    ReadFromParquet(manifest) -> Prepare (pure per-record work; failures -> dead letters)
        -> RunInference(KeyedModelHandler(<extractor>))   (meta: a Map with train statistics)
        -> ToRow (model errors -> dead letters) -> Progress -> WriteToParquet (shards)

The shards are then merged into one file sorted by id, with provenance metadata, and the counts
are reconciled: every manifest id ends up in the features or in the dead letters, never both.
"""
from __future__ import annotations

import importlib
import json
import logging
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline import features, runtime, schema
from pipeline.config import ConfigError, section, to_dict
from pipeline.extractors import module_for
from pipeline.extractors.base import ItemError, ItemResult, MissingModelError, error_text
from pipeline.ingest import read_manifest

log = logging.getLogger(__name__)


class ExtractionError(runtime.UserError):
    """Extraction as a whole failed (too many failures, lost items, missing model)."""


@dataclass(frozen=True)
class JobConfig:
    """How Beam runs the extraction jobs (shared by every modality)."""

    runner: str = "FnApiRunner"  # local, never waits on the network; or FlinkRunner, SparkRunner, ...
    direct_num_workers: int = 1
    direct_running_mode: str = "in_memory"  # in_memory | multi_threading | multi_processing
    num_shards: int = 1  # shards written by Beam before the final merge
    max_failure_fraction: float = 0.05
    log_every_s: float = 10.0
    options: dict[str, Any] = field(default_factory=dict)  # any other Beam option, passed as --key=value


def beam_options(job: JobConfig, extra: Sequence[str] = ()) -> PipelineOptions:
    """Pipeline options from params (runner, local workers, pass-through options) plus extra flags."""
    flags = [f"--runner={job.runner}", f"--direct_num_workers={job.direct_num_workers}",
             f"--direct_running_mode={job.direct_running_mode}"]
    for key, value in job.options.items():
        if isinstance(value, bool):
            flags.append(f"--{key}" if value else f"--no{key}")  # Beam's boolean flag style
        else:
            flags.append(f"--{key}={value}")
    return PipelineOptions([*flags, *extra])


def modality_config(params: dict[str, Any], name: str) -> tuple[str, Any, Any]:
    """(kind, typed config, extractor module) of modality `name` in params extract.modalities."""
    raw = params.get("extract", {}).get("modalities", {}).get(name)
    if raw is None:
        known = sorted(params.get("extract", {}).get("modalities", {}))
        raise ConfigError(f"extract.modalities: no modality {name!r}; configured: {known}")
    kind = raw.get("kind")
    try:
        module = importlib.import_module(module_for(kind))
    except ValueError as exc:
        raise ConfigError(f"extract.modalities.{name}.kind: {exc}") from None
    return kind, section(params, f"extract.modalities.{name}", module.CONFIG_CLASS), module


# --------------------------------------------------------------------------------------------
# Beam transforms
# --------------------------------------------------------------------------------------------


def _quiet() -> None:
    """Silence third-party chatter that says nothing about this job (progress bars, deprecations)."""
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\..*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


class PrepareFn(beam.DoFn):
    """Per-record work through the extractor's pure `prepare`; failures become dead letters."""

    def __init__(self, modality: str, module_name: str, cfg: Any, root: str):
        self.modality, self.module_name, self.cfg, self.root = modality, module_name, cfg, root

    def setup(self) -> None:
        _quiet()
        self.prepare = importlib.import_module(self.module_name).prepare

    def process(self, row: dict[str, Any]):
        item_id = row[schema.ID]
        try:
            payload = self.prepare(row, self.cfg, Path(self.root))
        except Exception as exc:
            yield beam.pvalue.TaggedOutput("dead", dead_letter(item_id, self.modality, "prepare", error_text(exc)))
            return
        yield item_id, payload  # None: the item has no input for this modality (an empty set)


def dead_letter(item_id: str, modality: str, stage: str, error: str) -> dict[str, Any]:
    return {schema.ID: item_id, "modality": modality, "stage": stage, "error": error}


def to_row(item_id: str, result: ItemResult) -> dict[str, Any]:
    """A feature row from an extraction result."""
    return {
        schema.ID: item_id,
        features.VECTORS: result.vectors.astype("float32").tolist(),
        features.ELEMENTS: result.elements,
        features.CATEGORY_IDS: result.category_ids,
    }


class ToRowFn(beam.DoFn):
    """Extraction results to rows; per-item model errors become dead letters."""

    def __init__(self, modality: str):
        self.modality = modality

    def process(self, keyed: tuple[str, ItemResult | ItemError]):
        item_id, result = keyed
        if isinstance(result, ItemError):
            yield beam.pvalue.TaggedOutput("dead", dead_letter(item_id, self.modality, result.stage, result.error))
        else:
            yield to_row(item_id, result)


class ProgressFn(beam.DoFn):
    """Logs items done, items/s and ETA every `every_s` seconds (per worker)."""

    def __init__(self, modality: str, total: int, every_s: float):
        self.modality, self.total, self.every_s = modality, total, every_s

    def setup(self) -> None:
        self.start = self.last = time.perf_counter()
        self.done = 0

    def process(self, row: dict[str, Any]):
        self.done += 1
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            rate = self.done / (now - self.start)
            log.info("%s: %d/%d items (%.1f items/s, ETA %.0f s)", self.modality, self.done, self.total, rate,
                     max(0.0, self.total - self.done) / rate if rate else float("nan"))
            self.last = now
        yield row


def build(p: beam.Pipeline, manifest: str, modality: str, kind: str, cfg: Any, module: Any, root: str,
          dim: int, tmp: str, job: JobConfig, total: int, stats: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """Add the extraction transforms for one modality to pipeline `p`; returns (rows, dead letters)."""
    rows = p | "ReadManifest" >> beam.io.ReadFromParquet(manifest)
    prepared = rows | "Prepare" >> beam.ParDo(PrepareFn(modality, module.__name__, cfg, root)).with_outputs(
        "dead", main="ready")
    if kind == "meta":
        numeric, categorical = stats["columns"]
        results = prepared.ready | "EncodeMeta" >> beam.MapTuple(
            lambda i, row: (i, module.encode(row, numeric, categorical, stats["stats"])))
    else:
        handler = module.HANDLER_CLASS(cfg)
        handler.empty_dim = dim
        results = prepared.ready | "RunInference" >> RunInference(KeyedModelHandler(handler))
    # one fused chain from the manifest to the writer: rows stream, nothing is buffered in between
    converted = results | "ToRow" >> beam.ParDo(ToRowFn(modality)).with_outputs("dead", main="rows")
    rows = converted.rows | "Progress" >> beam.ParDo(ProgressFn(modality, total, job.log_every_s))
    dead = (prepared.dead, converted.dead) | "MergeDead" >> beam.Flatten()
    rows | "WriteFeatures" >> beam.io.WriteToParquet(
        f"{tmp}/features", features.feature_schema(dim), num_shards=job.num_shards, file_name_suffix=".parquet")
    dead | "WriteDeadLetters" >> beam.io.WriteToParquet(
        f"{tmp}/dead", features.DEAD_LETTER_SCHEMA, num_shards=job.num_shards, file_name_suffix=".parquet")
    return rows, dead


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def _read_shards(folder: Path, prefix: str, sch: pa.Schema) -> pa.Table:
    parts = sorted(folder.glob(f"{prefix}-*.parquet"))
    tables = [pq.read_table(p).cast(sch) for p in parts]
    return pa.concat_tables(tables) if tables else sch.empty_table()


def run_extraction(modality: str, params: dict[str, Any], manifest_path: Path, out_dir: Path, metrics_path: Path,
                   extra_beam_args: Sequence[str] = (), test_pipeline: beam.Pipeline | None = None,
                   expect: dict[str, Any] | None = None) -> dict[str, Any]:
    """Extract modality `modality` for every manifest row; writes features, dead letters and counts.

    `expect` is a model bundle's provenance of this modality (scoring new data): the extractor,
    model, weights and dimension must match it before any item is processed, and a meta modality
    reuses the bundle's training statistics instead of fitting new ones.
    """
    _quiet()
    t0 = time.perf_counter()
    job = section(params, "extract.job", JobConfig)
    kind, cfg, module = modality_config(params, modality)
    manifest, mmeta = read_manifest(manifest_path)
    ids = manifest[schema.ID].to_pylist()
    root = mmeta["dataset"]["dir"]
    if kind in ("text", "list") and cfg.column not in mmeta["fields"]["text" if kind == "text" else "lists"]:
        raise ConfigError(f"extract.modalities.{modality}.column: {cfg.column!r} is not a {kind} column of the "
                          f"manifest; it has {mmeta['fields']}")
    stats = None
    try:
        if kind == "meta":
            if expect is not None:  # scoring: the training statistics, on the columns they were fitted on
                fitted = expect["stats"]
                numeric, categorical = list(fitted["numeric"]), list(fitted["categorical"])
                module.columns(module.CONFIG_CLASS(numeric=tuple(numeric), categorical=tuple(categorical)),
                               mmeta["fields"])
            else:
                numeric, categorical = module.columns(cfg, mmeta["fields"])
                fitted = module.fit(manifest, schema.SPLIT, numeric, categorical, cfg.max_categories)
            stats = {"columns": (numeric, categorical), "stats": fitted}
            described = module.describe(cfg, numeric, fitted)
            described["categorical"] = {c: fitted["categorical"][c] for c in categorical}
        else:
            described = module.describe(cfg)
    except (MissingModelError, ValueError) as exc:
        raise ExtractionError(f"extract.modalities.{modality}: {exc}") from None
    dim = described["dim"]
    if expect is not None:
        diffs = features.provenance_diffs(expect, described, ("extractor", "model_id", "weights_sha256", "dim"),
                                          "model has", "this installation has")
        if diffs:
            raise features.FeatureMismatchError(
                f"{modality}: the extractor here is not the one the model was trained with ({'; '.join(diffs)}). "
                "Install the same extractor weights, or retrain the model on features from this installation.")

    tmp = out_dir / "_shards"
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.mkdir(parents=True)
    log.info("%s: extracting %d items with %s (%s, dim %d) on %s", modality, len(ids), described["model_id"],
             kind, dim, job.runner)
    p = test_pipeline or beam.Pipeline(options=beam_options(job, extra_beam_args))
    build(p, str(manifest_path), modality, kind, cfg, module, root, dim, str(tmp), job, len(ids), stats)
    result = p.run()
    result.wait_until_finish()

    feats = _read_shards(tmp, "features", features.feature_schema(dim))
    dead = _read_shards(tmp, "dead", features.DEAD_LETTER_SCHEMA)
    meta = {
        "modality": modality, "kind": kind, **{k: v for k, v in described.items() if k != "stats"},
        "manifest_sha256": features.file_sha256(manifest_path), "params": to_dict(cfg),
        "items": feats.num_rows,
    }
    if stats is not None:
        meta["stats"] = stats["stats"]
    features.write_feature_table(feats, dim, meta, out_dir / "features.parquet")
    dead = dead.sort_by(schema.ID)
    pq.write_table(dead, out_dir / "dead_letters.parquet", compression="zstd")
    shutil.rmtree(tmp)

    got, failed = feats[schema.ID].to_pylist(), dead[schema.ID].to_pylist()
    lost = set(ids) - set(got) - set(failed)
    twice = set(got) & set(failed)
    n_vectors = pc.list_value_length(feats[features.VECTORS]).to_pylist()
    elapsed = time.perf_counter() - t0
    metrics = {
        "modality": modality, "kind": kind, "items_in": len(ids), "written": len(got),
        "empty_sets": sum(1 for n in n_vectors if n == 0), "failed": len(failed),
        "elements": sum(n_vectors), "max_elements": max(n_vectors, default=0),
        "failed_by_stage": {s: failed_stages.count(s) for s in sorted(set(failed_stages))}
        if (failed_stages := dead["stage"].to_pylist()) else {},
        "seconds": round(elapsed, 1), "items_per_s": round(len(ids) / elapsed, 2) if elapsed else None,
    }
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    log.info("%s: %d in, %d written (%d empty sets, %d elements), %d failed in %.1f s (%.1f items/s)", modality,
             len(ids), len(got), metrics["empty_sets"], metrics["elements"], len(failed), elapsed, metrics["items_per_s"])
    if lost or twice or len(got) + len(failed) != len(ids):
        raise ExtractionError(f"{modality}: counts do not reconcile: {len(lost)} ids lost {sorted(lost)[:5]}, "
                              f"{len(twice)} both written and failed {sorted(twice)[:5]}")
    if ids and len(failed) / len(ids) > job.max_failure_fraction:
        first = dead.slice(0, 3).to_pylist()
        raise ExtractionError(f"{modality}: {len(failed)} of {len(ids)} items failed, more than "
                              f"extract.job.max_failure_fraction={job.max_failure_fraction}; first: {first}; "
                              f"see {out_dir / 'dead_letters.parquet'}")
    return metrics


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the extract@<modality> stages (and of `dmms extract`)."""
    p = runtime.parser("Extract one modality's feature sets with Apache Beam.")
    p.add_argument("--modality", required=True, help="a key of params extract.modalities")
    p.add_argument("--manifest", required=True, help="canonical manifest written by ingest")
    p.add_argument("--out", required=True, help="folder for features.parquet and dead_letters.parquet")
    p.add_argument("--metrics", required=True, help="metrics JSON")
    args, beam_args = p.parse_known_args(argv)  # unknown flags go to Beam
    params, _ = runtime.setup(args.params)
    run_extraction(args.modality, params, Path(args.manifest), Path(args.out), Path(args.metrics), beam_args)
