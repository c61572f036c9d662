"""Extraction throughput on real posters: the Beam stage next to a bare batched loop and a naive
one-item-at-a-time loop over the same model, in one run.

    python benchmarks/extract_throughput.py --posters ../shared/data/movie-posters --n 200

All three variants include loading the model once and the same per-record work (decode, EXIF,
RGB, preprocessing); the Beam variant also pays for pipeline construction and start-up, Parquet
writing, the merge and the count reconciliation. Each variant first runs once on a few items so
that imports and the file cache are warm for all three; the timed runs then go in the order
naive, bare, Beam. Numbers are items/s of wall time.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import extract, runtime  # noqa: E402
from pipeline.config import DatasetConfig, IngestConfig, section  # noqa: E402
from pipeline.ingest import run_ingest  # noqa: E402
from pipeline.schema import read_manifest  # noqa: E402


def subset(posters: Path, n: int, out: Path) -> Path:
    """The first n rows of movies.csv with their posters, copied (a subset cannot live in a read-only folder)."""
    raw = out / "raw"
    (raw / "posters").mkdir(parents=True, exist_ok=True)
    with (posters / "movies.csv").open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        rows = [r for _, r in zip(range(n), reader)]
        header = reader.fieldnames
    for r in rows:
        shutil.copy(posters / r["image"], raw / r["image"])
    with (raw / "movies.csv").open("w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=header, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return raw


def bare_loop(module, cfg, rows, root: Path, batch_size: int) -> float:
    t0 = time.perf_counter()
    handler = module.HANDLER_CLASS(cfg)
    model = handler.load_model()
    payloads = [module.prepare(r, cfg, root) for r in rows]
    ready = [p for p in payloads if p is not None]
    for start in range(0, len(ready), batch_size):
        handler.infer_batch(ready[start:start + batch_size], model)
    return time.perf_counter() - t0


def naive_loop(module, cfg, rows, root: Path) -> float:
    t0 = time.perf_counter()
    handler = module.HANDLER_CLASS(cfg)
    model = handler.load_model()
    for r in rows:
        p = module.prepare(r, cfg, root)
        if p is not None:
            handler.infer_batch([p], model)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--posters", default=str(REPO.parent / "shared" / "data" / "movie-posters"))
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--modalities", default="image,faces,ocr,title,tags,meta")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()
    for key, value in runtime.OFFLINE_ENV.items():  # the stages run offline; so does their benchmark
        os.environ.setdefault(key, value)
    work = Path(args.work or tempfile.mkdtemp(prefix="dmms-bench-"))
    params = runtime.load_overlaid([REPO / "params.yaml", REPO / "examples" / "movie-posters.yaml"])
    runtime.configure_logging("WARNING")
    # no per-item cache: every variant computes every item
    job = dataclasses.replace(section(params, "extract.job", extract.JobConfig), cache_dir=None)
    raw = subset(Path(args.posters), args.n, work)
    params["dataset"]["dir"] = str(raw)
    manifest = work / "ingest" / "manifest.parquet"
    run_ingest(section(params, "dataset", DatasetConfig), section(params, "ingest", IngestConfig),
               work / "ingest", work / "ingest.json")
    table, meta = read_manifest(manifest)
    rows = table.to_pylist()
    print(f"{len(rows)} posters from {args.posters}; torch threads {__import__('torch').get_num_threads()}; "
          f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset')}")
    header = f"{'modality':<10} {'items':>5} {'beam it/s':>10} {'bare it/s':>10} {'naive it/s':>11} {'beam/bare time':>15}"
    print(header)
    print("-" * len(header))
    warm = work / "warm-manifest.parquet"
    import pyarrow.parquet as pq

    pq.write_table(pq.read_table(manifest).slice(0, 8), warm)
    for modality in args.modalities.split(","):
        spec = extract.modality(modality, params["extract"]["modalities"][modality])
        module, cfg = spec.module, spec.cfg
        extract.run_extraction(spec, job, warm, work / "warm" / modality, work / f"warm-{modality}.json")
        if spec.kind == "meta":
            t0 = time.perf_counter()
            extract.run_extraction(spec, job, manifest, work / "features" / modality, work / f"{modality}.json")
            beam_s = time.perf_counter() - t0
            print(f"{modality:<10} {len(rows):>5} {len(rows) / beam_s:>10.1f} {'(no model)':>10} {'':>11} {'':>15}")
            continue
        bare_loop(module, cfg, rows[:8], raw, cfg.batch_size)
        naive_s = naive_loop(module, cfg, rows, raw)
        bare_s = bare_loop(module, cfg, rows, raw, cfg.batch_size)
        t0 = time.perf_counter()
        extract.run_extraction(spec, job, manifest, work / "features" / modality, work / f"{modality}.json")
        beam_s = time.perf_counter() - t0
        print(f"{modality:<10} {len(rows):>5} {len(rows) / beam_s:>10.1f} {len(rows) / bare_s:>10.1f} "
              f"{len(rows) / naive_s:>11.1f} {beam_s / bare_s:>14.2f}x", flush=True)


if __name__ == "__main__":
    main()
