"""Readers of raw datasets (CSV, JSONL, the MM-IMDb layout): every row of the source, parsable or not.

Each reader yields one RawRow per record of its source, in source order; a record that cannot be
parsed still yields a row (with its error), so ingest can count and reject it. Used by ingest and by
batch scoring, which reads a new folder under a model's dataset contract.
"""

from __future__ import annotations

import csv
import json
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import records, runtime
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
    """Make text safe to store: bytes kept by surrogateescape become visible escapes (\\xe9), and so
    does any other lone surrogate (from a JSON escape such as \\ud800)."""
    if isinstance(value, str):
        try:
            return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {unescape(k): unescape(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [unescape(v) for v in value]
    return value


def raw_json(data: Any) -> str:
    """A row as JSON text; bytes that were not UTF-8 appear backslash-escaped."""
    try:
        return json.dumps(unescape(data), ensure_ascii=False, default=str)
    except ValueError:  # an integer too long to print (Python's 4,300-digit limit)
        return repr(type(data))


# --------------------------------------------------------------------------------------------
# Readers: each yields every record of the source, parsable or not. Blank lines are not records.
# --------------------------------------------------------------------------------------------

# physical lines of a text: \r\n, \n or a lone \r ends one (the line keeps its ending, as csv expects)
_LINE_END = re.compile(r"(?<=\n)|(?<=\r)(?!\n)")
_CSV_FIELD_LIMIT = 2**31 - 1  # the csv module's own limit (131,072) would make it lose its place


def read_bytes(path: Path, what: str) -> bytes:
    """A whole file, a leading UTF-8 BOM dropped; only a regular file is read, so a FIFO or a device
    named like a manifest cannot hang the run."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # opening a FIFO without O_NONBLOCK would wait for a writer
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise IngestError(f"{path}: the {what} is not a regular file")
        data = fh.read()
    return data[3:] if data.startswith(b"\xef\xbb\xbf") else data


def read_text(path: Path, what: str) -> str:
    """A whole text file (see read_bytes); undecodable bytes are kept by surrogateescape."""
    return read_bytes(path, what).decode("utf-8", "surrogateescape")


class _Cursor:
    """An iterator over physical lines that says how far a csv reader has read."""

    def __init__(self, lines: list[str], pos: int):
        self.lines, self.pos = lines, pos

    def __iter__(self) -> _Cursor:
        return self

    def __next__(self) -> str:
        if self.pos >= len(self.lines):
            raise StopIteration
        self.pos += 1
        return self.lines[self.pos - 1]


def _csv_records(lines: list[str], start: int) -> Iterator[tuple[int, int, list[str] | None, str | None]]:
    """(first line, last line, cells or None, error) per CSV record from line index `start` on.

    A record is what RFC 4180 says it is (a quoted field may span lines). A record the parser cannot
    close (a quote opened and never closed, text after a closing quote) is rejected as its first line
    only, and reading resumes on the next line, so one bad quote never swallows the rows after it.
    Blank lines between records are skipped: they are not records.
    """
    cursor = _Cursor(lines, start)
    reader = csv.reader(cursor, strict=True)
    while cursor.pos < len(lines):
        first = cursor.pos
        if not lines[first].strip():
            cursor.pos += 1
            continue
        try:
            cells = next(reader)
        except csv.Error as exc:
            yield first + 1, cursor.pos, None, str(exc)
            cursor.pos = first + 1
            reader = csv.reader(cursor, strict=True)
            continue
        except StopIteration:
            return
        yield first + 1, cursor.pos, cells, None


def _read_csv(path: Path, required: list[str], id_column: str, max_field_chars: int) -> Iterator[RawRow]:
    """CSV with a header row; undecodable bytes are kept (surrogateescape) so that row is rejected alone."""
    csv.field_size_limit(_CSV_FIELD_LIMIT)
    lines = _LINE_END.split(read_text(path, "manifest"))
    records = _csv_records(lines, 0)
    header_rec = next(records, None)
    if header_rec is None:
        raise IngestError(f"{path}: the manifest is empty (no header row)")
    first, _, header, err = header_rec
    if header is None:
        raise IngestError(f"{path}: line {first}: the header row cannot be parsed: {err}")
    header = [h.strip() for h in header]
    dup = sorted({h for h in header if header.count(h) > 1})
    if dup:
        raise IngestError(f"{path}: line {first}: the header names column(s) {dup} more than once")
    missing = [c for c in required if c not in header]
    if missing:
        raise IngestError(f"{path}: column(s) {missing} named in params.yaml 'dataset' are not in the header {header}")
    id_index = header.index(id_column) if id_column in header else None
    for n, (first, last, cells, err) in enumerate(records, start=1):
        where = f"line {first}" if first == last else f"lines {first}-{last}"
        if cells is None:
            yield RawRow(
                n,
                None,
                unescape(lines[first - 1].rstrip("\r\n"))[:10_000],
                RejectError("malformed_row", f"line {first}: {err}; reading resumes on the next line"),
            )
            continue
        raw = raw_json([c[:10_000] for c in cells])
        hint = unescape(cells[id_index].strip()) if id_index is not None and id_index < len(cells) else None
        too_long = [
            header[i] if i < len(header) else f"field {i + 1}" for i, c in enumerate(cells) if len(c) > max_field_chars
        ]
        if len(cells) != len(header):
            yield RawRow(
                n,
                None,
                raw,
                RejectError("malformed_row", f"{where}: {len(cells)} fields, header has {len(header)}"),
                hint or None,
            )
        elif too_long:
            yield RawRow(
                n,
                None,
                raw,
                RejectError(
                    "field_too_large",
                    f"{where}: column(s) {too_long} longer than ingest.max_field_chars={max_field_chars}",
                ),
                hint or None,
            )
        elif all(not c.strip() for c in cells):
            yield RawRow(n, None, raw, RejectError("empty_row", f"{where}: every field is empty"))
        else:
            yield RawRow(n, dict(zip(header, cells)), raw)


def _json_record(text: str, where: str, max_field_chars: int) -> dict[str, Any]:
    """One JSON object from one record's text, or RejectError."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RejectError("malformed_row", f"{where}: invalid JSON: {exc}") from None
    except (ValueError, RecursionError) as exc:  # an integer over Python's digit limit, absurd nesting
        raise RejectError("malformed_row", f"{where}: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(obj, dict):
        raise RejectError("malformed_row", f"{where}: expected a JSON object, found {type(obj).__name__}")
    bad = records.find_bad_utf8(obj)
    if bad is not None:
        raise RejectError(
            "invalid_utf8",
            f"{where}: column {bad!r} holds a lone surrogate (an escape such as \\ud800 that is no character)",
        )
    too_long = [k for k, v in obj.items() if isinstance(v, str) and len(v) > max_field_chars]
    if too_long:
        raise RejectError(
            "field_too_large", f"{where}: column(s) {too_long} longer than ingest.max_field_chars={max_field_chars}"
        )
    return obj


def _read_jsonl(path: Path, max_field_chars: int) -> Iterator[RawRow]:
    """JSON Lines: one object per line; a leading BOM is dropped, blank lines are not records."""
    data = read_bytes(path, "manifest")
    n = 0
    for line_no, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        n += 1
        raw = line.decode("utf-8", "backslashreplace").rstrip("\r")[:10_000]
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield RawRow(n, None, raw, RejectError("invalid_utf8", f"line {line_no}: {exc}"))
            continue
        try:
            yield RawRow(n, _json_record(text, f"line {line_no}", max_field_chars), raw)
        except RejectError as err:
            yield RawRow(n, None, raw, err)


def _read_mmimdb(root: Path, max_field_chars: int) -> Iterator[RawRow]:
    """The released MM-IMDb layout: dataset/<id>.json + dataset/<id>.jpeg, and split.json.

    Each row is the item's JSON plus three columns the importer adds: `id` (the file stem),
    `image` (dataset/<id>.jpeg) and `split` (train/dev/test from split.json, blank if unlisted).
    """
    split_file = root / "split.json"
    data_dir = root / "dataset"
    if not split_file.is_file() or not data_dir.is_dir():
        raise IngestError(
            f"{root}: an MM-IMDb folder needs split.json and dataset/; found "
            f"{sorted(p.name for p in root.iterdir()) if root.is_dir() else 'no folder'}"
        )
    try:
        splits = json.loads(read_text(split_file, "split file"))
        split_of = {str(item_id): name for name, ids in reversed(list(splits.items())) for item_id in ids}
    except (ValueError, RecursionError, TypeError, AttributeError) as exc:
        raise IngestError(f"{split_file}: expected a JSON object of split name -> list of ids: {exc}") from exc
    stems = {p.stem for p in data_dir.glob("*.json")}
    for n, item_id in enumerate(sorted(stems | set(split_of)), start=1):
        path = data_dir / f"{item_id}.json"
        extra = {"id": item_id, "image": f"dataset/{item_id}.jpeg", "split": split_of.get(item_id, "")}
        try:
            if item_id not in stems:
                raise RejectError("malformed_row", f"{item_id} is listed in split.json but {path.name} is missing")
            try:
                text = read_text(path, "item file")
            except (OSError, IngestError) as exc:
                raise RejectError("malformed_row", f"{path.name}: {exc}") from None
            if records.find_bad_utf8({"file": text}) is not None:
                raise RejectError("invalid_utf8", f"{path.name}: the file is not valid UTF-8")
            row = {**_json_record(text, path.name, max_field_chars), **extra}
        except RejectError as err:
            yield RawRow(n, None, raw_json(extra), err, item_id)
            continue
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


def read_rows(
    cfg: DatasetConfig, root: Path, optional: frozenset[str] = frozenset(), max_field_chars: int = 1_000_000
) -> list[RawRow]:
    """Every record of the dataset at `root`, in source order; mapped columns in `optional` may be
    absent from the source (their values read as empty). A field longer than `max_field_chars` makes
    its record a reject."""
    required = [c for c in required_columns(cfg) if c not in optional]
    if not root.is_dir():
        raise IngestError(f"dataset folder not found: {root}")
    if cfg.format == "mmimdb":
        rows = list(_read_mmimdb(root, max_field_chars))
    else:
        path = root / cfg.manifest
        if not path.exists():
            raise IngestError(f"manifest not found: {path} (params: dataset.dir / dataset.manifest)")
        rows = list(
            _read_csv(path, required, cfg.id, max_field_chars)
            if cfg.format == "csv"
            else _read_jsonl(path, max_field_chars)
        )
    if cfg.format != "csv":  # schemaless sources: a mapped column seen in no row is a mapping error
        seen = set().union(*(r.data.keys() for r in rows if r.data is not None))
        absent = [c for c in required if c not in seen]
        if seen and absent:
            raise IngestError(
                f"{root}: column(s) {absent} named in params.yaml 'dataset' appear in no row; found {sorted(seen)}"
            )
    return rows
