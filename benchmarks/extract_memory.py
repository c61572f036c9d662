"""Peak memory of the image extract stage at 1x, 4x and 16x the items, in one run.

    python benchmarks/extract_memory.py --base 200

Each size runs in a fresh child process: generate that many random JPEG images (256x256), ingest
them, then run the image extract stage (`dmms extract`, in-process FnApiRunner, per-item cache off)
and report the process's peak resident set size. The 1x row is the baseline the others are compared
with: the merge streams, so peak RSS should not grow with the number of items (target: within 25%).
A second column runs the same stage with merge_buffer_mb=1, so the sort spills runs to disk and the
merge path is measured too.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(n: int, work: Path, buffer_mb: int) -> None:
    sys.path.insert(0, str(REPO))
    import numpy as np
    import yaml
    from PIL import Image

    from pipeline import runtime
    from pipeline.config import DatasetConfig, IngestConfig, section
    from pipeline.ingest import run_ingest
    from pipeline.stages import extract as stage

    raw = work / "raw"
    (raw / "img").mkdir(parents=True)
    rng = np.random.default_rng(n)
    with open(raw / "manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "image", "title", "labels"])
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(
                raw / "img" / f"{i}.jpg", quality=85
            )
            w.writerow([f"item{i:06d}", f"img/{i}.jpg", f"Title {i}", "a" if i % 2 else "b"])
    params = runtime.load_overlaid([REPO / "params.yaml"])
    params["dataset"].update(
        dir=str(raw), manifest="manifest.csv", text=["title"], lists={}, numeric=[], categorical=[]
    )
    run_ingest(
        section(params, "dataset", DatasetConfig),
        section(params, "ingest", IngestConfig),
        work / "ingest",
        work / "ingest.json",
    )
    overlay = work / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"extract": {"job": {"cache_dir": None, "merge_buffer_mb": buffer_mb}}}))
    stage.main(
        [
            "--params",
            str(REPO / "params.yaml"),
            "--params",
            str(overlay),
            "--log-level",
            "WARNING",
            "--modality",
            "image",
            "--manifest",
            str(work / "ingest" / "manifest.parquet"),
            "--out",
            str(work / "features"),
            "--metrics",
            str(work / "metrics.json"),
        ]
    )
    metrics = json.loads((work / "metrics.json").read_text())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"items": n, "written": metrics["written"], "peak_mb": peak_mb, "seconds": metrics["seconds"]}))


def measure(n: int, buffer_mb: int) -> dict:
    env = {**os.environ, **runtime_env()}
    with tempfile.TemporaryDirectory(prefix="dmms-mem-") as tmp:
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(n), "--work", tmp, "--buffer-mb", str(buffer_mb)],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


def runtime_env() -> dict[str, str]:
    # what the extract stage's command in dvc.yaml sets, and offline model loading
    return {
        "MALLOC_MMAP_THRESHOLD_": "4294967296",
        "MALLOC_TRIM_THRESHOLD_": "4294967296",
        "MALLOC_TOP_PAD_": "536870912",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=int, default=200, help="items at 1x")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--buffer-mb", type=int, default=256, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.child, Path(args.work), args.buffer_mb)
        return
    print(
        f"{'scale':>5} {'items':>6} {'peak MB':>8} {'vs 1x':>6} {'peak MB, 1 MB sort buffer':>26} {'vs 1x':>6} {'s':>6}"
    )
    base = {}
    for scale in (1, 4, 16):
        n = args.base * scale
        a, b = measure(n, 256), measure(n, 1)
        assert a["written"] == b["written"] == n, (a, b)
        base = base or {"a": a["peak_mb"], "b": b["peak_mb"]}
        print(
            f"{scale:>4}x {n:>6} {a['peak_mb']:>8.0f} {a['peak_mb'] / base['a']:>6.2f} {b['peak_mb']:>26.0f} "
            f"{b['peak_mb'] / base['b']:>6.2f} {a['seconds']:>6.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
