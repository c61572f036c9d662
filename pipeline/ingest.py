"""Ingest: read a raw dataset (CSV, JSONL or the MM-IMDb layout), validate every row, and write the
canonical manifest (Parquet), the rejected rows with their reasons, and reconciled counts.

Nothing is dropped silently: every row read ends up either in the manifest or in the rejects file,
and the metrics say how many of each (read = accepted + rejected).
"""
from __future__ import annotations

import csv
import json
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import records, runtime, schema
from pipeline.config import DatasetConfig, IngestConfig, section, to_dict
from pipeline.records import RejectError

log = logging.getLogger(__name__)


class IngestError(runtime.UserError):
    """The dataset as a whole cannot be ingested (bad mapping, too many rejects, nothing accepted)."""


@dataclass
class RawRow:
    """One row as read from the source, before validation."""

    source_row: int  # 1-based position of the row in the source (header excluded)
    data: dict[str, Any] | None  # None when the row could not even be parsed
    raw: str  # the row as text, for the rejects file
    error: RejectError | None = None
    id_hint: str | None = None  # the id, when a row that cannot be parsed still tells it


def _unescape(value: Any) -> Any:
    """Turn bytes kept by surrogateescape back into visible backslash escapes (\\xe9)."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if isinstance(value, dict):
        return {_unescape(k): _unescape(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_unescape(v) for v in value]
    return value


def _raw_json(data: Any) -> str:
    """A row as JSON text; bytes that were not UTF-8 appear backslash-escaped."""
    return json.dumps(_unescape(data), ensure_ascii=False, default=str)


# --------------------------------------------------------------------------------------------
# Readers: each yields every row of the source, parsable or not.
# --------------------------------------------------------------------------------------------


def _read_csv(path: Path, required: list[str], id_column: str) -> Iterator[RawRow]:
    # surrogateescape keeps undecodable bytes so the row can be rejected with its number
    with path.open("r", encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise IngestError(f"{path}: the manifest is empty (no header row)") from None
        header = [h.strip() for h in header]
        missing = [c for c in required if c not in header]
        if missing:
            raise IngestError(
                f"{path}: column(s) {missing} named in params.yaml 'dataset' are not in the header {header}"
            )
        id_index = header.index(id_column) if id_column in header else None
        n = 0
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                n += 1
                yield RawRow(n, None, f"line {reader.line_num}", RejectError("malformed_row", f"line {reader.line_num}: {exc}"))
                continue
            n += 1
            raw = _raw_json(cells)
            if not cells or all(not c.strip() for c in cells):
                yield RawRow(n, None, raw, RejectError("empty_row", f"line {reader.line_num}: empty row"))
            elif len(cells) != len(header):
                hint = cells[id_index].strip() if id_index is not None and id_index < len(cells) else None
                yield RawRow(
                    n, None, raw,
                    RejectError("malformed_row", f"line {reader.line_num}: {len(cells)} fields, header has {len(header)}"),
                    _unescape(hint) or None,
                )
            else:
                yield RawRow(n, dict(zip(header, cells)), raw)


def _read_jsonl(path: Path) -> Iterator[RawRow]:
    with path.open("rb") as fh:
        for n, line in enumerate(fh, start=1):
            raw = line.decode("utf-8", "backslashreplace").rstrip("\r\n")
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield RawRow(n, None, raw, RejectError("invalid_utf8", f"line {n}: {exc}"))
                continue
            if not text.strip():
                yield RawRow(n, None, raw, RejectError("empty_row", f"line {n}: empty line"))
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                yield RawRow(n, None, raw, RejectError("malformed_row", f"line {n}: invalid JSON: {exc}"))
                continue
            if not isinstance(obj, dict):
                yield RawRow(n, None, raw, RejectError("malformed_row", f"line {n}: expected a JSON object"))
                continue
            yield RawRow(n, obj, raw)


def _read_mmimdb(root: Path) -> Iterator[RawRow]:
    """The released MM-IMDb layout: dataset/<id>.json + dataset/<id>.jpeg, and split.json.

    Each row is the item's JSON plus three columns the importer adds: `id` (the file stem),
    `image` (dataset/<id>.jpeg) and `split` (train/dev/test from split.json, blank if unlisted).
    """
    split_file = root / "split.json"
    data_dir = root / "dataset"
    if not split_file.is_file() or not data_dir.is_dir():
        raise IngestError(f"{root}: an MM-IMDb folder needs split.json and dataset/; found {sorted(p.name for p in root.iterdir()) if root.is_dir() else 'no folder'}")
    try:
        splits = json.loads(split_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IngestError(f"{split_file}: not valid JSON: {exc}") from exc
    split_of: dict[str, str] = {}
    for name, ids in splits.items():
        for item_id in ids:
            split_of.setdefault(str(item_id), name)
    stems = {p.stem for p in data_dir.glob("*.json")}
    for n, item_id in enumerate(sorted(stems | set(split_of)), start=1):
        path = data_dir / f"{item_id}.json"
        extra = {"id": item_id, "image": f"dataset/{item_id}.jpeg", "split": split_of.get(item_id, "")}
        if item_id not in stems:
            yield RawRow(n, None, _raw_json(extra), RejectError("malformed_row", f"{item_id} is listed in split.json but {path.name} is missing"), item_id)
            continue
        blob = path.read_bytes()
        try:
            obj = json.loads(blob.decode("utf-8"))
        except UnicodeDecodeError as exc:
            yield RawRow(n, None, _raw_json(extra), RejectError("invalid_utf8", f"{path.name}: {exc}"), item_id)
            continue
        except json.JSONDecodeError as exc:
            yield RawRow(n, None, _raw_json(extra), RejectError("malformed_row", f"{path.name}: invalid JSON: {exc}"), item_id)
            continue
        if not isinstance(obj, dict):
            yield RawRow(n, None, _raw_json(extra), RejectError("malformed_row", f"{path.name}: expected a JSON object"), item_id)
            continue
        row = {**obj, **extra}
        yield RawRow(n, row, _raw_json(row))


def required_columns(cfg: DatasetConfig) -> list[str]:
    """Every source column the mapping names."""
    cols = [cfg.id, *cfg.feature_columns()]
    if cfg.image:
        cols.append(cfg.image)
    if cfg.labels.column:
        cols.append(cfg.labels.column)
    if cfg.split.column:
        cols.append(cfg.split.column)
    return cols


def read_rows(cfg: DatasetConfig, root: Path, optional: frozenset[str] = frozenset()) -> list[RawRow]:
    """Every row of the dataset at `root`, in source order; mapped columns in `optional` may be absent
    from the source (their values read as empty)."""
    required = [c for c in required_columns(cfg) if c not in optional]
    if not root.is_dir():
        raise IngestError(f"dataset folder not found: {root}")
    if cfg.format == "mmimdb":
        rows = list(_read_mmimdb(root))
    else:
        path = root / cfg.manifest
        if not path.is_file():
            raise IngestError(f"manifest not found: {path} (params: dataset.dir / dataset.manifest)")
        rows = list(_read_csv(path, required, cfg.id) if cfg.format == "csv" else _read_jsonl(path))
    if cfg.format != "csv":  # schemaless sources: a mapped column seen in no row is a mapping error
        seen = set().union(*(r.data.keys() for r in rows if r.data is not None))
        absent = [c for c in required if c not in seen]
        if seen and absent:
            raise IngestError(f"{root}: column(s) {absent} named in params.yaml 'dataset' appear in no row; found {sorted(seen)}")
    return rows


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
            data.get(cfg.labels.column), cfg.labels.kind, cfg.labels.separator, cfg.labels.positive_name
        )
        if labels is None and out[schema.SPLIT] in cfg.labels.required_in:
            raise RejectError(
                "missing_label", f"column {cfg.labels.column!r} is empty in the {out[schema.SPLIT]} split"
            )
        out[schema.LABELS] = labels
    else:
        out[schema.LABELS] = None

    for col in cfg.text:
        out[col] = records.parse_text(data.get(col))
    for col, sep in cfg.lists.items():
        out[col] = records.parse_list(data.get(col), sep)
    for col in cfg.numeric:
        out[col] = records.parse_number(data.get(col), col)
    for col in cfg.categorical:
        out[col] = records.parse_category(data.get(col))

    out[schema.IMAGE] = out[schema.IMAGE_WIDTH] = out[schema.IMAGE_HEIGHT] = out[schema.IMAGE_SHA256] = None
    value = data.get(cfg.image) if cfg.image else None
    if records.is_blank(value):
        if cfg.image and cfg.image_required:
            raise RejectError("missing_image", f"column {cfg.image!r} is empty")
    else:
        path = records.resolve_media_path(root, str(value))
        info = records.inspect_image(path, ingest.max_image_pixels)
        out[schema.IMAGE] = path.relative_to(root).as_posix()
        out[schema.IMAGE_WIDTH], out[schema.IMAGE_HEIGHT] = info.width, info.height
        out[schema.IMAGE_SHA256] = info.sha256
    return out


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def _label_vocabulary(accepted: list[dict[str, Any]], cfg: DatasetConfig, min_count: int,
                      fixed: list[str] | None = None) -> tuple[list[str], Counter]:
    if fixed is not None:  # scoring: the model's labels, whatever this dataset holds
        vocab = list(fixed)
        everywhere = Counter(lab for r in accepted if r[schema.LABELS] for lab in r[schema.LABELS])
        return vocab, Counter({lab: n for lab, n in everywhere.items() if lab not in vocab})
    if cfg.labels.kind == "binary":
        return [cfg.labels.positive_name], Counter()
    train = Counter(
        lab for r in accepted if r[schema.SPLIT] == "train" and r[schema.LABELS] for lab in r[schema.LABELS]
    )
    everywhere = Counter(lab for r in accepted if r[schema.LABELS] for lab in r[schema.LABELS])
    vocab = sorted(lab for lab, n in train.items() if n >= min_count)
    dropped = Counter({lab: n for lab, n in everywhere.items() if lab not in vocab})
    return vocab, dropped


def run_ingest(dataset: DatasetConfig, ingest: IngestConfig, out_dir: Path, metrics_path: Path,
               fixed_split: str | None = None, vocabulary: list[str] | None = None,
               rows: list[RawRow] | None = None) -> dict[str, Any]:
    """Validate the dataset and write manifest.parquet, rejects.parquet and the metrics JSON.

    Scoring a new dataset with a trained model passes `fixed_split` (every row gets this split),
    `vocabulary` (the model's label names) and the `rows` it has read already (read_rows).
    """
    t0 = time.perf_counter()
    root = Path(dataset.dir)
    rows = read_rows(dataset, root) if rows is None else rows
    log.info("read %d rows from %s (%s)", len(rows), root, dataset.format)

    rejects: list[dict[str, Any]] = []

    def reject(row: RawRow, item_id: str | None, err: RejectError) -> None:
        rejects.append(
            {schema.SOURCE_ROW: row.source_row, schema.ID: item_id, "reason": err.reason,
             "detail": err.detail, "row": row.raw}
        )

    seen: set[str] = set()
    candidates: list[tuple[str, RawRow]] = []
    for row in rows:
        try:
            candidates.append((precheck(row, dataset, seen), row))
        except RejectError as err:
            raw_id = (row.data or {}).get(dataset.id, row.id_hint)
            reject(row, None if records.is_blank(raw_id) else _unescape(str(raw_id).strip()), err)

    def check(pair: tuple[str, RawRow]) -> dict[str, Any] | RejectError:
        try:
            return validate_row(pair[0], pair[1], dataset, root, ingest, fixed_split)
        except RejectError as err:
            return err

    accepted: list[dict[str, Any]] = []
    last_log = time.perf_counter()
    with ThreadPoolExecutor(max_workers=ingest.workers) as pool:
        for i, ((item_id, row), result) in enumerate(zip(candidates, pool.map(check, candidates)), start=1):
            if isinstance(result, RejectError):
                reject(row, item_id, result)
            else:
                accepted.append(result)
            if time.perf_counter() - last_log > 10:
                rate = i / (time.perf_counter() - t0)
                log.info("validated %d/%d rows (%.0f rows/s, ETA %.0f s)", i, len(candidates), rate, (len(candidates) - i) / rate)
                last_log = time.perf_counter()

    vocab, dropped = _label_vocabulary(accepted, dataset, ingest.min_label_count, vocabulary)
    if dataset.labels.column and dataset.labels.kind != "binary":
        kept = []
        row_by_id = dict(candidates)
        for rec in accepted:
            labels = rec[schema.LABELS]
            if labels is not None:
                rec[schema.LABELS] = [lab for lab in labels if lab in vocab]
                if dataset.labels.kind == "multiclass" and not rec[schema.LABELS] and vocabulary is None:
                    reject(row_by_id[rec[schema.ID]], rec[schema.ID], RejectError(
                        "bad_label", f"class {labels[0]!r} has fewer than {ingest.min_label_count} train rows"))
                    continue
            kept.append(rec)
        accepted = kept

    accepted.sort(key=lambda r: r[schema.ID])
    rejects.sort(key=lambda r: r[schema.SOURCE_ROW])

    out_dir.mkdir(parents=True, exist_ok=True)
    sch = schema.manifest_schema(dataset.text, list(dataset.lists), dataset.numeric, dataset.categorical)
    meta = {
        "kind": "manifest",
        "dataset": to_dict(dataset),
        "task": dataset.labels.kind if dataset.labels.column else None,
        "label_names": vocab if dataset.labels.column else [],
        "fields": {"text": list(dataset.text), "lists": list(dataset.lists),
                   "numeric": list(dataset.numeric), "categorical": list(dataset.categorical)},
    }
    table = pa.Table.from_pylist(accepted, schema=schema.with_metadata(sch, meta))
    pq.write_table(table, out_dir / "manifest.parquet", compression="zstd")
    pq.write_table(pa.Table.from_pylist(rejects, schema=schema.REJECTS_SCHEMA), out_dir / "rejects.parquet", compression="zstd")

    by_reason = Counter(r["reason"] for r in rejects)
    split_names = (fixed_split,) if fixed_split else schema.SPLITS
    metrics = {
        "read": len(rows),
        "accepted": len(accepted),
        "rejected": len(rejects),
        "reject_fraction": round(len(rejects) / len(rows), 6) if rows else 0.0,
        "rejected_by_reason": {reason: by_reason.get(reason, 0) for reason in schema.REJECT_REASONS},
        "splits": {s: sum(1 for r in accepted if r[schema.SPLIT] == s) for s in split_names},
        "labels": {
            s: dict(sorted(Counter(lab for r in accepted if r[schema.SPLIT] == s and r[schema.LABELS]
                                   for lab in r[schema.LABELS]).items()))
            for s in split_names
        },
        "label_names": meta["label_names"],
        "labels_dropped": dict(sorted(dropped.items())),
    }
    assert metrics["read"] == metrics["accepted"] + metrics["rejected"], "ingest lost rows"
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    log.info(
        "accepted %d, rejected %d of %d rows (%s) in %.1f s",
        metrics["accepted"], metrics["rejected"], metrics["read"],
        dict(by_reason), time.perf_counter() - t0,
    )

    if not rows:
        raise IngestError(f"{root}: the dataset has no rows")
    if metrics["reject_fraction"] > ingest.max_reject_fraction:
        top = ", ".join(f"{k}={v}" for k, v in by_reason.most_common())
        raise IngestError(
            f"{len(rejects)} of {len(rows)} rows rejected ({metrics['reject_fraction']:.1%}), more than "
            f"ingest.max_reject_fraction={ingest.max_reject_fraction:.1%} ({top}); see {out_dir / 'rejects.parquet'}"
        )
    if not accepted:
        raise IngestError(f"{root}: no row was accepted; see {out_dir / 'rejects.parquet'}")
    return metrics


def read_manifest(path: Path) -> tuple[pa.Table, dict[str, Any]]:
    """Read a canonical manifest and its provenance (a file not written by ingest is refused)."""
    table = pq.read_table(path)
    meta = schema.read_metadata(table.schema)
    if meta.get("kind") != "manifest":
        raise ValueError(f"{path}: expected a canonical manifest, found a {meta.get('kind')!r} file")
    return table, meta


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ingest stage (and of `dmms ingest`)."""
    p = runtime.parser("Validate a raw dataset and write the canonical manifest.")
    p.add_argument("--out", required=True, help="folder for manifest.parquet and rejects.parquet")
    p.add_argument("--metrics", required=True, help="metrics JSON (counts that reconcile)")
    p.add_argument("--dataset-dir", help="override params.yaml dataset.dir")
    args = p.parse_args(argv)
    params, _ = runtime.setup(args.params)
    raw = dict(params.get("dataset") or {})
    if args.dataset_dir:
        raw["dir"] = args.dataset_dir
    dataset = section({"dataset": raw}, "dataset", DatasetConfig)
    run_ingest(dataset, section(params, "ingest", IngestConfig), Path(args.out), Path(args.metrics))
