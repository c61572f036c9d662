"""The extraction jobs on a Dask distributed cluster (runner `dask`, pipeline.dask_runner): a local
cluster of two worker processes gives what the in-process runner gives, and both workers work."""

from __future__ import annotations

import copy

import numpy as np
import pyarrow.parquet as pq
import pytest

pytest.importorskip("distributed")

from test_cache import assert_same_features, grown, run  # noqa: E402,F401  (grown: a fixture)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["image", "title"])
def test_a_two_worker_dask_cluster_equals_the_in_process_runner(grown, tmp_path, name):  # noqa: F811
    params, _, full, root = grown
    params = copy.deepcopy(params)
    params["extract"]["job"]["max_failure_fraction"] = 0.5
    raw = root / "raw"
    victim = raw / pq.read_table(full).to_pylist()[3]["image"]
    good = victim.read_bytes()
    victim.write_bytes(good[:300])  # a cut-short image: a dead letter for the image modality
    try:
        local_m, local, _ = run(params, name, full, tmp_path / "local", None)
        params["extract"]["job"].update(runner="dask", dask={"address": None, "workers": 2, "threads_per_worker": 1})
        dask_m, dist, _ = run(params, name, full, tmp_path / "dask", None)
    finally:
        victim.write_bytes(good)
    assert_same_features(dist, local)  # same ids, vectors within 1e-4, the same elements
    dead = [
        pq.read_table(tmp_path / d / "dead_letters.parquet").select(["id", "modality", "stage"]).to_pylist()
        for d in ("local", "dask")
    ]
    assert dead[0] == dead[1] and len(dead[0]) == (1 if name == "image" else 0)
    assert dask_m["items_in"] == dask_m["written"] + dask_m["failed"] == 12
    items = dask_m["worker_items"]
    assert len(items) == 2 and min(items.values()) > 0, f"both workers finished items: {items}"
    assert sum(items.values()) == 12 and "worker_items" not in local_m
    assert np.isclose(dask_m["elements"], local_m["elements"])
