"""The per-item extraction cache: what an extractor made of one item's input, reused by every later run.

An entry's key is sha256(extractor fingerprint, item input). The fingerprint covers everything that
can change an extractor's output beyond float noise:
- the extractor's provenance (`described`): kind, model id, the sha256 of the weights and of every file
  of a model folder (tokenizer, config, code), the dimension and (meta) the fitted statistics in column
  order;
- its params, except those that only change how fast it runs (batch sizes, device) and those that only
  filter results (OCR confidence, face probability, how many are kept): entries hold the unfiltered
  result and the filters run when the features are assembled;
- the software that computes it (`software`): the versions of the libraries the extractor runs
  (module LIBRARIES), the Python version, a digest of the project's modules that shape the output
  (module SOURCES: their syntax tree without docstrings, so a comment or formatting change keeps the
  cache and any code change drops it), and CACHE_FORMAT for the stored row layout.
The thread count is not in it either: it changes floats by ~1e-6, not results. The item input is the
image sha256 the manifest records (the job checks the bytes it reads against it), or the text / list
values, or the meta values with their column names.

Layout: <root>/<kind>-<fingerprint[:16]>/part-<UTC time>-<random>.parquet, one part per run that
computed something, rows (key, vectors, elements, category_ids), and extractor.json saying which
extractor and params the folder holds. A part is written aside and renamed when complete, so a
killed or failed write never leaves a readable part; readers see only `part-*.parquet`. When a key is
stored twice (two runs computed it at once), the part whose name sorts first wins, so the entry used
never changes once written. A part that cannot be read, or whose pages fail their checksums, is moved
to <folder>/quarantine/ with the reason beside it and its items computed again. The whole folder can
be deleted at any time (the next run computes everything again); `dmms cache` lists, prunes and
compacts it.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import socket
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import features, schema

log = logging.getLogger(__name__)

KEY = "key"
KEY_DTYPE = "S16"  # a key in memory: its 16 bytes (stored as 32 hex characters)
# params that change how fast an extractor runs, never what it outputs
RUNTIME_PARAMS = frozenset(
    {"batch_size", "text_batch_size", "crop_batch_size", "device", "parallel_images", "allow_download"}
)
PART_ROW_GROUP = 1024
# the stored row layout and the glue around the extractors (to_row, filters); bump when either changes
# what an entry holds
CACHE_FORMAT = 2
STALE_PARTIAL_S = 3600  # a write aside untouched this long is from a process that died
QUARANTINE = "quarantine"
ABOUT = "extractor.json"


# ------------------------------------------------------------------ keys


@functools.cache
def installed_version(distribution: str) -> str:
    """The version of a distribution as this process first saw it (a later upgrade on disk is not what a
    running worker has loaded), or 'absent' (an extractor that runs without it)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


@functools.cache
def _module_digest(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise ValueError(f"cannot find the source of module {name}")
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    for node in ast.walk(tree):  # docstrings say, they do not compute
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree, include_attributes=False).encode()).hexdigest()


def record(libraries: Sequence[str], sources: Sequence[str]) -> None:
    """Read the versions and code digests now (when the extractors are imported), so that a long-lived
    worker reports what it loaded, not files edited or upgraded on its disk since."""
    for d in libraries:
        installed_version(d)
    for m in sources:
        _module_digest(m)


def code_digest(modules: Sequence[str]) -> str:
    """sha256 over the syntax trees (docstrings removed) of the project modules that shape an output."""
    return hashlib.sha256("\n".join(f"{m}:{_module_digest(m)}" for m in sorted(modules)).encode()).hexdigest()


def software(libraries: Sequence[str], sources: Sequence[str]) -> dict[str, Any]:
    """What computes an extractor's output besides its model: library versions, Python, project code."""
    return {
        "libraries": {d: installed_version(d) for d in sorted(libraries)},
        "python": ".".join(platform.python_version_tuple()[:2]),
        "code": code_digest(sources),
        "cache_format": CACHE_FORMAT,
    }


def fingerprint(
    described: dict[str, Any], params: dict[str, Any], filter_params: Iterable[str], soft: dict[str, Any]
) -> str:
    """sha256 over an extractor's provenance (`described`), its params minus the runtime-only and
    filter-only ones, and the software that runs it (`soft`, see software())."""
    skip = RUNTIME_PARAMS | set(filter_params)
    payload = {"described": described, "params": {k: v for k, v in params.items() if k not in skip}, "software": soft}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def item_key(fp: str, value: Any) -> str:
    """The cache key of one item: the extractor's fingerprint and the item's input value."""
    blob = json.dumps(value, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(f"{fp}\x00{blob}".encode("utf-8", "surrogatepass")).hexdigest()[:32]


def raw_schema(dim: int) -> pa.Schema:
    """A cache part's schema: the feature schema with the key in place of the id."""
    sch = features.feature_schema(dim)
    return pa.schema([pa.field(KEY, pa.string(), nullable=False), *[f for f in sch if f.name != schema.ID]])


_NIBBLE = np.full(256, 255, np.uint8)
_NIBBLE[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint8)
_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)


def key_array(keys: pa.Array | pa.ChunkedArray | Sequence[str]) -> np.ndarray:
    """Cache keys (32 lowercase hex characters each) as 16-byte values, no Python objects. Compare and
    sort them as they are; turn them back into text with key_text() (the bytes may end in NULs, which
    numpy drops from a single value)."""
    values = keys.to_numpy(zero_copy_only=False) if isinstance(keys, pa.Array | pa.ChunkedArray) else keys
    try:
        text = np.asarray(values, dtype="S33")  # one byte more than a key: a longer value is seen, not cut
    except UnicodeEncodeError:
        raise ValueError("not a cache key (32 hex characters): a non-ASCII value") from None
    digits = _NIBBLE[text.view(np.uint8).reshape(-1, 33)[:, :32]]
    if len(text) and (digits.max() > 15 or (np.char.str_len(text) != 32).any()):
        bad = next(k for k in text.tolist() if len(k) != 32 or _NIBBLE[np.frombuffer(k, np.uint8)].max() > 15)
        raise ValueError(f"not a cache key (32 hex characters): {bad!r}")
    return np.ascontiguousarray((digits[:, 0::2] << 4) | digits[:, 1::2]).view(KEY_DTYPE).reshape(-1)


def key_text(keys: np.ndarray) -> np.ndarray:
    """16-byte keys (key_array) back to their 32 hex characters."""
    raw = np.ascontiguousarray(keys).view(np.uint8).reshape(-1, 16)
    out = np.empty((len(raw), 32), np.uint8)
    out[:, 0::2], out[:, 1::2] = _HEX[raw >> 4], _HEX[raw & 15]
    return out.view("S32").reshape(-1)


class KeyIndex:
    """Where the cache holds each item's entry, kept as arrays (~36 bytes an item).

    Built from the items' keys in manifest order (the array given is sorted in place: consumed), `inv`
    maps an item to its distinct key, and for each
    distinct key `part` (an index into `parts`, -1 while not found) and `row` say where its entry is."""

    def __init__(self, keys: np.ndarray):
        order = np.argsort(keys, kind="stable").astype(np.int32 if len(keys) < 2**31 else np.int64)
        keys.sort(kind="stable")  # in place (the caller's array is consumed): no sorted copy beside it
        new = np.empty(len(keys), dtype=bool)
        new[:1] = True
        np.not_equal(keys[1:], keys[:-1], out=new[1:])
        self.uniq = keys[new]
        self.first = order[new]  # each distinct key's first item (the stable sort keeps item order)
        # item -> its distinct key (np.unique(return_inverse) does the same with more temporaries)
        self.inv = np.empty(len(keys), np.int32 if len(keys) < 2**31 else np.int64)
        self.inv[order] = np.cumsum(new, dtype=self.inv.dtype) - 1
        self.clear()

    def clear(self) -> None:
        self.part = np.full(len(self.uniq), -1, np.int32)
        self.row = np.zeros(len(self.uniq), np.int32)  # a part holds fewer than 2**31 rows
        self.parts: list[Path] = []

    def add_part(self, path: Path, part_keys: np.ndarray) -> int:
        """Place the keys of one part not placed yet (a key stored twice in it: its first row); returns how
        many were placed."""
        if not len(self.uniq) or not len(part_keys):
            return 0
        pos = np.minimum(np.searchsorted(self.uniq, part_keys), len(self.uniq) - 1)
        rows = np.flatnonzero((self.uniq[pos] == part_keys) & (self.part[pos] < 0))
        if not len(rows):
            return 0
        first = np.unique(pos[rows], return_index=True)[1]
        rows = rows[first]
        self.part[pos[rows]] = len(self.parts)
        self.row[pos[rows]] = rows
        self.parts.append(path)
        return len(rows)

    def entries(self) -> dict[str, tuple[Path, int]]:
        """{key: (part, row)} of the keys found (for a look; the run itself keeps the arrays)."""
        placed = np.flatnonzero(self.part >= 0)
        text = key_text(self.uniq[placed])
        return {k.decode(): (self.parts[self.part[i]], int(self.row[i])) for k, i in zip(text, placed.tolist())}

    def used_parts(self) -> set[Path]:
        return {self.parts[p] for p in np.unique(self.part[self.part >= 0]).tolist()}

    def found(self) -> np.ndarray:
        """Per item: True where its key has an entry."""
        return self.part[self.inv] >= 0

    def item_part(self) -> np.ndarray:
        return self.part[self.inv]

    def item_row(self) -> np.ndarray:
        return self.row[self.inv]


# ------------------------------------------------------------------ one extractor's folder

_READ_ERRORS = (pa.ArrowException, OSError, ValueError, EOFError)


def _part_name() -> str:
    """A part's file name: UTC time first, so names sort by when they were written (first wins)."""
    return f"part-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%fZ')}-{uuid.uuid4().hex[:12]}.parquet"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FeatureCache:
    """One extractor's folder of cache parts."""

    def __init__(self, root: Path, kind: str, fp: str, dim: int, about: dict[str, Any] | None = None):
        self.folder = Path(root) / f"{kind}-{fp[:16]}"
        self.fp, self.dim, self.about = fp, dim, about or {}
        self.quarantined: list[str] = []  # parts moved aside in this process, with their reason

    @classmethod
    def at(cls, folder: Path, dim: int) -> FeatureCache:
        """The cache of an existing extractor folder (maintenance: `dmms cache compact`)."""
        store = cls(folder.parent, "", "", dim)
        store.folder = folder
        return store

    def parts(self) -> list[Path]:
        """The complete parts, in name order (the order in which duplicates are resolved)."""
        return sorted(self.folder.glob("part-*.parquet")) if self.folder.is_dir() else []

    def quarantine(self, part: Path, reason: str) -> None:
        """Move a damaged part aside (never read again, kept for a look) and say so, naming it."""
        aside = self.folder / QUARANTINE
        aside.mkdir(exist_ok=True)
        try:
            os.replace(part, aside / part.name)
        except FileNotFoundError:
            return  # another process moved it first
        (aside / f"{part.name}.reason.txt").write_text(reason + "\n", encoding="utf-8")
        self.quarantined.append(f"{part.name}: {reason}")
        log.warning("cache part %s is damaged (%s): moved to %s; its items are computed again", part, reason, aside)

    def clean_partials(self) -> list[Path]:
        """Remove the writes aside of processes that died: older than STALE_PARTIAL_S, or of a process of
        this machine that no longer runs. A write in progress elsewhere is left alone."""
        removed = []
        host = socket.gethostname()
        for path in self.folder.glob(".part-*.partial") if self.folder.is_dir() else []:
            bits = path.name.split("~")  # .part-<...>.parquet~<host>~<pid>.partial
            try:
                stale = time.time() - path.stat().st_mtime > STALE_PARTIAL_S
            except FileNotFoundError:
                continue
            if len(bits) == 3 and bits[1] == host and bits[2].removesuffix(".partial").isdigit():
                stale = stale or not _pid_alive(int(bits[2].removesuffix(".partial")))
            if stale:
                path.unlink(missing_ok=True)
                removed.append(path)
        if removed:
            log.info("cache %s: removed %d write(s) left by killed runs", self.folder, len(removed))
        return removed

    def locate(self, index: KeyIndex, parts: list[Path] | None = None) -> None:
        """Record in `index` where its keys are stored, for the keys found in `parts` (default all) and not
        placed yet: the first part in name order wins. Reads the key columns only; a part whose keys cannot
        be read is quarantined."""
        for part in self.parts() if parts is None else sorted(parts):
            try:
                part_keys = pq.ParquetFile(part, page_checksum_verification=True).read(columns=[KEY])[KEY]
                index.add_part(part, key_array(part_keys))
            except FileNotFoundError:
                continue  # compacted or quarantined by another process meanwhile
            except _READ_ERRORS as exc:
                self.quarantine(part, f"unreadable: {type(exc).__name__}: {str(exc)[:200]}")

    def verify(self, parts: Iterable[Path]) -> list[Path]:
        """Read every page of `parts` with its checksum, a row group at a time; quarantine the parts that
        fail and return them."""
        bad = []
        for part in sorted(set(parts)):
            try:
                pf = pq.ParquetFile(part, page_checksum_verification=True)
                for g in range(pf.num_row_groups):
                    table = pf.read_row_group(g).cast(raw_schema(self.dim))
                    if table.num_rows != pf.metadata.row_group(g).num_rows:
                        raise ValueError(
                            f"row group {g} holds {table.num_rows} rows, its footer says "
                            f"{pf.metadata.row_group(g).num_rows}"
                        )
            except _READ_ERRORS as exc:
                self.quarantine(part, f"corrupt: {type(exc).__name__}: {str(exc)[:200]}")
                bad.append(part)
        return bad

    def locate_verified(self, index: KeyIndex) -> None:
        """locate() into a fresh `index`, with every part that holds a wanted entry verified first: entries
        of a damaged part are looked up again in the others (a duplicate may live there) or stay missing."""
        while True:
            index.clear()
            self.locate(index)
            if not self.verify(index.used_parts()):
                return

    def write_about(self) -> None:
        """extractor.json: for people, which extractor, params and software this folder holds."""
        about = self.folder / ABOUT
        if about.exists():
            return
        aside = self.folder / f".extractor-{uuid.uuid4().hex}.json"
        aside.write_text(json.dumps({"fingerprint": self.fp, **self.about}, indent=1, sort_keys=True, default=str))
        os.replace(aside, about)

    def write_part(self, tables: Iterable[pa.Table]) -> tuple[Path | None, int]:
        """Write one part from a stream of raw tables (key first); returns (part, rows) or (None, 0) when
        the stream is empty. Complete or absent: written aside, renamed when closed."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.write_about()
        name = _part_name()
        aside = self.folder / f".{name}~{socket.gethostname()}~{os.getpid()}.partial"
        sch, rows, writer = raw_schema(self.dim), 0, None
        try:
            for table in tables:
                if not table.num_rows:
                    continue
                if writer is None:
                    writer = pq.ParquetWriter(aside, sch, compression="zstd", write_page_checksum=True)
                writer.write_table(table.select(sch.names).cast(sch), row_group_size=PART_ROW_GROUP)
                rows += table.num_rows
            if writer is None:
                return None, 0
            writer.close()
            writer = None
            os.replace(aside, self.folder / name)
        finally:
            if writer is not None:
                writer.close()
            aside.unlink(missing_ok=True)
        return self.folder / name, rows


class PartError(Exception):
    """A cache part that failed while being read (after it was verified)."""

    def __init__(self, part: Path, exc: BaseException):
        super().__init__(f"{part}: {type(exc).__name__}: {str(exc)[:200]}")
        self.part = part


def gather(index: KeyIndex, ids: pa.Array, keep: np.ndarray, dim: int, batch_rows: int = PART_ROW_GROUP):
    """The stored rows of the items `keep` selects (a mask over `ids`, the items of `index`) as feature
    tables, part by part and row group by row group: memory holds one row group, not the modality."""
    items = np.flatnonzero(keep & index.found()).astype(np.int32)
    parts, rows = index.item_part()[items], index.item_row()[items]
    order = np.lexsort((rows, parts))  # by part, then by row: each part read once, front to back
    items, parts, rows = items[order], parts[order], rows[order]
    bounds = np.flatnonzero(np.diff(parts)) + 1
    for in_part in np.split(np.arange(len(items)), bounds) if len(items) else []:
        part = index.parts[int(parts[in_part[0]])]
        try:
            pf = pq.ParquetFile(part, page_checksum_verification=True)
        except _READ_ERRORS as exc:
            raise PartError(part, exc) from None
        starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
        groups = np.searchsorted(starts, rows[in_part], side="right") - 1
        for sel in np.split(in_part, np.flatnonzero(np.diff(groups)) + 1):
            g = int(groups[sel[0] - in_part[0]])
            try:
                table = pf.read_row_group(g, use_threads=False).cast(raw_schema(dim))
            except _READ_ERRORS as exc:
                raise PartError(part, exc) from None
            for start in range(0, len(sel), batch_rows):
                chunk = sel[start : start + batch_rows]
                out = table.take(pa.array(rows[chunk] - int(starts[g]))).drop_columns([KEY])
                yield out.add_column(0, schema.ID, ids.take(pa.array(items[chunk])))


# ------------------------------------------------------------------ maintenance (`dmms cache`)


def describe_folder(folder: Path) -> dict[str, Any]:
    """One extractor folder as `dmms cache list` shows it: kind, model, params, parts, entries, bytes."""
    about: dict[str, Any] = {}
    try:
        about = json.loads((folder / ABOUT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    parts = sorted(folder.glob("part-*.parquet"))
    entries, unreadable = 0, 0
    for part in parts:
        try:
            entries += pq.ParquetFile(part).metadata.num_rows
        except _READ_ERRORS:
            unreadable += 1
    described = about.get("described") or {}
    files = [p for p in folder.rglob("*") if p.is_file()]
    return {
        "folder": folder.name,
        "fingerprint": about.get("fingerprint"),
        "kind": folder.name.rsplit("-", 1)[0],
        "model_id": described.get("model_id"),
        "dim": described.get("dim"),
        "params": about.get("params"),
        "software": about.get("software"),
        "parts": len(parts),
        "entries": entries,
        "unreadable_parts": unreadable,
        "quarantined": len(list((folder / QUARANTINE).glob("part-*.parquet"))),
        "bytes": sum(p.stat().st_size for p in files),
        "last_written": max((p.stat().st_mtime for p in parts), default=None),
    }


def folders(root: Path) -> list[Path]:
    """The extractor folders under a cache root."""
    return (
        sorted(p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith("."))
        if Path(root).is_dir()
        else []
    )


def compact(store: FeatureCache) -> dict[str, int]:
    """Merge every part of `store` into one, an entry per key (the one in use: first part in name order
    wins), streamed a row group at a time. Damaged parts are quarantined, not merged. The merged part
    takes the first part's place in name order, so the entry used for a key never changes. Returns
    counts before and after. Run it while no extraction writes to this folder."""
    store.clean_partials()
    store.verify(store.parts())
    parts = store.parts()
    if len(parts) < 2:
        rows = sum(pq.ParquetFile(p).metadata.num_rows for p in parts)
        return {"parts_before": len(parts), "parts_after": len(parts), "entries_before": rows, "entries_after": rows}
    seen: set[str] = set()
    keep: dict[Path, np.ndarray] = {}
    before = 0
    for part in parts:
        keys = pq.read_table(part, columns=[KEY])[KEY].to_pylist()
        before += len(keys)
        mask = np.zeros(len(keys), dtype=bool)
        for i, key in enumerate(keys):
            if key not in seen:
                seen.add(key)
                mask[i] = True
        keep[part] = mask

    def rows() -> Iterator[pa.Table]:
        for part in parts:
            pf, at = pq.ParquetFile(part, page_checksum_verification=True), 0
            for g in range(pf.num_row_groups):
                table = pf.read_row_group(g).cast(raw_schema(store.dim))
                yield table.filter(pa.array(keep[part][at : at + table.num_rows]))
                at += table.num_rows

    merged, after = store.write_part(rows())
    # named after the first part, so it sorts where that part did: before every other part
    target = parts[0].with_name(parts[0].stem.removesuffix("-compacted") + "-compacted.parquet")
    os.replace(merged, target)
    for part in parts:
        if part != target:
            part.unlink()
    return {"parts_before": len(parts), "parts_after": 1, "entries_before": before, "entries_after": after}
