"""Batch scoring on real data: N movie posters scored as a new, unlabelled folder.

    bash benchmarks/posters_features.sh            # once: features into ../posters-run
    python benchmarks/posters_score.py [--run ../posters-run] [--n 100]

Takes the first N test-split films of ../shared/data/movie-posters, copies their posters into a
new folder with a manifest whose genres column is dropped (kept aside), scores it with
`dmms score` and a set model trained on the posters features (trained here if missing), then
prints the counts, the wall time, the largest difference between the scored probabilities and
those the predict stage gives from the pipeline's own features, and the metrics against the genres
kept aside.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import metrics as M  # noqa: E402
from pipeline import runtime  # noqa: E402
from pipeline.config import load_params, section  # noqa: E402
from pipeline.predict import PredictConfig, run_predict  # noqa: E402
from pipeline.train import TrainConfig, fit  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "movie-posters"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=str(REPO.parent / "posters-run"))
    ap.add_argument("--n", type=int, default=100)
    args = ap.parse_args()
    run = Path(args.run)
    runtime.configure_logging("INFO")
    params = load_params(REPO / "params.yaml")
    manifest = run / "ingest" / "manifest.parquet"
    bundle = run / "models" / "score-bundle" / "model.pt"
    if not bundle.is_file():
        fit(
            section(params, "train", TrainConfig),
            manifest,
            run / "features",
            bundle.parent,
            run / "metrics" / "train-score-bundle.json",
            run / "plots" / "train-score-bundle.csv",
            seed=params["base"]["seed"],
        )

    ids = [r["id"] for r in pq.read_table(manifest, columns=["id", "split"]).to_pylist() if r["split"] == "test"][
        : args.n
    ]
    rows = {r["id"]: r for r in csv.DictReader(open(DATA / "movies.csv", encoding="utf-8"))}
    folder = run / f"new{args.n}"
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "posters").mkdir(parents=True)
    cols = [c for c in next(iter(rows.values())) if c != "genres"]
    with open(folder / "movies.csv", "w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, cols, lineterminator="\n")
        w.writeheader()
        for i in ids:
            w.writerow({c: rows[i][c] for c in cols})
            shutil.copy(DATA / rows[i]["image"], folder / rows[i]["image"])
    truth = {i: rows[i]["genres"].split("|") for i in ids}

    out = run / f"scored{args.n}"
    t0 = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "score",
            "--params",
            str(REPO / "params.yaml"),
            "--model",
            str(bundle),
            "--input",
            str(folder),
            "--output",
            str(out),
        ],
        check=True,
        cwd=REPO,
    )
    wall = time.perf_counter() - t0
    summary = json.loads((out / "summary.json").read_text())
    scored = pq.read_table(out / "predictions.parquet").to_pandas().set_index("id")
    run_predict(PredictConfig(splits=("test",), device="cpu"), bundle, manifest, run / "features", run / "predict-test")
    ref = pq.read_table(run / "predict-test" / "predictions.parquet").to_pandas().set_index("id").loc[scored.index]
    prob_cols = [c for c in scored.columns if c.startswith("prob_")]
    labels = [c[len("prob_") :] for c in prob_cols]
    y = np.array([[lab in truth[i] for lab in labels] for i in scored.index], dtype=float)
    print(f"counts: {summary['counts']}")
    print(f"dmms score wall time: {wall:.1f} s for {args.n} posters")
    print(
        f"max |p(scored) - p(predict stage on pipeline features)|: "
        f"{float(np.abs(scored[prob_cols].to_numpy() - ref[prob_cols].to_numpy()).max()):.2e}"
    )
    print(
        "against the genres kept aside:",
        {k: round(v, 3) for k, v in M.evaluate("multilabel", y, scored[prob_cols].to_numpy(), 0.5).items()},
    )


if __name__ == "__main__":
    main()
