"""The Beam extraction job: canonical manifest -> one modality's variable-length feature sets.

    ReadFromParquet(items to compute) -> Reshuffle (spreads the work over a cluster's workers)
        -> Prepare (pure per-record work; failures -> dead letters)
        -> RunInference(KeyedModelHandler(<extractor's handler>))   (meta: no model, the train statistics)
        -> ToRow (model errors -> dead letters) -> Progress -> WriteToParquet (shards)

The extractor is the registered class of the modality's kind (pipeline.extractors): the job only
calls its interface. Around the job, the per-item cache (pipeline.cache): only items whose (extractor, input) key is not
cached go to the job; its results become a new cache part; the features are then assembled from the
cache, filtered (OCR confidence, face probability, ...), sorted by id in bounded memory and written
with provenance metadata. The counts are reconciled: every manifest id ends up in the features or in
the dead letters, never both, and computed + reused + failed = items in.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline import cache, extractors, features, runtime, schema
from pipeline.config import ConfigError, from_dict, to_dict
from pipeline.extractors import Extractor
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
    flags: tuple[str, ...] = ()  # Beam flags as on a command line (the stage adds those its parser does not know)
    cache_dir: str | None = None  # the per-item extraction cache; null: off (every item is computed)
    merge_buffer_mb: int = 256  # rows held in memory while sorting the features by id; more spill to disk
    dask: DaskConfig = field(default_factory=DaskConfig)


def runner_flags(job: JobConfig) -> list[str]:
    """--runner and the runner's own flags (`dask`: this project's Dask runner and its cluster)."""
    if job.runner.lower() != "dask":
        return [f"--runner={job.runner}"]
    flags = [
        f"--runner={DASK_RUNNER}",
        f"--dask_local_workers={job.dask.workers}",
        f"--dask_threads_per_worker={job.dask.threads_per_worker}",
    ]
    return flags + ([f"--dask_client_address={job.dask.address}"] if job.dask.address else [])


def beam_options(job: JobConfig) -> PipelineOptions:
    """Pipeline options from params (runner, local workers, pass-through options) and the job's flags."""
    flags = [
        *runner_flags(job),
        f"--direct_num_workers={job.direct_num_workers}",
        f"--direct_running_mode={job.direct_running_mode}",
    ]
    for key, value in job.options.items():
        if isinstance(value, bool):
            flags.append(f"--{key}" if value else f"--no{key}")  # Beam's boolean flag style
        else:
            flags.append(f"--{key}={value}")
    return PipelineOptions([*flags, *job.flags])


@dataclass(frozen=True)
class Modality:
    """One configured extraction modality: its name, its extractor (kind and typed config) and where its
    params came from (extract.modalities.<name>, or a bundle's record), for errors."""

    name: str
    extractor: Extractor
    where: str

    @property
    def kind(self) -> str:
        return self.extractor.kind

    @property
    def cfg(self) -> Any:
        return self.extractor.cfg


def modality(name: str, raw: Any, where: str | None = None) -> Modality:
    """The modality `name` from its params mapping: the registered extractor of its `kind`, configured.

    The stage builds it from params extract.modalities.<name>; scoring from a model bundle's record.
    """
    where = where or f"extract.modalities.{name}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with a 'kind', found {raw!r}")
    try:
        cls = extractors.get(raw.get("kind"))
    except ValueError as exc:
        raise ConfigError(f"{where}.kind: {exc}") from None
    return Modality(name, cls(from_dict(cls.config_class, raw, where)), where)


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

    def __init__(self, modality: str, extractor: Extractor, root: str):
        self.modality, self.extractor, self.root = modality, extractor, root

    def setup(self) -> None:
        _quiet()

    def process(self, row: dict[str, Any]):
        item_id = row[schema.ID]
        try:
            payload = self.extractor.prepare(row, Path(self.root))
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


@dataclass(frozen=True)
class JobPlan:
    """What one Beam job extracts: which modality, from which manifest rows, into which folder."""

    spec: Modality
    described: dict[str, Any]  # the extractor's provenance (the handler is bound to it)
    manifest: str  # the rows to compute (Parquet)
    root: str  # the dataset folder media paths are relative to
    shards: str  # where the job writes its feature and dead-letter shards
    total: int  # rows, for progress


def build(p: beam.Pipeline, plan: JobPlan, job: JobConfig) -> tuple[Any, Any]:
    """Add the extraction transforms of `plan` to pipeline `p`; returns (rows, dead letters)."""
    spec, dim = plan.spec, plan.described["dim"]
    rows = p | "ReadManifest" >> beam.io.ReadFromParquet(plan.manifest) | "Spread" >> beam.Reshuffle()
    prepared = rows | "Prepare" >> beam.ParDo(PrepareFn(spec.name, spec.extractor, plan.root)).with_outputs(
        "dead", main="ready"
    )
    handler = spec.extractor.handler(plan.described)  # checks the model files it loads on every worker
    results = prepared.ready | "RunInference" >> RunInference(KeyedModelHandler(handler))
    converted = results | "ToRow" >> beam.ParDo(ToRowFn(spec.name)).with_outputs("dead", main="rows")
    rows = converted.rows | "Progress" >> beam.ParDo(ProgressFn(spec.name, plan.total, job.log_every_s))
    dead = (prepared.dead, converted.dead) | "MergeDead" >> beam.Flatten()
    rows | "WriteFeatures" >> beam.io.WriteToParquet(
        f"{plan.shards}/features", features.feature_schema(dim), num_shards=job.num_shards, file_name_suffix=".parquet"
    )
    dead | "WriteDeadLetters" >> beam.io.WriteToParquet(
        f"{plan.shards}/dead", schema.EXTRACT_DEAD_LETTER_SCHEMA, num_shards=job.num_shards, file_name_suffix=".parquet"
    )
    return rows, dead


# --------------------------------------------------------------------------------------------
# One extraction run: describe the extractor, run the job, merge its shards, reconcile the counts
# --------------------------------------------------------------------------------------------


def describe(
    spec: Modality,
    manifest: pa.Table | None = None,
    mmeta: dict[str, Any] | None = None,
    expect: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Provenance of this extractor's output without running it (a fitted kind fits on `manifest`, or
    reuses the `expect`ed bundle's statistics when scoring). Refuses a column the manifest lacks, a
    missing model, and an extractor that differs from `expect`."""
    fields = mmeta["fields"] if mmeta is not None else None
    try:
        described = spec.extractor.describe(manifest, fields, expect)
    except ConfigError as exc:
        raise ConfigError(f"{spec.where}.{exc}") from None
    except (MissingModelError, ValueError) as exc:
        raise ExtractionError(f"{spec.where}: {exc}") from None
    if expect is not None:
        check_extractor(spec.name, expect, described)
    return described


def check_extractor(name: str, expect: dict[str, Any], described: dict[str, Any]) -> None:
    """Refuse an extractor whose model, weights, model files or dimension differ from a bundle's record of it."""
    diffs = features.provenance_diffs(
        expect, described, features.keys_to_match(expect, features.EXTRACTOR_KEYS), "model has", "this installation has"
    )
    if diffs:
        raise features.FeatureMismatchError(
            f"{name}: the extractor here is not the one the model was trained with ({'; '.join(diffs)}). "
            "Install the same extractor weights, or retrain the model on features from this installation."
        )


def _read_shards(folder: Path, prefix: str, sch: pa.Schema) -> Iterator[pa.Table]:
    """The rows of Beam's shards, a record batch at a time."""
    for part in sorted(folder.glob(f"{prefix}-*.parquet")):
        for batch in pq.ParquetFile(part).iter_batches(batch_size=cache.PART_ROW_GROUP):
            yield pa.Table.from_batches([batch]).cast(sch)


def apply_filter(table: pa.Table, extractor: Extractor) -> pa.Table:
    """The extractor's result filter (`select`: OCR confidence, face probability, how many are kept)
    applied to unfiltered sets; elements are renumbered in output order."""
    if not extractor.filter_params or not table.num_rows:
        return table
    vectors = table[features.VECTORS].combine_chunks()
    starts = np.concatenate([[0], np.cumsum(pc.list_value_length(vectors).to_numpy(zero_copy_only=False))])
    take, offsets, kept = [], [0], []
    for r, elements in enumerate(table[features.ELEMENTS].to_pylist()):
        idx = extractor.select(elements)
        idx = range(len(elements)) if idx is None else idx
        take.extend(int(starts[r]) + i for i in idx)
        offsets.append(len(take))
        kept.append([{**elements[i], "index": rank} for rank, i in enumerate(idx)])
    values = vectors.flatten().take(pa.array(take, pa.int64()))
    table = table.set_column(
        table.schema.get_field_index(features.VECTORS),
        features.VECTORS,
        pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values),
    )
    return table.set_column(
        table.schema.get_field_index(features.ELEMENTS),
        features.ELEMENTS,
        pa.array(kept, pa.list_(features.ELEMENT_TYPE)),
    )


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

    def metrics(
        self, dead: pa.Table, computed: int, reused: int, cache_dir: str | None, seconds: float, cpu: float | None
    ) -> dict[str, Any]:
        """The metrics JSON; `cpu`: CPU seconds of this process over the run (None where the work ran in
        other processes: a cluster runner)."""
        failed_stages = dead[schema.STAGE].to_pylist()
        threads = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None
        return {
            "modality": self.spec.name,
            "kind": self.spec.kind,
            "items_in": len(self.ids),
            "written": len(self.written),
            "computed": computed,
            "reused": reused,
            "cache": cache_dir,
            "empty_sets": self.empty_sets,
            "failed": dead.num_rows,
            "elements": self.elements,
            "max_elements": self.max_elements,
            "failed_by_stage": {s: failed_stages.count(s) for s in sorted(set(failed_stages))},
            "seconds": round(seconds, 1),
            "items_per_s": round(len(self.ids) / seconds, 2) if seconds else None,
            "computed_per_s": round(computed / seconds, 2) if seconds else None,  # reused items cost ~nothing
            "cpu_seconds": None if cpu is None else round(cpu, 1),  # core-seconds: all threads of the process
            "torch_threads": threads,
        }


def _reconcile(spec: Modality, ids: list[str], got: list[str], dead: pa.Table, job: JobConfig, out_dir: Path) -> None:
    """Every manifest id in exactly one of features and dead letters, and failures under the limit."""
    failed = dead[schema.ID].to_pylist()
    lost = set(ids) - set(got) - set(failed)
    twice = set(got) & set(failed)
    if lost or twice or len(got) + len(failed) != len(ids):
        raise ExtractionError(
            f"{spec.name}: counts do not reconcile: {len(lost)} ids lost {sorted(lost)[:5]}, "
            f"{len(twice)} both written and failed {sorted(twice)[:5]}"
        )
    if ids and len(failed) / len(ids) > job.max_failure_fraction:
        first = dead.slice(0, 3).to_pylist()
        raise ExtractionError(
            f"{spec.name}: {len(failed)} of {len(ids)} items failed, more than "
            f"extract.job.max_failure_fraction={job.max_failure_fraction}; first: {first}; "
            f"see {out_dir / 'dead_letters.parquet'}"
        )


def _fan_out(dead: pa.Table, ids: list[str], keys: list[str]) -> pa.Table:
    """The dead letters of every item whose key is the key of an item that failed in inference (identical
    inputs are computed once, for the first item that has them, so they fail together); a prepare failure
    stays the failed item's own."""
    if not dead.num_rows:
        return dead
    key_of = dict(zip(ids, keys))
    by_key = {key_of[r[schema.ID]]: r for r in dead.to_pylist() if r[schema.STAGE] != "prepare"}
    rows = [r for r in dead.to_pylist() if r[schema.STAGE] == "prepare"]
    for item_id, key in zip(ids, keys):
        first = by_key.get(key)
        if first is not None:
            same = "" if first[schema.ID] == item_id else f" (same input as {first[schema.ID]})"
            rows.append({**first, schema.ID: item_id, schema.ERROR: first[schema.ERROR] + same})
    return pa.Table.from_pylist(rows, schema=schema.EXTRACT_DEAD_LETTER_SCHEMA).sort_by(schema.ID)


def fingerprint(spec: Modality, described: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The cache fingerprint of an extractor (pipeline.cache) and the software it covers."""
    ext = spec.extractor
    soft = cache.software(ext.libraries, ext.sources)
    return cache.fingerprint(described, to_dict(spec.cfg), ext.filter_params, soft), soft


def current_fingerprints(specs: Sequence[Modality], manifest_path: Path | None) -> dict[str, str | None]:
    """Modality -> the fingerprint its extractor has here (what `dmms cache prune` keeps); None for a
    fitted kind (meta) without a manifest to fit on."""
    out: dict[str, str | None] = {}
    table = mmeta = None
    if manifest_path is not None:
        table, mmeta = schema.read_manifest(manifest_path)
    for spec in specs:
        if spec.extractor.fitted and table is None:
            out[spec.name] = None
            continue
        out[spec.name] = fingerprint(spec, describe(spec, table, mmeta))[0]
    return out


class Run:
    """One extraction run: the modality, its manifest and provenance, the cache, and the job's work folder."""

    def __init__(
        self, spec: Modality, job: JobConfig, manifest_path: Path, out_dir: Path, expect: dict[str, Any] | None
    ):
        self.spec, self.job, self.out_dir = spec, job, out_dir
        self.manifest, self.mmeta = schema.read_manifest(manifest_path)
        self.manifest_sha256 = features.file_sha256(manifest_path)
        self.ids = self.manifest[schema.ID].to_pylist()
        self.described = describe(spec, self.manifest, self.mmeta, expect)
        fp, self.software = fingerprint(spec, self.described)
        self.job_described = {**self.described, "software": self.software}  # what every worker checks
        self.keys = [cache.item_key(fp, v) for v in spec.extractor.item_inputs(self.manifest, self.described)]
        self.work = out_dir / "_work"
        self.store = cache.FeatureCache(
            Path(job.cache_dir) if job.cache_dir else self.work / "cache",
            spec.kind,
            fp,
            self.described["dim"],
            {"described": self.described, "params": to_dict(spec.cfg), "software": self.software},
        )
        self.workers: dict[str, int] = {}  # tasks per cluster worker, where the runner reports them

    def meta(self) -> dict[str, Any]:
        """The provenance features.parquet records."""
        return {
            "modality": self.spec.name,
            "kind": self.spec.kind,
            **self.described,
            "manifest_sha256": self.manifest_sha256,
            "params": to_dict(self.spec.cfg),
            "software": self.software,
        }

    def compute(self, todo: pa.Table, tag: str = "job") -> tuple[pa.Table, Iterator[pa.Table]]:
        """Run the Beam job on the manifest rows `todo`; returns its dead letters (sorted by id) and its
        feature shards' rows (a stream). `tag` names its work files (one run may run two jobs)."""
        manifest, shards = self.work / f"todo-{tag}.parquet", self.work / f"shards-{tag}"
        pq.write_table(todo, manifest)
        shards.mkdir()
        log.info("%s: extracting %d items on %s", self.spec.name, todo.num_rows, self.job.runner)
        p = beam.Pipeline(options=beam_options(self.job))
        build(
            p,
            JobPlan(
                self.spec, self.job_described, str(manifest), self.mmeta["dataset"]["dir"], str(shards), todo.num_rows
            ),
            self.job,
        )
        result = p.run()
        result.wait_until_finish()
        self.workers.update(getattr(result, "worker_task_counts", None) or {})
        dead = list(_read_shards(shards, "dead", schema.EXTRACT_DEAD_LETTER_SCHEMA))
        dead = pa.concat_tables(dead) if dead else schema.EXTRACT_DEAD_LETTER_SCHEMA.empty_table()
        return dead.sort_by(schema.ID), _read_shards(shards, "features", features.feature_schema(self.described["dim"]))

    def store_rows(self, rows: Iterator[pa.Table], found: dict[str, Any]) -> None:
        """The job's rows as a new cache part (keyed by their items' keys), added to `found`."""
        key_of = dict(zip(self.ids, self.keys))
        part, _ = self.store.write_part(
            t.set_column(0, cache.KEY, pa.array([key_of[i] for i in t[schema.ID].to_pylist()], pa.string()))
            for t in rows
        )
        if part is not None:
            found.update({k: v for k, v in self.store.locate(self.keys, [part]).items() if k not in found})

    def compute_missing(self, found: dict[str, Any]) -> tuple[pa.Table, int]:
        """Run the Beam job once per distinct key that is not `found`, store the results as a new cache
        part and add them to `found`; returns (the dead letters of every item, the items sent to the job).

        An inference failure belongs to the input, so every item with that key shares it. A prepare failure
        belongs to the item's own file (missing, changed since ingest): the other items with that key run
        in a second job, each on its own file."""
        todo, seen = [], set()
        for key in self.keys:
            todo.append(key not in found and key not in seen)
            seen.add(key)
        if not any(todo):
            return schema.EXTRACT_DEAD_LETTER_SCHEMA.empty_table(), 0
        dead, rows = self.compute(self.manifest.filter(pa.array(todo)))
        self.store_rows(rows, found)
        key_of = dict(zip(self.ids, self.keys))
        first_failed = set(dead[schema.ID].to_pylist())
        own = {key_of[r[schema.ID]] for r in dead.to_pylist() if r[schema.STAGE] == "prepare"}
        retry = [key_of[i] in own and key_of[i] not in found and i not in first_failed for i in self.ids]
        dead = _fan_out(dead, self.ids, self.keys)
        if any(retry):
            log.info(
                "%s: %d items share an input whose first item could not be read: each reads its own file",
                self.spec.name,
                sum(retry),
            )
            dead2, rows = self.compute(self.manifest.filter(pa.array(retry)), "retry")
            self.store_rows(rows, found)
            dead = pa.concat_tables([dead, dead2]).sort_by(schema.ID)
        return dead, sum(todo) + sum(retry)

    def assemble(self, found: dict[str, Any], dead: pa.Table) -> Counts:
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
                sorter.add(apply_filter(table, self.spec.extractor))
        except cache.PartError as exc:  # damaged after it was verified: moved aside, so the next run heals
            self.store.quarantine(exc.part, f"unreadable during a run: {exc}")
            raise ExtractionError(
                f"{self.spec.name}: cache part {exc} failed while its entries were read; it was moved "
                "aside: run again to compute its items"
            ) from None
        with features.FeatureWriter(self.out_dir / "features.parquet", self.described["dim"], self.meta()) as writer:
            for table in sorter.sorted():
                writer.write(table)
                counts.add(table)
        return counts


def run_extraction(
    spec: Modality,
    job: JobConfig,
    manifest_path: Path,
    out_dir: Path,
    metrics_path: Path,
    expect: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Extract modality `spec` for every manifest row; writes features, dead letters and counts.

    Items already in the cache (job.cache_dir) are reused; only the others go to the Beam job, each
    distinct input once. `expect` is a model bundle's provenance of this modality (scoring new data):
    the extractor, model, weights and dimension must match it before any item is processed, and a fitted
    kind (meta) reuses the bundle's training statistics instead of fitting new ones.
    """
    _quiet()
    t0, cpu0 = time.perf_counter(), time.process_time()
    shutil.rmtree(out_dir, ignore_errors=True)
    if job.cache_dir:
        spec.extractor.artifacts = (Path(job.cache_dir) / ".artifacts").resolve()
    run = Run(spec, job, manifest_path, out_dir, expect)
    run.work.mkdir(parents=True)
    run.store.clean_partials()
    found = run.store.locate_verified(run.keys)
    ids = run.ids
    reused = sum(k in found for k in run.keys)
    log.info(
        "%s: %d items (%d distinct inputs), %d in the cache, %d to compute with %s (%s, dim %d)",
        spec.name,
        len(ids),
        len(set(run.keys)),
        reused,
        len(ids) - reused,
        run.described["model_id"],
        spec.kind,
        run.described["dim"],
    )
    dead, sent = run.compute_missing(found)
    pq.write_table(dead, out_dir / "dead_letters.parquet", compression="zstd")
    counts = run.assemble(found, dead)
    shutil.rmtree(run.work, ignore_errors=True)

    computed = len(counts.written) - reused
    in_process = job.runner.lower() in ("fnapirunner", "directrunner") and job.direct_running_mode != "multi_processing"
    cpu = time.process_time() - cpu0 if in_process else None  # elsewhere the work ran in other processes
    metrics = counts.metrics(dead, computed, reused, job.cache_dir, time.perf_counter() - t0, cpu)
    metrics["sent_to_job"] = sent  # distinct inputs computed (computed counts every item that got a result)
    if run.store.quarantined:
        metrics["cache_quarantined"] = run.store.quarantined
    if run.workers:
        metrics["worker_tasks"] = dict(sorted(run.workers.items()))  # tasks per cluster worker
    runtime.write_json(metrics_path, metrics)
    log.info(
        "%s: %d in, %d written (%d computed from %d distinct inputs, %d reused; %d empty sets, %d elements), "
        "%d failed in %.1f s (%.1f items/s)",
        spec.name,
        len(ids),
        metrics["written"],
        computed,
        sent,
        reused,
        metrics["empty_sets"],
        metrics["elements"],
        metrics["failed"],
        metrics["seconds"],
        metrics["items_per_s"] or 0.0,
    )
    try:
        _reconcile(spec, ids, counts.written, dead, job, out_dir)
    except ExtractionError:  # a folder holding features.parquet is a finished extraction: this one is not
        (out_dir / "features.parquet").unlink(missing_ok=True)
        raise
    return metrics
