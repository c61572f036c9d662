"""pipeline.dask_runner: tiny Beam pipelines on a real 2-worker Dask cluster, one per mended defect.

Outputs come back through files (the workers are other processes) and are compared as sorted lists.
"""

from __future__ import annotations

import os
import pickle
import sys
import uuid
from pathlib import Path

import pytest

pytest.importorskip("dask")
ddist = pytest.importorskip("distributed")

import apache_beam as beam  # noqa: E402
import psutil  # noqa: E402  (a dependency of distributed)
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from apache_beam.ml.inference.base import ModelHandler, RunInference  # noqa: E402
from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402
from apache_beam.runners.runner import PipelineState  # noqa: E402

RUNNER = "--runner=pipeline.dask_runner.DaskRunner"


@pytest.fixture(scope="module")
def cluster():
    """One 2-worker, 1-thread-each local cluster for the module. Work stealing is off so that where a
    task runs follows from the graph alone (the reshuffle test checks the runner's placement)."""
    import dask

    with dask.config.set({"distributed.scheduler.work-stealing": False}):
        with ddist.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0"
        ) as c:
            with ddist.Client(c) as client:
                workers = sorted(client.scheduler_info()["workers"])
            assert len(workers) == 2
            yield c.scheduler_address, workers


def options(cluster, *extra: str) -> PipelineOptions:
    return PipelineOptions([RUNNER, f"--dask_client_address={cluster[0]}", *extra])


class Collect(beam.DoFn):
    """Writes every element to its own pickle file in `folder` (any worker, any order)."""

    def __init__(self, folder: str):
        self.folder = folder

    def process(self, element):
        Path(self.folder, f"{uuid.uuid4().hex}.pkl").write_bytes(pickle.dumps(element))
        yield element


def collected(folder: Path, key=None) -> list:
    return sorted((pickle.loads(p.read_bytes()) for p in folder.glob("*.pkl")), key=key)


def run(p: beam.Pipeline):
    result = p.run()
    assert result.wait_until_finish() == PipelineState.DONE
    return result


def write_parquet(path: Path, n: int) -> Path:
    pq.write_table(pa.table({"id": [f"r{i:03d}" for i in range(n)], "x": list(range(n))}), path)
    return path


def test_read_from_parquet_reads_every_row(cluster, tmp_path):
    src = write_parquet(tmp_path / "in.parquet", 37)
    out = tmp_path / "out"
    out.mkdir()
    p = beam.Pipeline(options=options(cluster))
    p | beam.io.ReadFromParquet(str(src)) | beam.ParDo(Collect(str(out)))
    run(p)
    assert collected(out, key=lambda r: r["id"]) == pq.read_table(src).to_pylist()


class Where(beam.DoFn):
    def process(self, row):
        yield row["x"], ddist.get_worker().address


def test_reshuffle_spreads_a_one_bundle_read_over_both_workers(cluster, tmp_path):
    src = write_parquet(tmp_path / "in.parquet", 40)
    out = tmp_path / "out"
    out.mkdir()
    p = beam.Pipeline(options=options(cluster))
    (p | beam.io.ReadFromParquet(str(src)) | beam.Reshuffle() | beam.ParDo(Where()) | beam.ParDo(Collect(str(out))))
    result = run(p)
    got = collected(out)
    assert sorted(x for x, _ in got) == list(range(40)), "every row once"
    assert sorted({w for _, w in got}) == cluster[1], "the rows after the reshuffle ran on both workers"
    assert sorted(result.worker_items) == cluster[1] and sum(result.worker_items.values()) == 40
    assert all(n > 0 for n in result.worker_items.values()), result.worker_items


class SplitOdd(beam.DoFn):
    def process(self, x):
        if x % 2:
            yield beam.pvalue.TaggedOutput("dead", x)
        else:
            yield x


def test_with_outputs_keeps_main_and_tagged_outputs_apart(cluster, tmp_path):
    rows, dead = tmp_path / "rows", tmp_path / "dead"
    rows.mkdir()
    dead.mkdir()
    p = beam.Pipeline(options=options(cluster))
    split = p | beam.Create(range(20)) | beam.ParDo(SplitOdd()).with_outputs("dead", main="rows")
    split.rows | "rows" >> beam.ParDo(Collect(str(rows)))
    split.dead | "dead" >> beam.ParDo(Collect(str(dead)))
    run(p)
    assert collected(rows) == list(range(0, 20, 2))
    assert collected(dead) == list(range(1, 20, 2))


def test_batch_elements_keeps_the_last_partial_batch(cluster, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    p = beam.Pipeline(options=options(cluster))
    (
        p
        | beam.Create(range(10))
        | beam.BatchElements(min_batch_size=3, max_batch_size=3)
        | beam.ParDo(Collect(str(out)))
    )
    run(p)
    batches = collected(out)
    assert sorted(x for b in batches for x in b) == list(range(10))
    assert all(len(b) <= 3 for b in batches) and sum(len(b) < 3 for b in batches) >= 1


def test_write_to_parquet_writes_every_row_and_two_sinks_are_both_written(cluster, tmp_path):
    schema = pa.schema([("id", pa.string()), ("x", pa.int64())])
    rows = [{"id": f"r{i:02d}", "x": i} for i in range(25)]
    p = beam.Pipeline(options=options(cluster))
    created = p | beam.Create(rows)
    created | "first" >> beam.io.WriteToParquet(str(tmp_path / "a" / "part"), schema, file_name_suffix=".parquet")
    (
        created
        | beam.Filter(lambda r: r["x"] % 5 == 0)
        | "second"
        >> beam.io.WriteToParquet(str(tmp_path / "b" / "part"), schema, num_shards=1, file_name_suffix=".parquet")
    )
    run(p)

    def read(folder):
        return sorted(
            (r for f in (tmp_path / folder).glob("part-*.parquet") for r in pq.read_table(f).to_pylist()),
            key=lambda r: r["x"],
        )

    assert read("a") == rows
    assert read("b") == [r for r in rows if r["x"] % 5 == 0]


class Mark(beam.DoFn):
    """Leaves one file per processed element, to count how often the element was processed."""

    def __init__(self, folder: str):
        self.folder = folder

    def process(self, x):
        Path(self.folder, f"{x}-{uuid.uuid4().hex}").touch()
        yield x


def test_side_inputs_give_the_right_result_and_are_computed_once(cluster, tmp_path):
    out, marks = tmp_path / "out", tmp_path / "marks"
    out.mkdir()
    marks.mkdir()
    p = beam.Pipeline(options=options(cluster, "--dask_npartitions=4"))
    table = p | "table" >> beam.Create([("a", 1), ("b", 2), ("c", 3)]) | "mark" >> beam.ParDo(Mark(str(marks)))
    extra = p | "extra" >> beam.Create([10, 20])
    (
        p
        | "main" >> beam.Create(["a", "b", "c", "a"])
        | beam.Reshuffle()
        | beam.Map(lambda k, d, e: (k, d[k] + sum(e)), beam.pvalue.AsDict(table), beam.pvalue.AsList(extra))
        | beam.ParDo(Collect(str(out)))
    )
    run(p)
    assert collected(out) == [("a", 31), ("a", 31), ("b", 32), ("c", 33)]
    assert sorted(f.name.split("-")[0] for f in marks.iterdir()) == ["('a', 1)", "('b', 2)", "('c', 3)"], (
        "the side input's upstream ran once per element, not once per consuming bundle"
    )


class Fail(beam.DoFn):
    def process(self, x):
        if x == 3:
            raise ValueError("planted failure on 3")
        yield x


def test_a_failed_task_fails_the_run(cluster):
    p = beam.Pipeline(options=options(cluster))
    p | beam.Create(range(5)) | beam.ParDo(Fail())
    result = p.run()
    with pytest.raises(Exception, match="planted failure on 3"):
        result.wait_until_finish()
    assert result.state == PipelineState.FAILED


def test_a_transform_without_translation_is_a_clear_error(cluster):
    p = beam.Pipeline(options=options(cluster))
    p | beam.Impulse() | beam.Map(lambda x: x)
    with pytest.raises(NotImplementedError, match="Impulse.*cannot run Impulse"):
        p.run()


class Env(beam.DoFn):
    def process(self, _):
        yield os.environ.get("OMP_NUM_THREADS"), os.environ.get("MKL_NUM_THREADS"), os.getpid()


def test_without_an_address_a_local_cluster_runs_the_job_and_is_shut_down(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    p = beam.Pipeline(options=PipelineOptions([RUNNER, "--dask_local_workers=1", "--dask_threads_per_worker=2"]))
    p | beam.Create([0, 1, 2]) | beam.ParDo(Env()) | beam.ParDo(Collect(str(out)))
    result = run(p)
    got = collected(out)
    assert {(omp, mkl) for omp, mkl, _ in got} == {("2", "2")}, "threads per worker reach the worker's env"
    assert len(result.worker_items) == 1 and sum(result.worker_items.values()) == 3
    for pid in {pid for _, _, pid in got}:  # the worker process ends: the cluster was closed after the run
        try:
            psutil.Process(pid).wait(timeout=60)
        except psutil.NoSuchProcess:
            pass


class CountSetups(beam.DoFn):
    """Records each setup (a model load in RunInference) as a file named after the worker process."""

    def __init__(self, folder: str):
        self.folder = folder

    def setup(self):
        Path(self.folder, f"{os.getpid()}-{uuid.uuid4().hex}").touch()

    def process(self, element):
        yield os.getpid()


def test_a_dofn_is_set_up_once_per_worker_process_not_per_bundle(cluster, tmp_path):
    setups, out = tmp_path / "setups", tmp_path / "out"
    setups.mkdir()
    out.mkdir()
    p = beam.Pipeline(options=options(cluster, "--dask_npartitions=8"))  # 8 bundles over 2 workers
    (
        p
        | beam.Create(list(range(40)))
        | beam.Reshuffle()
        | beam.ParDo(CountSetups(str(setups)))
        | beam.ParDo(Collect(str(out)))
    )
    run(p)
    pids = collected(out)
    assert len(pids) == 40
    per_process: dict[str, int] = {}
    for f in setups.iterdir():
        per_process[f.name.split("-")[0]] = per_process.get(f.name.split("-")[0], 0) + 1
    assert set(per_process) == {str(pid) for pid in set(pids)} and len(per_process) == 2
    assert all(n == 1 for n in per_process.values()), f"setups per worker process: {per_process}"


class Emit(beam.DoFn):
    """Counts what it emitted in this bundle where the next step can see it (one task at a time per
    worker process: 1 thread each)."""

    def start_bundle(self):
        sys.dmms_emitted = 0

    def process(self, x):
        sys.dmms_emitted += 1
        yield x


class Seen(beam.DoFn):
    def start_bundle(self):
        self.n = 0

    def process(self, x):
        self.n += 1
        yield self.n, sys.dmms_emitted  # streaming: the step before has emitted exactly n so far


def test_consecutive_pardos_stream_each_element_through(cluster, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    p = beam.Pipeline(options=options(cluster))
    (
        p
        | beam.io.ReadFromParquet(str(write_parquet(tmp_path / "in.parquet", 30)))
        | beam.ParDo(Emit())
        | beam.ParDo(Seen())
        | beam.ParDo(Collect(str(out)))
    )
    run(p)
    got = collected(out)
    assert len(got) == 30 and all(n == emitted for n, emitted in got), got


def test_more_partitions_than_workers_spread_over_both_without_a_reshuffle(cluster, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for f in range(8):  # 8 files: 8 partitions, more than the 2 x 2 dealt by a reshuffle
        pq.write_table(pa.table({"x": list(range(f * 5, f * 5 + 5))}), folder / f"todo-{f}.parquet")
    out = tmp_path / "out"
    out.mkdir()
    p = beam.Pipeline(options=options(cluster))
    (p | beam.io.ReadFromParquet(str(folder / "todo-*.parquet")) | beam.ParDo(Where()) | beam.ParDo(Collect(str(out))))
    result = run(p)
    got = collected(out)
    assert sorted(x for x, _ in got) == list(range(40))
    assert sorted({w for _, w in got}) == cluster[1], "both workers took partitions"
    assert sum(result.worker_items.values()) == 40 and all(result.worker_items.values()), result.worker_items


class Model:
    """A 'model' a ModelHandler loads: something to find on the workers after a run."""

    def __init__(self, run: int):
        self.run, self.weights = run, bytearray(1 << 20)


class Handler(ModelHandler):
    def __init__(self, run: int):
        super().__init__()
        self.run = run

    def load_model(self) -> Model:
        return Model(self.run)

    def run_inference(self, batch, model, inference_args=None):
        return [(x, model.run) for x in batch]


def live_models() -> list[int]:
    """On a worker: the runs of the Model objects still alive, and how many set-up groups it keeps."""
    import gc

    from pipeline import dask_runner

    gc.collect()
    runs = sorted(o.run for o in gc.get_objects() if type(o).__name__ == "Model" and hasattr(o, "weights"))
    return runs + [-len(dask_runner._IDLE)]


def test_a_long_lived_cluster_keeps_no_dofn_or_model_of_earlier_runs(cluster, tmp_path):
    with ddist.Client(cluster[0]) as client:
        for n in range(3):
            out = tmp_path / f"out{n}"
            out.mkdir()
            p = beam.Pipeline(options=options(cluster, "--dask_npartitions=4"))
            (p | beam.Create(range(20)) | beam.Reshuffle() | RunInference(Handler(n)) | beam.ParDo(Collect(str(out))))
            result = run(p)
            assert sorted(collected(out)) == [(x, n) for x in range(20)]
            assert result.torn_down >= 2, "the run's set-up DoFns were torn down on both workers"
            assert client.run(live_models) == {w: [0] for w in cluster[1]}, "nothing of this run is left"


def test_a_cluster_without_workers_is_a_clear_error(tmp_path):
    with ddist.LocalCluster(n_workers=0, processes=True, dashboard_address="127.0.0.1:0") as empty:
        p = beam.Pipeline(options=options((empty.scheduler_address,), "--dask_wait_for_workers_s=1"))
        p | beam.Create([1]) | beam.Map(lambda x: x)
        with pytest.raises(RuntimeError, match="has no workers .waited 1 s"):
            p.run()


def test_a_pardo_after_an_output_read_outside_its_group_still_runs(cluster, tmp_path):
    grouped, after = tmp_path / "grouped", tmp_path / "after"
    grouped.mkdir()
    after.mkdir()
    p = beam.Pipeline(options=options(cluster))
    pairs = p | beam.Create(range(6)) | "pair" >> beam.Map(lambda v: (v % 2, v))
    (
        pairs
        | beam.GroupByKey()
        | "sorted" >> beam.MapTuple(lambda k, vs: (k, sorted(vs)))
        | "g" >> beam.ParDo(Collect(str(grouped)))
    )
    pairs | "after" >> beam.ParDo(Collect(str(after)))  # visited after the GroupByKey built the group
    run(p)
    assert collected(grouped) == [(0, [0, 2, 4]), (1, [1, 3, 5])]
    assert collected(after) == sorted((v % 2, v) for v in range(6))
