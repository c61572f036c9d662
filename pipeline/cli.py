"""The `dmms` command: one subcommand per pipeline step, each the same code its DVC stage runs."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from pipeline import runtime

# subcommand -> (stage module with a main(argv), one-line help), in the order data flows
COMMANDS = {
    "demo": ("pipeline.stages.make_demo", "generate the embedded demo dataset"),
    "ingest": ("pipeline.stages.ingest", "validate a raw dataset and write the canonical manifest"),
    "extract": ("pipeline.stages.extract", "extract one modality's feature sets with Apache Beam"),
    "train": ("pipeline.stages.train", "train the set model on extracted feature sets"),
    "predict": ("pipeline.stages.predict", "predictions and per-modality importances of a trained model"),
    "report": ("pipeline.stages.report", "the static HTML report of predictions and importances"),
    "score": ("pipeline.stages.score", "score a new dataset folder with a trained model (ingest, extract, predict)"),
    # tools, not stages
    "cache": ("pipeline.commands.cache", "list, prune and compact the per-item extraction cache"),
    "compare": (
        "pipeline.commands.compare",
        "train variants over several seeds (or read a DVC sweep): mean, spread, paired differences",
    ),
}


def main(argv: Sequence[str] | None = None) -> None:
    """Dispatch `dmms <command> [options]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items()]
        print("usage: dmms <command> [options]\n\ncommands:\n" + "\n".join(lines), file=sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    runtime.quiet_imports(argv)  # before the stage's libraries log while importing
    module = importlib.import_module(COMMANDS[argv[0]][0])
    runtime.run_main(module.main, argv[1:])


if __name__ == "__main__":
    main()
