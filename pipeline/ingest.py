"""Ingest: validate every row a reader yields and write the canonical manifest (Parquet), the
rejected rows with their reasons, and reconciled counts.

Nothing is dropped silently: every row read ends up either in the manifest or in the rejects file,
and the metrics say how many of each (read = accepted + rejected).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import records, runtime, schema
from pipeline.config import DatasetConfig, IngestConfig, to_dict
from pipeline.readers import IngestError, RawRow, read_rows, required_columns, unescape
from pipeline.records import RejectError

log = logging.getLogger(__name__)

__all__ = ["IngestError", "precheck", "run_ingest", "validate_row"]


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def precheck(row: RawRow, cfg: DatasetConfig, seen_ids: set[str]) -> str:
    """Cheap, order-dependent checks (run sequentially); returns the id or raises RejectError."""
    if row.error is not None:
        raise row.error
    data = row.data or {}
    mapped = required_columns(cfg)
    if all(records.is_blank(data.get(c)) for c in mapped):
        raise RejectError("empty_row", "every mapped column is empty")
    bad = records.find_bad_utf8(data)
    if bad is not None:
        raise RejectError("invalid_utf8", f"row {row.source_row}: column {bad!r} is not valid UTF-8")
    raw_id = data.get(cfg.id)
    if records.is_blank(raw_id):
        raise RejectError("missing_id", f"column {cfg.id!r} is empty")
    if isinstance(raw_id, (dict, list, bool)):
        raise RejectError("bad_value", f"column {cfg.id!r}: an id is a string or a number, found {str(raw_id)[:80]!r}")
    item_id = str(raw_id).strip()
    if item_id in seen_ids:
        raise RejectError("duplicate_id", f"id {item_id!r} already appeared in an earlier row")
    seen_ids.add(item_id)
    return item_id


def validate_row(
    item_id: str, row: RawRow, cfg: DatasetConfig, root: Path, ingest: IngestConfig, fixed_split: str | None = None
) -> dict[str, Any]:
    """Turn one pre-checked row into a canonical manifest record, or raise RejectError."""
    data = row.data or {}
    out: dict[str, Any] = {schema.ID: item_id, schema.SOURCE_ROW: row.source_row}

    if fixed_split:
        out[schema.SPLIT] = fixed_split
    elif cfg.split.column:
        out[schema.SPLIT] = records.normalise_split(data.get(cfg.split.column))
    else:
        out[schema.SPLIT] = records.assign_split(item_id, cfg.split.fractions, cfg.split.salt)

    if cfg.labels.column:
        labels = records.parse_labels(
            data.get(cfg.labels.column),
            cfg.labels.kind,
            cfg.labels.separator,
            cfg.labels.positive_name,
            cfg.labels.column,
        )
        if labels is None and out[schema.SPLIT] in cfg.labels.required_in:
            raise RejectError(
                "missing_label", f"column {cfg.labels.column!r} is empty in the {out[schema.SPLIT]} split"
            )
        out[schema.LABELS] = labels
    else:
        out[schema.LABELS] = None

    for col in cfg.text:
        out[col] = records.parse_text(data.get(col), col)
    for col, sep in cfg.lists.items():
        out[col] = records.parse_list(data.get(col), sep, col)
    for col in cfg.numeric:
        out[col] = records.parse_number(data.get(col), col)
    for col in cfg.categorical:
        out[col] = records.parse_category(data.get(col), col)

    out[schema.IMAGE] = out[schema.IMAGE_WIDTH] = out[schema.IMAGE_HEIGHT] = out[schema.IMAGE_SHA256] = None
    value = data.get(cfg.image) if cfg.image else None
    if records.is_blank(value):
        if cfg.image and cfg.image_required:
            raise RejectError("missing_image", f"column {cfg.image!r} is empty")
    else:
        if not isinstance(value, str):
            raise RejectError("bad_value", f"column {cfg.image!r}: expected a relative path, found {str(value)[:80]!r}")
        path = records.resolve_media_path(root, value)
        info = records.inspect_image(path, ingest.max_image_pixels)
        out[schema.IMAGE] = path.relative_to(root).as_posix()
        out[schema.IMAGE_WIDTH], out[schema.IMAGE_HEIGHT] = info.width, info.height
        out[schema.IMAGE_SHA256] = info.sha256
    return out


# --------------------------------------------------------------------------------------------
# The ingest run: prechecks, validation, label vocabulary, outputs, limits
# --------------------------------------------------------------------------------------------


def as_reject(exc: Exception) -> RejectError:
    """The reject an error checking one row stands for: a RejectError as it is, anything else as
    `unexpected_error` with its type and message."""
    if isinstance(exc, RejectError):
        return exc
    return RejectError("unexpected_error", f"{type(exc).__name__}: {str(exc)[:300]}")


class _Rejects(list):
    """Rejected rows as records of schema.REJECTS_SCHEMA."""

    def add(self, row: RawRow, item_id: str | None, err: RejectError) -> None:
        self.append(
            {
                schema.SOURCE_ROW: row.source_row,
                schema.ID: unescape(item_id),
                schema.REASON: err.reason,
                schema.DETAIL: unescape(err.detail),
                schema.ROW: unescape(row.raw),
            }
        )


def _prechecked(rows: list[RawRow], dataset: DatasetConfig, rejects: _Rejects) -> list[tuple[str, RawRow]]:
    """(id, row) of every row that passes the order-dependent checks (ids, duplicates), in source order."""
    seen: set[str] = set()
    candidates: list[tuple[str, RawRow]] = []
    for row in rows:
        try:
            candidates.append((precheck(row, dataset, seen), row))
        except Exception as exc:  # noqa: BLE001 - one row's problem is that row's reject, never the run's
            raw_id = (row.data or {}).get(dataset.id, row.id_hint)
            item_id = (
                None if records.is_blank(raw_id) or isinstance(raw_id, (dict, list)) else unescape(str(raw_id).strip())
            )
            rejects.add(row, item_id, as_reject(exc))
    return candidates


def _validated(
    candidates: list[tuple[str, RawRow]],
    dataset: DatasetConfig,
    ingest: IngestConfig,
    fixed_split: str | None,
    rejects: _Rejects,
) -> list[dict[str, Any]]:
    """Manifest records of the rows that validate (images decoded in `ingest.workers` threads)."""
    root = Path(dataset.dir)

    def check(pair: tuple[str, RawRow]) -> dict[str, Any] | RejectError:
        try:
            return validate_row(pair[0], pair[1], dataset, root, ingest, fixed_split)
        except Exception as exc:  # noqa: BLE001 - one row's problem is that row's reject, never the run's
            return as_reject(exc)

    accepted: list[dict[str, Any]] = []
    progress = runtime.Progress("ingest: validated", len(candidates), "rows")
    with ThreadPoolExecutor(max_workers=ingest.workers) as pool:
        for (item_id, row), result in zip(candidates, pool.map(check, candidates)):
            if isinstance(result, RejectError):
                rejects.add(row, item_id, result)
            else:
                accepted.append(result)
            progress.update()
    progress.close()
    return accepted


def _label_vocabulary(
    accepted: list[dict[str, Any]], cfg: DatasetConfig, min_count: int, fixed: list[str] | None = None
) -> tuple[list[str], Counter]:
    """The task's label names (from the train split, or `fixed`) and the labels left out, with counts."""
    everywhere = Counter(lab for r in accepted if r[schema.LABELS] for lab in r[schema.LABELS])
    if fixed is not None:  # scoring: the model's labels, whatever this dataset holds
        vocab = list(fixed)
    elif cfg.labels.kind == "binary":
        return [cfg.labels.positive_name], Counter()
    else:
        train = Counter(
            lab for r in accepted if r[schema.SPLIT] == "train" and r[schema.LABELS] for lab in r[schema.LABELS]
        )
        vocab = sorted(lab for lab, n in train.items() if n >= min_count)
    return vocab, Counter({lab: n for lab, n in everywhere.items() if lab not in vocab})


def _keep_known_labels(
    accepted: list[dict[str, Any]],
    vocab: list[str],
    reject_below: int | None,
    rows: dict[str, RawRow],
    rejects: _Rejects,
) -> list[dict[str, Any]]:
    """Drop labels outside the vocabulary; with `reject_below` (multiclass training: the minimum train
    count), a row left without its class is rejected."""
    kept = []
    for rec in accepted:
        labels = rec[schema.LABELS]
        if labels is not None:
            rec[schema.LABELS] = [lab for lab in labels if lab in vocab]
            if reject_below is not None and not rec[schema.LABELS]:
                rejects.add(
                    rows[rec[schema.ID]],
                    rec[schema.ID],
                    RejectError("bad_label", f"class {labels[0]!r} has fewer than {reject_below} train rows"),
                )
                continue
        kept.append(rec)
    return kept


def _manifest_metadata(dataset: DatasetConfig, vocab: list[str]) -> dict[str, Any]:
    return {
        "kind": "manifest",
        "dataset": to_dict(dataset),
        "task": dataset.labels.kind if dataset.labels.column else None,
        "label_names": vocab if dataset.labels.column else [],
        "fields": {
            "text": list(dataset.text),
            "lists": list(dataset.lists),
            "numeric": list(dataset.numeric),
            "categorical": list(dataset.categorical),
        },
    }


def _counts(
    rows: list[RawRow],
    accepted: list[dict[str, Any]],
    rejects: _Rejects,
    split_names: tuple[str, ...],
    label_names: list[str],
    dropped: Counter,
) -> dict[str, Any]:
    """The ingest metrics: read = accepted + rejected, per reason, per split and per label."""
    by_reason = Counter(r[schema.REASON] for r in rejects)
    return {
        "read": len(rows),
        "accepted": len(accepted),
        "rejected": len(rejects),
        "reject_fraction": round(len(rejects) / len(rows), 6) if rows else 0.0,
        "rejected_by_reason": {reason: by_reason.get(reason, 0) for reason in schema.REJECT_REASONS},
        "splits": {s: sum(1 for r in accepted if r[schema.SPLIT] == s) for s in split_names},
        "labels": {
            s: dict(
                sorted(
                    Counter(
                        lab for r in accepted if r[schema.SPLIT] == s and r[schema.LABELS] for lab in r[schema.LABELS]
                    ).items()
                )
            )
            for s in split_names
        },
        "label_names": label_names,
        "labels_dropped": dict(sorted(dropped.items())),
    }


def _check_limits(metrics: dict[str, Any], root: Path, ingest: IngestConfig, rejects_path: Path) -> None:
    """Fail the run (after its outputs are written) when it has no rows, too many rejects or no accepted row."""
    if not metrics["read"]:
        raise IngestError(f"{root}: the dataset has no rows")
    if metrics["reject_fraction"] > ingest.max_reject_fraction:
        top = ", ".join(
            f"{k}={v}" for k, v in sorted(metrics["rejected_by_reason"].items(), key=lambda kv: (-kv[1], kv[0])) if v
        )  # most first, then by name
        raise IngestError(
            f"{metrics['rejected']} of {metrics['read']} rows rejected ({metrics['reject_fraction']:.1%}), more than "
            f"ingest.max_reject_fraction={ingest.max_reject_fraction:.1%} ({top}); see {rejects_path}"
        )
    if not metrics["accepted"]:
        raise IngestError(f"{root}: no row was accepted; see {rejects_path}")


def check_media_folders(rows: list[RawRow], dataset: DatasetConfig, root: Path) -> None:
    """One error, up front, when a folder the image paths go through resolves outside the dataset folder
    (a media folder that is a symlink to elsewhere): every row under it would be an unsafe_path reject."""
    if not dataset.image:
        return
    real_root = root.resolve()
    seen: set[tuple[str, ...]] = set()
    for row in rows:
        value = (row.data or {}).get(dataset.image)
        if not isinstance(value, str) or not value.strip() or "\x00" in value or value[1:2] == ":":
            continue
        rel = PurePosixPath(value.strip().replace("\\", "/"))
        if rel.is_absolute() or ".." in rel.parts:
            continue  # rejected row by row as unsafe_path
        for depth in range(1, len(rel.parts)):
            folder = rel.parts[:depth]
            if folder in seen:
                continue
            seen.add(folder)
            path = root.joinpath(*folder)
            try:
                real = path.resolve()
            except (OSError, RuntimeError):
                break
            if path.is_dir() and not real.is_relative_to(real_root):
                raise IngestError(
                    f"the media folder {path} resolves to {real}, outside the dataset folder {real_root}; media "
                    "must live inside the dataset folder (a symlink leading out is refused for safety), so every "
                    f"row under it would be rejected. Point dataset.dir at a folder that holds the media itself, "
                    f"or copy (or bind-mount) the media into {root}."
                )


# the stage's settings and paths, plus what scoring passes to reuse it (a fixed split, the model's labels,
# rows already read, no size limits): one entry point for both
def run_ingest(
    dataset: DatasetConfig,
    ingest: IngestConfig,
    out_dir: Path,
    metrics_path: Path,
    fixed_split: str | None = None,
    vocabulary: list[str] | None = None,
    rows: list[RawRow] | None = None,
    check_limits: bool = True,
) -> dict[str, Any]:
    """Validate the dataset and write manifest.parquet, rejects.parquet and the metrics JSON.

    Scoring a new dataset with a trained model passes `fixed_split` (every row gets this split),
    `vocabulary` (the model's label names), the `rows` it has read already (read_rows), and
    `check_limits=False` (a batch job: no reject limit, and no accepted row is not an error).
    """
    t0 = time.perf_counter()
    root = Path(dataset.dir)
    rows = read_rows(dataset, root, max_field_chars=ingest.max_field_chars) if rows is None else rows
    log.info("read %d rows from %s (%s)", len(rows), root, dataset.format)
    check_media_folders(rows, dataset, root)

    rejects = _Rejects()
    candidates = _prechecked(rows, dataset, rejects)
    accepted = _validated(candidates, dataset, ingest, fixed_split, rejects)
    vocab, dropped = _label_vocabulary(accepted, dataset, ingest.min_label_count, vocabulary)
    if dataset.labels.column and dataset.labels.kind != "binary":
        multiclass_training = dataset.labels.kind == "multiclass" and vocabulary is None
        accepted = _keep_known_labels(
            accepted, vocab, ingest.min_label_count if multiclass_training else None, dict(candidates), rejects
        )
    accepted.sort(key=lambda r: r[schema.ID])
    rejects.sort(key=lambda r: r[schema.SOURCE_ROW])

    meta = _manifest_metadata(dataset, vocab)
    out_dir.mkdir(parents=True, exist_ok=True)
    sch = schema.manifest_schema(dataset.text, list(dataset.lists), dataset.numeric, dataset.categorical)
    pq.write_table(
        pa.Table.from_pylist(accepted, schema=schema.with_metadata(sch, meta)),
        out_dir / "manifest.parquet",
        compression="zstd",
    )
    pq.write_table(
        pa.Table.from_pylist(rejects, schema=schema.REJECTS_SCHEMA), out_dir / "rejects.parquet", compression="zstd"
    )

    metrics = _counts(
        rows, accepted, rejects, (fixed_split,) if fixed_split else schema.SPLITS, meta["label_names"], dropped
    )
    assert metrics["read"] == metrics["accepted"] + metrics["rejected"], "ingest lost rows"
    runtime.write_json(metrics_path, metrics)
    log.info(
        "accepted %d, rejected %d of %d rows (%s) in %.1f s",
        metrics["accepted"],
        metrics["rejected"],
        metrics["read"],
        {k: v for k, v in metrics["rejected_by_reason"].items() if v},
        time.perf_counter() - t0,
    )
    if check_limits:
        _check_limits(metrics, root, ingest, out_dir / "rejects.parquet")
    return metrics
