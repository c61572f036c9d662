"""What a warm run pays to look up and check its cached entries, per entry, at 10x apart.

    python benchmarks/cache_lookup.py --base 10000 --dim 1280

Writes a cache folder of `base` and `10 * base` entries (random `dim`-d vectors, one element each, in
parts of 20,000 rows, as runs that computed that many would), then times, in the same run:
- baseline: `locate` alone (the key columns: what the cache read before parts were verified);
- `locate_verified`: locate plus the page-checksum pass over every part that holds a wanted entry,
  which is what lets a damaged part be moved aside and recomputed instead of failing the run;
- `gather`: reading the entries back as the assembly does (the same bytes once more).
No model runs: this measures the cache machinery only. Prints seconds and microseconds per entry.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline import cache, features

PART_ROWS = 20_000


def build(root: Path, n: int, dim: int) -> tuple[cache.FeatureCache, list[str]]:
    store = cache.FeatureCache(root, "image", "b" * 64, dim)
    rng = np.random.default_rng(n)
    keys = [f"{i:032x}" for i in range(n)]
    sch = cache.raw_schema(dim)
    for start in range(0, n, PART_ROWS):
        part = keys[start : start + PART_ROWS]
        vecs = rng.standard_normal((len(part), dim), dtype=np.float32)
        values = pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), dim)
        vectors = pa.ListArray.from_arrays(pa.array(np.arange(len(part) + 1, dtype=np.int32)), values)
        elements = pa.array([[features.element(index=0)]] * len(part), pa.list_(features.ELEMENT_TYPE))
        table = pa.table([pa.array(part), vectors, elements, pa.nulls(len(part), pa.list_(pa.int32()))], schema=sch)
        store.write_part([table])
    return store, keys


def timed(fn, *args) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def located(store: cache.FeatureCache, keys: list[str], verified: bool) -> cache.KeyIndex:
    index = cache.KeyIndex(cache.key_array(keys))
    (store.locate_verified if verified else store.locate)(index)
    return index


def count_rows(found: cache.KeyIndex, ids: list[str], dim: int) -> int:
    return sum(t.num_rows for t in cache.gather(found, pa.array(ids), found.found(), dim))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=1280)
    args = ap.parse_args()
    print(
        f"{'entries':>8} {'MB':>7} {'locate s':>9} {'us/entry':>9} {'+verify s':>10} {'us/entry':>9} "
        f"{'gather s':>9} {'us/entry':>9}"
    )
    for n in (args.base, 10 * args.base):
        with tempfile.TemporaryDirectory() as tmp:
            store, keys = build(Path(tmp), n, args.dim)
            mb = sum(p.stat().st_size for p in store.parts()) / 1e6
            t_loc, found = timed(located, store, keys, False)
            t_ver, found2 = timed(located, store, keys, True)
            assert found.found().sum() == found2.found().sum() == n
            t_gat, _ = timed(count_rows, found, keys, args.dim)
            print(
                f"{n:>8} {mb:>7.0f} {t_loc:>9.2f} {1e6 * t_loc / n:>9.1f} {t_ver:>10.2f} {1e6 * t_ver / n:>9.1f} "
                f"{t_gat:>9.2f} {1e6 * t_gat / n:>9.1f}"
            )


if __name__ == "__main__":
    main()
