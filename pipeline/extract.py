"""The Beam extraction job: canonical manifest -> one modality's variable-length feature sets.

    ReadFromParquet(manifest) -> Prepare (pure per-record work; failures -> dead letters)
        -> RunInference(KeyedModelHandler(<extractor>))   (meta: a Map with train statistics)
        -> ToRow (model errors -> dead letters) -> Progress -> WriteToParquet (shards)

The shards are then merged into one file sorted by id, with provenance metadata, and the counts
are reconciled: every manifest id ends up in the features or in the dead letters, never both.
"""
from __future__ import annotations

import dataclasses
import importlib
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
from pipeline.config import ConfigError, from_dict, to_dict
from pipeline.extractors import module_for
from pipeline.extractors.base import ItemError, ItemResult, MissingModelError, error_text

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


@dataclass(frozen=True)
class Modality:
    """One configured extraction modality: its name, its extractor kind and that kind's typed config."""

    name: str
    kind: str
    cfg: Any  # the kind's CONFIG_CLASS (ImageConfig, FacesConfig, ...)
    where: str  # where its params came from, for errors: extract.modalities.<name> or a bundle's record

    @property
    def module(self) -> Any:
        """The extractor module of this kind (prepare, describe, HANDLER_CLASS, ...)."""
        return importlib.import_module(module_for(self.kind))


def modality(name: str, raw: Any, where: str | None = None) -> Modality:
    """The typed config of modality `name` from its params mapping (`where` names it in errors).

    The stage builds it from params extract.modalities.<name>; scoring from a model bundle's record.
    """
    where = where or f"extract.modalities.{name}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with a 'kind', found {raw!r}")
    kind = raw.get("kind")
    try:
        module = importlib.import_module(module_for(kind))
    except ValueError as exc:
        raise ConfigError(f"{where}.kind: {exc}") from None
    return Modality(name, kind, from_dict(module.CONFIG_CLASS, raw, where), where)


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
    """A record of schema.EXTRACT_DEAD_LETTER_SCHEMA."""
    return {schema.ID: item_id, schema.MODALITY: modality, schema.STAGE: stage, schema.ERROR: error}


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
    """Items done, items/s and ETA of this worker (runtime.Progress: a bar on a terminal, else log lines)."""

    def __init__(self, modality: str, total: int, every_s: float):
        self.modality, self.total, self.every_s = modality, total, every_s

    def setup(self) -> None:
        self.progress = runtime.Progress(self.modality, self.total, "items", self.every_s, log)

    def process(self, row: dict[str, Any]):
        self.progress.update()
        yield row

    def teardown(self) -> None:
        self.progress.close()


def build(p: beam.Pipeline, manifest: str, spec: Modality, root: str, dim: int, tmp: str, job: JobConfig,
          total: int, stats: MetaStats | None = None) -> tuple[Any, Any]:
    """Add the extraction transforms for one modality to pipeline `p`; returns (rows, dead letters)."""
    module = spec.module
    rows = p | "ReadManifest" >> beam.io.ReadFromParquet(manifest)
    prepared = rows | "Prepare" >> beam.ParDo(PrepareFn(spec.name, module.__name__, spec.cfg, root)).with_outputs(
        "dead", main="ready")
    if spec.kind == "meta":
        numeric, categorical, fitted = stats.numeric, stats.categorical, stats.fitted
        results = prepared.ready | "EncodeMeta" >> beam.MapTuple(
            lambda i, row: (i, module.encode(row, numeric, categorical, fitted)))
    else:
        handler = module.HANDLER_CLASS(spec.cfg)
        handler.empty_dim = dim
        results = prepared.ready | "RunInference" >> RunInference(KeyedModelHandler(handler))
    # one fused chain from the manifest to the writer: rows stream, nothing is buffered in between
    converted = results | "ToRow" >> beam.ParDo(ToRowFn(spec.name)).with_outputs("dead", main="rows")
    rows = converted.rows | "Progress" >> beam.ParDo(ProgressFn(spec.name, total, job.log_every_s))
    dead = (prepared.dead, converted.dead) | "MergeDead" >> beam.Flatten()
    rows | "WriteFeatures" >> beam.io.WriteToParquet(
        f"{tmp}/features", features.feature_schema(dim), num_shards=job.num_shards, file_name_suffix=".parquet")
    dead | "WriteDeadLetters" >> beam.io.WriteToParquet(
        f"{tmp}/dead", schema.EXTRACT_DEAD_LETTER_SCHEMA, num_shards=job.num_shards, file_name_suffix=".parquet")
    return rows, dead


# --------------------------------------------------------------------------------------------
# One extraction run: describe the extractor, run the job, merge its shards, reconcile the counts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetaStats:
    """The columns a meta modality encodes and the train statistics it encodes them with."""

    numeric: list[str]
    categorical: list[str]
    fitted: dict[str, Any]


def describe(spec: Modality, manifest: pa.Table, mmeta: dict[str, Any],
             expect: dict[str, Any] | None = None) -> tuple[dict[str, Any], MetaStats | None]:
    """Provenance of this extractor's output without running it (and, for meta, its statistics:
    fitted on the train split, or the `expect`ed bundle's when scoring). Refuses a text or list column
    the manifest lacks, a missing model, and an extractor that differs from `expect`."""
    cfg, module, fields = spec.cfg, spec.module, mmeta["fields"]
    where = spec.where
    if spec.kind in ("text", "list") and cfg.column not in fields["text" if spec.kind == "text" else "lists"]:
        raise ConfigError(f"{where}.column: {cfg.column!r} is not a {spec.kind} column of the manifest; "
                          f"it has {fields}")
    stats = None
    try:
        if spec.kind == "meta":
            if expect is not None:  # scoring: the training statistics, on the columns they were fitted on
                fitted = expect["stats"]
                cfg = dataclasses.replace(cfg, numeric=tuple(fitted["numeric"]), categorical=tuple(fitted["categorical"]))
            numeric, categorical = module.columns(cfg, fields)
            if expect is None:
                fitted = module.fit(manifest, schema.SPLIT, numeric, categorical, cfg.max_categories)
            stats = MetaStats(numeric, categorical, fitted)
            described = module.describe(cfg, numeric, fitted)
            described["categorical"] = {c: fitted["categorical"][c] for c in categorical}
        else:
            described = describe_model(spec)
    except (MissingModelError, ValueError) as exc:
        raise ExtractionError(f"{where}: {exc}") from None
    if expect is not None:
        check_extractor(spec.name, expect, described)
    return described, stats


def describe_model(spec: Modality) -> dict[str, Any]:
    """Provenance of a model-based extractor (not meta) from its config and weight files alone."""
    try:
        return spec.module.describe(spec.cfg)
    except (MissingModelError, ValueError) as exc:
        raise ExtractionError(f"{spec.where}: {exc}") from None


def check_extractor(name: str, expect: dict[str, Any], described: dict[str, Any]) -> None:
    """Refuse an extractor whose model, weights or dimension differ from a bundle's record of it."""
    diffs = features.provenance_diffs(expect, described, features.EXTRACTOR_KEYS, "model has", "this installation has")
    if diffs:
        raise features.FeatureMismatchError(
            f"{name}: the extractor here is not the one the model was trained with ({'; '.join(diffs)}). "
            "Install the same extractor weights, or retrain the model on features from this installation.")


def _read_shards(folder: Path, prefix: str, sch: pa.Schema) -> pa.Table:
    parts = sorted(folder.glob(f"{prefix}-*.parquet"))
    tables = [pq.read_table(p).cast(sch) for p in parts]
    return pa.concat_tables(tables) if tables else sch.empty_table()


def _counts(spec: Modality, ids: list[str], feats: pa.Table, dead: pa.Table, seconds: float) -> dict[str, Any]:
    """The extraction metrics: items_in = written + failed, set sizes, failures per stage."""
    n_vectors = pc.list_value_length(feats[features.VECTORS]).to_pylist()
    failed_stages = dead[schema.STAGE].to_pylist()
    return {
        "modality": spec.name, "kind": spec.kind, "items_in": len(ids), "written": feats.num_rows,
        "empty_sets": sum(1 for n in n_vectors if n == 0), "failed": dead.num_rows,
        "elements": sum(n_vectors), "max_elements": max(n_vectors, default=0),
        "failed_by_stage": {s: failed_stages.count(s) for s in sorted(set(failed_stages))},
        "seconds": round(seconds, 1), "items_per_s": round(len(ids) / seconds, 2) if seconds else None,
    }


def _reconcile(spec: Modality, ids: list[str], feats: pa.Table, dead: pa.Table, job: JobConfig, out_dir: Path) -> None:
    """Every manifest id in exactly one of features and dead letters, and failures under the limit."""
    got, failed = feats[schema.ID].to_pylist(), dead[schema.ID].to_pylist()
    lost = set(ids) - set(got) - set(failed)
    twice = set(got) & set(failed)
    if lost or twice or len(got) + len(failed) != len(ids):
        raise ExtractionError(f"{spec.name}: counts do not reconcile: {len(lost)} ids lost {sorted(lost)[:5]}, "
                              f"{len(twice)} both written and failed {sorted(twice)[:5]}")
    if ids and len(failed) / len(ids) > job.max_failure_fraction:
        first = dead.slice(0, 3).to_pylist()
        raise ExtractionError(f"{spec.name}: {len(failed)} of {len(ids)} items failed, more than "
                              f"extract.job.max_failure_fraction={job.max_failure_fraction}; first: {first}; "
                              f"see {out_dir / 'dead_letters.parquet'}")


def run_extraction(spec: Modality, job: JobConfig, manifest_path: Path, out_dir: Path, metrics_path: Path,
                   extra_beam_args: Sequence[str] = (), test_pipeline: beam.Pipeline | None = None,
                   expect: dict[str, Any] | None = None) -> dict[str, Any]:
    """Extract modality `spec` for every manifest row; writes features, dead letters and counts.

    `expect` is a model bundle's provenance of this modality (scoring new data): the extractor,
    model, weights and dimension must match it before any item is processed, and a meta modality
    reuses the bundle's training statistics instead of fitting new ones.
    """
    _quiet()
    t0 = time.perf_counter()
    manifest, mmeta = schema.read_manifest(manifest_path)
    ids = manifest[schema.ID].to_pylist()
    described, stats = describe(spec, manifest, mmeta, expect)
    dim = described["dim"]

    tmp = out_dir / "_shards"
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.mkdir(parents=True)
    log.info("%s: extracting %d items with %s (%s, dim %d) on %s", spec.name, len(ids), described["model_id"],
             spec.kind, dim, job.runner)
    p = test_pipeline or beam.Pipeline(options=beam_options(job, extra_beam_args))
    build(p, str(manifest_path), spec, mmeta["dataset"]["dir"], dim, str(tmp), job, len(ids), stats)
    p.run().wait_until_finish()

    feats = _read_shards(tmp, "features", features.feature_schema(dim))
    dead = _read_shards(tmp, "dead", schema.EXTRACT_DEAD_LETTER_SCHEMA).sort_by(schema.ID)
    meta = {"modality": spec.name, "kind": spec.kind, **{k: v for k, v in described.items() if k != "stats"},
            "manifest_sha256": features.file_sha256(manifest_path), "params": to_dict(spec.cfg),
            "items": feats.num_rows}
    if stats is not None:
        meta["stats"] = stats.fitted
    pq.write_table(dead, out_dir / "dead_letters.parquet", compression="zstd")
    shutil.rmtree(tmp)
    # last, and atomically: a folder holding features.parquet is a finished extraction
    features.write_feature_table(feats, dim, meta, out_dir / "features.parquet")

    metrics = _counts(spec, ids, feats, dead, time.perf_counter() - t0)
    runtime.write_json(metrics_path, metrics)
    log.info("%s: %d in, %d written (%d empty sets, %d elements), %d failed in %.1f s (%.1f items/s)", spec.name,
             len(ids), metrics["written"], metrics["empty_sets"], metrics["elements"], metrics["failed"],
             metrics["seconds"], metrics["items_per_s"] or 0.0)
    _reconcile(spec, ids, feats, dead, job, out_dir)
    return metrics
