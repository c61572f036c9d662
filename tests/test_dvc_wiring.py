"""DVC wiring: each stage reruns exactly when its inputs change (tests/test_layout.py checks statically
that its deps list exactly the code it imports and the params it reads).

The pipeline is copied into a temporary DVC project with a tiny demo dataset and reproduced for
real; then every params section (and every subsection) and every module (library, extractors and
stage modules) is changed in turn and `dvc status` must report exactly the stages that list it, and
a real `dvc repro` after a change must run those stages and their descendants only.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, copy_project
from test_layout import stages

pytestmark = pytest.mark.slow

DVC = [sys.executable, "-m", "dvc"]


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(cwd),
    }  # the stages import the copy's pipeline/, not the installed one
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of the pipeline reproduced once on a tiny demo dataset."""
    root = copy_project(tmp_path_factory.mktemp("dvcproj"), demo={"items": 16, "unlabelled": 4, "unlabelled_broken": 0})
    run(DVC + ["init", "--no-scm", "-q"], root)
    run(DVC + ["config", "core.analytics", "false"], root)
    first = run(DVC + ["repro"], root)
    assert set(re.findall(r"Running stage '([^']+)'", first.stdout)) == set(stages())
    return root


def status(root: Path) -> set[str]:
    out = run(DVC + ["status", "--json"], root).stdout
    return set(json.loads(out or "{}"))


def descendants(names: set[str]) -> set[str]:
    """Stages downstream of `names` (through outs -> deps), not including them."""
    st = stages()
    outs = {n: [o if isinstance(o, str) else next(iter(o)) for o in s.get("outs", [])] for n, s in st.items()}
    found: set[str] = set()
    frontier = set(names)
    while frontier:
        nxt = set()
        for n, s in st.items():
            deps = [d for d in s.get("deps", []) if isinstance(d, str)]
            if n not in found | names and any(d.startswith(o) for f in frontier for o in outs[f] for d in deps):
                nxt.add(n)
        found |= nxt
        frontier = nxt
    return found


def params_leaves(params: dict[str, Any]) -> list[tuple[str, ...]]:
    """One scalar leaf of every section and subsection (paths as key tuples)."""
    leaves = []

    def walk(node: dict[str, Any], path: tuple[str, ...]) -> None:
        # `kind` picks the code a foreach stage depends on; changing it is not a settings change
        scalar = next((k for k, v in node.items() if not isinstance(v, dict) and k != "kind"), None)
        if scalar is not None:
            leaves.append(path + (scalar,))
        for k, v in node.items():
            if isinstance(v, dict) and v and len(path) < 3:
                walk(v, path + (k,))

    for section, body in params.items():
        if isinstance(body, dict):
            walk(body, (section,))
    return leaves


def perturb(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, list):
        return [*value, "probe"]
    return f"{value}-probe"


def stages_reading(key: tuple[str, ...]) -> set[str]:
    """Stages whose params entries cover `key` (a whole section, or a dotted key above or at it)."""
    out = set()
    for name, s in stages().items():
        for entry in s.get("params", []):
            entries = [entry] if isinstance(entry, str) else [k for v in entry.values() for k in v]
            for e in entries:
                parts = tuple(e.split("."))
                if key[: len(parts)] == parts:
                    out.add(name)
    return out


def test_second_repro_does_nothing(project):
    again = run(DVC + ["repro"], project)
    assert "Running stage" not in again.stdout
    assert status(project) == set()


def test_each_params_change_invalidates_exactly_the_stages_that_read_it(project):
    original = (project / "params.yaml").read_text()
    params = yaml.safe_load(original)
    checked = 0
    try:
        for key in params_leaves(params):
            changed = yaml.safe_load(original)
            node = changed
            for k in key[:-1]:
                node = node[k]
            if key in (("dataset", "dir"), ("score", "input")):
                continue  # a path: it moves a stage's input, checked by test_dataset_dir_is_a_path_dep
            node[key[-1]] = perturb(node[key[-1]])
            (project / "params.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
            expected = stages_reading(key)
            assert expected, f"no stage reads params key {'.'.join(key)}: remove it or wire it"
            assert status(project) == expected, f"after changing {'.'.join(key)}"
            checked += 1
    finally:
        (project / "params.yaml").write_text(original)
    assert checked >= len(params) and status(project) == set()


def test_each_code_change_invalidates_exactly_the_stages_that_import_it(project):
    modules = sorted((project / "pipeline").rglob("*.py"))
    assert {m.parent.name for m in modules} >= {"pipeline", "extractors", "stages"}
    for module in modules:
        rel = module.relative_to(project).as_posix()
        text = module.read_text()
        module.write_text(text + "\n# probe\n")
        try:
            expected = {n for n, s in stages().items() if rel in s.get("deps", [])}
            assert status(project) == expected, f"after changing {rel}"
        finally:
            module.write_text(text)


def test_a_change_reruns_that_stage_and_what_follows_only(project):
    original = (project / "params.yaml").read_text()
    changed = yaml.safe_load(original)
    changed["demo"]["seed"] += 1  # changes the data, so everything downstream must rerun
    changed["ingest"]["max_image_pixels"] += 1  # ingest reruns but writes identical outputs
    try:
        (project / "params.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
        ran = set(re.findall(r"Running stage '([^']+)'", run(DVC + ["repro"], project).stdout))
        assert ran == {"make_demo"} | descendants({"make_demo"})
        changed["ingest"]["max_image_pixels"] += 1
        (project / "params.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
        out = run(DVC + ["repro"], project).stdout
        ran = set(re.findall(r"Running stage '([^']+)'", out))
        # the stages that read the key (ingest, and score, which ingests new folders) rerun; ingest's
        # outputs are identical, so nothing downstream of it does
        assert ran == stages_reading(("ingest", "max_image_pixels")) == {"ingest", "score"}
    finally:
        (project / "params.yaml").write_text(original)
        run(DVC + ["repro"], project)


def test_dataset_dir_is_a_path_dep(project):
    """ingest depends on the dataset folder itself: editing a file in it reruns ingest only."""
    manifest = project / "data" / "demo" / "raw" / "manifest.csv"
    text = manifest.read_text()
    try:
        manifest.write_text(text + "\n")
        assert status(project) == {"make_demo", "ingest"}  # make_demo's output was modified too
    finally:
        manifest.write_text(text)
    assert status(project) == set()


def test_no_param_is_named_like_a_key_dvc_leaves_out_of_its_run_cache():
    """DVC 3 computes the run-cache key of a stage with every dict key named `size` or `nfiles` left
    out (they are file metadata to it), params included: a param of that name could change and DVC would
    restore the outputs of a run made with another value instead of running the stage."""
    from dvc_data.hashfile.meta import Meta

    banned = {Meta.PARAM_SIZE, Meta.PARAM_NFILES}

    def walk(node, path):
        if isinstance(node, dict):
            for key, value in node.items():
                assert key not in banned, f"params key {'.'.join([*path, key])} is invisible to DVC's run cache"
                walk(value, [*path, key])

    walk(yaml.safe_load((REPO / "params.yaml").read_text()), [])


def test_removing_a_modality_from_params_removes_its_stage_and_training_leaves_it_out(project):
    """extract.modalities drives both the extract stages (dvc.yaml's foreach) and what train uses: a
    modality removed from the params has no stage, and the model trains without it although its old
    folder is still under data/features."""
    params_path = project / "params.yaml"
    original = params_path.read_text()
    params = yaml.safe_load(original)
    del params["extract"]["modalities"]["tags"]
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        listed = run(DVC + ["stage", "list", "--name-only"], project).stdout.split()
        assert "extract@tags" not in listed and "extract@title" in listed
        ran = set(re.findall(r"Running stage '([^']+)'", run(DVC + ["repro"], project).stdout))
        assert "train" in ran and not any(s.startswith("extract@") for s in ran), ran
        metrics = json.loads((project / "data" / "metrics" / "train.json").read_text())
        assert "tags" not in metrics["modalities"] and "title" in metrics["modalities"]
        assert (project / "data" / "features" / "tags" / "features.parquet").is_file(), "left there, not used"
    finally:
        params_path.write_text(original)
        run(DVC + ["repro"], project)
    assert not status(project)
