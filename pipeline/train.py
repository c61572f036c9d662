"""Training of the set model (or the concat baseline) from the Parquet feature sets.

Importable with torch, pyarrow, numpy and pyyaml alone, so the stage runs on a GPU machine that
has no Beam, DVC or OCR installed. The feature tensors move to the device once; batches are built
there with tensor ops only.
"""

from __future__ import annotations

import copy
import csv
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline import metrics as M
from pipeline import runtime
from pipeline.bundle import Bundle, ModalityRecord, check_same_manifest, feature_dirs, logits, predict, to_probs
from pipeline.config import ConfigError, to_dict
from pipeline.model import ModelConfig, build_model
from pipeline.setdata import FeatureStore, drop_elements, label_matrix, read_manifest_labels

log = logging.getLogger(__name__)
MONITORS = ("f1_micro", "f1_macro", "f1_weighted", "f1_samples", "mean_average_precision", "loss")
IMBALANCE = ("none", "pos_weight")


@dataclass(frozen=True)
class TrainConfig:
    """Settings of the train stage (params train); the seed is params base.seed."""

    # null: the train stage trains on every modality of extract.modalities; fit() on every folder of --features
    modalities: tuple[str, ...] | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    epochs: int = 60
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 10  # epochs without improvement of `monitor` on val before stopping
    # mAP: threshold-free and every label counts the same, so rare labels steer early stopping too
    monitor: str = "mean_average_precision"
    tune_thresholds: bool = True  # per-label thresholds tuned on val (multilabel/binary)
    imbalance: str = "pos_weight"  # none | pos_weight: weigh positives (classes) by their rarity in train
    pos_weight_cap: float = 10.0  # the largest weight imbalance gives a label or class
    element_dropout: float = 0.0  # training only: each element (face, box, sentence, tag) dropped with this probability
    modality_dropout: float = 0.0  # training only: each modality of each item dropped with this probability
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = False  # bfloat16 autocast on CUDA
    deterministic: bool = False

    def validate(self, where: str) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.patience < 1:
            raise ConfigError(f"{where}: epochs, batch_size, patience must be >= 1 and lr > 0")
        if self.monitor not in MONITORS:
            raise ConfigError(f"{where}.monitor: unknown metric {self.monitor!r}; expected one of {MONITORS}")
        if self.imbalance not in IMBALANCE:
            raise ConfigError(f"{where}.imbalance: expected one of {IMBALANCE}, found {self.imbalance!r}")
        if self.pos_weight_cap < 1 or not (0 <= self.element_dropout < 1 and 0 <= self.modality_dropout < 1):
            raise ConfigError(f"{where}: pos_weight_cap must be >= 1, element_dropout and modality_dropout in [0, 1)")


def class_weights(task: str, y: torch.Tensor, cap: float) -> torch.Tensor:
    """Weights from train frequencies, capped at `cap`: per label (n - n_pos) / n_pos for BCE's pos_weight,
    per class n / (K n_k) for cross-entropy; a label or class with no train positive gets 1."""
    n, counts = y.shape[0], y.sum(0)
    if task == "multiclass":
        w = n / (y.shape[1] * counts.clamp(min=1))
    else:
        w = (n - counts) / counts.clamp(min=1)
    return torch.where(counts > 0, w.clamp(min=1.0 if task != "multiclass" else 0.0, max=cap), torch.ones_like(w))


def loss_fn(task: str, weights: torch.Tensor | None = None) -> nn.Module:
    """Cross-entropy (multiclass) or per-label BCE; `weights` from class_weights, or None for plain."""
    if task == "multiclass":
        return nn.CrossEntropyLoss(weight=weights)
    return nn.BCEWithLogitsLoss(pos_weight=weights)


def _loss(task: str, crit: nn.Module, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return crit(logits, y.argmax(1)) if task == "multiclass" else crit(logits, y)


def train_one_epoch(
    model: nn.Module,
    data: TrainData,
    cfg: TrainConfig,
    opt: torch.optim.Optimizer,
    crit: nn.Module,
    gens: tuple[torch.Generator, torch.Generator],
) -> float:
    """One pass over the train split in shuffled batches; returns the mean training loss. `gens`: the
    shuffling generator (CPU) and the one drawing the element and modality dropout masks (on the
    store's device)."""
    model.train()
    gen, drop_gen = gens
    idx = data.index["train"]
    perm = idx[torch.randperm(idx.numel(), generator=gen).to(idx.device)]
    total, n = 0.0, 0
    amp = cfg.amp and idx.device.type == "cuda"
    for start in range(0, perm.numel(), cfg.batch_size):
        b = perm[start : start + cfg.batch_size]
        batch = drop_elements(data.store.batch(b), cfg.element_dropout, cfg.modality_dropout, drop_gen)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            out = model(batch)
        loss = _loss(data.task, crit, out.float(), data.y[b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach()) * b.numel()
        n += b.numel()
    return total / max(n, 1)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: TrainData,
    idx: torch.Tensor,
    thresholds: np.ndarray | float = 0.5,
    crit: nn.Module | None = None,
) -> dict[str, float]:
    """Loss and the field's metrics on items `idx`; `crit` is the training loss (with its class weights),
    so a val loss is the same loss as the train loss it is plotted with."""
    if idx.numel() == 0:
        return {}
    out_logits = logits(model, data.store, idx)
    out = M.evaluate(data.task, data.y[idx].cpu().numpy(), to_probs(data.task, out_logits).cpu().numpy(), thresholds)
    out["loss"] = float(_loss(data.task, crit or loss_fn(data.task), out_logits, data.y[idx]))
    return out


def labels_without_positives(data: TrainData, split: str) -> list[str]:
    """The labels no item of `split` carries (their AP is undefined there; mAP averages the others)."""
    idx = data.index[split]
    if not idx.numel():
        return []
    counts = data.y[idx].sum(0).cpu().numpy()
    return [name for name, c in zip(data.names, counts) if c == 0]


def frequency_baseline(task: str, y: np.ndarray, train: np.ndarray, test: np.ndarray) -> dict[str, float]:
    """The floor a model must clear: every item gets the train label frequencies as probabilities.

    Thresholded at 0.5 that predicts only labels on more than half the items, so the F1s use the
    stronger form of the same baseline: predict the k most frequent train labels for every item,
    k = the mean number of labels per train item (rounded, at least 1).
    """
    freq = y[train].mean(0)
    probs = np.repeat(freq[None, :], len(test), axis=0)
    out = M.evaluate(task, y[test], probs)  # AP comes from the frequencies themselves
    k = max(1, int(round(y[train].sum(1).mean()))) if task != "multiclass" else 1
    top = np.zeros_like(probs, dtype=bool)
    top[:, np.argsort(-freq, kind="stable")[:k]] = True
    out.update(M.f1_scores(y[test], top))
    out["accuracy"] = float((top == y[test].astype(bool)).all(1).mean())
    out["top_k"] = k
    return out


# --------------------------------------------------------------------------------------------
# One training run: data on the device, the epoch loop with early stopping, final metrics, outputs
# --------------------------------------------------------------------------------------------


@dataclass
class TrainData:
    """The manifest's labels and every modality's features, on the training device."""

    task: str
    names: list[str]  # label names
    store: FeatureStore
    y: torch.Tensor  # (n, L) multi-hot, on the device
    index: dict[str, torch.Tensor]  # split -> item positions, on the device
    manifest_meta: dict[str, Any]


def load_train_data(cfg: TrainConfig, manifest: Path, features_root: Path, device: torch.device) -> TrainData:
    """Labels and feature sets of every item, checked to come from this manifest, moved to `device`."""
    ids, splits, labels, mmeta = read_manifest_labels(manifest)
    task, names = mmeta.get("task"), mmeta.get("label_names", [])
    if not task or not names:
        raise runtime.UserError(f"{manifest}: the manifest has no labels to train on")
    store = FeatureStore.load(feature_dirs(features_root, cfg.modalities), ids)
    check_same_manifest(store, manifest, features_root)
    split = np.array(splits)
    index = {s: torch.from_numpy(np.nonzero(split == s)[0]).to(device) for s in ("train", "val", "test")}
    if index["train"].numel() == 0:
        raise runtime.UserError("the train split is empty")
    return TrainData(task, names, store.to(device), label_matrix(labels, names).to(device), index, mmeta)


def training_loss(cfg: TrainConfig, data: TrainData) -> nn.Module:
    """The loss training minimises (class-weighted from the train split when train.imbalance asks); val
    and test losses are this loss too."""
    weights = (
        class_weights(data.task, data.y[data.index["train"]], cfg.pos_weight_cap)
        if cfg.imbalance == "pos_weight"
        else None
    )
    return loss_fn(data.task, weights)


def train_loop(cfg: TrainConfig, model: nn.Module, data: TrainData, seed: int) -> dict[str, Any]:
    """Epochs until `cfg.epochs` or early stopping on val `cfg.monitor`; leaves the best weights in
    `model` and returns the curve, the best epoch and the training throughput."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    drop_gen = torch.Generator(device=data.y.device).manual_seed(seed + 1)
    crit = training_loss(cfg, data)
    higher = cfg.monitor != "loss"
    best, best_state, best_epoch, stale = -math.inf if higher else math.inf, None, 0, 0
    curve, t_train, n_seen = [], 0.0, 0
    train_idx = data.index["train"]
    val_idx = data.index["val"] if data.index["val"].numel() else train_idx
    t_start = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        train_loss = train_one_epoch(model, data, cfg, opt, crit, (gen, drop_gen))
        if train_idx.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        t_train += dt
        n_seen += train_idx.numel()
        val = evaluate(model, data, val_idx, crit=crit)
        score = val[cfg.monitor]
        curve.append(
            {
                "epoch": epoch,
                "train_loss": round(train_loss, 6),
                "val_loss": round(val["loss"], 6),
                f"val_{cfg.monitor}": round(score, 6),
            }
        )
        if math.isfinite(score) and (score > best if higher else score < best):  # NaN never improves
            best, best_state, best_epoch, stale = score, copy.deepcopy(model.state_dict()), epoch, 0
        else:
            stale += 1
        per_epoch = (time.perf_counter() - t_start) / epoch  # averaged over the run: a steady ETA
        log.info(
            "epoch %d/%d: train loss %.4f, val loss %.4f, val %s %.4f (%.0f items/s, ETA %.0f s at most)",
            epoch,
            cfg.epochs,
            train_loss,
            val["loss"],
            cfg.monitor,
            score,
            train_idx.numel() / dt,
            per_epoch * (cfg.epochs - epoch),
        )
        if stale >= cfg.patience:
            log.info(
                "early stop: no val %s improvement for %d epochs (best %.4f at epoch %d)",
                cfg.monitor,
                cfg.patience,
                best,
                best_epoch,
            )
            break
    if best_state is None:  # e.g. val mAP is NaN in every epoch: no val item carries any label
        log.warning(
            "val %s was never a number (no val positives?): keeping the last epoch's weights (%d)",
            cfg.monitor,
            len(curve),
        )
        best_epoch = len(curve)
    else:
        model.load_state_dict(best_state)
    return {"curve": curve, "best_epoch": best_epoch, "items_per_s": n_seen / t_train}


def thresholds_for(cfg: TrainConfig, model: nn.Module, data: TrainData) -> np.ndarray:
    """0.5 per label, or per-label thresholds tuned on val (`cfg.tune_thresholds`, not multiclass)."""
    if cfg.tune_thresholds and data.task != "multiclass" and data.index["val"].numel():
        val = data.index["val"]
        return M.tune_thresholds(data.y[val].cpu().numpy(), predict(model, data.store, val, data.task).cpu().numpy())
    return np.full(len(data.names), 0.5)


def threshold_record(cfg: TrainConfig, data: TrainData, thresholds: np.ndarray) -> dict[str, Any]:
    """What the metrics say about the decision thresholds: per label, whether tuned, and on which split."""
    tuned = bool(cfg.tune_thresholds and data.task != "multiclass" and data.index["val"].numel())
    out: dict[str, Any] = {
        "values": {lab: float(t) for lab, t in zip(data.names, thresholds)} if data.task != "multiclass" else {},
        "tuned": tuned,
        "tuned_on": "val" if tuned else None,
        "rule": "arg-max class"
        if data.task == "multiclass"
        else "a label is predicted when its probability is at least its threshold",
    }
    if tuned:
        out["note"] = (
            "the val F1 scores use thresholds tuned on val, so they are optimistic; test is the split "
            "the tuning did not see. AP and mAP do not depend on thresholds."
        )
    return out


def bundle_of(model: nn.Module, cfg: TrainConfig, data: TrainData, thresholds: np.ndarray, seed: int) -> Bundle:
    """The trained model as a bundle: weights, configs, labels, thresholds, the provenance of its features
    and the dataset contract of training (so new folders are scored the same way)."""
    return Bundle(
        model_config=cfg.model,
        train_config={**to_dict(cfg), "seed": seed},
        task=data.task,
        label_names=list(data.names),
        thresholds=[float(t) for t in np.broadcast_to(thresholds, (len(data.names),))],
        dims=data.store.dims,
        categories=data.store.categories,
        provenance={m: ModalityRecord.from_meta(m, meta) for m, meta in data.store.meta.items()},
        dataset=data.manifest_meta.get("dataset"),
        fields=data.manifest_meta.get("fields"),
        state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()},
    )


def write_curve(curve: list[dict[str, Any]], path: Path) -> None:
    """The training curve as CSV, for `dvc plots`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(curve[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(curve)


# the settings, one parameter per input and output path the stage passes (dvc.yaml owns the paths), the seed
def fit(
    cfg: TrainConfig,
    manifest: Path,
    features_root: Path,
    out_dir: Path,
    metrics_path: Path,
    plots_path: Path,
    seed: int = 0,
) -> dict[str, Any]:
    """Train, early-stop on val, evaluate on test, and write the bundle, metrics and curves."""
    runtime.seed_everything(seed, cfg.deterministic)
    device = runtime.resolve_device(cfg.device)
    data = load_train_data(cfg, manifest, features_root, device)
    log.info(
        "train on %s: %d/%d/%d items, %d labels (%s), modalities %s, %.1f MB of features on the device",
        device,
        *(data.index[s].numel() for s in ("train", "val", "test")),
        len(data.names),
        data.task,
        sorted(data.store.dims),
        data.store.nbytes() / 1e6,
    )
    without_positives = {split: labels_without_positives(data, split) for split in ("val", "test")}
    for split, missing in without_positives.items():
        if missing:  # their AP is undefined there: mAP and the F1 averages are over the other labels
            log.warning(
                "%s has no positive item for label(s) %s: their AP is undefined there and left out of mAP",
                split,
                missing,
            )
    model = build_model(cfg.model, data.store.dims, data.store.categories, len(data.names)).to(device)
    run = train_loop(cfg, model, data, seed)
    crit = training_loss(cfg, data)
    thresholds = thresholds_for(cfg, model, data)
    y_np = data.y.cpu().numpy()
    test = data.index["test"]
    result = {
        "task": data.task,
        "labels": data.names,
        "device": str(device),
        "architecture": cfg.model.architecture,
        "pooling": cfg.model.pooling,
        "modalities": sorted(data.store.dims),
        "epochs_run": len(run["curve"]),
        "best_epoch": run["best_epoch"],
        "train_items_per_s": round(run["items_per_s"], 1),
        "seed": seed,
        "thresholds": threshold_record(cfg, data, thresholds),
        "loss": "the training loss"
        + (" with per-label positive weights (train.imbalance: pos_weight)" if cfg.imbalance == "pos_weight" else ""),
        "val": evaluate(model, data, data.index["val"], thresholds, crit),
        "test": evaluate(model, data, test, thresholds, crit),
        "labels_without_positives": without_positives,
        "test_label_frequency_baseline": frequency_baseline(
            data.task, y_np, data.index["train"].cpu().numpy(), test.cpu().numpy()
        )
        if test.numel()
        else {},
    }
    bundle_of(model, cfg, data, thresholds, seed).to_file(out_dir / "model.pt")
    runtime.write_json(metrics_path, result)
    write_curve(run["curve"], plots_path)
    log.info(
        "test: %s (label-frequency baseline: %s)",
        {k: round(v, 4) for k, v in result["test"].items()},
        {k: round(v, 4) for k, v in result["test_label_frequency_baseline"].items()},
    )
    return result
