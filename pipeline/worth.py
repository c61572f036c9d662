"""What each modality is worth and what it costs: leave-one-out over seeds, beside its extraction cost.

For every modality, the model without it is trained with the same seeds as the model with all of
them (or read from a DVC experiments sweep), and the drop in each test metric (all minus without,
paired by seed) gets a 95% t-interval (pipeline.compare.paired). Its cost comes from the extract
stage's metrics file: wall seconds, CPU seconds of the stage process (core-seconds, all threads),
items computed, and its share of the whole extraction pass. A verdict line puts the two together.

Models are chosen on val (early stopping, thresholds) and reported on test, as `dmms compare` does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from html import escape
from pathlib import Path
from typing import Any

from pipeline import compare, plots, runtime
from pipeline.compare import METRICS, SHORT, Paired, Run

FULL = "all modalities"
PREFIX = "without "


def without(modality: str) -> str:
    """The variant name of the model trained without `modality`."""
    return f"{PREFIX}{modality}"


def variants(modalities: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Overrides of params train, one variant per modality left out, and the full model."""
    mods = sorted(modalities)
    out: dict[str, dict[str, Any]] = {FULL: {"modalities": mods}}
    for m in mods:
        out[without(m)] = {"modalities": [x for x in mods if x != m]}
    return out


def label_experiments(runs: Sequence[Run], modalities: Sequence[str], key: str = "train.modalities") -> list[Run]:
    """Runs of a DVC experiments sweep named as the leave-one-out variants by their `train.modalities`
    (null or every modality: the full model); runs of other modality sets are left out."""
    full = set(modalities)
    out = []
    for r in runs:
        chosen = r.params.get(key)
        mods = full if chosen is None else set(chosen)
        if mods == full:
            out.append(Run(FULL, r.seed, r.test, r.baseline, r.params, r.val))
        elif len(full - mods) == 1 and mods < full:
            out.append(Run(without(next(iter(full - mods))), r.seed, r.test, r.baseline, r.params, r.val))
    return out


@dataclass
class Cost:
    """One modality's extraction cost, from its extract metrics file."""

    items_in: int
    computed: int  # items whose features this run computed (the others came from the cache)
    seconds: float  # wall seconds of the stage
    cpu_seconds: float | None  # core-seconds of the stage process (null: a cluster runner)
    share: float | None = None  # of the whole pass: CPU seconds where all are known, else wall seconds

    @property
    def per_item(self) -> float | None:
        """Core-seconds (else wall seconds) per computed item; None when nothing was computed."""
        spent = self.cpu_seconds if self.cpu_seconds is not None else self.seconds
        return spent / self.computed if self.computed else None

    @property
    def unit(self) -> str:
        return "core-s" if self.cpu_seconds is not None else "wall s"


def read_costs(metrics_dir: Path, modalities: Sequence[str]) -> dict[str, Cost]:
    """The cost of each modality whose extract metrics file (<modality>.json) is in `metrics_dir`."""
    costs: dict[str, Cost] = {}
    for m in modalities:
        path = Path(metrics_dir) / f"{m}.json"
        if not path.is_file():
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        costs[m] = Cost(
            int(data["items_in"]),
            int(data.get("computed", data["items_in"])),
            float(data["seconds"]),
            None if data.get("cpu_seconds") is None else float(data["cpu_seconds"]),
        )
    use_cpu = all(c.cpu_seconds is not None for c in costs.values())
    total = sum((c.cpu_seconds if use_cpu else c.seconds) or 0.0 for c in costs.values())
    for c in costs.values():
        c.share = ((c.cpu_seconds if use_cpu else c.seconds) / total) if total else None
    return costs


@dataclass
class Worth:
    """One modality: the drop in each test metric without it (all minus without), the drop in the val
    metric the verdict is decided on, and its cost."""

    modality: str
    drops: dict[str, Paired]  # test
    decided_on: Paired | None  # the verdict's metric on val (None: the runs carry no val metrics)
    cost: Cost | None

    def verdict(self, metric: str) -> str:
        """Decided on val (so test stays a measurement), else on test when the runs have no val metrics."""
        d = self.decided_on or self.drops[metric]
        split = "val" if self.decided_on is not None else "test"
        share = (
            f"{self.cost.share:.0%} of the extraction" if self.cost and self.cost.share is not None else "cost unknown"
        )
        if d.n < 2:
            return f"one seed: no interval ({share})"
        interval = f"drop in {split} {SHORT[metric]} {d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}]"
        if d.low > 0:
            return f"worth it: {interval} ({share})"
        if d.high < 0:
            return f"costs accuracy, the model is better without it: {interval} ({share})"
        return f"no measurable value at this cost: {interval} covers 0 ({share})"


def assess(runs: Sequence[Run], modalities: Sequence[str], costs: Mapping[str, Cost], metric: str) -> list[Worth]:
    """Every modality's drops (paired by seed; test, and `metric` on val where the runs carry it) and cost,
    in the order of `modalities`."""
    has_val = all(metric in r.val for r in runs)
    twice = sorted(
        {(r.variant, r.seed) for r in runs if sum(x.variant == r.variant and x.seed == r.seed for x in runs) > 1}
    )
    if twice:  # e.g. a sweep that varied other params too: which run is "all modalities, seed 0"?
        raise runtime.UserError(
            f"more than one run for {twice[:3]}: the runs differ in more than the modalities and the seed; "
            "sweep train.modalities and base.seed only"
        )
    return [
        Worth(
            m,
            {k: compare.paired(runs, FULL, without(m), k) for k in METRICS},
            compare.paired(runs, FULL, without(m), metric, "val") if has_val else None,
            costs.get(m),
        )
        for m in modalities
    ]


def markdown(worths: Sequence[Worth], metric: str, seeds: int, split: str = "test") -> str:
    """The table: per modality the drop in each metric with its interval, the cost, the verdict."""
    cols = ("f1_macro", "mean_average_precision", "f1_micro")
    lines = [
        f"Leave-one-out over {seeds} seed(s): drops measured on the {split} split, verdicts decided on val "
        "(models, thresholds and verdicts are chosen on val; test only measures). A drop is the metric with "
        "every modality minus the metric without this one, paired by seed, with its 95% interval.",
        "",
        "| modality | "
        + " | ".join(f"drop in {SHORT[c]}" for c in cols)
        + " | items computed | seconds | core-s per item | share of the pass | verdict |",
        "|---|" + "---:|" * len(cols) + "---:|---:|---:|---:|---|",
    ]
    for w in worths:
        cells = []
        for c in cols:
            d = w.drops[c]
            cells.append(f"{d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}]" if math.isfinite(d.low) else f"{d.mean:+.4f}")
        cost = w.cost
        per = (
            f"{cost.per_item:.4f} {'' if cost.unit == 'core-s' else '(wall)'}".strip()
            if cost and cost.per_item
            else "-"
        )
        lines.append(
            f"| {w.modality} | " + " | ".join(cells) + f" | {cost.computed if cost else '-'} | "
            f"{f'{cost.seconds:.1f}' if cost else '-'} | {per} | "
            f"{f'{cost.share:.0%}' if cost and cost.share is not None else '-'} | {w.verdict(metric)} |"
        )
    warm = [w.modality for w in worths if w.cost and w.cost.computed < w.cost.items_in]
    if warm:  # a warm run's seconds are not what extracting these items costs
        lines += [
            "",
            f"Costs of {', '.join(warm)}: some items came from the per-item cache, so the shares "
            "understate them; extract with `extract.job.cache_dir: null` for costs to compare.",
        ]
    missing = [w.modality for w in worths if w.cost is None]
    if missing:
        lines += ["", f"No extract metrics for {', '.join(missing)}: their cost is unknown."]
    return "\n".join(lines) + "\n"


def chart(worths: Sequence[Worth], metric: str) -> str:
    """An SVG: per modality, its drop in `metric` (with the 95% interval) against its cost per item."""
    width, height, left, right, top, bottom = 640, 380, 70, 110, 48, 56
    pts = [(w, w.cost.per_item, w.drops[metric]) for w in worths if w.cost and w.cost.per_item]
    title = f"What each modality is worth (drop in test {SHORT[metric]} without it) and what it costs"
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" role="img" aria-label="{escape(title)}" font-family="sans-serif" font-size="12">',
        f'<text x="4" y="18" font-size="14" font-weight="bold">{escape(title)}</text>',
    ]
    if not pts:
        out += [f'<text x="4" y="{top + 20}">no extraction costs: give the extract metrics folder</text>', "</svg>"]
        return "\n".join(out) + "\n"
    xs = [math.log10(p) for _, p, _ in pts]
    ys = [v for _, _, d in pts for v in (d.low, d.high, d.mean) if math.isfinite(v)] + [0.0]
    x0, x1 = math.floor(min(xs) - 0.2), math.ceil(max(xs) + 0.2)
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.1 or 0.01
    y0, y1 = y0 - pad, y1 + pad

    def sx(v: float) -> float:
        return left + (math.log10(v) - x0) / (x1 - x0) * (width - left - right)

    def sy(v: float) -> float:
        return top + (y1 - v) / (y1 - y0) * (height - top - bottom)

    axis_y = height - bottom
    out.append(f'<line x1="{left}" x2="{width - right}" y1="{axis_y}" y2="{axis_y}" stroke="#444"/>')
    out.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{axis_y}" stroke="#444"/>')
    for k in range(x0, x1 + 1):  # a tick per power of ten
        x = sx(10.0**k)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{axis_y}" y2="{axis_y + 4}" stroke="#444"/>')
        out.append(f'<text x="{x:.1f}" y="{axis_y + 16}" text-anchor="middle">{10.0**k:g}</text>')
    for v in (y0 + pad, 0.0, y1 - pad):
        out.append(f'<text x="{left - 6}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:+.3f}</text>')
    out.append(
        f'<line x1="{left}" x2="{width - right}" y1="{sy(0):.1f}" y2="{sy(0):.1f}" stroke="#999" '
        'stroke-dasharray="4 3"/>'
    )
    out.append(f'<text x="{width - right + 4}" y="{sy(0) + 4:.1f}" fill="#666">no change</text>')
    for i, (w, per, d) in enumerate(pts):
        x = sx(per)
        if math.isfinite(d.low):
            out.append(
                f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{sy(d.low):.1f}" y2="{sy(d.high):.1f}" '
                f'stroke="{plots.colour(i)}" stroke-width="2"/>'
            )
        out.append(f'<circle cx="{x:.1f}" cy="{sy(d.mean):.1f}" r="5" fill="{plots.colour(i)}"/>')
        out.append(f'<text x="{x + 8:.1f}" y="{sy(d.mean) + 4:.1f}">{escape(w.modality)}</text>')
    unit = "core-seconds" if pts[0][0].cost.unit == "core-s" else "wall seconds"
    out.append(
        f'<text x="{(left + width - right) / 2:.0f}" y="{height - 14}" text-anchor="middle">'
        f"extraction cost per item ({unit}, log scale)</text>"
    )
    out.append(
        f'<text x="4" y="{top - 12}" fill="#444">drop without it (all minus without), mean and 95% interval '
        "over seeds: above the line, the modality helps</text>"
    )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write(runs: Sequence[Run], worths: Sequence[Worth], out_dir: Path, metric: str) -> str:
    """table.md, worth.json, chart.svg and runs.json under `out_dir`; returns the table."""
    seeds = len({r.seed for r in runs if r.variant == FULL})
    table = markdown(worths, metric, seeds)
    compare.write(runs, out_dir / "variants")  # every variant's mean ± std, and runs.json
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "table.md").write_text(table, encoding="utf-8")
    (out_dir / "chart.svg").write_text(chart(worths, metric), encoding="utf-8")
    runtime.write_json(
        out_dir / "worth.json",
        {
            "split": "test",
            "chosen_on": "val",
            "verdict_split": "val" if all(w.decided_on is not None for w in worths) else "test",
            "metric": metric,
            "seeds": seeds,
            "modalities": [
                {
                    "modality": w.modality,
                    "verdict": w.verdict(metric),
                    "drop": {k: vars(d) for k, d in w.drops.items()},
                    "val_drop": None if w.decided_on is None else vars(w.decided_on),
                    "cost": None
                    if w.cost is None
                    else {**asdict(w.cost), "per_item": w.cost.per_item, "per_item_unit": w.cost.unit},
                }
                for w in worths
            ],
        },
    )
    return table
