"""Honest comparisons of model variants: several seeds each, mean and spread, paired differences.

One number from one seed cannot say whether one variant beats another: seeds move test scores by
as much as variants do. A comparison here trains every variant with every seed (or reads runs that
DVC experiments made), reports mean and standard deviation of each test metric, and the difference
between two variants paired by seed with a 95% t-interval over seeds. The label-frequency
baseline (every item gets the train frequencies; F1 from the k most frequent labels) is the floor.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import plots, runtime
from pipeline.config import from_dict

log = logging.getLogger(__name__)

METRICS = ("f1_micro", "f1_macro", "f1_weighted", "f1_samples", "mean_average_precision")
SHORT = {
    "f1_micro": "F1 micro",
    "f1_macro": "F1 macro",
    "f1_weighted": "F1 weighted",
    "f1_samples": "F1 samples",
    "mean_average_precision": "mAP",
}
FREQUENCY = "label frequencies"
# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (more: the normal's 1.96)
# fmt: off
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)
# fmt: on


@dataclass
class Run:
    """One trained model's test metrics (and the label-frequency baseline of the same test split)."""

    variant: str
    seed: int
    test: dict[str, float]
    baseline: dict[str, float] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)  # a DVC experiment's params (flattened keys)
    val: dict[str, float] = field(default_factory=dict)  # the val metrics, where a choice is made on val


@dataclass
class Summary:
    """Mean and standard deviation (over seeds) of every metric of one variant."""

    variant: str
    seeds: list[int]
    mean: dict[str, float]
    std: dict[str, float]


@dataclass
class Paired:
    """Variant `a` minus variant `b` on `metric`, paired by seed: mean and 95% t-interval."""

    a: str
    b: str
    metric: str
    n: int
    mean: float
    low: float
    high: float

    @property
    def verdict(self) -> str:
        if self.n < 2:
            return "one seed: no interval"
        if self.low > 0:
            return f"{self.a} better"
        if self.high < 0:
            return f"{self.b} better"
        return "no difference beyond the interval"


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "variant"


# what to train (variants, seeds, the base params), on which data, where, and a progress callback
def train_runs(
    variants: Mapping[str, Mapping[str, Any]],
    seeds: Sequence[int],
    train_params: Mapping[str, Any],
    manifest: Path,
    features_root: Path,
    out_dir: Path,
    on_run: Callable[[list[Run]], None] | None = None,
) -> list[Run]:
    """Train every variant (overrides of the params train section) with every seed; models, metrics
    and curves go under `out_dir`; `on_run` sees the runs so far after each one (to save them as they come)."""
    from pipeline.train import TrainConfig, fit

    configs = {
        name: from_dict(TrainConfig, runtime.merge(dict(train_params), dict(over)), f"variants.{name}")
        for name, over in variants.items()
    }  # every variant is checked before anything is trained
    runs = []
    for name, cfg in configs.items():
        for seed in seeds:
            tag = f"{slug(name)}-seed{seed}"
            res = fit(
                cfg,
                manifest,
                features_root,
                out_dir / "models" / tag,
                out_dir / "metrics" / f"{tag}.json",
                out_dir / "curves" / f"{tag}.csv",
                seed=seed,
            )
            runs.append(Run(name, seed, res["test"], res.get("test_label_frequency_baseline", {}), val=res["val"]))
            if on_run is not None:
                on_run(runs)
            log.info("%s, seed %d: %s", name, seed, {SHORT[m]: round(res["test"][m], 4) for m in METRICS})
    return runs


# --------------------------------------------------------------------------------------------
# Runs made by DVC experiments (`dvc exp show --json`)
# --------------------------------------------------------------------------------------------


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for k, v in node.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _records(exp_show: Iterable[dict[str, Any]]) -> Iterable[tuple[str, dict[str, Any], bool]]:
    """(name, data, is an experiment) of every commit and experiment in `dvc exp show --json` output."""
    for entry in exp_show:
        if entry.get("rev") != "workspace" and entry.get("data"):
            yield entry.get("name") or entry["rev"][:7], entry["data"], False
        for exp in entry.get("experiments") or []:
            for rev in exp.get("revs") or []:
                if rev.get("data") and not rev.get("error"):
                    yield rev.get("name") or rev["rev"][:7], rev["data"], True


def runs_from_experiments(
    exp_show: list[dict[str, Any]],
    metrics_file: str = "data/metrics/train.json",
    params_file: str = "params.yaml",
    seed_key: str = "base.seed",
) -> list[Run]:
    """Runs from `dvc exp show --json`: each experiment (and the baseline commit) is one run; its variant
    is named by the params it changed against the baseline, other than the seed."""
    records = []
    for name, data, _ in _records(exp_show):
        params = _flatten(((data.get("params") or {}).get(params_file) or {}).get("data") or {})
        metrics = ((data.get("metrics") or {}).get(metrics_file) or {}).get("data") or {}
        if metrics.get("test"):
            records.append((name, params, metrics))
    if not records:
        raise runtime.UserError(
            f"no experiment has test metrics in {metrics_file}; run the sweep first "
            "(dvc exp run --queue ..., dvc queue start) and wait for it (dvc queue status)"
        )
    keys = sorted({k for _, p, _ in records for k in p} - {seed_key})
    varying = [k for k in keys if len({repr(p.get(k)) for _, p, _ in records}) > 1]
    base_values = {k: _mode([p.get(k) for _, p, _ in records]) for k in varying}  # what most runs share
    runs, seen = [], set()
    for _name, params, metrics in records:
        diff = [f"{k}={params.get(k)}" for k in varying if params.get(k) != base_values[k]]
        variant = ", ".join(diff) or "params.yaml as committed"
        seed = int(params.get(seed_key, 0) or 0)
        if (variant, seed) in seen:  # the workspace and a queued copy of the baseline are one run
            continue
        seen.add((variant, seed))
        runs.append(
            Run(
                variant,
                seed,
                metrics["test"],
                metrics.get("test_label_frequency_baseline") or {},
                params,
                metrics.get("val") or {},
            )
        )
    return runs


def _mode(values: list[Any]) -> Any:
    counts: dict[str, tuple[int, Any]] = {}
    for v in values:
        n, _ = counts.get(repr(v), (0, v))
        counts[repr(v)] = (n + 1, v)
    return max(counts.values(), key=lambda t: t[0])[1]


# --------------------------------------------------------------------------------------------
# Aggregates, paired differences, the table and the chart
# --------------------------------------------------------------------------------------------


def summarise(runs: Sequence[Run]) -> list[Summary]:
    """Per variant (in first-seen order), mean and sample standard deviation over seeds; the
    label-frequency baseline last (it does not depend on the seed)."""
    order = list(dict.fromkeys(r.variant for r in runs))
    out = []
    for v in order:
        rs = [r for r in runs if r.variant == v]
        vals = {m: np.array([r.test[m] for r in rs if r.test.get(m) is not None], dtype=float) for m in METRICS}
        out.append(
            Summary(
                v,
                [r.seed for r in rs],
                {m: float(x.mean()) if x.size else math.nan for m, x in vals.items()},
                {m: float(x.std(ddof=1)) if x.size > 1 else 0.0 for m, x in vals.items()},
            )
        )
    base = next((r.baseline for r in runs if r.baseline), None)
    if base:
        out.append(
            Summary(FREQUENCY, [], {m: float(base.get(m, math.nan)) for m in METRICS}, {m: 0.0 for m in METRICS})
        )
    return out


def paired(runs: Sequence[Run], a: str, b: str, metric: str, split: str = "test") -> Paired:
    """`a` minus `b` on `metric` of `split` (test, or val) over the seeds both have, with a 95% t-interval."""
    by_seed = {v: {r.seed: getattr(r, split)[metric] for r in runs if r.variant == v} for v in (a, b)}
    for v in (a, b):
        if not by_seed[v]:
            raise runtime.UserError(f"no run of variant {v!r}; variants: {sorted({r.variant for r in runs})}")
    common = sorted(set(by_seed[a]) & set(by_seed[b]))
    d = np.array([by_seed[a][s] - by_seed[b][s] for s in common], dtype=float)
    if d.size < 2:
        mean = float(d.mean()) if d.size else math.nan
        return Paired(a, b, metric, int(d.size), mean, math.nan, math.nan)
    half = (_T975[d.size - 2] if d.size - 1 <= len(_T975) else 1.96) * d.std(ddof=1) / math.sqrt(d.size)
    return Paired(a, b, metric, int(d.size), float(d.mean()), float(d.mean() - half), float(d.mean() + half))


def markdown(summaries: Sequence[Summary], pairs: Sequence[Paired] = ()) -> str:
    """The comparison as markdown: mean ± std over seeds per variant, then the paired differences."""
    lines = [
        "| variant | seeds | " + " | ".join(SHORT[m] for m in METRICS) + " |",
        "|---|---:|" + "---:|" * len(METRICS),
    ]
    for s in summaries:
        cells = [
            f"{s.mean[m]:.4f} ± {s.std[m]:.4f}" if s.seeds and len(s.seeds) > 1 else f"{s.mean[m]:.4f}" for m in METRICS
        ]
        lines.append(f"| {s.variant} | {len(s.seeds) or '-'} | " + " | ".join(cells) + " |")
    if pairs:
        lines += [
            "",
            "| difference (paired by seed) | metric | seeds | mean | 95% interval | verdict |",
            "|---|---|---:|---:|---|---|",
        ]
        for p in pairs:
            interval = f"[{p.low:+.4f}, {p.high:+.4f}]" if math.isfinite(p.low) else "-"
            lines.append(f"| {p.a} − {p.b} | {SHORT[p.metric]} | {p.n} | {p.mean:+.4f} | {interval} | {p.verdict} |")
    return "\n".join(lines) + "\n"


def chart(summaries: Sequence[Summary], metrics: Sequence[str] = ("f1_macro", "mean_average_precision")) -> str:
    """An SVG of mean ± std per variant for `metrics`, side by side."""
    parts = []
    for m in metrics:
        values = {s.variant: (s.mean[m], s.std[m]) for s in summaries if math.isfinite(s.mean[m])}
        parts.append(plots.bars_with_spread(values, f"test {SHORT[m]}, mean ± std over seeds"))
    width = sum(int(re.search(r'width="(\d+)"', p).group(1)) for p in parts) + 10 * len(parts)
    height = max(int(re.search(r'height="(\d+)"', p).group(1)) for p in parts)
    x, inner = 0, []
    for p in parts:
        inner.append(f'<g transform="translate({x},0)">{p}</g>')
        x += int(re.search(r'width="(\d+)"', p).group(1)) + 10
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{escape("model comparison")}">' + "".join(inner) + "</svg>\n"
    )


def read_runs(path: Path) -> list[Run]:
    """The runs of an earlier comparison's runs.json."""
    import json

    data = json.loads(path.read_text(encoding="utf-8"))
    baseline = data.get("baseline") or {}
    return [Run(r["variant"], int(r["seed"]), r["test"], baseline, val=r.get("val") or {}) for r in data["runs"]]


def write(runs: Sequence[Run], out_dir: Path, pairs: Sequence[tuple[str, str]] = ()) -> str:
    """table.md, chart.svg and runs.json under `out_dir`; returns the table."""
    summaries = summarise(runs)
    diffs = [paired(runs, a, b, m) for a, b in pairs for m in METRICS]
    table = markdown(summaries, diffs)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "table.md").write_text(table, encoding="utf-8")
    (out_dir / "chart.svg").write_text(chart(summaries), encoding="utf-8")
    runtime.write_json(
        out_dir / "runs.json",
        {
            "runs": [{"variant": r.variant, "seed": r.seed, "test": r.test, "val": r.val} for r in runs],
            "baseline": next((r.baseline for r in runs if r.baseline), {}),
            "summary": [{"variant": s.variant, "seeds": s.seeds, "mean": s.mean, "std": s.std} for s in summaries],
            "paired": [vars(p) | {"verdict": p.verdict} for p in diffs],
        },
    )
    return table
