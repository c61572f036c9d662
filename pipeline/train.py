"""Training of the set model (or the concat baseline) from the Parquet feature sets.

Importable with torch, pyarrow, numpy and pyyaml alone, so the stage runs on a GPU machine that
has no Beam, DVC or OCR installed. The feature tensors move to the device once; batches are built
there with tensor ops only.
"""
from __future__ import annotations

import copy
import csv
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from pipeline import metrics as M
from pipeline import runtime
from pipeline.config import ConfigError, section, to_dict
from pipeline.features import PROVENANCE_KEYS, FeatureMismatchError, file_sha256, provenance_diffs
from pipeline.model import ModelConfig, build_model
from pipeline.setdata import FeatureStore, label_matrix, read_manifest_labels

log = logging.getLogger(__name__)
BUNDLE_FORMAT = 1


@dataclass(frozen=True)
class TrainConfig:
    """Settings of the train stage (params train)."""

    modalities: tuple[str, ...] | None = None  # null: every modality folder under --features
    model: ModelConfig = field(default_factory=ModelConfig)
    epochs: int = 60
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 10  # epochs without improvement of `monitor` on val before stopping
    monitor: str = "f1_micro"
    tune_thresholds: bool = False  # per-label thresholds tuned on val (multilabel/binary)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = False  # bfloat16 autocast on CUDA
    deterministic: bool = False
    seed: int = 0

    def validate(self, where: str) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.patience < 1:
            raise ConfigError(f"{where}: epochs, batch_size, patience must be >= 1 and lr > 0")
        if self.monitor not in ("f1_micro", "f1_macro", "f1_weighted", "f1_samples", "mean_average_precision", "loss"):
            raise ConfigError(f"{where}.monitor: unknown metric {self.monitor!r}")


def resolve_device(name: str) -> torch.device:
    """auto -> CUDA when present, else CPU; asking for CUDA without one is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise runtime.UserError(f"train.device={name!r} but torch sees no CUDA device; use auto or cpu")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # scatter reductions have no deterministic CUDA kernel: warn instead of failing there
        torch.use_deterministic_algorithms(True, warn_only=True)


def loss_fn(task: str) -> nn.Module:
    return nn.CrossEntropyLoss() if task == "multiclass" else nn.BCEWithLogitsLoss()


def _loss(task: str, crit: nn.Module, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return crit(logits, y.argmax(1)) if task == "multiclass" else crit(logits, y)


def to_probs(task: str, logits: torch.Tensor) -> torch.Tensor:
    return logits.softmax(1) if task == "multiclass" else logits.sigmoid()


def train_one_epoch(model: nn.Module, store: FeatureStore, y: torch.Tensor, idx: torch.Tensor, cfg: TrainConfig,
                    task: str, opt: torch.optim.Optimizer, gen: torch.Generator) -> float:
    """One pass over `idx` in shuffled batches; returns the mean training loss."""
    model.train()
    crit = loss_fn(task)
    perm = idx[torch.randperm(idx.numel(), generator=gen).to(idx.device)]
    total, n = 0.0, 0
    amp = cfg.amp and idx.device.type == "cuda"
    for start in range(0, perm.numel(), cfg.batch_size):
        b = perm[start:start + cfg.batch_size]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            logits = model(store.batch(b))
        loss = _loss(task, crit, logits.float(), y[b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach()) * b.numel()
        n += b.numel()
    return total / max(n, 1)


@torch.no_grad()
def _logits(model: nn.Module, store: FeatureStore, idx: torch.Tensor, batch_size: int,
            drop: frozenset[str]) -> torch.Tensor:
    """Logits (len(idx), L) in eval mode, in chunks of `batch_size`."""
    model.eval()
    out = [model(store.batch(idx[s:s + batch_size], drop)).float() for s in range(0, idx.numel(), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, 0)


@torch.no_grad()
def predict(model: nn.Module, store: FeatureStore, idx: torch.Tensor, task: str, batch_size: int = 1024,
            drop: frozenset[str] = frozenset()) -> torch.Tensor:
    """Probabilities (len(idx), L) in eval mode; `drop` removes modalities at inference."""
    return to_probs(task, _logits(model, store, idx, batch_size, drop))


@torch.no_grad()
def evaluate(model: nn.Module, store: FeatureStore, y: torch.Tensor, idx: torch.Tensor, task: str,
             thresholds: np.ndarray | float = 0.5) -> dict[str, float]:
    """Loss and the field's metrics on `idx`."""
    if idx.numel() == 0:
        return {}
    crit = loss_fn(task)
    logits = _logits(model, store, idx, 1024, frozenset())
    out = M.evaluate(task, y[idx].cpu().numpy(), to_probs(task, logits).cpu().numpy(), thresholds)
    out["loss"] = float(_loss(task, crit, logits, y[idx]))
    return out


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


def feature_dirs(root: Path, modalities: Sequence[str] | None, what: str = "train.modalities") -> dict[str, Path]:
    """Modality -> feature folder; all folders holding a features.parquet when `modalities` is null."""
    found = {p.parent.name: p.parent for p in sorted(root.glob("*/features.parquet"))}
    if modalities is None:
        if not found:
            raise runtime.UserError(f"no feature sets under {root} (expected <modality>/features.parquet)")
        return found
    missing = [m for m in modalities if m not in found]
    if missing:
        raise runtime.UserError(f"{what} {missing} have no features under {root}; found {sorted(found)}")
    return {m: found[m] for m in modalities}


def provenance(store: FeatureStore) -> dict[str, dict[str, Any]]:
    """What the bundle records of each modality's features (checked again at prediction time)."""
    keep = (*PROVENANCE_KEYS, "params", "categorical", "stats", "embedder")
    return {m: {k: meta[k] for k in keep if k in meta} for m, meta in store.meta.items()}


def save_bundle(path: Path, model: nn.Module, cfg: TrainConfig, store: FeatureStore, task: str,
                labels: list[str], thresholds: np.ndarray, manifest_meta: dict[str, Any] | None = None) -> None:
    """Weights plus everything needed to rebuild and check the model, and to score new data the same
    way (the dataset contract and manifest fields of training); plain tensors and data only."""
    bundle = {
        "format": BUNDLE_FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_config": to_dict(cfg.model),
        "train_config": to_dict(cfg),
        "task": task,
        "label_names": list(labels),
        "thresholds": [float(t) for t in np.broadcast_to(thresholds, (len(labels),))],
        "dims": store.dims,
        "categories": store.categories,
        "provenance": provenance(store),
        "dataset": (manifest_meta or {}).get("dataset"),
        "fields": (manifest_meta or {}).get("fields"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(bundle, path)


def load_bundle(path: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from a bundle (weights_only: no arbitrary code is unpickled)."""
    from pipeline.config import from_dict

    bundle = torch.load(path, map_location=device, weights_only=True)
    if bundle.get("format") != BUNDLE_FORMAT:
        raise runtime.UserError(f"{path}: bundle format {bundle.get('format')} not supported (expected {BUNDLE_FORMAT})")
    cfg = from_dict(ModelConfig, bundle["model_config"], "bundle.model_config")
    model = build_model(cfg, bundle["dims"], bundle["categories"], len(bundle["label_names"]))
    model.load_state_dict(bundle["state_dict"])
    return model.to(device).eval(), bundle


def check_store_matches(bundle: dict[str, Any], store: FeatureStore) -> None:
    """Refuse features whose extractor, model, weights or dimension differ from the bundle's."""
    problems = []
    for m, rec in bundle["provenance"].items():
        meta = store.meta.get(m)
        if meta is None:
            problems.append(f"{m}: missing")
            continue
        problems += [f"{m}.{d}" for d in provenance_diffs(
            rec, meta, ("extractor", "model_id", "weights_sha256", "dim", "categorical", "stats"),
            "model has", "features have")]
    if problems:
        raise FeatureMismatchError("features do not match the model bundle: " + "; ".join(problems))


def fit(cfg: TrainConfig, manifest: Path, features_root: Path, out_dir: Path, metrics_path: Path,
        plots_path: Path) -> dict[str, Any]:
    """Train, early-stop on val, evaluate on test, and write the bundle, metrics and curves."""
    seed_everything(cfg.seed, cfg.deterministic)
    device = resolve_device(cfg.device)
    ids, splits, labels, mmeta = read_manifest_labels(manifest)
    task, names = mmeta.get("task"), mmeta.get("label_names", [])
    if not task or not names:
        raise runtime.UserError(f"{manifest}: the manifest has no labels to train on")
    store = FeatureStore.load(feature_dirs(features_root, cfg.modalities), ids)
    manifest_sha = file_sha256(manifest)  # FeatureStore.load already checked that all sets share one manifest
    if any(meta["manifest_sha256"] != manifest_sha for meta in store.meta.values()):
        raise FeatureMismatchError(f"features under {features_root} were extracted from another manifest than {manifest}")
    y_all = label_matrix(labels, names)
    split = np.array(splits)
    index = {s: torch.from_numpy(np.nonzero(split == s)[0]) for s in ("train", "val", "test")}
    if index["train"].numel() == 0:
        raise runtime.UserError("the train split is empty")
    store = store.to(device)
    y = y_all.to(device)
    index = {s: v.to(device) for s, v in index.items()}
    log.info("train on %s: %d/%d/%d items, %d labels (%s), modalities %s, %.1f MB of features on the device",
             device, *(index[s].numel() for s in ("train", "val", "test")), len(names), task,
             sorted(store.dims), store.nbytes() / 1e6)

    model = build_model(cfg.model, store.dims, store.categories, len(names)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    higher = cfg.monitor != "loss"
    best, best_state, best_epoch, stale = -math.inf if higher else math.inf, None, 0, 0
    curve, t_train, n_seen = [], 0.0, 0
    val_idx = index["val"] if index["val"].numel() else index["train"]
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        train_loss = train_one_epoch(model, store, y, index["train"], cfg, task, opt, gen)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        t_train += dt
        n_seen += index["train"].numel()
        val = evaluate(model, store, y, val_idx, task)
        score = val[cfg.monitor]
        curve.append({"epoch": epoch, "train_loss": round(train_loss, 6), "val_loss": round(val["loss"], 6),
                      f"val_{cfg.monitor}": round(score, 6)})
        improved = score > best if higher else score < best
        if improved:
            best, best_state, best_epoch, stale = score, copy.deepcopy(model.state_dict()), epoch, 0
        else:
            stale += 1
        log.info("epoch %d/%d: train loss %.4f, val loss %.4f, val %s %.4f (%.0f items/s, ETA %.0f s)", epoch,
                 cfg.epochs, train_loss, val["loss"], cfg.monitor, score, index["train"].numel() / dt,
                 dt * (cfg.epochs - epoch))
        if stale >= cfg.patience:
            log.info("early stop: no val %s improvement for %d epochs (best %.4f at epoch %d)",
                     cfg.monitor, cfg.patience, best, best_epoch)
            break
    model.load_state_dict(best_state)

    thresholds = np.full(len(names), 0.5)
    if cfg.tune_thresholds and task != "multiclass" and index["val"].numel():
        thresholds = M.tune_thresholds(y[index["val"]].cpu().numpy(),
                                       predict(model, store, index["val"], task).cpu().numpy())
    y_np = y_all.numpy()
    result = {
        "task": task, "labels": names, "device": str(device), "architecture": cfg.model.architecture,
        "pooling": cfg.model.pooling, "modalities": sorted(store.dims), "epochs_run": len(curve),
        "best_epoch": best_epoch, "train_items_per_s": round(n_seen / t_train, 1),
        "val": evaluate(model, store, y, index["val"], task, thresholds),
        "test": evaluate(model, store, y, index["test"], task, thresholds),
        "test_label_frequency_baseline": frequency_baseline(
            task, y_np, index["train"].cpu().numpy(), index["test"].cpu().numpy()) if index["test"].numel() else {},
    }
    save_bundle(out_dir / "model.pt", model, cfg, store, task, names, thresholds, mmeta)
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(rounded(result), indent=2) + "\n", encoding="utf-8")
    plots_path.parent.mkdir(parents=True, exist_ok=True)
    with plots_path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(curve[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(curve)
    log.info("test: %s (label-frequency baseline: %s)", {k: round(v, 4) for k, v in result["test"].items()},
             {k: round(v, 4) for k, v in result["test_label_frequency_baseline"].items()})
    return result


def rounded(obj: Any) -> Any:
    """Floats rounded to 6 digits (non-finite -> null) through dicts and lists, for metrics JSON."""
    if isinstance(obj, float):
        return round(obj, 6) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rounded(v) for v in obj]
    return obj


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the train stage (and of `dmms train`)."""
    p = runtime.parser("Train the Deep Multi-Modal Sets model on extracted feature sets.")
    p.add_argument("--manifest", required=True)
    p.add_argument("--features", required=True, help="folder holding <modality>/features.parquet")
    p.add_argument("--out", required=True, help="folder for model.pt")
    p.add_argument("--metrics", required=True)
    p.add_argument("--plots", required=True, help="training curve CSV")
    args = p.parse_args(argv)
    params, _ = runtime.setup(args.params)
    cfg = section(params, "train", TrainConfig)
    fit(cfg, Path(args.manifest), Path(args.features), Path(args.out), Path(args.metrics), Path(args.plots))
