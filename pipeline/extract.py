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
import os
import shutil
import sys
import time
import uuid
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
from apache_beam.transforms.window import GlobalWindows

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
    partition_items: int = 1000  # items per work file: a Beam bundle, a Dask partition (bounds a worker's memory)
    commit_items: int = 10000  # computed items are committed to the cache every this many items...
    commit_every_s: float = 300.0  # ...or this many seconds, per worker: a killed job keeps what it committed
    max_failure_fraction: float = 0.05
    log_every_s: float = 10.0
    options: dict[str, Any] = field(default_factory=dict)  # any other Beam option, passed as --key=value
    flags: tuple[str, ...] = ()  # Beam flags as on a command line (the stage adds those its parser does not know)
    cache_dir: str | None = None  # the per-item extraction cache; null: off (every item is computed)
    merge_buffer_mb: int = 16  # rows held in memory while sorting the features by id (twice that at a spill)
    dask: DaskConfig = field(default_factory=DaskConfig)

    def validate(self, where: str) -> None:
        if self.partition_items < 1 or self.commit_items < 1 or self.commit_every_s <= 0:
            raise ConfigError(
                f"{where}: partition_items and commit_items must be >= 1 and commit_every_s > 0, found "
                f"{self.partition_items}, {self.commit_items}, {self.commit_every_s}"
            )
        if self.cache_dir and "://" in str(self.cache_dir):
            raise ConfigError(
                f"{where}.cache_dir: {self.cache_dir!r} is not a local path. The job's work files and the cache are "
                "read and written by every worker as files: use a POSIX path that every worker mounts (NFS, "
                "a shared volume), README 'Running on a cluster'"
            )


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
        item_id, key = row[schema.ID], row[TODO_KEY]
        row = {k: v for k, v in row.items() if k != TODO_KEY}  # the extractor sees the manifest's row
        try:
            payload = self.extractor.prepare(row, Path(self.root))
        except Exception as exc:
            yield beam.pvalue.TaggedOutput("dead", dead_letter(item_id, self.modality, "prepare", error_text(exc)))
            return
        yield (item_id, key), payload  # None: the item has no input for this modality (an empty set)


def dead_letter(item_id: str, modality: str, stage: str, error: str) -> dict[str, Any]:
    """A record of schema.EXTRACT_DEAD_LETTER_SCHEMA."""
    return {schema.ID: item_id, schema.MODALITY: modality, schema.STAGE: stage, schema.ERROR: error}


def committed_table(rows: list[tuple[str, ItemResult]], dim: int) -> pa.Table:
    """Cache rows (key, vectors, elements, category_ids) from (key, result) pairs, vectors straight from
    numpy."""
    counts = np.array([len(r.elements) if dim == 0 else r.vectors.shape[0] for _, r in rows], dtype=np.int32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    if dim:
        flat = np.concatenate([r.vectors.reshape(-1, dim).astype(np.float32, copy=False) for _, r in rows]).ravel()
        inner = pa.FixedSizeListArray.from_arrays(pa.array(flat), dim)
    else:  # a set of zero-length vectors (meta without numeric columns)
        inner = pa.array([[] for _, r in rows for _ in r.elements], pa.list_(pa.float32(), 0))
    sch = cache.raw_schema(dim)
    return pa.table(
        {
            cache.KEY: pa.array([k for k, _ in rows], pa.string()),
            features.VECTORS: pa.ListArray.from_arrays(offsets, inner),
            features.ELEMENTS: pa.array([r.elements for _, r in rows], pa.list_(features.ELEMENT_TYPE)),
            features.CATEGORY_IDS: pa.array([r.category_ids for _, r in rows], pa.list_(pa.int32())),
        },
        schema=sch,
    )


class ToRowFn(beam.DoFn):
    """Per-item model errors become dead letters; results go on to be committed."""

    def __init__(self, modality: str):
        self.modality = modality

    def process(self, keyed: tuple[tuple[str, str], ItemResult | ItemError]):
        (item_id, key), result = keyed
        if isinstance(result, ItemError):
            yield beam.pvalue.TaggedOutput("dead", dead_letter(item_id, self.modality, result.stage, result.error))
        else:
            yield item_id, key, result


class ProgressFn(beam.DoFn):
    """Items done, items/s and ETA of this worker (runtime.Progress: a bar on a terminal, else log lines)."""

    def __init__(self, modality: str, total: int, every_s: float):
        self.modality, self.total, self.every_s = modality, total, every_s

    def setup(self) -> None:
        self.progress = runtime.Progress(self.modality, self.total, "items", self.every_s, log)

    def process(self, row: Any):
        self.progress.update()
        yield row

    def teardown(self) -> None:
        self.progress.close()


class CommitFn(beam.DoFn):
    """Computed items into the per-item cache while the job runs: a new cache part every `commit_items`
    items or `commit_every_s` seconds (and at the end of each bundle), written aside and renamed, so a
    job killed at any point keeps every slice committed before it. Emits the ids it committed."""

    def __init__(self, store: cache.FeatureCache, commit_items: int, commit_every_s: float):
        self.store, self.commit_items, self.commit_every_s = store, commit_items, commit_every_s

    def start_bundle(self) -> None:
        self.rows: list[tuple[str, ItemResult]] = []
        self.ids: list[str] = []
        self.since = time.monotonic()

    def process(self, row: tuple[str, str, ItemResult]):
        item_id, key, result = row
        self.rows.append((key, result))
        self.ids.append(item_id)
        if len(self.rows) >= self.commit_items or time.monotonic() - self.since >= self.commit_every_s:
            yield from self._commit()

    def finish_bundle(self):
        for item_id in self._commit():
            yield GlobalWindows.windowed_value(item_id)

    def _commit(self) -> Iterator[str]:
        if self.rows:
            self.store.write_part([committed_table(self.rows, self.store.dim)])
        ids, self.rows, self.ids, self.since = self.ids, [], [], time.monotonic()
        yield from ids


class DeadLetterFn(beam.DoFn):
    """Dead letters to a file per bundle in the job's work folder (written aside, renamed when closed)."""

    def __init__(self, folder: str):
        self.folder = folder

    def start_bundle(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def process(self, row: dict[str, Any]):
        self.rows.append(row)
        yield row[schema.ID]

    def finish_bundle(self) -> None:
        if self.rows:
            name = f"dead-{uuid.uuid4().hex}.parquet"
            aside = Path(self.folder) / f".{name}.partial"
            pq.write_table(pa.Table.from_pylist(self.rows, schema=schema.EXTRACT_DEAD_LETTER_SCHEMA), aside)
            os.replace(aside, Path(self.folder) / name)
        self.rows = []


TODO_KEY = "__dmms_cache_key"  # the column of the job's work files that carries each item's cache key


@dataclass(frozen=True)
class JobPlan:
    """What one Beam job extracts: which modality, from which work files, into which cache folder."""

    spec: Modality
    described: dict[str, Any]  # the extractor's provenance (the handler is bound to it)
    todo: str  # the folder of the work files: the manifest rows to compute and their cache keys
    root: str  # the dataset folder media paths are relative to
    store: cache.FeatureCache  # where computed items are committed
    dead: str  # the folder for dead letters
    total: int  # rows, for progress


def in_process(job: JobConfig) -> bool:
    """Whether the job runs in the stage's process (Beam's FnApiRunner in memory or threads)."""
    return job.runner.lower() in ("fnapirunner", "directrunner") and job.direct_running_mode != "multi_processing"


def build(p: beam.Pipeline, plan: JobPlan, job: JobConfig) -> tuple[Any, Any, Any]:
    """Add the extraction transforms of `plan` to pipeline `p`; returns the ids committed to the cache and
    those that failed in prepare and in inference. Nothing waits for the whole job: each work file is a
    bundle that streams through prepare, inference and the cache commits."""
    spec = plan.spec
    rows = p | "ReadTodo" >> beam.io.ReadFromParquet(f"{plan.todo}/todo-*.parquet")
    if not (in_process(job) and job.direct_num_workers == 1):
        rows = rows | "Spread" >> beam.Reshuffle()  # a cluster's runner spreads the work files over its workers
    prepared = rows | "Prepare" >> beam.ParDo(PrepareFn(spec.name, spec.extractor, plan.root)).with_outputs(
        "dead", main="ready"
    )
    handler = spec.extractor.handler(plan.described)  # checks the model files it loads on every worker
    results = prepared.ready | "RunInference" >> RunInference(KeyedModelHandler(handler))
    converted = results | "ToRow" >> beam.ParDo(ToRowFn(spec.name)).with_outputs("dead", main="rows")
    committed = (
        converted.rows
        | "Progress" >> beam.ParDo(ProgressFn(spec.name, plan.total, job.log_every_s))
        | "Commit" >> beam.ParDo(CommitFn(plan.store, job.commit_items, job.commit_every_s))
    )
    dead_prepare = prepared.dead | "DeadInPrepare" >> beam.ParDo(DeadLetterFn(plan.dead))
    dead_inference = converted.dead | "DeadInInference" >> beam.ParDo(DeadLetterFn(plan.dead))
    return committed, dead_prepare, dead_inference


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


def _read_dead(folder: Path) -> pa.Table:
    """The dead letters the job wrote, sorted by id, one per item (a bundle a runner ran twice, after a
    lost worker, wrote its dead letters twice)."""
    parts = [pq.read_table(f).cast(schema.EXTRACT_DEAD_LETTER_SCHEMA) for f in sorted(folder.glob("dead-*.parquet"))]
    dead = pa.concat_tables(parts) if parts else schema.EXTRACT_DEAD_LETTER_SCHEMA.empty_table()
    dead = dead.sort_by(schema.ID)
    ids = dead[schema.ID].combine_chunks()
    if len(ids) > 1:
        dead = dead.filter(pa.array(np.r_[True, pc.not_equal(ids.slice(1), ids.slice(0, len(ids) - 1)).to_numpy()]))
    return dead


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
    """The extraction metrics, accumulated as feature rows stream past, and the proof that they are the
    rows expected: the ids written must be those of `ids` (the manifest's) at positions `expected`, in id
    order, each once."""

    def __init__(self, spec: Modality, items: int, ids: pa.Array, expected: np.ndarray):
        self.spec, self.items, self.ids, self.expected = spec, items, ids, expected
        if len(ids) > 1 and not pc.all(pc.greater(ids.slice(1), ids.slice(0, len(ids) - 1))).as_py():
            by_id = pc.sort_indices(ids).to_numpy()  # ingest writes manifests sorted; any other order works too
            self.expected = by_id[np.isin(by_id, expected)].astype(np.int32)
        self.written = self.empty_sets = self.elements = self.max_elements = 0
        self.unexpected: list[str] = []

    def add(self, table: pa.Table) -> None:
        ids = table[schema.ID].combine_chunks()
        want = self.ids.take(pa.array(self.expected[self.written : self.written + len(ids)]))
        if len(want) != len(ids) or not pc.all(pc.equal(ids, want)).as_py():
            self.unexpected.extend(sorted(set(ids.to_pylist()) - set(want.to_pylist()))[:5] or ids.to_pylist()[:1])
        self.written += table.num_rows
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
            "items_in": self.items,
            "written": self.written,
            "computed": computed,
            "reused": reused,
            "cache": cache_dir,
            "empty_sets": self.empty_sets,
            "failed": dead.num_rows,
            "elements": self.elements,
            "max_elements": self.max_elements,
            "failed_by_stage": {s: failed_stages.count(s) for s in sorted(set(failed_stages))},
            "seconds": round(seconds, 1),
            "items_per_s": round(computed / seconds, 2) if seconds else None,  # computed only: reused cost ~nothing
            "cpu_seconds": None if cpu is None else round(cpu, 1),  # core-seconds: all threads of the process
            "torch_threads": threads,
        }


def _reconcile(spec: Modality, counts: Counts, lost: list[str], dead: pa.Table, job: JobConfig, out_dir: Path) -> None:
    """Every manifest id in exactly one of features and dead letters, and failures under the limit."""
    failed = dead.num_rows
    if lost or counts.unexpected or counts.written != len(counts.expected) or counts.written + failed != counts.items:
        raise ExtractionError(
            f"{spec.name}: counts do not reconcile: {counts.items} items in, {counts.written} written of "
            f"{len(counts.expected)} expected, {failed} failed; ids lost {lost[:5]}, "
            f"written unexpectedly {counts.unexpected[:5]}"
        )
    if counts.items and failed / counts.items > job.max_failure_fraction:
        first = dead.slice(0, 3).to_pylist()
        raise ExtractionError(
            f"{spec.name}: {failed} of {counts.items} items failed, more than "
            f"extract.job.max_failure_fraction={job.max_failure_fraction}; first: {first}; "
            f"see {out_dir / 'dead_letters.parquet'}"
        )


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
    """One extraction run: the modality, its manifest and provenance, the cache, and the job's work folder.

    What it holds per item is the id and the cache key's place (`cache.KeyIndex`): arrays, ~50 bytes an
    item; the manifest's rows are streamed from the file, a batch at a time."""

    def __init__(
        self, spec: Modality, job: JobConfig, manifest_path: Path, out_dir: Path, expect: dict[str, Any] | None
    ):
        self.spec, self.job, self.out_dir, self.manifest_path = spec, job, out_dir, manifest_path
        fields, self.mmeta = schema.read_manifest_schema(manifest_path)
        # a fitted kind (meta) fits on the rows; the others check the columns
        table = schema.read_manifest(manifest_path)[0] if spec.extractor.fitted else fields.empty_table()
        self.manifest_sha256 = features.file_sha256(manifest_path)
        # the ids (~15 bytes an item), read without read-ahead; one array (a take from chunks copies them)
        chunks = [c for b in self.batches(65536, [schema.ID]) for c in b.column(0).chunks]
        self.ids = pa.concat_arrays(chunks) if chunks else pa.array([], pa.string())
        del chunks
        self.described = describe(spec, table, self.mmeta, expect)
        del table
        fp, self.software = fingerprint(spec, self.described)
        self.job_described = {**self.described, "software": self.software}  # what every worker checks
        keys, at = np.empty(len(self.ids), cache.KEY_DTYPE), 0  # filled in place: no list of batches to join
        for batch in self.batches():
            inputs = spec.extractor.item_inputs(batch, self.described)
            keys[at : at + batch.num_rows] = cache.key_array([cache.item_key(fp, v) for v in inputs])
            at += batch.num_rows
        self.index = cache.KeyIndex(keys)
        del keys
        self.work = out_dir / "_work"
        self.store = cache.FeatureCache(
            Path(job.cache_dir) if job.cache_dir else self.work / "cache",
            spec.kind,
            fp,
            self.described["dim"],
            {"described": self.described, "params": to_dict(spec.cfg), "software": self.software},
        )
        self.workers: dict[str, int] = {}  # items per cluster worker, where the runner reports them

    def batches(self, rows: int = 16384, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """The manifest's rows (or `columns`), a batch at a time, in file order; no read-ahead: a buffered
        stream decodes the file a page at a time."""
        pf = pq.ParquetFile(self.manifest_path, pre_buffer=False, buffer_size=1 << 20)
        for batch in pf.iter_batches(rows, columns=columns):
            yield pa.Table.from_batches([batch])

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

    def write_todo(self, todo: np.ndarray, folder: Path) -> int:
        """The manifest rows `todo` selects (a mask) with their cache keys, as work files of at most
        job.partition_items rows; returns the rows written."""
        folder.mkdir(parents=True)
        writer, in_file, files, start, written = None, 0, 0, 0, 0
        try:
            for batch in self.batches():
                end = start + batch.num_rows
                picked = np.flatnonzero(todo[start:end])
                if len(picked):
                    rows = batch.take(pa.array(picked)).append_column(
                        TODO_KEY, pa.array(cache.key_text(self.index.uniq[self.index.inv[start + picked]]).astype(str))
                    )
                    while rows.num_rows:
                        if writer is None:
                            writer = pq.ParquetWriter(folder / f"todo-{files:06d}.parquet", rows.schema)
                            files, in_file = files + 1, 0
                        take = min(rows.num_rows, self.job.partition_items - in_file)
                        writer.write_table(rows.slice(0, take))
                        rows, in_file, written = rows.slice(take), in_file + take, written + take
                        if in_file == self.job.partition_items:
                            writer.close()
                            writer = None
                start = end
        finally:
            if writer is not None:
                writer.close()
        return written

    def compute(self, todo: np.ndarray, tag: str = "job") -> pa.Table:
        """Run the Beam job on the manifest rows `todo` selects; their results are committed to the cache
        as the job runs and placed in the index after it. Returns the job's dead letters (sorted by id).
        `tag` names its work files (one run may run two jobs)."""
        folder, dead = self.work / f"todo-{tag}", self.work / f"dead-{tag}"
        total = self.write_todo(todo, folder)
        dead.mkdir()
        log.info("%s: extracting %d items on %s", self.spec.name, total, self.job.runner)
        before = set(self.store.parts())
        p = beam.Pipeline(options=beam_options(self.job))
        plan = JobPlan(
            self.spec, self.job_described, str(folder), self.mmeta["dataset"]["dir"], self.store, str(dead), total
        )
        build(p, plan, self.job)
        result = p.run()
        result.wait_until_finish()
        for worker, n in (getattr(result, "worker_items", None) or {}).items():
            self.workers[worker] = self.workers.get(worker, 0) + n
        self.store.locate(self.index, sorted(set(self.store.parts()) - before))
        shutil.rmtree(folder, ignore_errors=True)
        return _read_dead(dead)

    def positions(self, ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Manifest positions of `ids` (each a manifest id)."""
        return pc.index_in(ids, value_set=self.ids).to_numpy(zero_copy_only=False).astype(np.int64)

    def compute_missing(self) -> tuple[pa.Table, int]:
        """Run the Beam job once per distinct key that is not in the cache; returns (the dead letters of
        every item, the items sent to the job).

        An inference failure belongs to the input, so every item with that key shares it. A prepare failure
        belongs to the item's own file (missing, changed since ingest): the other items with that key run
        in a second job, each on its own file."""
        index, n = self.index, len(self.ids)
        todo = np.zeros(n, dtype=bool)
        todo[index.first[index.part < 0]] = True  # each missing distinct key's first item
        if not todo.any():
            return schema.EXTRACT_DEAD_LETTER_SCHEMA.empty_table(), 0
        dead = self.compute(todo)
        retry = np.zeros(n, dtype=bool)
        if dead.num_rows:
            at = self.positions(dead[schema.ID])
            prepare = np.asarray(dead[schema.STAGE].to_pylist()) == "prepare"
            failed = np.zeros(n, dtype=bool)
            failed[at] = True
            own = np.isin(index.inv, index.inv[at[prepare]])
            retry = own & ~index.found() & ~failed
            dead = self.fan_out(dead, at, prepare)
        if retry.any():
            log.info(
                "%s: %d items share an input whose first item could not be read: each reads its own file",
                self.spec.name,
                int(retry.sum()),
            )
            dead = pa.concat_tables([dead, self.compute(retry, "retry")]).sort_by(schema.ID)
        return dead, int(todo.sum() + retry.sum())

    def fan_out(self, dead: pa.Table, at: np.ndarray, prepare: np.ndarray) -> pa.Table:
        """The dead letters of every item whose key is the key of an item that failed in inference
        (identical inputs are computed once, for the first item that has them, so they fail together); a
        prepare failure stays the failed item's own."""
        rows = dead.to_pylist()
        out = [r for r, p in zip(rows, prepare) if p]
        by_key = {int(self.index.inv[i]): r for i, r, p in zip(at, rows, prepare) if not p}
        if by_key:
            for i in np.flatnonzero(np.isin(self.index.inv, list(by_key))).tolist():
                first = by_key[int(self.index.inv[i])]
                item_id = self.ids[i].as_py()
                same = "" if first[schema.ID] == item_id else f" (same input as {first[schema.ID]})"
                out.append({**first, schema.ID: item_id, schema.ERROR: first[schema.ERROR] + same})
        return pa.Table.from_pylist(out, schema=schema.EXTRACT_DEAD_LETTER_SCHEMA).sort_by(schema.ID)

    def assemble(self, dead: pa.Table) -> tuple[Counts, list[str]]:
        """features.parquet from the cache: every item that did not fail, filtered, sorted by id in bounded
        memory and written last and atomically (a folder holding features.parquet is a finished extraction).
        Returns the counts and the ids neither written nor failed (none, when all is well)."""
        failed = np.zeros(len(self.ids), dtype=bool)
        if dead.num_rows:
            failed[self.positions(dead[schema.ID])] = True
        keep = self.index.found() & ~failed
        lost = self.ids.filter(pa.array(~keep & ~failed)).to_pylist()
        counts = Counts(self.spec, len(self.ids), self.ids, np.flatnonzero(keep).astype(np.int32))
        sorter = ExternalSort(schema.ID, self.job.merge_buffer_mb << 20, self.work)
        try:
            for table in cache.gather(self.index, self.ids, keep, self.described["dim"]):
                sorter.add(apply_filter(table, self.spec.extractor))
            self.index = None  # every row is read: its arrays are not needed while the sort merges
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
        return counts, lost


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
    distinct input once, and what it computes is committed to the cache in slices as it goes (a rerun
    after a kill computes only the rest). `expect` is a model bundle's provenance of this modality
    (scoring new data): the extractor, model, weights and dimension must match it before any item is
    processed, and a fitted kind (meta) reuses the bundle's training statistics instead of fitting new ones.
    """
    _quiet()
    t0, cpu0 = time.perf_counter(), time.process_time()
    shutil.rmtree(out_dir, ignore_errors=True)
    if job.cache_dir:
        spec.extractor.artifacts = (Path(job.cache_dir) / ".artifacts").resolve()
    run = Run(spec, job, manifest_path, out_dir, expect)
    run.work.mkdir(parents=True)
    run.store.clean_partials()
    run.store.locate_verified(run.index)
    n = len(run.ids)
    reused = int(run.index.found().sum())
    log.info(
        "%s: %d items (%d distinct inputs), %d in the cache, %d to compute with %s (%s, dim %d)",
        spec.name,
        n,
        len(run.index.uniq),
        reused,
        n - reused,
        run.described["model_id"],
        spec.kind,
        run.described["dim"],
    )
    dead, sent = run.compute_missing()
    pq.write_table(dead, out_dir / "dead_letters.parquet", compression="zstd")
    counts, lost = run.assemble(dead)
    shutil.rmtree(run.work, ignore_errors=True)

    computed = counts.written - reused
    cpu = time.process_time() - cpu0 if in_process(job) else None  # elsewhere the work ran in other processes
    metrics = counts.metrics(dead, computed, reused, job.cache_dir, time.perf_counter() - t0, cpu)
    metrics["sent_to_job"] = sent  # distinct inputs computed (computed counts every item that got a result)
    if run.store.quarantined:
        metrics["cache_quarantined"] = run.store.quarantined
    if run.workers:
        metrics["worker_items"] = dict(sorted(run.workers.items()))  # items each cluster worker finished
    runtime.write_json(metrics_path, metrics)
    log.info(
        "%s: %d in, %d written (%d computed from %d distinct inputs, %d reused; %d empty sets, %d elements), "
        "%d failed in %.1f s (%.1f computed items/s)",
        spec.name,
        n,
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
        _reconcile(spec, counts, lost, dead, job, out_dir)
    except ExtractionError:  # a folder holding features.parquet is a finished extraction: this one is not
        (out_dir / "features.parquet").unlink(missing_ok=True)
        raise
    return metrics
