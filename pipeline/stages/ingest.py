"""Stage ingest (`dmms ingest`): validate a raw dataset; write the canonical manifest, the rejects
and counts that reconcile.

params: dataset, ingest. Library: pipeline.readers (CSV, JSONL, MM-IMDb), pipeline.ingest.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipeline import runtime
from pipeline.config import DatasetConfig, IngestConfig, section
from pipeline.ingest import run_ingest


def main(argv: Sequence[str] | None = None) -> None:
    """The entry point (argv without the program name)."""
    p = runtime.parser(
        "dmms ingest",
        "Validate a raw dataset and write the canonical manifest.",
        "dmms ingest --params params.yaml --params examples/movie-posters.yaml --out posters/ingest "
        "--metrics posters/ingest.json",
    )
    p.add_argument("--out", required=True, help="folder for manifest.parquet and rejects.parquet")
    p.add_argument("--metrics", required=True, help="metrics JSON (counts that reconcile)")
    p.add_argument("--dataset-dir", help="override params.yaml dataset.dir")
    args = p.parse_args(argv)
    params = runtime.setup(args)
    if args.dataset_dir:
        params = runtime.merge(params, {"dataset": {"dir": args.dataset_dir}})
    dataset, ingest = section(params, "dataset", DatasetConfig), section(params, "ingest", IngestConfig)
    runtime.require_folder(
        dataset.dir,
        "dataset folder",
        "--dataset-dir" if args.dataset_dir else f"dataset.dir in {runtime.origin_of(args.params, 'dataset.dir')}",
    )
    run_ingest(dataset, ingest, Path(args.out), Path(args.metrics))
