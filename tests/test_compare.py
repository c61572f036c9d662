"""Comparisons over seeds: mean ± std per variant, paired differences with a 95% interval, the table
and chart; the same table from a DVC experiments sweep (a real queue, run on a few demo items)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import copy_project
from test_model import train_cfg, write_synthetic

from pipeline import compare

DVC = [sys.executable, "-m", "dvc"]


def test_paired_difference_and_its_interval_by_hand():
    runs = [compare.Run("a", s, {"f1_macro": v}) for s, v in enumerate([0.30, 0.32, 0.34])]
    runs += [compare.Run("b", s, {"f1_macro": v}) for s, v in enumerate([0.20, 0.25, 0.21])]
    p = compare.paired(runs, "a", "b", "f1_macro")
    # differences 0.10, 0.07, 0.13: mean 0.10, sd 0.03, t(0.975, 2) = 4.303
    assert p.n == 3 and p.mean == pytest.approx(0.10)
    assert (p.low, p.high) == pytest.approx((0.10 - 4.303 * 0.03 / 3**0.5, 0.10 + 4.303 * 0.03 / 3**0.5))
    assert p.verdict == "a better"
    assert compare.paired(runs[:1] + runs[3:4], "a", "b", "f1_macro").verdict == "one seed: no interval"


def test_compare_trains_every_variant_and_seed_and_writes_the_table(tmp_path):
    manifest = write_synthetic(tmp_path)
    base = {k: v for k, v in vars(train_cfg(epochs=15, patience=15)).items() if k != "model"}
    base["model"] = {"dim": 16, "dropout": 0.0, "head_hidden": [16]}
    variants = {"set, max": {}, "concat": {"model": {"architecture": "concat"}}, "a only": {"modalities": ["a"]}}
    runs = compare.train_runs(variants, [0, 1, 2], base, manifest, tmp_path / "features", tmp_path / "cmp")
    assert [(r.variant, r.seed) for r in runs] == [(v, s) for v in variants for s in (0, 1, 2)]
    table = compare.write(runs, tmp_path / "cmp", [("set, max", "concat")])
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert set(variants) | {compare.FREQUENCY} <= set(rows)
    assert re.search(r"\| 3 \| 0\.\d{4} ± 0\.\d{4} \|", rows["set, max"]), "three seeds: mean ± std"
    assert "set, max − concat" in table and "95% interval" in table
    saved = json.loads((tmp_path / "cmp" / "runs.json").read_text())
    assert len(saved["runs"]) == 9 and len(saved["paired"]) == len(compare.METRICS)
    by_variant = {s["variant"]: s for s in saved["summary"]}
    # the "a only" model cannot see label B's modality: its macro F1 sits below the full set model's
    assert by_variant["a only"]["mean"]["f1_macro"] < by_variant["set, max"]["mean"]["f1_macro"]
    assert (tmp_path / "cmp" / "chart.svg").read_text().startswith("<svg")
    assert len(list((tmp_path / "cmp" / "models").glob("*/model.pt"))) == 9
    again = compare.write(compare.read_runs(tmp_path / "cmp" / "runs.json"), tmp_path / "again", [("a only", "concat")])
    assert again.split("\n| difference")[0] == table.split("\n| difference")[0], "runs.json re-tables the same"
    assert "a only − concat" in again


def test_runs_are_read_from_dvc_exp_show_and_named_by_what_they_change():
    def rev(name, seed, pooling, f1):
        return {
            "rev": name * 7,
            "name": name,
            "error": None,
            "data": {
                "params": {"params.yaml": {"data": {"base": {"seed": seed}, "train": {"model": {"pooling": pooling}}}}},
                "metrics": {
                    "data/metrics/train.json": {
                        "data": {
                            "test": {m: f1 for m in compare.METRICS},
                            "test_label_frequency_baseline": {"f1_macro": 0.08},
                        }
                    }
                },
            },
        }

    shown = [
        {"rev": "workspace", **rev("w", 0, "max", 0.5)},
        {
            **rev("main", 0, "max", 0.5),
            "experiments": [
                {"revs": [rev("e1", 1, "max", 0.6)]},
                {"revs": [rev("e2", 0, "sum", 0.3)]},
                {"revs": [rev("e3", 1, "sum", 0.4)]},
                {"revs": [{**rev("e4", 2, "sum", 0.1), "error": "failed"}]},
            ],
        },
    ]
    runs = compare.runs_from_experiments(shown)
    assert sorted((r.variant, r.seed, r.test["f1_macro"]) for r in runs) == [
        ("params.yaml as committed", 0, 0.5),
        ("params.yaml as committed", 1, 0.6),
        ("train.model.pooling=sum", 0, 0.3),
        ("train.model.pooling=sum", 1, 0.4),
    ]
    assert compare.summarise(runs)[-1].variant == compare.FREQUENCY


@pytest.mark.slow
def test_a_dvc_experiments_queue_feeds_the_same_table(tmp_path):
    """A git + DVC copy of the pipeline on a 16-item demo; two queued experiments with other seeds, run
    by `dvc queue start`, then `dmms compare --experiments dvc` reads them into the table."""
    root = copy_project(
        tmp_path / "proj",
        demo={"items": 24, "unlabelled": 2, "unlabelled_broken": 0},
        train={"epochs": 3, "patience": 3},
    )
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "PYTHONPATH": str(root),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.org",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.org",
    }

    def run(*cmd: str, timeout: int = 900) -> str:
        done = subprocess.run(list(cmd), cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        return done.stdout

    run("git", "init", "-q")
    run(*DVC, "init", "-q")
    run(*DVC, "repro", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "pipeline on a small demo")
    for seed in (1, 2):  # the train stage only: what a sweep of training settings reruns
        run(*DVC, "exp", "run", "--queue", "train", "-S", f"base.seed={seed}")
    run(*DVC, "queue", "start", "-j", "1")
    for _ in range(300):
        status = run(*DVC, "queue", "status")
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        subprocess.run(["sleep", "2"])
    assert status.count("Success") == 2, status
    out = run(sys.executable, "-m", "pipeline.cli", "compare", "--experiments", "dvc", "--out", str(tmp_path / "cmp"))
    row = next(line for line in out.splitlines() if line.startswith("| params.yaml as committed"))
    assert row.split(" | ")[1] == "3", f"seeds 0 (the commit), 1 and 2: {row}"
    assert (tmp_path / "cmp" / "chart.svg").is_file()
