"""`dmms compare`: train model variants with several seeds (or read the runs of a DVC experiments
sweep) and report mean ± std of every test metric, paired differences with a 95% interval, as a
markdown table and an SVG chart. With --leave-one-out: what each modality is worth, the model without
it against the model with all, beside its extraction cost (table.md, worth.json, chart.svg).

params: base (seed), train (the variants override it). Library: pipeline.compare, pipeline.worth.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from collections.abc import Sequence
from pathlib import Path

import yaml

from pipeline import compare, runtime, worth
from pipeline.bundle import feature_dirs
from pipeline.config import BaseConfig, section
from pipeline.train import TrainConfig


def _seeds(text: str, base: int) -> list[int]:
    """'5' -> five seeds from base.seed on; '0,3,7' -> those seeds."""
    if "," in text:
        return [int(s) for s in text.split(",") if s.strip()]
    return list(range(base, base + int(text)))


def _experiments(source: str) -> list[dict]:
    """`dvc exp show --json` output, from a file or (`dvc`) from running it in the working directory."""
    if source != "dvc":
        return json.loads(Path(source).read_text(encoding="utf-8"))
    done = subprocess.run(["dvc", "exp", "show", "--json"], capture_output=True, text=True)
    if done.returncode != 0:
        raise runtime.UserError(f"`dvc exp show --json` failed: {done.stderr.strip()[-300:]}")
    return json.loads(done.stdout or "[]")


def main(argv: Sequence[str] | None = None) -> None:
    """The entry point (argv without the program name)."""
    p = runtime.parser(
        "dmms compare",
        "Compare model variants over several seeds: mean ± std, paired differences, a chart.",
        "dmms compare --manifest data/ingest/manifest.parquet --features data/features --variants "
        "examples/variants.yaml --seeds 5 --pair 'set, max' concat --out data/compare",
    )
    p.add_argument("--variants", help="YAML file: variant name -> overrides of params train (each is trained)")
    p.add_argument("--manifest", help="canonical manifest (with --variants)")
    p.add_argument("--features", help="folder holding <modality>/features.parquet (with --variants)")
    p.add_argument("--seeds", default="5", help="how many seeds from base.seed on, or a list such as 0,1,2 (default 5)")
    p.add_argument(
        "--experiments",
        metavar="JSON|dvc",
        help="read the runs of a DVC experiments sweep instead of training: a `dvc exp show --json` "
        "file, or `dvc` to run that command here",
    )
    p.add_argument("--metrics-file", default="data/metrics/train.json", help="the train metrics file in experiments")
    p.add_argument(
        "--runs",
        metavar="JSON",
        nargs="+",
        help="re-table the runs.json of earlier comparisons, together (e.g. with other --pair)",
    )
    p.add_argument(
        "--pair",
        nargs=2,
        action="append",
        default=[],
        metavar=("A", "B"),
        help="also report A minus B paired by seed, with a 95%% interval (repeatable)",
    )
    p.add_argument(
        "--leave-one-out",
        action="store_true",
        help="what each modality is worth: the model without each modality of --features (or of the sweep) "
        "against the model with all, over the seeds, beside its extraction cost (--extract-metrics)",
    )
    p.add_argument(
        "--extract-metrics",
        metavar="DIR",
        help="with --leave-one-out: the extract stages' metrics (<modality>.json), e.g. data/metrics/extract",
    )
    p.add_argument(
        "--metric",
        default="mean_average_precision",
        choices=compare.METRICS,
        help="with --leave-one-out: the metric of the verdicts (default mean_average_precision)",
    )
    p.add_argument("--out", required=True, help="folder for table.md, chart.svg and runs.json (and trained models)")
    args = p.parse_args(argv)
    params = runtime.setup(args)
    if args.leave_one_out:
        leave_one_out(args, params)
        return
    if args.runs:
        runs = [r for path in args.runs for r in compare.read_runs(Path(path))]
    elif args.experiments:
        runs = compare.runs_from_experiments(_experiments(args.experiments), args.metrics_file)
    else:
        if not (args.variants and args.manifest and args.features):
            raise runtime.UserError(
                "give --variants, --manifest and --features to train, or --experiments to read a sweep"
            )
        section(params, "train", TrainConfig)  # the base every variant overrides must itself be valid
        variants = yaml.safe_load(Path(args.variants).read_text(encoding="utf-8"))
        if not isinstance(variants, dict) or not variants:
            raise runtime.UserError(f"{args.variants}: expected a mapping of variant name -> train overrides")
        seeds = _seeds(args.seeds, section(params, "base", BaseConfig).seed)
        unknown = sorted({v for pair in args.pair for v in pair} - set(variants))
        if unknown:  # found now, not after hours of training
            raise runtime.UserError(
                f"--pair names {unknown}, which are not variants of {args.variants}: {list(variants)}"
            )
        runs = compare.train_runs(
            {k: v or {} for k, v in variants.items()},
            seeds,
            params["train"],
            Path(args.manifest),
            Path(args.features),
            Path(args.out),
            on_run=lambda done: compare.write(done, Path(args.out)),
        )  # kept as they come
    print(compare.write(runs, Path(args.out), [tuple(p) for p in args.pair]), end="")


def _loo_modalities(args: argparse.Namespace) -> list[str]:
    """The modalities to leave out: the feature folders of --features, else the extract metrics files."""
    if args.features:
        return sorted(feature_dirs(Path(args.features), None, "--features"))
    if args.extract_metrics and Path(args.extract_metrics).is_dir():
        return sorted(p.stem for p in Path(args.extract_metrics).glob("*.json"))
    raise runtime.UserError("--leave-one-out needs --features (the modalities to leave out), or --extract-metrics")


def leave_one_out(args: argparse.Namespace, params: dict) -> None:
    """`--leave-one-out`: train (or read from a DVC sweep) the full model and one without each modality,
    and write the worth table, JSON and chart beside each modality's extraction cost."""
    modalities = _loo_modalities(args)
    out = Path(args.out)
    if args.experiments:
        runs = worth.label_experiments(
            compare.runs_from_experiments(_experiments(args.experiments), args.metrics_file), modalities
        )
    elif args.runs:
        runs = [r for path in args.runs for r in compare.read_runs(Path(path))]
    else:
        if not (args.manifest and args.features):
            raise runtime.UserError("--leave-one-out trains: give --manifest and --features (or --experiments)")
        section(params, "train", TrainConfig)
        seeds = _seeds(args.seeds, section(params, "base", BaseConfig).seed)
        runs = compare.train_runs(
            worth.variants(modalities),
            seeds,
            params["train"],
            Path(args.manifest),
            Path(args.features),
            out,
            on_run=lambda done: compare.write(done, out / "variants"),
        )  # kept as they come
    costs = worth.read_costs(Path(args.extract_metrics), modalities) if args.extract_metrics else {}
    print(worth.write(runs, worth.assess(runs, modalities, costs, args.metric), out, args.metric), end="")
