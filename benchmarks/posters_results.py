"""The results table on ../shared/data/movie-posters: set-max, set-sum, set-mean, the concat
baseline and each single modality alone, F1 on the test split (threshold 0.5).

    bash benchmarks/posters_features.sh          # features into ../posters-run (~45 min on CPU)
    python benchmarks/posters_results.py [--run ../posters-run] [--out RESULTS.md]

Every variant uses params.yaml's train section with the architecture, pooling or modality list
changed, the same seed and the same early stopping on val F1 micro.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import runtime  # noqa: E402
from pipeline.config import from_dict, load_params  # noqa: E402
from pipeline.train import TrainConfig, fit  # noqa: E402

MODALITIES = ["image", "faces", "ocr", "title", "tags", "meta"]
VARIANTS = [
    ("set, max pooling", {"model": {"pooling": "max"}}),
    ("set, sum pooling", {"model": {"pooling": "sum"}}),
    ("set, mean pooling", {"model": {"pooling": "mean"}}),
    ("concat baseline", {"model": {"architecture": "concat"}}),
    *[(f"{m} only (set, max)", {"modalities": [m], "model": {"pooling": "max"}}) for m in MODALITIES],
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=str(REPO.parent / "posters-run"))
    ap.add_argument("--out", default=None, help="write the table as markdown here too")
    args = ap.parse_args()
    run = Path(args.run)
    runtime.configure_logging("INFO")
    params = load_params(REPO / "params.yaml")
    base, seed = params["train"], params["base"]["seed"]
    rows = []
    for name, over in VARIANTS:
        raw = runtime.merge(base, {"modalities": MODALITIES, "device": "auto", **over})
        cfg = from_dict(TrainConfig, raw, "train")
        tag = name.split(" (")[0].replace(", ", "-").replace(" ", "-")
        res = fit(cfg, run / "ingest" / "manifest.parquet", run / "features", run / "models" / tag,
                  run / "metrics" / f"train-{tag}.json", run / "plots" / f"train-{tag}.csv", seed=seed)
        rows.append((name, res))
        print(json.dumps({"variant": name, **{k: round(v, 4) for k, v in res["test"].items()}}), flush=True)
    base_f = rows[0][1]["test_label_frequency_baseline"]
    lines = ["| variant | F1 micro | F1 macro | F1 weighted | F1 samples | mAP | best epoch |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, res in rows:
        t = res["test"]
        lines.append(f"| {name} | {t['f1_micro']:.4f} | {t['f1_macro']:.4f} | {t['f1_weighted']:.4f} | "
                     f"{t['f1_samples']:.4f} | {t['mean_average_precision']:.4f} | {res['best_epoch']} |")
    lines.append(f"| label frequencies (top-{base_f['top_k']} labels) | {base_f['f1_micro']:.4f} | "
                 f"{base_f['f1_macro']:.4f} | {base_f['f1_weighted']:.4f} | {base_f['f1_samples']:.4f} | "
                 f"{base_f['mean_average_precision']:.4f} | |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
