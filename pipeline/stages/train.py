"""Stage train (`dmms train`): fit the set model (or the concat baseline) on the feature sets;
write the model bundle, metrics and the training curve.

params: base (seed), train, extract.modalities (their names: what train.modalities null trains on).
Library: pipeline.train, pipeline.bundle, pipeline.model, pipeline.setdata.
Imports torch, pyarrow, numpy and pyyaml only, so it runs on a GPU machine without Beam or DVC.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from pipeline import runtime
from pipeline.config import BaseConfig, section
from pipeline.train import TrainConfig, fit


def main(argv: Sequence[str] | None = None) -> None:
    """The entry point (argv without the program name)."""
    p = runtime.parser(
        "dmms train",
        "Train the Deep Multi-Modal Sets model on extracted feature sets.",
        "dmms train --manifest data/ingest/manifest.parquet --features data/features --out data/model "
        "--metrics data/metrics/train.json --plots data/plots/train_curve.csv",
        inputs=("manifest", "features"),
    )
    p.add_argument("--out", required=True, help="folder for model.pt")
    p.add_argument("--metrics", required=True)
    p.add_argument("--plots", required=True, help="training curve CSV")
    args = p.parse_args(argv)
    params = runtime.setup(args)
    base = section(params, "base", BaseConfig)
    cfg = section(params, "train", TrainConfig)
    if cfg.modalities is None:  # the modalities params.yaml extracts: a folder left by a removed one is not used
        configured = section(params, "extract.modalities", lambda raw, where: raw) or {}
        cfg = dataclasses.replace(cfg, modalities=tuple(m for m, spec in configured.items() if spec is not None))
    fit(
        cfg,
        Path(args.manifest),
        Path(args.features),
        Path(args.out),
        Path(args.metrics),
        Path(args.plots),
        seed=base.seed,
    )
