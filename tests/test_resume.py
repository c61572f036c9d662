"""Jobs that resume: an extract stage killed (SIGKILL, the whole process group) after it committed some
slices to the cache, then run again, computes only what was not committed, and its features equal an
uninterrupted run's; in-process and on a local 2-worker Dask cluster. And the Dask workers log like
the stage: no library warnings unless --verbose.

The extractor is the synthetic stand-in (pipeline.extractors.synthetic: ~15 ms an item here), run
through the real CLI in a child process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import dataset_config, ingest_config, write_csv
from test_cache import assert_same_features

from pipeline import features
from pipeline.ingest import run_ingest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
ITEMS = 240
# the stage's CLI with the synthetic kind registered first (as a plugin package would register it)
DRIVER = (
    "import sys; from pipeline import runtime; runtime.quiet_imports(sys.argv); "
    "import pipeline.extractors.synthetic; from pipeline import cli; cli.main(sys.argv[1:])"
)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    rows = [[f"i{k:04d}", f"Title number {k}", "A" if k % 2 else "B"] for k in range(ITEMS)]
    write_csv(root / "raw" / "manifest.csv", ["id", "title", "labels"], rows)
    ds = dataset_config(
        root / "raw", image=None, image_required=False, text=["title"], lists={}, numeric=[], categorical=[]
    )
    run_ingest(ds, ingest_config(), root / "ingest", root / "ingest.json")
    return root / "ingest" / "manifest.parquet"


def stage(manifest: Path, work: Path, cache_dir: Path, runner: str, rounds: int, *extra: str) -> subprocess.Popen:
    job = {
        "runner": runner,
        "cache_dir": str(cache_dir),
        "commit_items": 20,
        "partition_items": 40,
        "dask": {"workers": 2, "threads_per_worker": 1},
    }
    synth = {"kind": "synthetic", "column": "title", "dim": 16, "rounds": rounds, "batch_size": 10}
    overlay = work / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"extract": {"job": job, "modalities": {"synth": synth}}}))
    cmd = [sys.executable, "-c", DRIVER, "extract", "--params", str(REPO / "params.yaml"), "--params", str(overlay)]
    cmd += ["--modality", "synth", "--manifest", str(manifest), "--out", str(work / "out")]
    cmd += ["--metrics", str(work / "metrics.json"), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip


def committed(cache_dir: Path) -> int:
    """Entries in the complete cache parts."""
    return sum(pq.ParquetFile(p).metadata.num_rows for p in cache_dir.rglob("part-*.parquet"))


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[str, str]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out, err


@pytest.mark.parametrize("runner", ["FnApiRunner", "dask"])
def test_a_killed_stage_resumes_from_its_committed_slices(manifest, tmp_path, runner):
    rounds = 10_000  # ~15 ms an item: the job runs for seconds after its first commits
    cache_dir = tmp_path / "cache"
    (tmp_path / "killed").mkdir()
    proc = stage(manifest, tmp_path / "killed", cache_dir, runner, rounds)
    deadline = time.monotonic() + 240
    while committed(cache_dir) < 40 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the stage ended before it could be killed: " + proc.communicate()[1][-2000:]
    os.killpg(proc.pid, signal.SIGKILL)  # the stage and, on Dask, its cluster's processes
    proc.wait()
    kept = committed(cache_dir)
    assert 40 <= kept < ITEMS, kept

    (tmp_path / "again").mkdir()
    finish(stage(manifest, tmp_path / "again", cache_dir, runner, rounds))
    m = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert (m["items_in"], m["written"], m["failed"]) == (ITEMS, ITEMS, 0)
    assert (m["reused"], m["computed"]) == (kept, ITEMS - kept), "only what was not committed is computed"
    assert committed(cache_dir) == ITEMS, "each item committed once"

    (tmp_path / "whole").mkdir()
    finish(stage(manifest, tmp_path / "whole", tmp_path / "cache2", runner, rounds))
    resumed = features.read_features(tmp_path / "again" / "out" / "features.parquet")[0]
    whole = features.read_features(tmp_path / "whole" / "out" / "features.parquet")[0]
    assert_same_features(resumed, whole)


def test_dask_workers_log_no_library_warnings_unless_verbose(manifest, tmp_path):
    (tmp_path / "quiet").mkdir()
    _, quiet = finish(stage(manifest, tmp_path / "quiet", tmp_path / "c1", "dask", 0))
    assert "apitools" not in quiet and "Warning" not in quiet and "WARNING" not in quiet, quiet[-3000:]
    assert "synth: " in quiet, "the stage's own lines still show"
    (tmp_path / "verbose").mkdir()
    _, verbose = finish(stage(manifest, tmp_path / "verbose", tmp_path / "c2", "dask", 0, "--verbose"))
    assert verbose.count("apitools not found") >= 2, "with --verbose the workers' library warnings show too"
