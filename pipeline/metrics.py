"""Classification metrics of the field, in numpy only (F1 micro/macro/weighted/samples, accuracy, AP).

Conventions follow scikit-learn (which the tests compare against): a label with no true and no
predicted positives has F1 0 (and counts in macro averages); F1 samples averages per-item F1.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denom = 2 * tp + fp + fn
    return np.divide(2 * tp, denom, out=np.zeros_like(denom, dtype=float), where=denom > 0)


def f1_scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """F1 micro, macro, weighted (by support) and samples for multi-hot (n, L) arrays."""
    t, p = y_true.astype(bool), y_pred.astype(bool)
    tp = (t & p).sum(0).astype(float)
    fp = (~t & p).sum(0).astype(float)
    fn = (t & ~p).sum(0).astype(float)
    per_label = _f1(tp, fp, fn)
    support = t.sum(0)
    per_item = _f1((t & p).sum(1).astype(float), (~t & p).sum(1).astype(float), (t & ~p).sum(1).astype(float))
    return {
        "f1_micro": float(_f1(tp.sum(), fp.sum(), fn.sum())),
        "f1_macro": float(per_label.mean()) if per_label.size else 0.0,
        "f1_weighted": float((per_label * support).sum() / support.sum()) if support.sum() else 0.0,
        "f1_samples": float(per_item.mean()) if per_item.size else 0.0,
    }


def average_precision(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per-label average precision (step-wise, as scikit-learn); NaN for a label with no positives."""
    out = np.full(y_true.shape[1], np.nan)
    for j in range(y_true.shape[1]):
        t = y_true[:, j].astype(bool)
        if not t.any():
            continue
        order = np.argsort(-scores[:, j], kind="mergesort")
        s, tt = scores[order, j], t[order]
        # thresholds at distinct scores: take the last index of each run of equal scores
        last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
        tps = np.cumsum(tt)[last]
        precision = tps / (last + 1)
        recall = tps / t.sum()
        out[j] = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
    return out


def decide(task: str, probs: np.ndarray, thresholds: np.ndarray | Sequence[float] | float = 0.5) -> np.ndarray:
    """Predicted labels (n, L) bool: the arg-max class (multiclass) or every label at or over its threshold."""
    if task == "multiclass":
        out = np.zeros_like(probs, dtype=bool)
        if probs.size:
            out[np.arange(len(probs)), probs.argmax(1)] = True
        return out
    return probs >= np.asarray(thresholds, dtype=probs.dtype)


def evaluate(
    task: str, y_true: np.ndarray, probs: np.ndarray, thresholds: np.ndarray | float = 0.5
) -> dict[str, float]:
    """Metrics for a task (multilabel | multiclass | binary) from true multi-hot labels and probabilities."""
    pred = decide(task, probs, thresholds)
    out = f1_scores(y_true, pred)
    out["accuracy"] = float((pred == y_true.astype(bool)).all(1).mean()) if len(y_true) else 0.0  # exact match
    ap = average_precision(y_true, probs)
    out["mean_average_precision"] = float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan")
    return out


def tune_thresholds(y_true: np.ndarray, probs: np.ndarray, grid: np.ndarray | None = None) -> np.ndarray:
    """Per-label threshold maximising that label's F1 on (validation) data; 0.5 where no positives.

    Each candidate is applied with `decide`, the rule prediction uses (in the probabilities' dtype), so a
    threshold chosen here splits the same scores the same way when the model is used.
    """
    grid = np.linspace(0.05, 0.95, 19) if grid is None else np.asarray(grid, dtype=float)
    best = np.full(y_true.shape[1], 0.5)
    for j in range(y_true.shape[1]):
        t = y_true[:, j].astype(bool)
        if not t.any():
            continue
        pred = np.stack([decide("multilabel", probs[:, j], g) for g in grid])  # (grid, n)
        tp, fp, fn = (pred & t).sum(1), (pred & ~t).sum(1), (~pred & t).sum(1)
        best[j] = float(grid[int(np.argmax(_f1(tp.astype(float), fp.astype(float), fn.astype(float))))])
    return best
