"""DVC wiring: each stage depends on exactly the code it imports and reruns only when its inputs change.

The pipeline is copied into a temporary DVC project with a tiny demo dataset and reproduced for
real; then every params section (and every subsection) is changed in turn and `dvc status` must
report exactly the stages that list it, and a real `dvc repro` after a change must run those
stages and their descendants only.
"""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import REPO

pytestmark = pytest.mark.slow

DVC = [sys.executable, "-m", "dvc"]


def stages() -> dict[str, dict[str, Any]]:
    """dvc.yaml's stages with ${params.key} templates filled in from params.yaml, as DVC does."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())

    def lookup(m: re.Match) -> str:
        return str(_lookup_value(params, m.group(1)))

    raw = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    out: dict[str, dict[str, Any]] = {}
    for name, body in raw.items():
        if "foreach" not in body:
            out[name] = yaml.safe_load(re.sub(r"\$\{([^}]+)\}", lookup, yaml.safe_dump(body)))
            continue
        m = re.fullmatch(r"\$\{([^}]+)\}", body["foreach"])
        items = _lookup_value(params, m.group(1))
        for key, item in items.items():
            local = {**params, "key": key, "item": item}
            text = re.sub(r"\$\{([^}]+)\}", lambda mm: str(_lookup_value(local, mm.group(1))), yaml.safe_dump(body["do"]))
            out[f"{name}@{key}"] = {**yaml.safe_load(text), "foreach_key": key, "kind": item.get("kind")}
    return out


def _lookup_value(params: dict[str, Any], dotted: str) -> Any:
    node: Any = params
    for k in dotted.split("."):
        node = node[k]
    return node


def script_of(stage: dict[str, Any]) -> str:
    m = re.search(r"python (stages/\S+\.py)", stage["cmd"])
    assert m, f"stage command does not run a stages/ script: {stage['cmd']}"
    return m.group(1)


def pipeline_imports(path: Path, seen: set[str] | None = None) -> set[str]:
    """pipeline/ modules imported by `path`, transitively (any import statement, at any depth)."""
    seen = set() if seen is None else seen
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if not name.startswith("pipeline."):
                continue
            parts = name.split(".")
            # importing pipeline.a.b runs pipeline/a/__init__.py too (pipeline/__init__.py is empty)
            for depth in range(2, len(parts) + 1):
                mod = ".".join(parts[:depth])
                file = module_file(mod)
                if file is not None and mod not in seen:
                    seen.add(mod)
                    pipeline_imports(file, seen)
    return seen


def module_file(name: str) -> Path | None:
    """The file of module `name` (a package's __init__.py), or None if it is not a module."""
    base = REPO / name.replace(".", "/")
    for file in (base.with_suffix(".py"), base / "__init__.py"):
        if file.is_file():
            return file
    return None


@pytest.mark.parametrize("name", sorted(stages()))
def test_stage_code_deps_are_exactly_what_it_imports(name):
    stage = stages()[name]
    script = script_of(stage)
    modules = pipeline_imports(REPO / script)
    if stage.get("kind"):  # extraction loads its extractor module by kind (importlib), with what it imports
        kind_module = f"pipeline.extractors.{stage['kind']}"
        modules |= {kind_module} | pipeline_imports(module_file(kind_module))
    elif "pipeline.extract" in modules:  # scoring runs whichever extractors the model bundle records
        for kind_file in sorted((REPO / "pipeline" / "extractors").glob("*.py")):
            kind_module = f"pipeline.extractors.{kind_file.stem}"
            modules |= {kind_module} | pipeline_imports(kind_file)
    expected = {script} | {module_file(m).relative_to(REPO).as_posix() for m in modules}
    listed = {d for d in stage.get("deps", []) if isinstance(d, str) and d.endswith(".py")}
    assert expected <= listed, f"missing code deps: {sorted(expected - listed)}"
    extra = listed - expected
    # foreach stages share one dep list: the extractor modules other kinds import may be listed too
    allowed = {"pipeline/extractors/image.py", "pipeline/extractors/text.py"} if stage.get("kind") else set()
    assert extra <= allowed, f"listed but not imported: {sorted(extra - allowed)}"


def sections_read_by(script: str) -> set[str]:
    """params keys the stage's entry module reads: section(params, "<key>", ...) anywhere in it
    (an f-string key such as f"extract.modalities.{name}" reads as "extract.modalities.{}")."""
    m = re.search(r"run_main\((\w+)\.main\)", (REPO / script).read_text())
    assert m, f"{script} should call runtime.run_main(<pipeline module>.main)"
    tree = ast.parse((REPO / "pipeline" / f"{m.group(1)}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            fn = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if fn == "section" and len(node.args) > 1:
                arg = node.args[1]
                if isinstance(arg, ast.Constant):
                    found.add(arg.value)
                elif isinstance(arg, ast.JoinedStr):
                    found.add("".join(v.value if isinstance(v, ast.Constant) else "{}" for v in arg.values))
            if fn == "setup":
                found.add("base")  # runtime.setup reads the base section (seed, log level)
    return found


@pytest.mark.parametrize("name", sorted(stages()))
def test_stage_params_are_exactly_the_sections_it_reads(name):
    stage = stages()[name]
    listed = set()
    for entry in stage.get("params", []):
        listed |= {entry} if isinstance(entry, str) else {k for v in entry.values() for k in v}
    read = {k.replace("{}", str(stage.get("foreach_key"))) for k in sections_read_by(script_of(stage))}
    assert listed == read


# ------------------------------------------------------------------------------------------------


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of the pipeline reproduced once on a tiny demo dataset."""
    root = tmp_path_factory.mktemp("dvcproj")
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    for folder in ("pipeline", "stages"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["demo"].update(size=16, unlabelled=4, unlabelled_broken=0)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
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
    for module in sorted((project / "pipeline").glob("*.py")):
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
