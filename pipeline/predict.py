"""Predictions and importances of a trained bundle on extracted feature sets (the predict stage).

For every item of the chosen splits it writes, under --out:

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
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline import metrics as M
from pipeline import plots, runtime, schema
from pipeline.config import ConfigError, section
from pipeline.features import CATEGORY_IDS, ELEMENTS, FeatureMismatchError, file_sha256
from pipeline.importance import METHODS, explain
from pipeline.model import SetModel
from pipeline.setdata import FeatureStore, label_matrix, read_manifest_labels
from pipeline.train import check_store_matches, feature_dirs, load_bundle, resolve_device, rounded, to_probs

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
        bad = [s for s in self.splits or () if s not in (*schema.SPLITS, "score")]
        if bad:
            raise ConfigError(f"{where}.splits: unknown split(s) {bad}; expected some of {schema.SPLITS}")


@dataclass
class Scored:
    """Everything predicted for n items over L labels and M modalities (numpy, on the CPU)."""

    ids: list[str]
    splits: list[str]
    labels: list[str]
    modalities: list[str]
    method: str
    probs: np.ndarray  # (n, L)
    predicted: np.ndarray  # (n, L) bool
    modality_share: np.ndarray | None  # (n, M)
    label_modality: np.ndarray | None  # (n, L, M)
    drop: np.ndarray | None  # (n, L, M)
    elements: dict[str, np.ndarray] = field(default_factory=dict)  # item, modality, position, share, wins, top_share


def decide(task: str, probs: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """Predicted labels: the arg-max class (multiclass) or every label over its threshold."""
    if task == "multiclass":
        out = np.zeros_like(probs, dtype=bool)
        if probs.size:
            out[np.arange(len(probs)), probs.argmax(1)] = True
        return out
    return probs >= np.asarray(thresholds, dtype=probs.dtype)[None, :]


@torch.no_grad()
def score_store(model: torch.nn.Module, bundle: dict[str, Any], store: FeatureStore, positions: np.ndarray,
                splits: list[str], cfg: PredictConfig) -> Scored:
    """Probabilities, decisions and importances for items `positions` of `store` (on the model's device);
    `splits` are those items' splits."""
    task, labels = bundle["task"], bundle["label_names"]
    mods = list(getattr(model, "modalities", sorted(store.dims)))
    is_set = isinstance(model, SetModel)
    method = explain_method(model)
    device = next(model.parameters()).device
    idx_all = torch.as_tensor(positions, dtype=torch.long, device=device)
    probs, shares, label_mod, drops = [], [], [], []
    el = {k: [] for k in ("item", "modality", "position", "share", "wins", "top_share")}
    model.eval()
    for start in range(0, idx_all.numel(), cfg.batch_size):
        idx = idx_all[start:start + cfg.batch_size]
        batch = store.batch(idx)
        if not is_set:
            p = to_probs(task, model(batch).float())
            probs.append(p.cpu())
            if cfg.ablation:
                drops.append(torch.stack([p - to_probs(task, model(store.batch(idx, frozenset({m}))).float())
                                          for m in mods], 2).cpu())
            continue
        # the set model's elements are encoded once; removing a modality only re-pools the others
        x, seg, mod = model.elements(batch)
        p = to_probs(task, model.head(model.pool(x, seg, mod, batch.size)).float())
        probs.append(p.cpu())
        if cfg.ablation:
            keep = [mod != k for k in range(len(mods))]
            drops.append(torch.stack([p - to_probs(task, model.head(model.pool(
                x[kp], seg[kp], mod[kp], batch.size)).float()) for kp in keep], 2).cpu())
        imp = explain(model, batch, label_conditional=cfg.label_conditional, elements=(x, seg, mod))
        shares.append(imp.modality_share.cpu())
        top = p.argmax(1)  # the item's top label
        el["item"].append((imp.element_segment + start).cpu())
        el["modality"].append(imp.element_modality.cpu())
        el["position"].append(model.element_positions(batch).cpu())
        el["share"].append(imp.element_share.cpu())
        if imp.element_wins is not None:
            el["wins"].append(imp.element_wins.cpu())
        if imp.label_modality is not None:
            label_mod.append(imp.label_modality.cpu())
            el["top_share"].append(imp.label_element[torch.arange(imp.element_segment.numel(), device=device),
                                                     top[imp.element_segment]].cpu())
    n, L, Mn = idx_all.numel(), len(labels), len(mods)
    cat = lambda parts, shape: torch.cat(parts).numpy() if parts else np.zeros(shape, dtype=np.float32)  # noqa: E731
    P = cat(probs, (n, L))
    return Scored(
        ids=[store.ids[i] for i in positions], splits=list(splits), labels=list(labels), modalities=mods, method=method,
        probs=P, predicted=decide(task, P, bundle["thresholds"]),
        modality_share=cat(shares, (n, Mn)) if is_set else None,
        label_modality=cat(label_mod, (n, L, Mn)) if is_set and cfg.label_conditional else None,
        drop=cat(drops, (n, L, Mn)) if cfg.ablation else None,
        elements={k: torch.cat(v).numpy() for k, v in el.items() if v},
    )


def explain_method(model: torch.nn.Module) -> str:
    return METHODS[model.cfg.pooling] if isinstance(model, SetModel) else "ablation"


# --------------------------------------------------------------------------------------------
# Element metadata, tables and summaries
# --------------------------------------------------------------------------------------------


def element_metadata(dirs: dict[str, Path], bundle: dict[str, Any], ids: list[str]) -> dict[str, dict[str, list]]:
    """modality -> id -> the element records of extraction (text, box, score, ...), plus one record
    per categorical meta column ("column: value") after the vector elements."""
    out: dict[str, dict[str, list]] = {}
    wanted = set(ids)
    for m, folder in dirs.items():
        table = pq.read_table(Path(folder) / "features.parquet", columns=[schema.ID, ELEMENTS, CATEGORY_IDS])
        vocab = bundle["provenance"].get(m, {}).get("categorical") or {}
        per_id = {}
        for item_id, elements, cats in zip(table[schema.ID].to_pylist(), table[ELEMENTS].to_pylist(),
                                           table[CATEGORY_IDS].to_pylist()):
            if item_id not in wanted:
                continue
            recs = list(elements or [])
            for c, (col, values) in enumerate(vocab.items()):
                cid = (cats or [0] * len(vocab))[c]
                recs.append({"text": f"{col}: {values[cid - 1] if cid else '(missing or unseen)'}"})
            per_id[item_id] = recs
        out[m] = per_id
    return out


def tables(scored: Scored, truth: list[list[str] | None] | None,
           meta: dict[str, dict[str, list]]) -> dict[str, pa.Table]:
    """The four output tables of `scored`."""
    L, mods = scored.labels, scored.modalities
    n = len(scored.ids)
    f32 = lambda a: pa.array(np.asarray(a, dtype=np.float32))  # noqa: E731
    has_truth = truth is not None and any(t is not None for t in truth)
    pred_cols: dict[str, Any] = {
        schema.ID: pa.array(scored.ids, pa.string()),
        schema.SPLIT: pa.array(scored.splits, pa.string()),
        "predicted": pa.array([[L[j] for j in np.nonzero(row)[0]] for row in scored.predicted], pa.list_(pa.string())),
        "labels": pa.array(truth if has_truth else [None] * n, pa.list_(pa.string())),
    }
    for j, lab in enumerate(L):
        pred_cols[f"prob_{lab}"] = f32(scored.probs[:, j])
    imp_cols: dict[str, Any] = {schema.ID: pred_cols[schema.ID], schema.SPLIT: pred_cols[schema.SPLIT],
                                "method": pa.array([scored.method] * n, pa.string())}
    if scored.modality_share is not None:
        top = [mods[int(np.argmax(r))] if r.sum() > 0 else None for r in scored.modality_share]
        imp_cols["top_modality"] = pa.array(top, pa.string())
        for j, m in enumerate(mods):
            imp_cols[f"share_{m}"] = f32(scored.modality_share[:, j])
    else:  # ablation: the modality whose removal lowers the top label most
        top_label = scored.probs.argmax(1) if n and L else np.zeros(n, dtype=int)
        d = scored.drop[np.arange(n), top_label] if scored.drop is not None and n and L else None
        imp_cols["top_modality"] = pa.array([mods[int(np.argmax(r))] for r in d] if d is not None else [None] * n,
                                            pa.string())
        for m in mods:
            imp_cols[f"share_{m}"] = pa.nulls(n, pa.float32())

    # label_importance: item-major, label-minor
    rep = np.repeat(np.arange(n), len(L))
    lab_idx = np.tile(np.arange(len(L)), n)
    y = label_matrix(truth, L).numpy().astype(bool) if has_truth else None
    li: dict[str, Any] = {
        schema.ID: pa.array([scored.ids[i] for i in rep], pa.string()),
        schema.SPLIT: pa.array([scored.splits[i] for i in rep], pa.string()),
        "label": pa.array([L[j] for j in lab_idx], pa.string()),
        "probability": f32(scored.probs.reshape(-1)),
        "predicted": pa.array(scored.predicted.reshape(-1), pa.bool_()),
        "true": pa.array(y.reshape(-1) if y is not None else [None] * len(rep), pa.bool_()),
    }
    for j, m in enumerate(mods):
        li[f"share_{m}"] = f32(scored.label_modality[:, :, j].reshape(-1)) if scored.label_modality is not None \
            else pa.nulls(len(rep), pa.float32())
    for j, m in enumerate(mods):
        li[f"drop_{m}"] = f32(scored.drop[:, :, j].reshape(-1)) if scored.drop is not None \
            else pa.nulls(len(rep), pa.float32())

    el = scored.elements
    k = len(el.get("item", []))
    recs = []
    for e in range(k):
        item, m, pos = int(el["item"][e]), mods[int(el["modality"][e])], int(el["position"][e])
        found = meta.get(m, {}).get(scored.ids[item], [])
        recs.append(found[pos] if pos < len(found) else {})
    top_label = scored.probs.argmax(1) if n and L else np.zeros(n, dtype=int)
    elements = {
        schema.ID: pa.array([scored.ids[int(i)] for i in el.get("item", [])], pa.string()),
        "modality": pa.array([mods[int(i)] for i in el.get("modality", [])], pa.string()),
        "position": pa.array(np.asarray(el.get("position", []), dtype=np.int32)),
        "share": f32(el.get("share", [])),
        "wins": f32(el["wins"]) if "wins" in el else pa.nulls(k, pa.float32()),
        "top_label": pa.array([L[int(top_label[int(i)])] for i in el.get("item", [])] if L else [None] * k, pa.string()),
        "top_label_share": f32(el["top_share"]) if "top_share" in el else pa.nulls(k, pa.float32()),
        "text": pa.array([r.get("text") for r in recs], pa.string()),
        "box": pa.array([r.get("box") for r in recs], pa.list_(pa.float32())),
        "score": pa.array([r.get("score") for r in recs], pa.float32()),
    }
    return {"predictions": pa.table(pred_cols), "importance": pa.table(imp_cols),
            "label_importance": pa.table(li),
            "elements": pa.table(elements).sort_by([(schema.ID, "ascending"), ("modality", "ascending"),
                                                    ("position", "ascending")])}


def summarise(scored: Scored, truth: list[list[str] | None] | None, task: str,
              thresholds: Sequence[float]) -> dict[str, Any]:
    """Dataset-level numbers: items per split, metrics where labels are known, mean modality
    shares, and per label the mean label-conditional share and ablation drop over its positives
    (the true positives where labels are known, else the predicted ones)."""
    L, mods = scored.labels, scored.modalities
    splits = np.array(scored.splits)
    has_truth = truth is not None and any(t is not None for t in truth)
    known = np.array([t is not None for t in truth]) if has_truth else np.zeros(len(scored.ids), bool)
    y = label_matrix(truth, L).numpy() if has_truth else None
    out: dict[str, Any] = {
        "items": len(scored.ids), "method": scored.method, "labels": L, "modalities": mods,
        "splits": {s: int((splits == s).sum()) for s in sorted(set(scored.splits))},
        "metrics": {},
        "predicted_per_label": {lab: int(scored.predicted[:, j].sum()) for j, lab in enumerate(L)},
    }
    if has_truth:
        for s in sorted(set(scored.splits)):
            rows = (splits == s) & known
            if rows.any():
                out["metrics"][s] = M.evaluate(task, y[rows], scored.probs[rows], np.asarray(thresholds))
    if scored.modality_share is not None:
        out["modality_share"] = {m: float(scored.modality_share[:, j].mean()) if len(scored.ids) else 0.0
                                 for j, m in enumerate(mods)}
    by_label = {}
    for j, lab in enumerate(L):
        pos = (y[:, j] > 0) & known if has_truth else scored.predicted[:, j]
        entry: dict[str, Any] = {"positives": int(pos.sum()), "positives_from": "labels" if has_truth else "predictions"}
        if scored.label_modality is not None:
            share = scored.label_modality[pos, j].mean(0) if pos.any() else np.zeros(len(mods))
            entry["share"] = {m: float(share[k]) for k, m in enumerate(mods)}
            entry["top_modality"] = mods[int(np.argmax(share))] if pos.any() else None
        if scored.drop is not None:
            drop = scored.drop[pos, j].mean(0) if pos.any() else np.zeros(len(mods))
            entry["ablation_drop"] = {m: float(drop[k]) for k, m in enumerate(mods)}
            entry["top_ablation"] = mods[int(np.argmax(drop))] if pos.any() else None
        by_label[lab] = entry
    out["by_label"] = by_label
    return out


def write_outputs(scored: Scored, truth: list[list[str] | None] | None, meta: dict[str, dict[str, list]],
                  summary: dict[str, Any], out_dir: Path) -> None:
    """The tables, summary.json and the two SVG plots under `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, table in tables(scored, truth, meta).items():
        pq.write_table(table, out_dir / f"{name}.parquet", compression="zstd")
    (out_dir / "summary.json").write_text(json.dumps(rounded(summary), indent=2) + "\n", encoding="utf-8")
    for name, svg in summary_plots(summary).items():
        (out_dir / name).write_text(svg, encoding="utf-8")


def summary_plots(summary: dict[str, Any]) -> dict[str, str]:
    """importance_by_label.svg (label x modality heatmap) and modality_importance.svg (bars)."""
    mods, by_label = summary["modalities"], summary["by_label"]
    key = "share" if any("share" in e for e in by_label.values()) else "ablation_drop"
    top = "top_modality" if key == "share" else "top_ablation"
    what = "label-conditional share" if key == "share" else "ablation drop in probability"
    src = "true" if any(e["positives_from"] == "labels" for e in by_label.values()) else "predicted"
    rows = [lab for lab, e in by_label.items() if e["positives"]]
    out = {"importance_by_label.svg": plots.heatmap(
        rows, mods, {lab: by_label[lab].get(key, {}) for lab in rows},
        f"Mean {what} per label over its {src} positives", {lab: by_label[lab].get(top) for lab in rows})}
    if "modality_share" in summary:
        colours = {m: plots.colour(i) for i, m in enumerate(mods)}
        unit = "dimensions won" if summary["method"] == "argmax" else "pooled mass"
        out["modality_importance.svg"] = plots.bars(summary["modality_share"],
                                                    f"Mean share of {unit} per modality", colours)
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
# The stage
# --------------------------------------------------------------------------------------------


def load_scoring_inputs(model_path: Path, manifest: Path, features_root: Path, device: str):
    """The bundle's model, the manifest's items and the matching feature store (mismatches refused)."""
    model, bundle = load_bundle(model_path, resolve_device(device))
    ids, splits, labels, _ = read_manifest_labels(manifest)
    dirs = feature_dirs(features_root, list(bundle["provenance"]), f"the model's modalities {sorted(bundle['provenance'])}:")
    store = FeatureStore.load(dirs, ids)
    check_store_matches(bundle, store)
    sha = file_sha256(manifest)
    if any(meta["manifest_sha256"] != sha for meta in store.meta.values()):
        raise FeatureMismatchError(f"features under {features_root} were extracted from another manifest than {manifest}")
    return model, bundle, store.to(next(model.parameters()).device), dirs, (ids, splits, labels)


def run_predict(cfg: PredictConfig, model_path: Path, manifest: Path, features_root: Path, out_dir: Path,
                metrics_path: Path | None = None, plot_csv: Path | None = None) -> dict[str, Any]:
    """Predict every item of the chosen splits and write the outputs; returns the summary."""
    t0 = time.perf_counter()
    model, bundle, store, dirs, (ids, splits, labels) = load_scoring_inputs(model_path, manifest, features_root,
                                                                           cfg.device)
    positions = np.array([i for i, s in enumerate(splits) if cfg.splits is None or s in cfg.splits], dtype=np.int64)
    log.info("predicting %d of %d items (%s) with %s pooling on %s", len(positions), len(ids),
             "all splits" if cfg.splits is None else ", ".join(cfg.splits),
             bundle["model_config"]["pooling"], next(model.parameters()).device)
    scored = score_store(model, bundle, store, positions, [splits[i] for i in positions], cfg)
    truth = [labels[i] for i in positions]
    summary = summarise(scored, truth, bundle["task"], bundle["thresholds"])
    summary["seconds"] = time.perf_counter() - t0
    write_outputs(scored, truth, element_metadata(dirs, bundle, scored.ids), summary, out_dir)
    if metrics_path is not None:
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text(json.dumps(rounded(summary), indent=2) + "\n", encoding="utf-8")
    if plot_csv is not None:
        write_plot_csv(summary, plot_csv)
    log.info("wrote predictions and %s importances of %d items to %s in %.1f s", scored.method, len(positions),
             out_dir, summary["seconds"])
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the predict stage (and of `dmms predict`)."""
    p = runtime.parser("Predict labels and per-modality importances with a trained model bundle.")
    p.add_argument("--model", required=True, help="model bundle (model.pt) written by train")
    p.add_argument("--manifest", required=True)
    p.add_argument("--features", required=True, help="folder holding <modality>/features.parquet")
    p.add_argument("--out", required=True, help="folder for the prediction and importance tables")
    p.add_argument("--metrics", help="summary JSON (dataset-level metrics and importances)")
    p.add_argument("--plot-csv", help="per label and modality importances as CSV, for `dvc plots`")
    args = p.parse_args(argv)
    params, _ = runtime.setup(args.params)
    cfg = section(params, "predict", PredictConfig)
    run_predict(cfg, Path(args.model), Path(args.manifest), Path(args.features), Path(args.out),
                Path(args.metrics) if args.metrics else None, Path(args.plot_csv) if args.plot_csv else None)
