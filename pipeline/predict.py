"""Predictions and importances of a trained bundle on extracted feature sets (the predict stage).

For every item of the chosen splits it writes, into the output folder:

    predictions.parquet       id, split, predicted labels, true labels (when known), prob_<label> per label
    importance.parquet        id, split, method, top_modality, share_<modality> per modality
    label_importance.parquet  one row per item and label: probability, predicted, true, and per modality
                              the label-conditional share (share_<m>) and the ablation drop (drop_<m>)
    elements.parquet          one row per element (face, text box, sentence, tag, meta value): its share
                              of the item (and won dimensions with max pooling), its share for the
                              item's top label, with the element's text, box and score from extraction
    summary.json, importance_by_label.svg, modality_importance.svg

`method` says what the shares mean: "argmax" (max pooling: share of the D pooled dimensions won),
"contribution" (sum/mean pooling: share of the pooled vector's L1 mass), or "ablation" (the concat
baseline has no set to decompose: share columns are null and only the ablation drops are filled).
The ablation drop of modality m is p(label) - p(label with m removed at inference).

Importable with torch, pyarrow, numpy and pyyaml only (like training).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline import metrics as M
from pipeline import plots, runtime, schema
from pipeline.bundle import Bundle, ScoringInputs, load_scoring_inputs, to_probs
from pipeline.config import ConfigError
from pipeline.features import CATEGORY_IDS, ELEMENTS
from pipeline.importance import explain
from pipeline.model import SetModel
from pipeline.setdata import FeatureStore, label_matrix

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictConfig:
    """Settings of prediction (params predict; scoring reads the same keys from params score)."""

    splits: tuple[str, ...] | None = None  # null: every item of the manifest
    batch_size: int = 256
    device: str = "auto"
    label_conditional: bool = True  # per-label shares (one backward pass per label and batch)
    ablation: bool = True  # per-modality ablation drops (one extra forward pass per modality)

    def validate(self, where: str) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"{where}.batch_size: expected >= 1, found {self.batch_size}")
        bad = [s for s in self.splits or () if s not in (*schema.SPLITS, schema.SCORE_SPLIT)]
        if bad:
            raise ConfigError(f"{where}.splits: unknown split(s) {bad}; expected some of {schema.SPLITS}")


@dataclass
class Scored:
    """Everything predicted for n items over L labels and M modalities (numpy, on the CPU)."""

    ids: list[str]
    splits: list[str]
    labels: list[str]
    modalities: list[str]
    method: dict[str, str]  # explain_method: method, unit, text
    probs: np.ndarray  # (n, L)
    predicted: np.ndarray  # (n, L) bool
    modality_share: np.ndarray | None  # (n, M)
    label_modality: np.ndarray | None  # (n, L, M)
    drop: np.ndarray | None  # (n, L, M)
    elements: dict[str, np.ndarray] = field(default_factory=dict)  # item, modality, position, share, wins, top_share


class _Collected:
    """Per-batch results of score_store, concatenated at the end (on the CPU)."""

    def __init__(self) -> None:
        self.probs: list[torch.Tensor] = []
        self.shares: list[torch.Tensor] = []
        self.label_modality: list[torch.Tensor] = []
        self.drops: list[torch.Tensor] = []
        self.elements: dict[str, list[torch.Tensor]] = {
            k: [] for k in ("item", "modality", "position", "share", "wins", "top_share")
        }


@dataclass
class _Scorer:
    """One scoring pass: the model, its features and settings, and what the batches have collected."""

    model: torch.nn.Module
    store: FeatureStore
    task: str
    cfg: PredictConfig
    out: _Collected = field(default_factory=_Collected)

    def concat_batch(self, idx: torch.Tensor) -> None:
        """The concat baseline: probabilities, and ablation by running the model without each modality."""
        model, store, task, out = self.model, self.store, self.task, self.out
        p = to_probs(task, model(store.batch(idx)).float())
        out.probs.append(p.cpu())
        if self.cfg.ablation:
            out.drops.append(
                torch.stack(
                    [p - to_probs(task, model(store.batch(idx, frozenset({m}))).float()) for m in model.modalities], 2
                ).cpu()
            )

    def set_batch(self, idx: torch.Tensor, start: int) -> None:
        """The set model: probabilities, ablation drops, and element, modality and label importances
        (`start`: the batch's first position among the items scored)."""
        model, task, cfg, out = self.model, self.task, self.cfg, self.out
        batch = self.store.batch(idx)
        # the elements are encoded once; removing a modality only re-pools the others
        x, seg, mod = model.elements(batch)
        p = to_probs(task, model.head(model.pool(x, seg, mod, batch.size)).float())
        out.probs.append(p.cpu())
        if cfg.ablation:
            keep = [mod != k for k in range(len(model.modalities))]
            out.drops.append(
                torch.stack(
                    [
                        p - to_probs(task, model.head(model.pool(x[kp], seg[kp], mod[kp], batch.size)).float())
                        for kp in keep
                    ],
                    2,
                ).cpu()
            )
        imp = explain(model, batch, label_conditional=cfg.label_conditional, elements=(x, seg, mod))
        out.shares.append(imp.modality_share.cpu())
        el = out.elements
        el["item"].append((imp.element_segment + start).cpu())
        el["modality"].append(imp.element_modality.cpu())
        el["position"].append(model.element_positions(batch).cpu())
        el["share"].append(imp.element_share.cpu())
        if imp.element_wins is not None:
            el["wins"].append(imp.element_wins.cpu())
        if imp.label_modality is not None:
            out.label_modality.append(imp.label_modality.cpu())
            top = p.argmax(1)  # the item's top label
            rows = torch.arange(imp.element_segment.numel(), device=top.device)
            el["top_share"].append(imp.label_element[rows, top[imp.element_segment]].cpu())


@torch.no_grad()
def score_store(
    model: torch.nn.Module,
    bundle: Bundle,
    store: FeatureStore,
    positions: np.ndarray,
    splits: list[str],
    cfg: PredictConfig,
) -> Scored:
    """Probabilities, decisions and importances for items `positions` of `store` (on the model's device);
    `splits` are those items' splits."""
    task, labels = bundle.task, bundle.label_names
    mods = list(model.modalities)
    is_set = isinstance(model, SetModel)
    device = next(model.parameters()).device
    idx_all = torch.as_tensor(positions, dtype=torch.long, device=device)
    scorer = _Scorer(model, store, task, cfg)
    out = scorer.out
    model.eval()
    for start in range(0, idx_all.numel(), cfg.batch_size):
        idx = idx_all[start : start + cfg.batch_size]
        if is_set:
            scorer.set_batch(idx, start)
        else:
            scorer.concat_batch(idx)
    n, L, Mn = idx_all.numel(), len(labels), len(mods)

    def cat(parts: list[torch.Tensor], shape: tuple[int, ...]) -> np.ndarray:
        return torch.cat(parts).numpy() if parts else np.zeros(shape, dtype=np.float32)

    P = cat(out.probs, (n, L))
    return Scored(
        ids=[store.ids[i] for i in positions],
        splits=list(splits),
        labels=list(labels),
        modalities=mods,
        method=explain_method(model),
        probs=P,
        predicted=M.decide(task, P, np.asarray(bundle.thresholds)),
        modality_share=cat(out.shares, (n, Mn)) if is_set else None,
        label_modality=cat(out.label_modality, (n, L, Mn)) if is_set and cfg.label_conditional else None,
        drop=cat(out.drops, (n, L, Mn)) if cfg.ablation else None,
        elements={k: torch.cat(v).numpy() for k, v in out.elements.items() if v},
    )


ABLATION = {
    "method": "ablation",
    "unit": "drop in probability",
    "text": "concat baseline: no set to decompose; importance is the drop in probability when a "
    "modality is removed at inference",
}


def explain_method(model: torch.nn.Module) -> dict[str, str]:
    """What the importances of `model` are, as its pooling describes them (method: argmax or contribution,
    the unit of an element's share, one sentence for the report), or ablation (the concat baseline)."""
    if not isinstance(model, SetModel):
        return ABLATION
    return {"method": model.pooling.method, "unit": model.pooling.unit, "text": model.pooling.description}


# --------------------------------------------------------------------------------------------
# Element metadata, tables and summaries
# --------------------------------------------------------------------------------------------


def element_metadata(dirs: dict[str, Path], bundle: Bundle, ids: list[str]) -> dict[str, dict[str, list]]:
    """modality -> id -> the element records of extraction (text, box, score, ...), plus one record
    per categorical meta column ("column: value") after the vector elements. Reads only the rows of
    `ids` (feature files are sorted by id, so Parquet's row-group statistics skip the others)."""
    out: dict[str, dict[str, list]] = {}
    for m, folder in dirs.items():
        table = pq.read_table(
            Path(folder) / "features.parquet",
            columns=[schema.ID, ELEMENTS, CATEGORY_IDS],
            filters=[(schema.ID, "in", list(ids))] if ids else None,
        )
        vocab = bundle.provenance[m].vocabularies() if m in bundle.provenance else []
        per_id = {}
        for item_id, elements, cats in zip(
            table[schema.ID].to_pylist(), table[ELEMENTS].to_pylist(), table[CATEGORY_IDS].to_pylist()
        ):
            recs = list(elements or [])
            for c, (col, values) in enumerate(vocab):
                cid = (cats or [0] * len(vocab))[c]
                recs.append({schema.TEXT: f"{col}: {values[cid - 1] if cid else '(missing or unseen)'}"})
            per_id[item_id] = recs
        out[m] = per_id
    return out


def _f32(values: Any) -> pa.Array:
    return pa.array(np.asarray(values, dtype=np.float32))


def _has_truth(truth: list[list[str] | None] | None) -> bool:
    return truth is not None and any(t is not None for t in truth)


def _top_label(scored: Scored) -> np.ndarray:
    """(n,) index of each item's most probable label."""
    n, L = len(scored.ids), len(scored.labels)
    return scored.probs.argmax(1) if n and L else np.zeros(n, dtype=int)


def predictions_table(scored: Scored, truth: list[list[str] | None] | None) -> pa.Table:
    """predictions.parquet: per item its predicted labels, true labels (when known), probabilities."""
    L, n = scored.labels, len(scored.ids)
    cols: list[Any] = [
        pa.array(scored.ids, pa.string()),
        pa.array(scored.splits, pa.string()),
        pa.array([[L[j] for j in np.nonzero(row)[0]] for row in scored.predicted], pa.list_(pa.string())),
        pa.array(truth if _has_truth(truth) else [None] * n, pa.list_(pa.string())),
        *(_f32(scored.probs[:, j]) for j in range(len(L))),
    ]
    return pa.Table.from_arrays(cols, schema=schema.predictions_schema(L))


def importance_table(scored: Scored) -> pa.Table:
    """importance.parquet: per item the method, the top modality and each modality's share."""
    mods, n = scored.modalities, len(scored.ids)
    if scored.modality_share is not None:
        top = [mods[int(np.argmax(r))] if r.sum() > 0 else None for r in scored.modality_share]
        shares = [_f32(scored.modality_share[:, j]) for j in range(len(mods))]
    else:  # ablation: the modality whose removal lowers the top label most
        d = scored.drop[np.arange(n), _top_label(scored)] if scored.drop is not None and n and scored.labels else None
        top = [mods[int(np.argmax(r))] for r in d] if d is not None else [None] * n
        shares = [pa.nulls(n, pa.float32()) for _ in mods]
    cols = [
        pa.array(scored.ids, pa.string()),
        pa.array(scored.splits, pa.string()),
        pa.array([scored.method["method"]] * n, pa.string()),
        pa.array(top, pa.string()),
        *shares,
    ]
    return pa.Table.from_arrays(cols, schema=schema.importance_schema(mods))


def label_importance_table(scored: Scored, truth: list[list[str] | None] | None) -> pa.Table:
    """label_importance.parquet: item-major, label-minor; label-conditional shares and ablation drops."""
    L, mods, n = scored.labels, scored.modalities, len(scored.ids)
    rep = np.repeat(np.arange(n), len(L))
    y = label_matrix(truth, L).numpy().astype(bool) if _has_truth(truth) else None

    def per_modality(values: np.ndarray | None) -> list[pa.Array]:
        return [
            _f32(values[:, :, j].reshape(-1)) if values is not None else pa.nulls(len(rep), pa.float32())
            for j in range(len(mods))
        ]

    cols = [
        pa.array([scored.ids[i] for i in rep], pa.string()),
        pa.array([scored.splits[i] for i in rep], pa.string()),
        pa.array([L[j] for j in np.tile(np.arange(len(L)), n)], pa.string()),
        _f32(scored.probs.reshape(-1)),
        pa.array(scored.predicted.reshape(-1), pa.bool_()),
        pa.array(y.reshape(-1) if y is not None else [None] * len(rep), pa.bool_()),
        *per_modality(scored.label_modality),
        *per_modality(scored.drop),
    ]
    return pa.Table.from_arrays(cols, schema=schema.label_importance_schema(mods))


def elements_table(scored: Scored, meta: dict[str, dict[str, list]]) -> pa.Table:
    """elements.parquet: per element its share, won dimensions, share for the top label, and the
    text, box and score extraction recorded for it."""
    L, mods, el = scored.labels, scored.modalities, scored.elements
    items = [int(i) for i in el.get("item", [])]
    k = len(items)
    recs = []
    for e, item in enumerate(items):
        m, pos = mods[int(el["modality"][e])], int(el["position"][e])
        found = meta.get(m, {}).get(scored.ids[item], [])
        recs.append(found[pos] if pos < len(found) else {})
    top_label = _top_label(scored)
    cols = [
        pa.array([scored.ids[i] for i in items], pa.string()),
        pa.array([mods[int(i)] for i in el.get("modality", [])], pa.string()),
        pa.array(np.asarray(el.get("position", []), dtype=np.int32)),
        _f32(el.get("share", [])),
        _f32(el["wins"]) if "wins" in el else pa.nulls(k, pa.float32()),
        pa.array([L[int(top_label[i])] for i in items] if L else [None] * k, pa.string()),
        _f32(el["top_share"]) if "top_share" in el else pa.nulls(k, pa.float32()),
        pa.array([r.get(schema.TEXT) for r in recs], pa.string()),
        pa.array([r.get(schema.BOX) for r in recs], pa.list_(pa.float32())),
        pa.array([r.get(schema.SCORE) for r in recs], pa.float32()),
    ]
    table = pa.Table.from_arrays(cols, schema=schema.ELEMENTS_TABLE_SCHEMA)
    return table.sort_by([(schema.ID, "ascending"), (schema.MODALITY, "ascending"), (schema.POSITION, "ascending")])


def tables(
    scored: Scored, truth: list[list[str] | None] | None, meta: dict[str, dict[str, list]]
) -> dict[str, pa.Table]:
    """The four output tables of `scored` (schema.PREDICTION_TABLES)."""
    return {
        "predictions": predictions_table(scored, truth),
        "importance": importance_table(scored),
        "label_importance": label_importance_table(scored, truth),
        "elements": elements_table(scored, meta),
    }


def _by_label(scored: Scored, y: np.ndarray | None, known: np.ndarray) -> dict[str, Any]:
    """Per label, over its positives (true positives where labels are known, else predicted ones):
    the mean label-conditional share and ablation drop per modality, and the top modality of each."""
    L, mods = scored.labels, scored.modalities
    by_label = {}
    for j, lab in enumerate(L):
        pos = (y[:, j] > 0) & known if y is not None else scored.predicted[:, j]
        entry: dict[str, Any] = {
            "positives": int(pos.sum()),
            "positives_from": "labels" if y is not None else "predictions",
        }
        if scored.label_modality is not None:
            share = scored.label_modality[pos, j].mean(0) if pos.any() else np.zeros(len(mods))
            entry["share"] = {m: float(share[k]) for k, m in enumerate(mods)}
            entry["top_modality"] = mods[int(np.argmax(share))] if pos.any() else None
        if scored.drop is not None:
            drop = scored.drop[pos, j].mean(0) if pos.any() else np.zeros(len(mods))
            entry["ablation_drop"] = {m: float(drop[k]) for k, m in enumerate(mods)}
            entry["top_ablation"] = mods[int(np.argmax(drop))] if pos.any() else None
        by_label[lab] = entry
    return by_label


def summarise(scored: Scored, truth: list[list[str] | None] | None, bundle: Bundle) -> dict[str, Any]:
    """Dataset-level numbers: items per split, metrics where labels are known, mean modality shares,
    each modality's extractor kind, and per label its mean importances (see _by_label)."""
    L, mods = scored.labels, scored.modalities
    splits = np.array(scored.splits)
    has_truth = _has_truth(truth)
    known = np.array([t is not None for t in truth]) if has_truth else np.zeros(len(scored.ids), bool)
    y = label_matrix(truth, L).numpy() if has_truth else None
    out: dict[str, Any] = {
        "items": len(scored.ids),
        "method": scored.method["method"],
        "method_unit": scored.method["unit"],
        "method_text": scored.method["text"],
        "labels": L,
        "modalities": mods,
        "modality_kinds": {m: bundle.provenance[m].kind if m in bundle.provenance else None for m in mods},
        "splits": {s: int((splits == s).sum()) for s in sorted(set(scored.splits))},
        "metrics": {},
        "predicted_per_label": {lab: int(scored.predicted[:, j].sum()) for j, lab in enumerate(L)},
    }
    if has_truth:
        for s in sorted(set(scored.splits)):
            rows = (splits == s) & known
            if rows.any():
                out["metrics"][s] = M.evaluate(bundle.task, y[rows], scored.probs[rows], np.asarray(bundle.thresholds))
    unlabelled = sorted(set(scored.splits) - set(out["metrics"]))
    if not scored.ids:
        out["metrics_note"] = "no item was scored, so there are no metrics"
    elif unlabelled:
        out["metrics_note"] = (
            f"no metrics for {', '.join(unlabelled)}: those items carry no true labels "
            "(the dataset has no labels column, or the rows leave it blank)"
        )
    if scored.modality_share is not None:
        out["modality_share"] = {
            m: float(scored.modality_share[:, j].mean()) if len(scored.ids) else 0.0 for j, m in enumerate(mods)
        }
    else:
        out["modality_share_note"] = (
            "the concat baseline has no set to decompose: see each label's ablation_drop "
            "(the drop in probability without each modality)"
        )
    out["by_label"] = _by_label(scored, y, known)
    return out


@dataclass
class Prediction:
    """What predicting a set of items gives: the scores, their true labels (None when unknown), the summary."""

    scored: Scored
    truth: list[list[str] | None]
    summary: dict[str, Any]


def predict_items(inputs: ScoringInputs, positions: np.ndarray, cfg: PredictConfig) -> Prediction:
    """Probabilities, decisions, importances and the summary of the items at `positions`."""
    scored = score_store(
        inputs.model, inputs.bundle, inputs.store, positions, [inputs.splits[i] for i in positions], cfg
    )
    truth = [inputs.labels[i] for i in positions]
    return Prediction(scored, truth, summarise(scored, truth, inputs.bundle))


def predict_nothing(model: torch.nn.Module, bundle: Bundle, cfg: PredictConfig) -> Prediction:
    """The prediction of no items (scoring a folder none of whose rows could be scored): empty tables
    with the model's columns and a summary with zero counts."""
    scored = score_store(model, bundle, None, np.zeros(0, dtype=np.int64), [], cfg)
    return Prediction(scored, [], summarise(scored, [], bundle))


def _slice(scored: Scored, start: int, stop: int) -> Scored:
    """Items start..stop of `scored` (their elements renumbered from 0)."""

    def rows(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else a[start:stop]

    el = scored.elements
    keep = (el["item"] >= start) & (el["item"] < stop) if "item" in el else None
    elements = {k: (v[keep] - start if k == "item" else v[keep]) for k, v in el.items()} if keep is not None else {}
    return dataclasses.replace(
        scored,
        ids=scored.ids[start:stop],
        splits=scored.splits[start:stop],
        probs=scored.probs[start:stop],
        predicted=scored.predicted[start:stop],
        modality_share=rows(scored.modality_share),
        label_modality=rows(scored.label_modality),
        drop=rows(scored.drop),
        elements=elements,
    )


def write_outputs(
    prediction: Prediction,
    out_dir: Path,
    element_meta: Callable[[list[str]], dict[str, dict[str, list]]],
    chunk_items: int = 4096,
) -> None:
    """The four tables, summary.json and the two SVG plots under `out_dir`. The tables are built and
    written `chunk_items` items at a time (`element_meta(ids)`: see element_metadata), so their memory
    does not grow with the number of items."""
    out_dir.mkdir(parents=True, exist_ok=True)
    scored, n = prediction.scored, len(prediction.scored.ids)
    writers: dict[str, pq.ParquetWriter] = {}
    try:
        for start in range(0, max(n, 1), chunk_items):
            part = _slice(scored, start, start + chunk_items)
            chunk = tables(
                part,
                None if prediction.truth is None else prediction.truth[start : start + chunk_items],
                element_meta(part.ids) if part.ids else {},
            )
            for name, table in chunk.items():
                if name not in writers:
                    writers[name] = pq.ParquetWriter(out_dir / f"{name}.parquet", table.schema, compression="zstd")
                writers[name].write_table(table)
    finally:
        for w in writers.values():
            w.close()
    runtime.write_json(out_dir / "summary.json", prediction.summary)
    for name, svg in summary_plots(prediction.summary).items():
        (out_dir / name).write_text(svg, encoding="utf-8")


def summary_plots(summary: dict[str, Any]) -> dict[str, str]:
    """importance_by_label.svg (label x modality heatmap) and modality_importance.svg (bars)."""
    mods, by_label = summary["modalities"], summary["by_label"]
    key = "share" if any("share" in e for e in by_label.values()) else "ablation_drop"
    top = "top_modality" if key == "share" else "top_ablation"
    what = "label-conditional share" if key == "share" else "ablation drop in probability"
    src = "true" if any(e["positives_from"] == "labels" for e in by_label.values()) else "predicted"
    rows = [lab for lab, e in by_label.items() if e["positives"]]
    out = {
        "importance_by_label.svg": plots.heatmap(
            rows,
            mods,
            {lab: by_label[lab].get(key, {}) for lab in rows},
            f"Mean {what} per label over its {src} positives",
            {lab: by_label[lab].get(top) for lab in rows},
        )
    }
    if "modality_share" in summary:
        colours = {m: plots.colour(i) for i, m in enumerate(mods)}
        unit = summary["method_unit"]
        out["modality_importance.svg"] = plots.bars(
            summary["modality_share"], f"Mean share of {unit} per modality", colours
        )
    return out


def write_plot_csv(summary: dict[str, Any], path: Path) -> None:
    """Long-format CSV (label, modality, share, ablation_drop) for `dvc plots`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["label", "modality", "share", "ablation_drop"])
        for lab, e in summary["by_label"].items():
            for m in summary["modalities"]:
                s, d = e.get("share", {}).get(m), e.get("ablation_drop", {}).get(m)
                w.writerow([lab, m, "" if s is None else round(s, 6), "" if d is None else round(d, 6)])


# --------------------------------------------------------------------------------------------
# The predict run
# --------------------------------------------------------------------------------------------


# one parameter per input and output path the stage passes (dvc.yaml owns the paths), plus the settings
def run_predict(
    cfg: PredictConfig,
    model_path: Path,
    manifest: Path,
    features_root: Path,
    out_dir: Path,
    metrics_path: Path | None = None,
    plot_csv: Path | None = None,
) -> dict[str, Any]:
    """Predict every item of the chosen splits and write the outputs; returns the summary."""
    t0 = time.perf_counter()
    inputs = load_scoring_inputs(model_path, manifest, features_root, cfg.device)
    positions = np.array(
        [i for i, s in enumerate(inputs.splits) if cfg.splits is None or s in cfg.splits], dtype=np.int64
    )
    log.info(
        "predicting %d of %d items (%s) with %s pooling on %s",
        len(positions),
        len(inputs.ids),
        "all splits" if cfg.splits is None else ", ".join(cfg.splits),
        inputs.bundle.model_config.pooling,
        next(inputs.model.parameters()).device,
    )
    prediction = predict_items(inputs, positions, cfg)
    summary = prediction.summary
    summary["seconds"] = time.perf_counter() - t0
    with runtime.staged_output(out_dir) as work:
        write_outputs(prediction, work, lambda ids: element_metadata(inputs.dirs, inputs.bundle, ids))
    if metrics_path is not None:
        runtime.write_json(metrics_path, summary)
    if plot_csv is not None:
        write_plot_csv(summary, plot_csv)
    log.info(
        "wrote predictions and %s importances of %d items to %s in %.1f s",
        prediction.scored.method["method"],
        len(positions),
        out_dir,
        summary["seconds"],
    )
    return summary
