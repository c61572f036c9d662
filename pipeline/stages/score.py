"""Stage score (`dmms score`): batch-score a new dataset folder with a trained bundle: the same
ingest checks, the bundle's extractors as the same Beam jobs, predictions, importances, dead
letters and a report, with counts that reconcile.

params: ingest, extract.job, score. Library: pipeline.score (which runs pipeline.ingest,
pipeline.extract, pipeline.predict and pipeline.report the way their stages do).
Flags this parser does not know go to Beam.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from pipeline import runtime
from pipeline.config import IngestConfig, section
from pipeline.extract import JobConfig
from pipeline.score import ScoreConfig, run_score


def main(argv: Sequence[str] | None = None) -> None:
    """The entry point (argv without the program name)."""
    p = runtime.parser(
        "dmms score",
        "Score a new dataset folder with a trained model bundle: ingest, extract, predict, report.",
        "dmms score --model data/model/model.pt --input data/demo/unlabelled --output scored",
        inputs=("model",),
    )
    p.add_argument("--input", help="dataset folder to score (default: params score.input)")
    p.add_argument("--output", required=True, help="folder for everything scoring writes")
    p.add_argument("--metrics", help="also write the summary JSON here")
    p.add_argument(
        "--allow-missing-columns",
        action="store_true",
        help="score with a modality empty when the dataset lacks its column",
    )
    args, beam_args = p.parse_known_args(argv)  # unknown flags go to Beam
    params = runtime.setup(args)
    cfg = section(params, "score", ScoreConfig)
    if args.allow_missing_columns:
        cfg = dataclasses.replace(cfg, allow_missing_columns=True)
    job, ingest = section(params, "extract.job", JobConfig), section(params, "ingest", IngestConfig)
    job = dataclasses.replace(job, flags=(*job.flags, *beam_args))
    folder = runtime.require_folder(
        args.input or cfg.input,
        "dataset folder",
        "--input" if args.input else f"score.input in {runtime.origin_of(args.params, 'score.input')}",
    )
    summary = run_score(cfg, Path(args.model), folder, Path(args.output), job, ingest)
    if args.metrics:
        runtime.write_json(args.metrics, summary)
