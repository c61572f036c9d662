"""The Beam extraction job: canonical manifest -> one modality's variable-length feature sets.

    ReadFromParquet(items to compute) -> Reshuffle (spreads the work over a cluster's workers)
        -> Prepare (pure per-record work; failures -> dead letters)
        -> RunInference(KeyedModelHandler(<extractor>))   (meta: a Map with train statistics)
        -> ToRow (model errors -> dead letters) -> Progress -> WriteToParquet (shards)

Around the job, the per-item cache (pipeline.cache): only items whose (extractor, input) key is not
cached go to the job; its results become a new cache part; the features are then assembled from the
cache, filtered (OCR confidence, face probability, ...), sorted by id in bounded memory and written
with provenance metadata. The counts are reconciled: every manifest id ends up in the features or in
the dead letters, never both, and computed + reused + failed = items in.
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
from typing import Any, Iterator, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline import cache, features, runtime, schema
from pipeline.config import ConfigError, from_dict, to_dict
from pipeline.extractors import module_for
from pipeline.extractors.base import ItemError, ItemResult, MissingModelError, error_text
from pipeline.sorting import ExternalSort

log = logging.getLogger(__name__)


class ExtractionError(runtime.UserError):
    """Extraction as a whole failed (too many failures, lost items, missing model)."""


@dataclass(frozen=True)
class DaskConfig:
    """The Dask cluster of runner `dask` (pipeline.dask_runner)."""

    address: str | None = None  # scheduler address, e.g. tcp://host:8786; null: a local cluster for the run
    workers: int = 2  # worker processes of the local cluster
    threads_per_worker: int = 1  # and torch threads in each (OMP_NUM_THREADS)


DASK_RUNNER = "pipeline.dask_runner.DaskRunner"


@dataclass(frozen=True)
class JobConfig:
    """How Beam runs the extraction jobs (shared by every modality)."""

    runner: str = "FnApiRunner"  # local, never waits on the network; dask; or FlinkRunner, SparkRunner, ...
    direct_num_workers: int = 1
    direct_running_mode: str = "in_memory"  # in_memory | multi_threading | multi_processing
    num_shards: int = 1  # shards written by Beam before the final merge
    max_failure_fraction: float = 0.05
    log_every_s: float = 10.0
    options: dict[str, Any] = field(default_factory=dict)  # any other Beam option, passed as --key=value
    cache_dir: str | None = None  # the per-item extraction cache; null: off (every item is computed)
    merge_buffer_mb: int = 256  # rows held in memory while sorting the features by id; more spill to disk
    dask: DaskConfig = field(default_factory=DaskConfig)


def runner_flags(job: JobConfig) -> list[str]:
    """--runner and the runner's own flags (`dask`: this project's Dask runner and its cluster)."""
    if job.runner.lower() != "dask":
        return [f"--runner={job.runner}"]
    flags = [f"--runner={DASK_RUNNER}", f"--dask_local_workers={job.dask.workers}",
             f"--dask_threads_per_worker={job.dask.threads_per_worker}"]
    return flags + ([f"--dask_client_address={job.dask.address}"] if job.dask.address else [])


def beam_options(job: JobConfig, extra: Sequence[str] = ()) -> PipelineOptions:
    """Pipeline options from params (runner, local workers, pass-through options) plus extra flags."""
    flags = [*runner_flags(job), f"--direct_num_workers={job.direct_num_workers}",
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


def build(p: beam.Pipeline, manifest: str, spec: Modality, root: str, described: dict[str, Any], tmp: str,
          job: JobConfig, total: int, stats: MetaStats | None = None) -> tuple[Any, Any]:
    """Add the extraction transforms for one modality to pipeline `p`; returns (rows, dead letters)."""
    module, dim = spec.module, described["dim"]
    rows = p | "ReadManifest" >> beam.io.ReadFromParquet(manifest) | "Spread" >> beam.Reshuffle()
    prepared = rows | "Prepare" >> beam.ParDo(PrepareFn(spec.name, module.__name__, spec.cfg, root)).with_outputs(
        "dead", main="ready")
    if spec.kind == "meta":
        encoder = module.Encoder(stats.fitted)
        results = prepared.ready | "EncodeMeta" >> beam.MapTuple(lambda i, row: (i, encoder(row)))
    else:
        handler = module.HANDLER_CLASS(spec.cfg)
        handler.empty_dim = dim
        handler.expect = described  # each worker checks the model files it loads against these checksums
        results = prepared.ready | "RunInference" >> RunInference(KeyedModelHandler(handler))
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
                cfg = dataclasses.replace(cfg, numeric=tuple(module.numeric_columns(fitted)),
                                          categorical=tuple(module.categorical_columns(fitted)))
            numeric, categorical = module.columns(cfg, fields)
            if expect is None:
                fitted = module.fit(manifest, schema.SPLIT, numeric, categorical, cfg.max_categories)
            stats = MetaStats(numeric, categorical, fitted)
            described = module.describe(cfg, fitted)
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
    """Refuse an extractor whose model, weights, model files or dimension differ from a bundle's record of it."""
    diffs = features.provenance_diffs(expect, described, features.keys_to_match(expect, features.EXTRACTOR_KEYS),
                                      "model has", "this installation has")
    if diffs:
        raise features.FeatureMismatchError(
            f"{name}: the extractor here is not the one the model was trained with ({'; '.join(diffs)}). "
            "Install the same extractor weights, or retrain the model on features from this installation.")


def _read_shards(folder: Path, prefix: str, sch: pa.Schema) -> Iterator[pa.Table]:
    """The rows of Beam's shards, a record batch at a time."""
    for part in sorted(folder.glob(f"{prefix}-*.parquet")):
        for batch in pq.ParquetFile(part).iter_batches(batch_size=cache.PART_ROW_GROUP):
            yield pa.Table.from_batches([batch]).cast(sch)


def item_inputs(spec: Modality, manifest: pa.Table, stats: MetaStats | None) -> list[Any]:
    """Each row's input for this modality, the item half of its cache key (read column by column: only
    the columns the modality reads)."""
    cols = [*stats.numeric, *stats.categorical] if spec.kind == "meta" else [spec.module.cache_column(spec.cfg)]
    if not cols:
        return [[] for _ in range(manifest.num_rows)]
    rows = [list(values) for values in zip(*(manifest[c].to_pylist() for c in cols))]
    if spec.kind == "meta":  # the column names go into the key with the values: (name, value) pairs in order
        return [spec.module.item_input(values, stats.fitted) for values in rows]
    return rows


def apply_filter(table: pa.Table, spec: Modality) -> pa.Table:
    """The modality's result filter (module.select: OCR confidence, face probability, how many are kept)
    applied to unfiltered sets; elements are renumbered in output order."""
    select = getattr(spec.module, "select", None)
    if select is None or not table.num_rows:
        return table
    vectors = table[features.VECTORS].combine_chunks()
    starts = np.concatenate([[0], np.cumsum(pc.list_value_length(vectors).to_numpy(zero_copy_only=False))])
    take, offsets, kept = [], [0], []
    for r, elements in enumerate(table[features.ELEMENTS].to_pylist()):
        idx = select(elements, spec.cfg)
        take.extend(int(starts[r]) + i for i in idx)
        offsets.append(len(take))
        kept.append([{**elements[i], "index": rank} for rank, i in enumerate(idx)])
    values = vectors.flatten().take(pa.array(take, pa.int64()))
    table = table.set_column(table.schema.get_field_index(features.VECTORS), features.VECTORS,
                             pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values))
    return table.set_column(table.schema.get_field_index(features.ELEMENTS), features.ELEMENTS,
                            pa.array(kept, pa.list_(features.ELEMENT_TYPE)))


class Counts:
    """The extraction metrics, accumulated as feature rows stream past."""

    def __init__(self, spec: Modality, ids: list[str]):
        self.spec, self.ids = spec, ids
        self.written: list[str] = []
        self.empty_sets = self.elements = self.max_elements = 0

    def add(self, table: pa.Table) -> None:
        self.written.extend(table[schema.ID].to_pylist())
        n = pc.list_value_length(table[features.VECTORS]).to_numpy(zero_copy_only=False)
        self.empty_sets += int((n == 0).sum())
        self.elements += int(n.sum())
        self.max_elements = max(self.max_elements, int(n.max(initial=0)))

    def metrics(self, dead: pa.Table, computed: int, reused: int, cache_dir: str | None,
                seconds: float) -> dict[str, Any]:
        failed_stages = dead[schema.STAGE].to_pylist()
        return {
            "modality": self.spec.name, "kind": self.spec.kind, "items_in": len(self.ids),
            "written": len(self.written), "computed": computed, "reused": reused, "cache": cache_dir,
            "empty_sets": self.empty_sets, "failed": dead.num_rows, "elements": self.elements,
            "max_elements": self.max_elements,
            "failed_by_stage": {s: failed_stages.count(s) for s in sorted(set(failed_stages))},
            "seconds": round(seconds, 1), "items_per_s": round(len(self.ids) / seconds, 2) if seconds else None,
        }


def _reconcile(spec: Modality, ids: list[str], got: list[str], dead: pa.Table, job: JobConfig, out_dir: Path) -> None:
    """Every manifest id in exactly one of features and dead letters, and failures under the limit."""
    failed = dead[schema.ID].to_pylist()
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


def _compute(spec: Modality, job: JobConfig, todo: pa.Table, mmeta: dict[str, Any], described: dict[str, Any],
             work: Path, stats: MetaStats | None, extra_beam_args: Sequence[str], test_pipeline: beam.Pipeline | None,
             workers: dict[str, int]) -> tuple[pa.Table, Iterator[pa.Table]]:
    """Run the Beam job on the manifest rows `todo`; returns its dead letters (sorted by id) and its
    feature shards' rows (a stream). `workers` receives the tasks each worker ran, where the runner
    reports them (the Dask runner does)."""
    manifest = work / "todo.parquet"
    pq.write_table(todo, manifest)
    shards = work / "shards"
    shards.mkdir()
    log.info("%s: extracting %d items on %s", spec.name, todo.num_rows, job.runner)
    p = test_pipeline or beam.Pipeline(options=beam_options(job, extra_beam_args))
    build(p, str(manifest), spec, mmeta["dataset"]["dir"], described, str(shards), job, todo.num_rows, stats)
    result = p.run()
    result.wait_until_finish()
    workers.update(getattr(result, "worker_task_counts", None) or {})
    dead = list(_read_shards(shards, "dead", schema.EXTRACT_DEAD_LETTER_SCHEMA))
    dead = pa.concat_tables(dead) if dead else schema.EXTRACT_DEAD_LETTER_SCHEMA.empty_table()
    return dead.sort_by(schema.ID), _read_shards(shards, "features", features.feature_schema(described["dim"]))


def _fan_out(dead: pa.Table, ids: list[str], keys: list[str]) -> pa.Table:
    """The dead letters of every item whose key is the key of a failed item (identical inputs are computed
    once, for the first item that has them, so they fail together)."""
    if not dead.num_rows:
        return dead
    key_of = dict(zip(ids, keys))
    by_key = {key_of[r[schema.ID]]: r for r in dead.to_pylist()}
    rows = []
    for item_id, key in zip(ids, keys):
        first = by_key.get(key)
        if first is not None:
            same = "" if first[schema.ID] == item_id else f" (same input as {first[schema.ID]})"
            rows.append({**first, schema.ID: item_id, schema.ERROR: first[schema.ERROR] + same})
    return pa.Table.from_pylist(rows, schema=schema.EXTRACT_DEAD_LETTER_SCHEMA).sort_by(schema.ID)


@dataclass
class Run:
    """One extraction run's state: what it extracts, from which manifest, with which cache."""

    spec: Modality
    job: JobConfig
    manifest: pa.Table
    mmeta: dict[str, Any]
    described: dict[str, Any]
    stats: MetaStats | None
    store: cache.FeatureCache
    work: Path
    ids: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    workers: dict[str, int] = field(default_factory=dict)

    def compute_missing(self, found: dict[str, Any], extra_beam_args: Sequence[str],
                        test_pipeline: beam.Pipeline | None) -> tuple[pa.Table, int]:
        """Run the Beam job once per distinct key that is not `found`, store the results as a new cache
        part and add them to `found`; returns (the dead letters of every item, the items sent to the job)."""
        todo, seen = [], set()
        for key in self.keys:
            todo.append(key not in found and key not in seen)
            seen.add(key)
        if not any(todo):
            return schema.EXTRACT_DEAD_LETTER_SCHEMA.empty_table(), 0
        key_of = dict(zip(self.ids, self.keys))
        dead, rows = _compute(self.spec, self.job, self.manifest.filter(pa.array(todo)), self.mmeta, self.described,
                              self.work, self.stats, extra_beam_args, test_pipeline, self.workers)
        part, _ = self.store.write_part(
            t.set_column(0, cache.KEY, pa.array([key_of[i] for i in t[schema.ID].to_pylist()], pa.string()))
            for t in rows)
        if part is not None:
            found.update({k: v for k, v in self.store.locate(self.keys, [part]).items() if k not in found})
        return _fan_out(dead, self.ids, self.keys), sum(todo)

    def assemble(self, found: dict[str, Any], dead: pa.Table, meta: dict[str, Any], out_dir: Path) -> Counts:
        """features.parquet from the cache: every item that did not fail, filtered, sorted by id in bounded
        memory and written last and atomically (a folder holding features.parquet is a finished extraction)."""
        failed = set(dead[schema.ID].to_pylist())
        ids_by_key: dict[str, list[str]] = {}
        for item_id, key in zip(self.ids, self.keys):
            if item_id not in failed and key in found:
                ids_by_key.setdefault(key, []).append(item_id)
        counts = Counts(self.spec, self.ids)
        sorter = ExternalSort(schema.ID, self.job.merge_buffer_mb << 20, self.work)
        try:
            for table in cache.gather({k: found[k] for k in ids_by_key}, ids_by_key, self.described["dim"]):
                sorter.add(apply_filter(table, self.spec))
        except cache.PartError as exc:  # damaged after it was verified: moved aside, so the next run heals
            self.store.quarantine(exc.part, f"unreadable during a run: {exc}")
            raise ExtractionError(f"{self.spec.name}: cache part {exc} failed while its entries were read; it was moved "
                                  "aside: run again to compute its items") from None
        with features.FeatureWriter(out_dir / "features.parquet", self.described["dim"], meta) as writer:
            for table in sorter.sorted():
                writer.write(table)
                counts.add(table)
        return counts


def fingerprint(spec: Modality, described: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The cache fingerprint of an extractor (pipeline.cache) and the software it covers."""
    soft = cache.software(spec.module.LIBRARIES, spec.module.SOURCES)
    return cache.fingerprint(described, to_dict(spec.cfg), getattr(spec.module, "FILTER_PARAMS", ()), soft), soft


def current_fingerprints(specs: Sequence[Modality], manifest_path: Path | None) -> dict[str, str | None]:
    """Modality -> the fingerprint its extractor has here (what `dmms cache prune` keeps); None for a meta
    modality without a manifest (its statistics are fitted on one)."""
    out: dict[str, str | None] = {}
    table = mmeta = None
    if manifest_path is not None:
        table, mmeta = schema.read_manifest(manifest_path)
    for spec in specs:
        if spec.kind == "meta" and table is None:
            out[spec.name] = None
            continue
        described = describe(spec, table, mmeta)[0] if spec.kind == "meta" else describe_model(spec)
        out[spec.name] = fingerprint(spec, described)[0]
    return out


def run_extraction(spec: Modality, job: JobConfig, manifest_path: Path, out_dir: Path, metrics_path: Path,
                   extra_beam_args: Sequence[str] = (), test_pipeline: beam.Pipeline | None = None,
                   expect: dict[str, Any] | None = None) -> dict[str, Any]:
    """Extract modality `spec` for every manifest row; writes features, dead letters and counts.

    Items already in the cache (job.cache_dir) are reused; only the others go to the Beam job, each
    distinct input once. `expect` is a model bundle's provenance of this modality (scoring new data):
    the extractor, model, weights and dimension must match it before any item is processed, and a meta
    modality reuses the bundle's training statistics instead of fitting new ones.
    """
    _quiet()
    t0 = time.perf_counter()
    manifest, mmeta = schema.read_manifest(manifest_path)
    ids = manifest[schema.ID].to_pylist()
    described, stats = describe(spec, manifest, mmeta, expect)
    fp, soft = fingerprint(spec, described)
    keys = [cache.item_key(fp, v) for v in item_inputs(spec, manifest, stats)]

    shutil.rmtree(out_dir, ignore_errors=True)
    work = out_dir / "_work"
    work.mkdir(parents=True)
    store = cache.FeatureCache(Path(job.cache_dir) if job.cache_dir else work / "cache", spec.kind, fp,
                               described["dim"], {"described": described, "params": to_dict(spec.cfg), "software": soft})
    run = Run(spec, job, manifest, mmeta, described, stats, store, work, ids, keys)
    store.clean_partials()
    found = store.locate_verified(keys)
    reused = sum(k in found for k in keys)
    log.info("%s: %d items (%d distinct inputs), %d in the cache, %d to compute with %s (%s, dim %d)", spec.name,
             len(ids), len(set(keys)), reused, len(ids) - reused, described["model_id"], spec.kind, described["dim"])
    dead, sent = run.compute_missing(found, extra_beam_args, test_pipeline)
    pq.write_table(dead, out_dir / "dead_letters.parquet", compression="zstd")
    meta = {"modality": spec.name, "kind": spec.kind, **{k: v for k, v in described.items() if k != "stats"},
            "manifest_sha256": features.file_sha256(manifest_path), "params": to_dict(spec.cfg), "software": soft,
            **({"stats": stats.fitted} if stats is not None else {})}
    counts = run.assemble(found, dead, meta, out_dir)
    shutil.rmtree(work, ignore_errors=True)

    computed = len(counts.written) - reused
    metrics = counts.metrics(dead, computed, reused, job.cache_dir, time.perf_counter() - t0)
    metrics["sent_to_job"] = sent  # distinct inputs computed (computed counts every item that got a result)
    if store.quarantined:
        metrics["cache_quarantined"] = store.quarantined
    if run.workers:
        metrics["worker_tasks"] = dict(sorted(run.workers.items()))  # tasks per cluster worker
    runtime.write_json(metrics_path, metrics)
    log.info("%s: %d in, %d written (%d computed from %d distinct inputs, %d reused; %d empty sets, %d elements), "
             "%d failed in %.1f s (%.1f items/s)", spec.name, len(ids), metrics["written"], computed, sent, reused,
             metrics["empty_sets"], metrics["elements"], metrics["failed"], metrics["seconds"],
             metrics["items_per_s"] or 0.0)
    _reconcile(spec, ids, counts.written, dead, job, out_dir)
    return metrics
