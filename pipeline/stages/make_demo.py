"""Stage make_demo (`dmms demo`): generate the embedded demo dataset, the pipeline's default input.

params: demo. Library: pipeline.demo.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipeline import demo, runtime
from pipeline.config import DemoConfig, section


def main(argv: Sequence[str] | None = None) -> None:
    """The entry point (argv without the program name)."""
    p = runtime.parser(
        "dmms demo",
        "Generate the embedded demo dataset.",
        "dmms demo --out data/demo/raw --unlabelled-out data/demo/unlabelled",
    )
    p.add_argument("--out", required=True, help="dataset folder to (re)write")
    p.add_argument("--unlabelled-out", help="folder for the unlabelled batch (params demo.unlabelled items)")
    args = p.parse_args(argv)
    params = runtime.setup(args)
    demo.generate(
        section(params, "demo", DemoConfig), Path(args.out), Path(args.unlabelled_out) if args.unlabelled_out else None
    )
