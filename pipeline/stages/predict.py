"""Stage predict (`dmms predict`): predictions and per-modality importances of the trained bundle
on already extracted features.

params: predict. Library: pipeline.predict, pipeline.importance, pipeline.bundle.
Imports torch, pyarrow, numpy and pyyaml only, like training.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipeline import runtime
from pipeline.config import section
from pipeline.predict import PredictConfig, run_predict


def main(argv: Sequence[str] | None = None) -> None:
    """The entry point (argv without the program name)."""
    p = runtime.parser(
        "dmms predict",
        "Predict labels and per-modality importances with a trained model bundle.",
        "dmms predict --model data/model/model.pt --manifest data/ingest/manifest.parquet "
        "--features data/features --out data/predictions",
        inputs=("model", "manifest", "features"),
    )
    p.add_argument("--out", required=True, help="folder for the prediction and importance tables")
    p.add_argument("--metrics", help="summary JSON (dataset-level metrics and importances)")
    p.add_argument("--plot-csv", help="per label and modality importances as CSV, for `dvc plots`")
    args = p.parse_args(argv)
    params = runtime.setup(args)
    run_predict(
        section(params, "predict", PredictConfig),
        Path(args.model),
        Path(args.manifest),
        Path(args.features),
        Path(args.out),
        Path(args.metrics) if args.metrics else None,
        Path(args.plot_csv) if args.plot_csv else None,
    )
