"""Small static SVG charts (no plotting library): a label x modality heatmap and horizontal bars.

The SVG text is self-contained, so it can be written to a file or inlined into the HTML report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape

# One colour per modality position, readable on white and distinguishable for common colour blindness.
PALETTE = ("#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee", "#aa3377", "#bbbbbb", "#000000")


def colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _shade(value: float) -> str:
    """White (0) to dark blue (1)."""
    v = min(max(value, 0.0), 1.0)
    r, g, b = (int(255 + (c - 255) * v) for c in (33, 84, 160))
    return f"#{r:02x}{g:02x}{b:02x}"


def heatmap(
    rows: Sequence[str],
    cols: Sequence[str],
    values: Mapping[str, Mapping[str, float]],
    title: str,
    highlight: Mapping[str, str] | None = None,
) -> str:
    """A rows x cols table of values in [0, 1] as coloured cells with the number written in;
    `highlight[row]` names a column whose cell gets a thick outline (e.g. the top modality)."""
    cell_w, cell_h, left, top = 78, 26, 150, 56
    width, height = left + cell_w * len(cols) + 10, top + cell_h * len(rows) + 10
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" role="img" aria-label="{escape(title)}" font-family="sans-serif" font-size="12">',
        f'<text x="4" y="16" font-size="14" font-weight="bold">{escape(title)}</text>',
    ]
    for j, c in enumerate(cols):
        x = left + j * cell_w + cell_w / 2
        out.append(f'<text x="{x:.0f}" y="{top - 8}" text-anchor="middle">{escape(c)}</text>')
    for i, r in enumerate(rows):
        y = top + i * cell_h
        out.append(f'<text x="{left - 6}" y="{y + cell_h / 2 + 4:.0f}" text-anchor="end">{escape(r)}</text>')
        for j, c in enumerate(cols):
            v = float(values.get(r, {}).get(c, 0.0))
            x = left + j * cell_w
            out.append(f'<rect x="{x}" y="{y}" width="{cell_w - 2}" height="{cell_h - 2}" fill="{_shade(v)}"/>')
            if highlight and highlight.get(r) == c:
                out.append(
                    f'<rect x="{x + 1}" y="{y + 1}" width="{cell_w - 4}" height="{cell_h - 4}" '
                    f'fill="none" stroke="#d62728" stroke-width="2.5"/>'
                )
            ink = "#ffffff" if v > 0.55 else "#111111"
            out.append(
                f'<text x="{x + cell_w / 2 - 1:.0f}" y="{y + cell_h / 2 + 4:.0f}" text-anchor="middle" '
                f'fill="{ink}">{v:.2f}</text>'
            )
    out.append("</svg>")
    return "\n".join(out)


def bars(
    values: Mapping[str, float], title: str, colours: Mapping[str, str] | None = None, vmax: float | None = None
) -> str:
    """Horizontal bars, one per key, with the value written at the end."""
    bar_h, left, top, span = 20, 150, 28, 260
    items = list(values.items())
    vmax = vmax or max([v for _, v in items] + [1e-12])
    width, height = left + span + 60, top + bar_h * len(items) + 6
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" role="img" aria-label="{escape(title)}" font-family="sans-serif" font-size="12">',
        f'<text x="4" y="16" font-size="14" font-weight="bold">{escape(title)}</text>',
    ]
    for i, (k, v) in enumerate(items):
        y = top + i * bar_h
        w = span * max(v, 0.0) / vmax
        fill = (colours or {}).get(k, PALETTE[0])
        out.append(f'<text x="{left - 6}" y="{y + 14}" text-anchor="end">{escape(k)}</text>')
        out.append(f'<rect x="{left}" y="{y + 3}" width="{w:.1f}" height="{bar_h - 6}" fill="{fill}"/>')
        out.append(f'<text x="{left + w + 4:.1f}" y="{y + 14}">{v:.3f}</text>')
    out.append("</svg>")
    return "\n".join(out)


def bars_with_spread(values: Mapping[str, tuple[float, float]], title: str) -> str:
    """Horizontal bars of means with a whisker of +- one standard deviation, one per key."""
    bar_h, left, top, span = 22, 230, 28, 240
    items = list(values.items())
    vmax = max([m + s for m, s in values.values()] + [1e-12])
    width, height = left + span + 110, top + bar_h * len(items) + 6
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" role="img" aria-label="{escape(title)}" font-family="sans-serif" font-size="12">',
        f'<text x="4" y="16" font-size="14" font-weight="bold">{escape(title)}</text>',
    ]
    for i, (k, (mean, std)) in enumerate(items):
        y = top + i * bar_h
        w = span * max(mean, 0.0) / vmax
        lo, hi = span * max(mean - std, 0.0) / vmax, span * max(mean + std, 0.0) / vmax
        out.append(f'<text x="{left - 6}" y="{y + 15}" text-anchor="end">{escape(k[:34])}</text>')
        out.append(f'<rect x="{left}" y="{y + 4}" width="{w:.1f}" height="{bar_h - 8}" fill="{colour(i)}"/>')
        out.append(
            f'<line x1="{left + lo:.1f}" x2="{left + hi:.1f}" y1="{y + bar_h / 2:.1f}" y2="{y + bar_h / 2:.1f}" '
            f'stroke="#000" stroke-width="1.5"/>'
        )
        out.append(f'<text x="{left + max(w, hi) + 4:.1f}" y="{y + 15}">{mean:.3f} ± {std:.3f}</text>')
    out.append("</svg>")
    return "\n".join(out)
