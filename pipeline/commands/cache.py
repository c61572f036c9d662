"""`dmms cache`: what the per-item extraction cache holds, and keeping it small.

    dmms cache list                    one line per extractor folder: kind, model, entries, size, in use
    dmms cache prune [--dry-run]       delete the folders no extractor of the params uses
    dmms cache compact                 merge each folder's parts into one (one entry per key)

The cache root is params extract.job.cache_dir (or --cache-dir). "In use" means: the fingerprint of an
extractor configured in extract.modalities here (installed models, libraries and code). A meta
modality's fingerprint depends on the statistics fitted on a manifest (a fitted kind): give --manifest
to tell (and prune) its folders; without it they are kept. Run prune and compact while no extraction runs.

params: extract.job, extract.modalities. Library: pipeline.cache, pipeline.extract.
"""

from __future__ import annotations

import datetime
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline import cache, extract, extractors, runtime
from pipeline.config import section


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _in_use(params: dict[str, Any], manifest: str | None) -> tuple[dict[str, str], bool]:
    """folder-name prefix -> modality for the extractors of the params; whether meta could be told."""
    raw = section(params, "extract.modalities", lambda r, where: r) or {}
    specs = [extract.modality(name, value) for name, value in raw.items()]
    fps = extract.current_fingerprints(specs, Path(manifest) if manifest else None)
    used = {f"{spec.kind}-{fps[spec.name][:16]}": spec.name for spec in specs if fps[spec.name]}
    return used, all(fp is not None for fp in fps.values())


def _fitted(kind: str) -> bool:
    """Whether a folder's kind fits statistics on a manifest (meta): its fingerprint needs --manifest."""
    try:
        return extractors.get(kind).fitted
    except ValueError:  # a kind no longer installed: its folder is unused
        return False


def _table(rows: list[dict[str, Any]], used: dict[str, str], fitted_known: bool) -> str:
    lines = [f"{'folder':<26} {'model':<34} {'entries':>8} {'parts':>5} {'size':>9}  {'last written':<16}  in use"]
    for r in rows:
        when = (
            datetime.datetime.fromtimestamp(r["last_written"]).strftime("%Y-%m-%d %H:%M") if r["last_written"] else "-"
        )
        status = used.get(r["folder"]) or ("? (give --manifest)" if _fitted(r["kind"]) and not fitted_known else "no")
        extra = f"  [{r['quarantined']} quarantined]" if r["quarantined"] else ""
        lines.append(
            f"{r['folder']:<26} {str(r['model_id'])[:34]:<34} {r['entries']:>8} {r['parts']:>5} "
            f"{_size(r['bytes']):>9}  {when:<16}  {status}{extra}"
        )
    total = sum(r["bytes"] for r in rows)
    lines.append(f"{len(rows)} folder(s), {sum(r['entries'] for r in rows)} entries, {_size(total)}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """The entry point (argv without the program name)."""
    p = runtime.parser(
        "dmms cache",
        "List, prune and compact the per-item extraction cache.",
        "dmms cache prune --manifest data/ingest/manifest.parquet --dry-run",
    )
    p.add_argument("action", choices=("list", "prune", "compact"))
    p.add_argument("--cache-dir", help="the cache root (default: params extract.job.cache_dir)")
    p.add_argument("--manifest", help="a canonical manifest: tells which meta folder the params use")
    p.add_argument("--dry-run", action="store_true", help="prune: say what would be deleted, delete nothing")
    args = p.parse_args(argv)
    params = runtime.setup(args)
    root = args.cache_dir or section(params, "extract.job", extract.JobConfig).cache_dir
    if not root:
        raise runtime.UserError("no cache: extract.job.cache_dir is null and no --cache-dir was given")
    root = Path(root)
    rows = [cache.describe_folder(f) for f in cache.folders(root)]
    if args.action == "compact":
        for r in rows:
            if r["dim"] is None:
                print(f"{r['folder']}: no readable {cache.ABOUT}, left as it is")
                continue
            got = cache.compact(cache.FeatureCache.at(root / r["folder"], r["dim"]))
            print(
                f"{r['folder']}: {got['parts_before']} part(s), {got['entries_before']} entries -> "
                f"{got['parts_after']} part(s), {got['entries_after']} entries"
            )
        return
    used, fitted_known = _in_use(params, args.manifest)
    if args.action == "list":
        print(_table(rows, used, fitted_known))
        return
    drop = [r for r in rows if r["folder"] not in used and (fitted_known or not _fitted(r["kind"]))]
    for r in drop:
        print(
            f"{'would delete' if args.dry_run else 'deleting'} {root / r['folder']} ({r['kind']}, "
            f"{r['model_id']}, {r['entries']} entries, {_size(r['bytes'])})"
        )
        if not args.dry_run:
            shutil.rmtree(root / r["folder"])
    kept = len(rows) - len(drop)
    print(
        f"{len(drop)} folder(s) {'to delete' if args.dry_run else 'deleted'}, {kept} kept "
        f"({_size(sum(r['bytes'] for r in drop))} {'would be' if args.dry_run else ''} freed)".replace("  ", " ")
    )
