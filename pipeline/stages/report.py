"""Stage report (`dmms report`): the static HTML report of predictions and importances.

params: report. Library: pipeline.report, pipeline.plots.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipeline import runtime
from pipeline.config import section
from pipeline.report import ReportConfig, write_report


def main(argv: Sequence[str] | None = None) -> None:
    """The entry point (argv without the program name)."""
    p = runtime.parser(
        "dmms report",
        "Write the static HTML report of predictions and importances.",
        "dmms report --predictions data/predictions --manifest data/ingest/manifest.parquet --out data/report",
        inputs=("manifest",),
    )
    p.add_argument("--predictions", required=True, help="folder written by the predict stage")
    p.add_argument("--out", required=True, help="report folder (index.html, img/)")
    args = p.parse_args(argv)
    params = runtime.setup(args)
    write_report(section(params, "report", ReportConfig), Path(args.predictions), Path(args.manifest), Path(args.out))
