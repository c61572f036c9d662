"""A static HTML report of predictions and importances (opens from disk: no server, no scripts).

For a sample of items: the poster with the detected face boxes, OCR boxes and image views (regions;
the whole image only when it mattered most) drawn over it (the box
that mattered most for the top label outlined in red), the top labels with their probabilities, and
per-modality importance bars, overall and for the top label; plus the dataset-level plots and
metrics. Thumbnails are copied into <out>/img, so the folder can be moved or zipped as a whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image

from pipeline import plots, records, runtime, schema
from pipeline.config import ConfigError

log = logging.getLogger(__name__)

# Extractor kinds whose elements carry image boxes -> css class. The kind comes from the features'
# provenance (summary.json modality_kinds), so a modality keeps its boxes under any name.
BOXED_KINDS = {"faces": "face", "ocr": "ocr", "image": "view"}


def _whole_image(e: dict[str, Any], size: tuple[int, int]) -> bool:
    """Whether an element's box is the whole image (an image modality's `full` view)."""
    x0, y0, x1, y1 = e[schema.BOX][:4]
    return x0 <= 0 and y0 <= 0 and x1 >= size[0] and y1 >= size[1]


@dataclass(frozen=True)
class ReportConfig:
    """Settings of the HTML report (params report, and score.report)."""

    items: int = 24  # posters shown
    split: str | None = "test"  # items of this split only (null: any)
    top_labels: int = 3
    top_elements: int = 4  # elements listed per item
    thumb_height: int = 360

    def validate(self, where: str) -> None:
        if self.items < 0 or self.top_labels < 1 or self.top_elements < 0 or self.thumb_height < 16:
            raise ConfigError(f"{where}: items and top_elements must be >= 0, top_labels >= 1, thumb_height >= 16")


def choose(pred: list[dict[str, Any]], labels: list[str], n: int) -> list[int]:
    """Rows to show: first, per label in turn, the most confident item predicted with it (so every
    predicted label appears), then the rest in a stable hash order of ids."""
    chosen: list[int] = []
    seen = set()
    by_label = {
        lab: sorted(
            (i for i, r in enumerate(pred) if lab in (r[schema.PREDICTED] or [])),
            key=lambda i: -pred[i][schema.prob_column(lab)],
        )
        for lab in labels
    }
    while len(chosen) < n and any(by_label.values()):
        for lab in labels:
            while by_label[lab] and by_label[lab][0] in seen:
                by_label[lab].pop(0)
            if by_label[lab] and len(chosen) < n:
                chosen.append(by_label[lab].pop(0))
                seen.add(chosen[-1])
    rest = sorted(
        (i for i in range(len(pred)) if i not in seen),
        key=lambda i: hashlib.sha256(pred[i][schema.ID].encode()).hexdigest(),
    )
    return chosen + rest[: max(0, n - len(chosen))]


def _bar_rows(values: dict[str, float], colours: dict[str, str], fmt: str = "{:.2f}") -> str:
    top = max(values.values(), default=0.0)
    rows = []
    for k, v in values.items():
        width = 100 * max(v, 0.0) / top if top > 0 else 0
        rows.append(
            f'<div class="row"><span class="name">{escape(k)}</span><span class="bar">'
            f'<i style="width:{width:.1f}%;background:{colours.get(k, "#4477aa")}"></i></span>'
            f'<span class="val">{fmt.format(v)}</span></div>'
        )
    return "\n".join(rows)


def _element_text(e: dict[str, Any], kind: str | None, size: tuple[int, int] | None = None) -> str:
    """What an element is, for people: its text, or which face, or the whole image."""
    if e.get(schema.TEXT):
        return e[schema.TEXT]
    if kind == "faces":
        score = f", detector score {e[schema.SCORE]:.2f}" if e.get(schema.SCORE) is not None else ""
        return f"face {e[schema.POSITION] + 1}{score}"
    if kind == "image":
        box = e.get(schema.BOX)
        if box is None or (size is not None and _whole_image(e, size)):
            return "the whole image"
        return f"image view {e[schema.POSITION] + 1}: pixels {box[0]:.0f},{box[1]:.0f} to {box[2]:.0f},{box[3]:.0f}"
    return f"element {e[schema.POSITION] + 1}"


def _poster(
    img_src: str,
    size: tuple[int, int],
    thumb: tuple[int, int],
    boxed: list[tuple[dict[str, Any], str]],
    top_element: dict[str, Any] | None,
    alt: str,
) -> str:
    """The thumbnail with an SVG overlay of the boxed elements ((element, kind) pairs) in image pixels; an
    image view covering the whole image is outlined only when it mattered most."""
    W, H = size
    rects = []
    for e, kind in boxed:
        if kind == "image" and e is not top_element and _whole_image(e, size):
            continue
        x0, y0, x1, y1 = e[schema.BOX][:4]
        cls = BOXED_KINDS[kind] + (" top" if e is top_element else "")
        what = {"faces": "face", "image": "image view"}.get(kind, f"text \u201c{e.get(schema.TEXT) or ''}\u201d")
        tip = f"{what}: {e[schema.SHARE]:.1%} of the item"
        if e.get(schema.TOP_LABEL_SHARE) is not None:
            tip += f", {e[schema.TOP_LABEL_SHARE]:.1%} of {e[schema.TOP_LABEL]}"
        rects.append(
            f'<rect class="box {cls}" x="{x0:.1f}" y="{y0:.1f}" width="{max(x1 - x0, 1):.1f}" '
            f'height="{max(y1 - y0, 1):.1f}"><title>{escape(tip)}</title></rect>'
        )
    return (
        f'<div class="poster" style="width:{thumb[0]}px;height:{thumb[1]}px">'
        f'<img src="{escape(img_src)}" alt="{escape(alt)}" width="{thumb[0]}" height="{thumb[1]}">'
        f'<svg class="boxes" viewBox="0 0 {W} {H}" preserveAspectRatio="none">{"".join(rects)}</svg></div>'
    )


CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{margin:0 0 4px} .muted{color:#666} table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right} th:first-child,td:first-child{text-align:left}
.plots{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start;margin:12px 0}
.plots svg{background:#fff;border:1px solid #ddd}
.legend span{display:inline-block;margin-right:14px} .legend i{display:inline-block;width:18px;height:10px;
 margin-right:4px;border:2px solid}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:16px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:12px;display:flex;gap:12px}
.card h3{margin:0 0 6px;font-size:15px} .card small{color:#777;font-weight:normal}
.poster{position:relative;flex:none} .poster img{display:block;width:100%;height:100%}
.poster svg{position:absolute;left:0;top:0;width:100%;height:100%}
.box{fill:none;stroke-width:3;vector-effect:non-scaling-stroke}
.box.face{stroke:#1f77ff} .box.ocr{stroke:#ff9900} .box.view{stroke:#2ca02c}
.box.top{stroke:#e00000;stroke-width:5;stroke-dasharray:8 3}
.info{flex:1;min-width:0;font-size:13px} .info h4{margin:8px 0 3px;font-size:13px}
.row{display:flex;align-items:center;gap:6px;margin:2px 0} .row .name{width:92px;overflow:hidden;
 text-overflow:ellipsis;white-space:nowrap} .row .bar{flex:1;background:#eee;height:11px;position:relative}
.row .bar i{position:absolute;left:0;top:0;bottom:0} .row .val{width:44px;text-align:right}
.pred .row .name{font-weight:600} .no{opacity:.55}
ul.el{margin:2px 0;padding-left:16px} ul.el li{margin:1px 0;overflow-wrap:anywhere}
"""


@dataclass
class _Inputs:
    """What the report reads: the summary, the predictions of the shown items and their importances."""

    summary: dict[str, Any]
    kinds: dict[str, str | None]  # modality -> extractor kind
    colours: dict[str, str]
    root: Path  # the dataset folder the images are in
    names: dict[str, dict[str, Any]]  # id -> manifest row (id, image, first text column)
    text_column: str | None
    pool: list[dict[str, Any]]  # prediction rows of the split shown
    picked: list[dict[str, Any]]
    importance: dict[str, dict[str, Any]]  # id -> importance row
    label_importance: dict[tuple[str, str], dict[str, Any]]  # (id, label) -> row
    elements: dict[str, list[dict[str, Any]]]  # id -> element rows


def _read_inputs(cfg: ReportConfig, pred_dir: Path, manifest_path: Path) -> _Inputs:
    summary = json.loads((pred_dir / "summary.json").read_text(encoding="utf-8"))
    mods = summary["modalities"]
    kinds = summary["modality_kinds"]
    pred = pq.read_table(pred_dir / "predictions.parquet").to_pylist()
    manifest, mmeta = schema.read_manifest(manifest_path)
    text_cols = mmeta["fields"]["text"]
    names = {r[schema.ID]: r for r in manifest.select([schema.ID, schema.IMAGE, *text_cols[:1]]).to_pylist()}
    pool = [r for r in pred if cfg.split is None or r[schema.SPLIT] == cfg.split] or pred
    picked = [pool[i] for i in choose(pool, summary["labels"], cfg.items)]
    wanted = {r[schema.ID] for r in picked}
    label_importance = {
        (r[schema.ID], r[schema.LABEL]): r
        for r in pq.read_table(pred_dir / "label_importance.parquet").to_pylist()
        if r[schema.ID] in wanted
    }
    elements: dict[str, list[dict[str, Any]]] = {}
    for r in pq.read_table(pred_dir / "elements.parquet").to_pylist():
        if r[schema.ID] in wanted:
            elements.setdefault(r[schema.ID], []).append(r)
    return _Inputs(
        summary,
        kinds,
        {m: plots.colour(i) for i, m in enumerate(mods)},
        Path(mmeta["dataset"]["dir"]),
        names,
        text_cols[0] if text_cols else None,
        pool,
        picked,
        {r[schema.ID]: r for r in pq.read_table(pred_dir / "importance.parquet").to_pylist()},
        label_importance,
        elements,
    )


def _image(root: Path, rel: str | None) -> Image.Image | None:
    """The item's image, or None when it has none or it can no longer be read (moved, changed since ingest)."""
    if not rel:
        return None
    try:
        return records.load_rgb(root / rel)
    except Exception as exc:  # noqa: BLE001 - the report shows the item without its picture
        log.warning("report: cannot show %s (%s)", root / rel, exc)
        return None


def _importance_blocks(inp: _Inputs, item: str, top_label: str | None) -> list[str]:
    """Modality bars of the item and of its top label (or the ablation drops of the concat baseline)."""
    mods, method, colours = inp.summary["modalities"], inp.summary["method"], inp.colours
    lr = inp.label_importance.get((item, top_label))
    if method == "ablation":
        return [
            f"<h4>Why {escape(str(top_label))}? (drop without each modality)</h4>"
            + _bar_rows({m: lr[schema.drop_column(m)] or 0.0 for m in mods}, colours, "{:+.2f}")
        ]
    unit = inp.summary["method_unit"]  # as the model's pooling describes its shares
    blocks = [
        f"<h4>All of the item ({unit})</h4>"
        + _bar_rows({m: inp.importance[item][schema.share_column(m)] or 0.0 for m in mods}, colours)
    ]
    if lr is not None and lr[schema.share_column(mods[0])] is not None:
        blocks.append(
            f"<h4>Why {escape(top_label)}?</h4>" + _bar_rows({m: lr[schema.share_column(m)] for m in mods}, colours)
        )
    return blocks


def _card(cfg: ReportConfig, inp: _Inputs, k: int, r: dict[str, Any], img_dir: Path) -> str:
    """One item: the poster with its boxes, top labels, modality bars and the elements that mattered most."""
    item = r[schema.ID]
    mrow = inp.names.get(item, {})
    name = (mrow.get(inp.text_column) if inp.text_column else None) or item
    labels = inp.summary["labels"]
    probs = sorted(((lab, r[schema.prob_column(lab)]) for lab in labels), key=lambda t: -t[1])[: cfg.top_labels]
    top_label = probs[0][0] if probs else None
    els = inp.elements.get(item, [])
    boxed = [
        (e, inp.kinds[e[schema.MODALITY]])
        for e in els
        if inp.kinds.get(e[schema.MODALITY]) in BOXED_KINDS and e.get(schema.BOX)
    ]
    key = schema.TOP_LABEL_SHARE if any(e.get(schema.TOP_LABEL_SHARE) is not None for e in els) else schema.SHARE
    top_el = max((e for e, _ in boxed), key=lambda e: e.get(key) or 0.0, default=None)
    poster = '<div class="poster"></div>'
    img = _image(inp.root, mrow.get(schema.IMAGE))
    if img is not None:
        th = min(cfg.thumb_height, img.size[1])
        tw = max(1, round(img.size[0] * th / img.size[1]))
        img.resize((tw, th), Image.BICUBIC).save(img_dir / f"{k}.jpg", quality=85)
        poster = _poster(f"img/{k}.jpg", img.size, (tw, th), boxed, top_el, f"poster of {name}")
    pred_rows = "\n".join(
        f'<div class="row{"" if lab in (r[schema.PREDICTED] or []) else " no"}"><span class="name">{escape(lab)}</span>'
        f'<span class="bar"><i style="width:{100 * p:.1f}%;background:#555"></i></span>'
        f'<span class="val">{p:.2f}</span></div>'
        for lab, p in probs
    )
    blocks = [f'<h4>Top labels</h4><div class="pred">{pred_rows}</div>', *_importance_blocks(inp, item, top_label)]
    if cfg.top_elements and els:
        size = img.size if img is not None else None
        best = sorted(els, key=lambda e: -(e.get(key) or 0.0))[: cfg.top_elements]
        lis = "".join(
            f'<li><b style="color:{inp.colours.get(e[schema.MODALITY], "#333")}">{escape(e[schema.MODALITY])}</b> '
            f"{(e.get(key) or 0.0):.0%}: {escape(_element_text(e, inp.kinds.get(e[schema.MODALITY]), size)[:90])}"
            f"{' <b>(outlined)</b>' if e is top_el else ''}</li>"
            for e in best
        )
        blocks.append(
            f"<h4>Elements that mattered most"
            f"{' for ' + escape(top_label) if key == schema.TOP_LABEL_SHARE else ''}"
            f'</h4><ul class="el">{lis}</ul>'
        )
    if r.get(schema.LABELS) is not None:
        blocks.append(f'<p class="muted">true labels: {escape(", ".join(r[schema.LABELS]) or "none")}</p>')
    return (
        f'<article class="card" id="item-{k}">{poster}<div class="info">'
        f"<h3>{escape(str(name))} <small>{escape(item)} \u00b7 {escape(r[schema.SPLIT])}</small></h3>"
        f"{''.join(blocks)}</div></article>"
    )


def write_report(
    cfg: ReportConfig,
    pred_dir: Path,
    manifest_path: Path,
    out_dir: Path,
    title: str = "Deep Multi-Modal Sets: predictions and importances",
) -> Path:
    """Write <out_dir>/index.html (and img/) from the predict outputs in `pred_dir`; returns the page."""
    inp = _read_inputs(cfg, pred_dir, manifest_path)
    with runtime.staged_output(out_dir) as work:
        (work / "img").mkdir()
        cards = [_card(cfg, inp, k, r, work / "img") for k, r in enumerate(inp.picked)]
        (work / "index.html").write_text(
            _page(title, inp.summary, pred_dir, cards, len(inp.pool), cfg), encoding="utf-8"
        )
    page = out_dir / "index.html"
    log.info("wrote the report of %d items to %s", len(cards), page)
    return page


def _page(title: str, summary: dict[str, Any], pred_dir: Path, cards: list[str], pool: int, cfg: ReportConfig) -> str:
    metrics = summary.get("metrics") or {}
    names = ["f1_micro", "f1_macro", "f1_weighted", "f1_samples", "mean_average_precision"]
    mt = ""
    if metrics:
        head = "".join(f"<th>{n}</th>" for n in names)
        body = "".join(
            f"<tr><td>{escape(s)}</td>"
            + "".join(f"<td>{m[n]:.3f}</td>" if m.get(n) is not None else "<td></td>" for n in names)
            + "</tr>"
            for s, m in metrics.items()
        )
        mt = f"<h2>Metrics</h2><table><tr><th>split</th>{head}</tr>{body}</table>"
    counts = summary.get("counts")
    ct = ""
    if counts:
        ct = (
            "<p>"
            + ", ".join(f"{escape(k.replace('_', ' '))}: {v}" for k, v in counts.items() if isinstance(v, int))
            + "</p>"
        )
    svgs = "".join(
        f"<div>{(pred_dir / n).read_text(encoding='utf-8')}</div>"
        for n in ("importance_by_label.svg", "modality_importance.svg")
        if (pred_dir / n).is_file()
    )
    scope = f"split {cfg.split}" if cfg.split else "all splits"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{CSS}</style></head>
<body>
<h1>{escape(title)}</h1>
<p class="muted">{summary["items"]} items scored; {len(cards)} shown below (of {pool} in {escape(scope)}).
Importance method: {escape(summary["method_text"])}.</p>
{ct}{mt}
<h2>Which modality drives each label</h2>
<div class="plots">{svgs}</div>
<h2>Items</h2>
<p class="legend"><span><i style="border-color:#1f77ff"></i>detected face</span>
<span><i style="border-color:#ff9900"></i>OCR text box</span>
<span><i style="border-color:#2ca02c"></i>image view (a region of the image)</span>
<span><i style="border-color:#e00000;border-style:dashed"></i>
the face, text box or image view that mattered most for the top label</span></p>
<div class="cards">
{chr(10).join(cards)}
</div>
</body></html>
"""
