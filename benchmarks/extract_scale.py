"""The extract stage's machinery at 10k, 100k and 1M items: memory, time per item, cache lookups.

    python benchmarks/extract_scale.py                          # 10k, 100k, 1M at dim 128; 100k at 1,280
    python benchmarks/extract_scale.py --sizes 2000 20000 --runners inprocess --no-wide   # a quick look

The extractor is `pipeline.extractors.synthetic` (no model: deterministic vectors from each item's
text, `--rounds` dim x dim layers per vector), so what is measured is the stage around it: the
manifest, the cache keys, the Beam job in slices with their cache commits, the merge, the sort by id
and the features file. Each size runs in a fresh child process, cold (an empty cache), then again
warm (every item reused: the cache lookup). Printed side by side, in one run:

  - peak RSS of the stage process, and on Dask of every worker process (sampled every 0.2 s);
  - wall time per item of the whole stage, and the bare loop's time per item: the same synthetic
    work (prepare + the handler's batches) in a plain Python loop, no Beam, no cache, no files;
  - the warm run's time per item (cache lookup and assembly only).

Runners: `inprocess` (Beam's FnApiRunner in the stage process) and `dask` (a local 2-worker cluster,
one thread each, through pipeline.dask_runner).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# one BLAS thread everywhere, set before numpy loads: the bare loop (this process), the in-process stage
# and each 1-thread Dask worker do the same work the same way
THREADS = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
os.environ.update(THREADS)


def write_manifest(path: Path, n: int) -> None:
    """A canonical manifest of n items with one text column (`title`), written a slice at a time."""
    sys.path.insert(0, str(REPO))
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import schema

    sch = schema.manifest_schema(["title"], [], [], [])
    meta = {
        "kind": "manifest",
        "dataset": {"dir": str(path.parent)},
        "task": "multilabel",
        "label_names": ["a", "b"],
        "fields": {"text": ["title"], "lists": [], "numeric": [], "categorical": []},
    }
    sch = schema.with_metadata(sch, meta)
    with pq.ParquetWriter(path, sch) as writer:
        for start in range(0, n, 100_000):
            idx = range(start, min(n, start + 100_000))
            cols = {
                schema.ID: [f"item{i:07d}" for i in idx],
                schema.SPLIT: [("train", "val", "test")[i % 3] for i in idx],
                schema.SOURCE_ROW: list(idx),
                schema.IMAGE: [None] * len(idx),
                schema.IMAGE_WIDTH: [None] * len(idx),
                schema.IMAGE_HEIGHT: [None] * len(idx),
                schema.IMAGE_SHA256: [None] * len(idx),
                schema.LABELS: [["a"] if i % 2 else ["b"] for i in idx],
                "title": [f"title {i} of the synthetic set" for i in idx],
            }
            writer.write_table(pa.table(cols, schema=sch), row_group_size=100_000)


class PeakSampler(threading.Thread):
    """Peak RSS of this process's children (the Dask workers and their nannies), sampled."""

    def __init__(self, every_s: float = 0.2):
        super().__init__(daemon=True)
        self.every_s, self.peaks, self.stop = every_s, {}, threading.Event()

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self.stop.is_set():
            for proc in me.children(recursive=True):
                try:
                    rss = proc.memory_info().rss
                    name = " ".join(proc.cmdline())
                except psutil.Error:
                    continue
                key = (proc.pid, "worker" if "spawn_main" in name else name)  # a Dask worker process
                self.peaks[key] = max(self.peaks.get(key, 0), rss)
            time.sleep(self.every_s)


def child(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(REPO))
    import yaml

    import pipeline.extractors.synthetic  # noqa: F401  (registers kind `synthetic`)
    from pipeline.stages import extract as stage

    work = Path(args.work)
    job = {
        "cache_dir": str(work / "cache"),
        "runner": "dask" if args.runner == "dask" else "FnApiRunner",
        "dask": {"workers": 2, "threads_per_worker": 1},
        "log_every_s": 3600,
    }
    modality = {"kind": "synthetic", "column": "title", "dim": args.dim, "rounds": args.rounds}
    overlay = work / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"extract": {"job": job, "modalities": {"synth": modality}}}))
    sampler = PeakSampler()
    sampler.start()
    runs = []
    for label in ("cold", "warm"):
        t0 = time.perf_counter()
        stage.main(
            [
                *("--params", str(REPO / "params.yaml"), "--params", str(overlay)),
                *("--log-level", "WARNING", "--modality", "synth"),
                *("--manifest", args.manifest, "--out", str(work / "features"), "--metrics", str(work / "m.json")),
            ]
        )
        wall = time.perf_counter() - t0
        m = json.loads((work / "m.json").read_text())
        runs.append({"run": label, "wall_s": wall, **{k: m.get(k) for k in ("written", "computed", "reused")}})
        if label == "cold":
            cold_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            workers = sorted(v / 2**20 for (pid, name), v in sampler.peaks.items() if name == "worker")
            worker_items = m.get("worker_items")
    sampler.stop.set()
    print(
        json.dumps({"runs": runs, "stage_peak_mb": cold_peak, "worker_peak_mb": workers, "worker_items": worker_items})
    )


def bare(n: int, dim: int, rounds: int, batch: int = 64) -> float:
    """Seconds per item of the synthetic work in a plain loop (prepare + the handler's batches)."""
    sys.path.insert(0, str(REPO))
    from pipeline.extractors import synthetic

    cfg = synthetic.SyntheticConfig(dim=dim, rounds=rounds, batch_size=batch)
    handler = synthetic.SyntheticHandler(synthetic.SyntheticExtractor(cfg), {"dim": dim})
    layer = handler.load()
    ext = synthetic.SyntheticExtractor(cfg)
    t0 = time.perf_counter()
    texts = []
    for i in range(n):
        texts.append(ext.prepare({"title": f"title {i} of the synthetic set"}, Path(".")))
        if len(texts) == batch:
            handler.infer_batch(texts, layer)
            texts = []
    if texts:
        handler.infer_batch(texts, layer)
    return (time.perf_counter() - t0) / n


def calibrate(dim: int, target_us: float) -> int:
    """The rounds that make the bare loop cost about `target_us` per item at this dimension."""
    base = bare(2000, dim, 0)
    per_round = (bare(2000, dim, 8) - base) / 8
    return max(0, round((target_us * 1e-6 - base) / per_round)) if per_round > 0 else 0


# what dvc.yaml's extract command sets
STAGE_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "4294967296",
    "MALLOC_TRIM_THRESHOLD_": "4294967296",
    "MALLOC_TOP_PAD_": "536870912",
    "MIMALLOC_PURGE_DELAY": "0",
}


def env() -> dict[str, str]:
    return {**os.environ, **STAGE_ENV, **THREADS}


def measure(manifest: Path, runner: str, dim: int, rounds: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="dmms-scale-") as tmp:
        cmd = [sys.executable, __file__, "--child", "--work", tmp, "--manifest", str(manifest)]
        cmd += ["--runner", runner, "--dim", str(dim), "--rounds", str(rounds)]  # the child's own flags
        out = subprocess.run(cmd, env=env(), check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--runners", nargs="+", default=["inprocess", "dask"], choices=["inprocess", "dask"])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument(
        "--work-us",
        type=float,
        default=500.0,
        help="the synthetic work per item, in microseconds of the bare loop (rounds calibrated per dimension)",
    )
    ap.add_argument("--rounds", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--no-wide", action="store_true", help="skip the 100k run at dim 1,280")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--manifest", help=argparse.SUPPRESS)
    ap.add_argument("--runner", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    sys.path.insert(0, str(REPO))
    from pipeline import runtime

    runtime.quiet_imports([])  # the apitools note Beam logs while importing
    runtime.configure_logging("WARNING")
    cases = [(r, n, args.dim) for r in args.runners for n in args.sizes]
    if not args.no_wide:
        cases += [(r, 100_000, 1280) for r in args.runners]
    rounds = {dim: calibrate(dim, args.work_us) for dim in sorted({d for _, _, d in cases})}
    bare_s = {dim: bare(100_000 if dim <= 128 else 20_000, dim, rounds[dim]) for dim in rounds}
    print(
        f"# {platform.machine()}, {os.cpu_count()} cores; synthetic work ~{args.work_us:g} us/item: "
        + ", ".join(f"dim {d}: {r} rounds, bare loop {bare_s[d] * 1e6:.1f} us/item" for d, r in rounds.items()),
        flush=True,
    )
    header = (
        f"{'runner':>9} {'items':>8} {'dim':>5} {'stage MB':>9} {'workers MB':>16} {'us/item':>8} "
        f"{'bare us':>8} {'x bare':>7} {'warm us':>8}"
    )
    print(header, flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="dmms-scale-data-") as data:
        for runner, n, dim in cases:
            manifest = Path(data) / f"manifest-{n}.parquet"
            if not manifest.exists():
                write_manifest(manifest, n)
            r = measure(manifest, runner, dim, rounds[dim])
            cold, warm = r["runs"]
            assert cold["written"] == n and cold["computed"] == n and warm["reused"] == n, r
            per = cold["wall_s"] / n
            workers = "/".join(f"{w:.0f}" for w in r["worker_peak_mb"]) or "-"
            print(
                f"{runner:>9} {n:>8} {dim:>5} {r['stage_peak_mb']:>9.0f} {workers:>16} {per * 1e6:>8.1f} "
                f"{bare_s[dim] * 1e6:>8.1f} {per / bare_s[dim]:>7.2f} {warm['wall_s'] / n * 1e6:>8.1f}",
                flush=True,
            )
            results.append(
                {"runner": runner, "items": n, "dim": dim, "rounds": rounds[dim], "bare_s": bare_s[dim], **r}
            )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
