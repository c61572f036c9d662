"""A static HTML report of predictions and importances (opens from disk: no server, no scripts).

For a sample of items: the poster with the detected face boxes and OCR boxes drawn over it (the box
that mattered most for the top label outlined in red), the top labels with their probabilities, and
per-modality importance bars, overall and for the top label; plus the dataset-level plots and
metrics. Thumbnails are copied into <out>/img, so the folder can be moved or zipped as a whole.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any, Sequence

import pyarrow.parquet as pq
from PIL import Image

from pipeline import plots, records, runtime, schema
from pipeline.config import ConfigError, section
from pipeline.ingest import read_manifest

log = logging.getLogger(__name__)

BOXED = {"faces": "face", "ocr": "ocr"}  # modalities whose elements carry image boxes -> css class
METHOD_TEXT = {
    "argmax": "max pooling: a modality's share is the fraction of the D pooled dimensions whose maximum "
              "came from one of its elements (element-wise argmax)",
    "contribution": "sum/mean pooling: a modality's share is its fraction of the pooled vector's L1 mass "
                    "(argmax importance needs max pooling)",
    "ablation": "concat baseline: no set to decompose; importance is the drop in probability when a "
                "modality is removed at inference",
}


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
    by_label = {lab: sorted((i for i, r in enumerate(pred) if lab in (r["predicted"] or [])),
                            key=lambda i: -pred[i][f"prob_{lab}"]) for lab in labels}
    while len(chosen) < n and any(by_label.values()):
        for lab in labels:
            while by_label[lab] and by_label[lab][0] in seen:
                by_label[lab].pop(0)
            if by_label[lab] and len(chosen) < n:
                chosen.append(by_label[lab].pop(0))
                seen.add(chosen[-1])
    rest = sorted((i for i in range(len(pred)) if i not in seen),
                  key=lambda i: hashlib.sha256(pred[i][schema.ID].encode()).hexdigest())
    return chosen + rest[: max(0, n - len(chosen))]


def _bar_rows(values: dict[str, float], colours: dict[str, str], fmt: str = "{:.2f}") -> str:
    top = max(values.values(), default=0.0)
    rows = []
    for k, v in values.items():
        width = 100 * max(v, 0.0) / top if top > 0 else 0
        rows.append(f'<div class="row"><span class="name">{escape(k)}</span><span class="bar">'
                    f'<i style="width:{width:.1f}%;background:{colours.get(k, "#4477aa")}"></i></span>'
                    f'<span class="val">{fmt.format(v)}</span></div>')
    return "\n".join(rows)


def _element_text(e: dict[str, Any]) -> str:
    """What an element is, for people: its text, or which face, or the whole image."""
    if e.get("text"):
        return e["text"]
    if e["modality"] == "faces":
        score = f", detector score {e['score']:.2f}" if e.get("score") is not None else ""
        return f"face {e['position'] + 1}{score}"
    return "the whole image" if e["modality"] == "image" else f"element {e['position'] + 1}"


def _poster(img_src: str, size: tuple[int, int], thumb: tuple[int, int], elements: list[dict[str, Any]],
            top_element: dict[str, Any] | None, alt: str) -> str:
    W, H = size
    rects = []
    for e in elements:
        if e["modality"] not in BOXED or not e.get("box"):
            continue
        x0, y0, x1, y1 = e["box"][:4]
        cls = BOXED[e["modality"]] + (" top" if e is top_element else "")
        what = "face" if e["modality"] == "faces" else f"text \u201c{e.get('text') or ''}\u201d"
        tip = f"{what}: {e['share']:.1%} of the item"
        if e.get("top_label_share") is not None:
            tip += f", {e['top_label_share']:.1%} of {e['top_label']}"
        rects.append(f'<rect class="box {cls}" x="{x0:.1f}" y="{y0:.1f}" width="{max(x1 - x0, 1):.1f}" '
                     f'height="{max(y1 - y0, 1):.1f}"><title>{escape(tip)}</title></rect>')
    return (f'<div class="poster" style="width:{thumb[0]}px;height:{thumb[1]}px">'
            f'<img src="{escape(img_src)}" alt="{escape(alt)}" width="{thumb[0]}" height="{thumb[1]}">'
            f'<svg class="boxes" viewBox="0 0 {W} {H}" preserveAspectRatio="none">{"".join(rects)}</svg></div>')


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
.box.face{stroke:#1f77ff} .box.ocr{stroke:#ff9900} .box.top{stroke:#e00000;stroke-width:5;stroke-dasharray:8 3}
.info{flex:1;min-width:0;font-size:13px} .info h4{margin:8px 0 3px;font-size:13px}
.row{display:flex;align-items:center;gap:6px;margin:2px 0} .row .name{width:92px;overflow:hidden;
 text-overflow:ellipsis;white-space:nowrap} .row .bar{flex:1;background:#eee;height:11px;position:relative}
.row .bar i{position:absolute;left:0;top:0;bottom:0} .row .val{width:44px;text-align:right}
.pred .row .name{font-weight:600} .no{opacity:.55}
ul.el{margin:2px 0;padding-left:16px} ul.el li{margin:1px 0;overflow-wrap:anywhere}
"""


def write_report(cfg: ReportConfig, pred_dir: Path, manifest_path: Path, out_dir: Path,
                 title: str = "Deep Multi-Modal Sets: predictions and importances") -> Path:
    """Write <out_dir>/index.html (and img/) from the predict outputs in `pred_dir`; returns the page."""
    summary = json.loads((pred_dir / "summary.json").read_text(encoding="utf-8"))
    labels, mods, method = summary["labels"], summary["modalities"], summary["method"]
    colours = {m: plots.colour(i) for i, m in enumerate(mods)}
    pred = pq.read_table(pred_dir / "predictions.parquet").to_pylist()
    imp = {r[schema.ID]: r for r in pq.read_table(pred_dir / "importance.parquet").to_pylist()}
    manifest, mmeta = read_manifest(manifest_path)
    root = Path(mmeta["dataset"]["dir"])
    text_cols = mmeta["fields"]["text"]
    rows_by_id = {r[schema.ID]: r for r in manifest.select(
        [schema.ID, schema.IMAGE, *text_cols[:1]]).to_pylist()}
    pool = [r for r in pred if cfg.split is None or r[schema.SPLIT] == cfg.split] or pred
    picked = [pool[i] for i in choose(pool, labels, cfg.items)]
    wanted = {r[schema.ID] for r in picked}
    li = {}
    for r in pq.read_table(pred_dir / "label_importance.parquet").to_pylist():
        if r[schema.ID] in wanted:
            li[(r[schema.ID], r["label"])] = r
    elements: dict[str, list[dict[str, Any]]] = {}
    for r in pq.read_table(pred_dir / "elements.parquet").to_pylist():
        if r[schema.ID] in wanted:
            elements.setdefault(r[schema.ID], []).append(r)

    shutil.rmtree(out_dir, ignore_errors=True)
    (out_dir / "img").mkdir(parents=True)
    cards = []
    for k, r in enumerate(picked):
        item = r[schema.ID]
        mrow = rows_by_id.get(item, {})
        name = (mrow.get(text_cols[0]) if text_cols else None) or item
        probs = sorted(((lab, r[f"prob_{lab}"]) for lab in labels), key=lambda t: -t[1])[: cfg.top_labels]
        top_label = probs[0][0] if probs else None
        poster = '<div class="poster"></div>'
        els = elements.get(item, [])
        boxed = [e for e in els if e["modality"] in BOXED and e.get("box")]
        key = "top_label_share" if any(e.get("top_label_share") is not None for e in els) else "share"
        top_el = max(boxed, key=lambda e: (e.get(key) or 0.0), default=None)
        if mrow.get(schema.IMAGE):
            img = records.load_rgb(root / mrow[schema.IMAGE])
            size = img.size
            th = min(cfg.thumb_height, size[1])
            tw = max(1, round(size[0] * th / size[1]))
            img.resize((tw, th), Image.BICUBIC).save(out_dir / "img" / f"{k}.jpg", quality=85)
            poster = _poster(f"img/{k}.jpg", size, (tw, th), els, top_el, f"poster of {name}")
        pred_rows = "\n".join(
            f'<div class="row{"" if lab in (r["predicted"] or []) else " no"}"><span class="name">{escape(lab)}</span>'
            f'<span class="bar"><i style="width:{100 * p:.1f}%;background:#555"></i></span>'
            f'<span class="val">{p:.2f}</span></div>' for lab, p in probs)
        blocks = [f'<h4>Top labels</h4><div class="pred">{pred_rows}</div>']
        if method != "ablation":
            unit = "dimensions won" if method == "argmax" else "pooled mass"
            blocks.append(f"<h4>All of the item ({unit})</h4>" +
                          _bar_rows({m: imp[item][f"share_{m}"] or 0.0 for m in mods}, colours))
            lr = li.get((item, top_label))
            if lr is not None and lr[f"share_{mods[0]}"] is not None:
                blocks.append(f"<h4>Why {escape(top_label)}?</h4>" +
                              _bar_rows({m: lr[f"share_{m}"] for m in mods}, colours))
        else:
            lr = li.get((item, top_label))
            blocks.append(f"<h4>Why {escape(str(top_label))}? (drop without each modality)</h4>" +
                          _bar_rows({m: lr[f"drop_{m}"] or 0.0 for m in mods}, colours, "{:+.2f}"))
        if cfg.top_elements and els:
            best = sorted(els, key=lambda e: -(e.get(key) or 0.0))[: cfg.top_elements]
            lis = "".join(
                f'<li><b style="color:{colours.get(e["modality"], "#333")}">{escape(e["modality"])}</b> '
                f'{(e.get(key) or 0.0):.0%}: {escape(_element_text(e)[:90])}'
                f'{" <b>(outlined)</b>" if e is top_el else ""}</li>' for e in best)
            blocks.append(f"<h4>Elements that mattered most{' for ' + escape(top_label) if key == 'top_label_share' else ''}"
                          f"</h4><ul class=\"el\">{lis}</ul>")
        if r.get("labels") is not None:
            blocks.append(f'<p class="muted">true labels: {escape(", ".join(r["labels"]) or "none")}</p>')
        cards.append(f'<article class="card" id="item-{k}">{poster}<div class="info">'
                     f'<h3>{escape(str(name))} <small>{escape(item)} \u00b7 {escape(r[schema.SPLIT])}</small></h3>'
                     f'{"".join(blocks)}</div></article>')

    page = out_dir / "index.html"
    page.write_text(_page(title, summary, pred_dir, cards, len(pool), cfg), encoding="utf-8")
    log.info("wrote the report of %d items to %s", len(cards), page)
    return page


def _page(title: str, summary: dict[str, Any], pred_dir: Path, cards: list[str], pool: int, cfg: ReportConfig) -> str:
    metrics = summary.get("metrics") or {}
    names = ["f1_micro", "f1_macro", "f1_weighted", "f1_samples", "mean_average_precision"]
    mt = ""
    if metrics:
        head = "".join(f"<th>{n}</th>" for n in names)
        body = "".join(f"<tr><td>{escape(s)}</td>" + "".join(
            f"<td>{m[n]:.3f}</td>" if m.get(n) is not None else "<td></td>" for n in names) + "</tr>"
            for s, m in metrics.items())
        mt = f"<h2>Metrics</h2><table><tr><th>split</th>{head}</tr>{body}</table>"
    counts = summary.get("counts")
    ct = ""
    if counts:
        ct = ("<p>" + ", ".join(f"{escape(k.replace('_', ' '))}: {v}" for k, v in counts.items()
                                if isinstance(v, int)) + "</p>")
    svgs = "".join(f"<div>{(pred_dir / n).read_text(encoding='utf-8')}</div>"
                   for n in ("importance_by_label.svg", "modality_importance.svg") if (pred_dir / n).is_file())
    scope = f"split {cfg.split}" if cfg.split else "all splits"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{CSS}</style></head>
<body>
<h1>{escape(title)}</h1>
<p class="muted">{summary['items']} items scored; {len(cards)} shown below (of {pool} in {escape(scope)}).
Importance method: {escape(METHOD_TEXT.get(summary['method'], summary['method']))}.</p>
{ct}{mt}
<h2>Which modality drives each label</h2>
<div class="plots">{svgs}</div>
<h2>Items</h2>
<p class="legend"><span><i style="border-color:#1f77ff"></i>detected face</span>
<span><i style="border-color:#ff9900"></i>OCR text box</span>
<span><i style="border-color:#e00000;border-style:dashed"></i>the face or text box that mattered most for the top label</span></p>
<div class="cards">
{chr(10).join(cards)}
</div>
</body></html>
"""


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the report stage (and of `dmms report`)."""
    p = runtime.parser("Write the static HTML report of predictions and importances.")
    p.add_argument("--predictions", required=True, help="folder written by the predict stage")
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True, help="report folder (index.html, img/)")
    args = p.parse_args(argv)
    params, _ = runtime.setup(args.params)
    write_report(section(params, "report", ReportConfig), Path(args.predictions), Path(args.manifest), Path(args.out))
