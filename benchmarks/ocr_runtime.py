"""OCR throughput and agreement per runtime and precision, on real posters, beside today's torch path.

    python benchmarks/ocr_runtime.py --posters ../shared/data/movie-posters --n 200

What is timed: the OCR handler over every poster in batches of `batch_size` (decoding, easyocr's
detector and recogniser, embedding the texts), with each model loaded and its graphs exported before
timing (the one-off export is printed apart). The modes run interleaved, `--repeats` rounds; the table
gives the median posters/s and its ratio to "torch, one image at a time" (the OCR path before
runtimes existed). Then the whole extract stage (Beam job, merge, sort, write; cache off) is timed
for that path and for the default, same posters.

Agreement with today's reads, over all boxes easyocr returns (before the confidence filter) and over
the boxes the stage keeps (confidence >= min_confidence): a box of today's is matched when the mode
has a box with IoU >= 0.5 (best match, each used once); "texts" counts matched boxes whose text is the
same; "items" counts posters whose whole read (every box, text) is the same; "max |dconf|" is over
boxes with the same text.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


from benchmarks.extract_throughput import subset  # noqa: E402
from pipeline import extract, runtime  # noqa: E402
from pipeline.config import DatasetConfig, IngestConfig, section  # noqa: E402
from pipeline.extractors import ocr, ocr_runtime  # noqa: E402
from pipeline.ingest import run_ingest  # noqa: E402
from pipeline.schema import read_manifest  # noqa: E402

TODAY = ("torch", "easyocr", 1)
MODES = [
    TODAY,
    ("torch", "easyocr", 2),
    ("onnxruntime", "easyocr", 1),
    ("onnxruntime", "easyocr", 2),
    ("openvino", "easyocr", 2),
    ("onnxruntime", "fp32", 2),
    ("openvino", "fp32", 2),
    ("openvino", "bf16", 2),
    ("onnxruntime", "int8", 2),
]


def label(mode: tuple[str, str, int]) -> str:
    rt, prec, par = mode
    return f"{rt} {prec}, {'1 image' if par == 1 else f'{par} images'} at a time"


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def agreement(got: list[list], want: list[list]) -> dict[str, float]:
    """Boxes of `want` matched in `got` (IoU >= 0.5), same texts among them, identical items, max |dconf|."""
    boxes = matched = same = items = 0
    dconf = 0.0
    for g, w in zip(got, want, strict=True):
        free = list(range(len(g)))
        identical = len(g) == len(w)
        for wb, wt, wc in w:
            boxes += 1
            best = max(free, key=lambda j: iou(g[j][0], wb), default=None)
            if best is None or iou(g[best][0], wb) < 0.5:
                identical = False
                continue
            free.remove(best)
            matched += 1
            if g[best][1] == wt:
                same += 1
                dconf = max(dconf, abs(g[best][2] - wc))
            else:
                identical = False
        items += identical
    return {
        "boxes": matched / max(boxes, 1),
        "texts": same / max(boxes, 1),
        "items": items / max(len(want), 1),
        "dconf": dconf,
        "n_boxes": boxes,
    }


def kept(found: list[list], min_confidence: float) -> list[list]:
    return [[f for f in item if f[2] >= min_confidence] for item in found]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--posters", default=str(REPO.parent / "shared" / "data" / "movie-posters"))
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-stage", action="store_true", help="skip timing the whole extract stage")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()
    for key, value in runtime.OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    runtime.configure_logging("WARNING")
    import torch

    work = Path(args.work or tempfile.mkdtemp(prefix="dmms-ocr-bench-"))
    params = runtime.load_overlaid([REPO / "params.yaml", REPO / "examples" / "movie-posters.yaml"])
    raw = subset(Path(args.posters), args.n, work)
    params["dataset"]["dir"] = str(raw)
    run_ingest(
        section(params, "dataset", DatasetConfig),
        section(params, "ingest", IngestConfig),
        work / "ingest",
        work / "i.json",
    )
    manifest = work / "ingest" / "manifest.parquet"
    table, meta = read_manifest(manifest)
    rows = table.to_pylist()
    base_cfg = extract.modality("ocr", params["extract"]["modalities"]["ocr"]).cfg
    base_cfg = dataclasses.replace(base_cfg, device="cpu")
    print(
        f"{len(rows)} posters from {args.posters}; torch threads {torch.get_num_threads()}; "
        f"onnxruntime {ocr_runtime.runtime_version('onnxruntime')}, "
        f"openvino {ocr_runtime.runtime_version('openvino')}, "
        f"CPU bf16: {ocr_runtime.cpu_has_bf16()}; canvas {base_cfg.canvas_size}, batch {base_cfg.batch_size}, "
        f"median of {args.repeats} interleaved rounds"
    )

    images = [ocr.OcrExtractor(base_cfg).prepare(r, raw) for r in rows]
    images = [im for im in images if im is not None]
    handlers = {}
    for mode in MODES:
        rt, prec, par = mode
        if prec == "bf16" and not ocr_runtime.cpu_has_bf16():
            print(f"  skipped {label(mode)}: this CPU has no bf16")
            continue
        ext = ocr.OcrExtractor(dataclasses.replace(base_cfg, runtime=rt, precision=prec, parallel_images=par))
        ext.artifacts = work / "artifacts"
        t0 = time.perf_counter()
        h = ext.handler(ext.describe_files())
        model = h.load_model()
        load_s = time.perf_counter() - t0
        handlers[mode] = (h, model, load_s)

    def run(h, model) -> tuple[float, list[list]]:
        found = []
        t0 = time.perf_counter()
        for start in range(0, len(images), base_cfg.batch_size):
            for r in h.run_inference(images[start : start + base_cfg.batch_size], model):
                found.append([(e["box"], e["text"], e["score"]) for e in r.elements])
        return time.perf_counter() - t0, found

    for h, model, _ in handlers.values():  # warm: first calls compile and allocate
        h.run_inference(images[:2], model)
    times: dict[tuple, list[float]] = {m: [] for m in handlers}
    reads: dict[tuple, list[list]] = {}
    for _ in range(args.repeats):
        for mode, (h, model, _) in handlers.items():
            sec, found = run(h, model)
            times[mode].append(sec)
            reads[mode] = found

    today = len(images) / statistics.median(times[TODAY])
    header = (
        f"{'OCR handler: runs the networks':<44} {'posters/s':>9} {'vs today':>8} {'load s':>7} | "
        f"{'all boxes: boxes texts items max|dconf|':<40} | kept (conf >= {base_cfg.min_confidence}): boxes texts items"
    )
    print(header)
    print("-" * len(header))
    for mode in handlers:
        rate = len(images) / statistics.median(times[mode])
        a = agreement(reads[mode], reads[TODAY])
        k = agreement(kept(reads[mode], base_cfg.min_confidence), kept(reads[TODAY], base_cfg.min_confidence))
        print(
            f"{label(mode):<44} {rate:>9.2f} {rate / today:>7.2f}x {handlers[mode][2]:>7.1f} | "
            f"{a['boxes']:>6.1%} {a['texts']:>6.1%} {a['items']:>6.1%} {a['dconf']:>9.1e}          | "
            f"{k['boxes']:>6.1%} {k['texts']:>6.1%} {k['items']:>6.1%}",
            flush=True,
        )
    kept_today = kept(reads[TODAY], base_cfg.min_confidence)
    print(
        f"boxes compared: {agreement(reads[TODAY], reads[TODAY])['n_boxes']} (all), "
        f"{agreement(kept_today, kept_today)['n_boxes']} (kept)"
    )

    if args.no_stage:
        return
    job = dataclasses.replace(section(params, "extract.job", extract.JobConfig), cache_dir=None)
    print(f"\nwhole extract stage (FnApiRunner, cache off), {len(rows)} posters:")
    stage = {}
    for _ in range(2):
        for name, over in (
            ("today: torch, 1 image at a time", {"runtime": "torch", "parallel_images": 1}),
            ("default", {}),
        ):
            raw_params = {**params["extract"]["modalities"]["ocr"], **over}
            spec = extract.modality("ocr", raw_params)
            t0 = time.perf_counter()
            m = extract.run_extraction(spec, job, manifest, work / "stage" / name[:5], work / f"stage-{name[:5]}.json")
            stage.setdefault(name, []).append(time.perf_counter() - t0)
            assert m["written"] == len(rows), m
    base_s = min(stage["today: torch, 1 image at a time"])
    for name, secs in stage.items():
        print(f"  {name:<34} {len(rows) / min(secs):6.2f} posters/s  {base_s / min(secs):5.2f}x  (best of {len(secs)})")


if __name__ == "__main__":
    main()
