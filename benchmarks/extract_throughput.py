"""Extraction throughput on real posters: the Beam stage (in-process, and on a local Dask cluster)
next to a bare batched loop and a naive one-item-at-a-time loop over the same model, in one run.

    python benchmarks/extract_throughput.py --posters ../shared/data/movie-posters --n 200

All variants include loading the model and the same per-record work (decode, EXIF, RGB,
preprocessing); the Beam variants also pay for pipeline construction and start-up, Parquet writing,
the merge and the count reconciliation, and the Dask variant for starting its cluster (`--dask-workers`
single-thread worker processes; 0 skips it). Each variant first runs once on a few items so that
imports and the file cache are warm; the timed runs then go in the order naive, bare, Beam, Dask.
The per-item cache is off. Numbers are items/s of wall time. For OCR and faces the sets found are
counted too (elements and mean score per runner), so a speed-up that changes what is read shows.
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


def bare_loop(ext, described, rows, root: Path, batch_size: int) -> float:
    t0 = time.perf_counter()
    handler = ext.handler(described)
    model = handler.load_model()
    payloads = [ext.prepare(r, root) for r in rows]
    ready = [p for p in payloads if p is not None]
    for start in range(0, len(ready), batch_size):
        handler.infer_batch(ready[start : start + batch_size], model)
    return time.perf_counter() - t0


def naive_loop(ext, described, rows, root: Path) -> float:
    t0 = time.perf_counter()
    handler = ext.handler(described)
    model = handler.load_model()
    for r in rows:
        p = ext.prepare(r, root)
        if p is not None:
            handler.infer_batch([p], model)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--posters", default=str(REPO.parent / "shared" / "data" / "movie-posters"))
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--modalities", default="image,faces,ocr,title,tags,meta")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--dask-workers", type=int, default=2, help="worker processes of the Dask variant (0: skip it)")
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
    run_ingest(
        section(params, "dataset", DatasetConfig),
        section(params, "ingest", IngestConfig),
        work / "ingest",
        work / "ingest.json",
    )
    table, meta = read_manifest(manifest)
    rows = table.to_pylist()
    print(
        f"{len(rows)} posters from {args.posters}; torch threads {__import__('torch').get_num_threads()}; "
        f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset')}"
    )
    header = (
        f"{'modality':<10} {'items':>5} {'beam it/s':>10} {'dask it/s':>10} {'bare it/s':>10} "
        f"{'naive it/s':>11} {'beam/bare time':>15}  sets found (elements, mean score): beam | dask"
    )
    print(header)
    print("-" * len(header))
    warm = work / "warm-manifest.parquet"
    import pyarrow.parquet as pq

    pq.write_table(pq.read_table(manifest).slice(0, 8), warm)
    dask_job = dataclasses.replace(job, runner="dask", dask=extract.DaskConfig(None, args.dask_workers, 1))
    for modality in args.modalities.split(","):
        spec = extract.modality(modality, params["extract"]["modalities"][modality])
        ext, cfg = spec.extractor, spec.cfg
        extract.run_extraction(spec, job, warm, work / "warm" / modality, work / f"warm-{modality}.json")
        naive_s = bare_s = None
        if not ext.fitted:  # a fitted kind (meta) runs no model: nothing to compare
            described = extract.describe(spec, table, meta)
            bare_loop(ext, described, rows[:8], raw, cfg.batch_size)
            naive_s = naive_loop(ext, described, rows, raw)
            bare_s = bare_loop(ext, described, rows, raw, cfg.batch_size)
        beam_s, found = timed_run(spec, job, manifest, work / "features" / modality)
        dask_s, dask_found = (
            timed_run(spec, dask_job, manifest, work / "dask" / modality) if args.dask_workers else (None, "")
        )
        n = len(rows)

        def rate(sec, n=n):
            return f"{n / sec:>10.2f}" if sec else f"{'-':>10}"

        ratio = f"{beam_s / bare_s:>14.2f}x" if bare_s else f"{'(no model)':>15}"
        naive = f"{n / naive_s:>11.2f}" if naive_s else f"{'-':>11}"
        rates = f"{rate(beam_s)} {rate(dask_s)} {rate(bare_s)} {naive} {ratio}"
        print(f"{modality:<10} {n:>5} {rates}  {found} | {dask_found}", flush=True)


def timed_run(spec, job, manifest: Path, out: Path) -> tuple[float, str]:
    """Seconds of one extraction stage, and what it found (elements, mean score) for detectors."""
    import pyarrow.compute as pc

    from pipeline import features

    t0 = time.perf_counter()
    extract.run_extraction(spec, job, manifest, out, out.with_suffix(".json"))
    seconds = time.perf_counter() - t0
    if spec.kind not in ("ocr", "faces"):
        return seconds, ""
    elements = features.read_features(out / "features.parquet")[0][features.ELEMENTS].combine_chunks().flatten()
    scores = elements.field("score")
    return seconds, f"{len(elements)}, {pc.mean(scores).as_py() or 0:.4f}"


if __name__ == "__main__":
    main()
