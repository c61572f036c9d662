"""Readers of raw datasets (CSV, JSONL, the MM-IMDb layout): every row of the source, parsable or not.

Each reader yields one RawRow per record of its source, in source order; a record that cannot be
parsed still yields a row (with its error), so ingest can count and reject it. Used by ingest and by
batch scoring, which reads a new folder under a model's dataset contract.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pipeline import runtime
from pipeline.config import DatasetConfig
from pipeline.records import RejectError


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


def unescape(value: Any) -> Any:
    """Turn bytes kept by surrogateescape back into visible backslash escapes (\\xe9)."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if isinstance(value, dict):
        return {unescape(k): unescape(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [unescape(v) for v in value]
    return value


def raw_json(data: Any) -> str:
    """A row as JSON text; bytes that were not UTF-8 appear backslash-escaped."""
    return json.dumps(unescape(data), ensure_ascii=False, default=str)


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
            raw = raw_json(cells)
            if not cells or all(not c.strip() for c in cells):
                yield RawRow(n, None, raw, RejectError("empty_row", f"line {reader.line_num}: empty row"))
            elif len(cells) != len(header):
                hint = cells[id_index].strip() if id_index is not None and id_index < len(cells) else None
                yield RawRow(
                    n, None, raw,
                    RejectError("malformed_row", f"line {reader.line_num}: {len(cells)} fields, header has {len(header)}"),
                    unescape(hint) or None,
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
            yield RawRow(n, None, raw_json(extra), RejectError("malformed_row", f"{item_id} is listed in split.json but {path.name} is missing"), item_id)
            continue
        blob = path.read_bytes()
        try:
            obj = json.loads(blob.decode("utf-8"))
        except UnicodeDecodeError as exc:
            yield RawRow(n, None, raw_json(extra), RejectError("invalid_utf8", f"{path.name}: {exc}"), item_id)
            continue
        except json.JSONDecodeError as exc:
            yield RawRow(n, None, raw_json(extra), RejectError("malformed_row", f"{path.name}: invalid JSON: {exc}"), item_id)
            continue
        if not isinstance(obj, dict):
            yield RawRow(n, None, raw_json(extra), RejectError("malformed_row", f"{path.name}: expected a JSON object"), item_id)
            continue
        row = {**obj, **extra}
        yield RawRow(n, row, raw_json(row))


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
