"""Stage extract@<modality> (`dmms extract`): one Beam job turning the manifest into one modality's
variable-length feature sets, with dead letters and counts that reconcile.

params: extract.job, extract.modalities.<modality>. Library: pipeline.extract, pipeline.extractors.
Flags this parser does not know go to Beam (e.g. --runner=FlinkRunner --flink_master=host:8081).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from pipeline import extract, runtime
from pipeline.config import section


def main(argv: Sequence[str] | None = None) -> None:
    """The entry point (argv without the program name)."""
    p = runtime.parser(
        "dmms extract",
        "Extract one modality's feature sets with Apache Beam.",
        "dmms extract --modality image --manifest data/ingest/manifest.parquet --out data/features/image "
        "--metrics data/metrics/extract/image.json",
        inputs=("manifest",),
    )
    p.add_argument("--modality", required=True, help="a key of params extract.modalities")
    p.add_argument("--out", required=True, help="folder for features.parquet and dead_letters.parquet")
    p.add_argument("--metrics", required=True, help="metrics JSON")
    args, beam_args = p.parse_known_args(argv)  # unknown flags go to Beam
    params = runtime.setup(args)
    name = args.modality
    spec = section(params, f"extract.modalities.{name}", lambda raw, where: extract.modality(name, raw, where))
    job = section(params, "extract.job", extract.JobConfig)
    job = dataclasses.replace(job, flags=(*job.flags, *beam_args))
    extract.run_extraction(spec, job, Path(args.manifest), Path(args.out), Path(args.metrics))
