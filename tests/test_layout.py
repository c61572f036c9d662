"""The code's seams, checked statically (no DVC run): stage modules apart from the library and never
importing one another, every stage's code and params deps in dvc.yaml exactly what it imports and
reads, and the stages the GPU machine runs importable without Beam, DVC or the OCR/face packages."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO

STAGE_PACKAGE = "pipeline.stages"
COMMAND_PACKAGE = "pipeline.commands"  # entry modules of tools that are not stages (dmms compare)


def stages() -> dict[str, dict[str, Any]]:
    """dvc.yaml's stages with ${params.key} templates filled in from params.yaml, as DVC does."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    raw = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    out: dict[str, dict[str, Any]] = {}
    for name, body in raw.items():
        if "foreach" not in body:
            text = re.sub(r"\$\{([^}]+)\}", lambda m: str(lookup(params, m.group(1))), yaml.safe_dump(body))
            out[name] = yaml.safe_load(text)
            continue
        items = lookup(params, re.fullmatch(r"\$\{([^}]+)\}", body["foreach"]).group(1))
        for key, item in items.items():
            local = {**params, "key": key, "item": item}
            text = re.sub(
                r"\$\{([^}]+)\}", lambda m, local=local: str(lookup(local, m.group(1))), yaml.safe_dump(body["do"])
            )
            out[f"{name}@{key}"] = {**yaml.safe_load(text), "foreach_key": key, "kind": item.get("kind")}
    return out


def lookup(params: dict[str, Any], dotted: str) -> Any:
    node: Any = params
    for k in dotted.split("."):
        node = node[k]
    return node


def script_of(stage: dict[str, Any]) -> str:
    m = re.search(r"python (stages/\S+\.py)", stage["cmd"])
    assert m, f"stage command does not run a stages/ script: {stage['cmd']}"
    return m.group(1)


def imported_names(path: Path) -> set[str]:
    """Every pipeline module an import statement in `path` names (at any depth of the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            # importing pipeline.a.b runs pipeline/a/__init__.py too (pipeline/__init__.py is empty)
            found |= {
                ".".join(parts[:d])
                for d in range(2, len(parts) + 1)
                if parts[0] == "pipeline" and module_file(".".join(parts[:d])) is not None
            }
    return found


def pipeline_imports(path: Path, seen: set[str] | None = None) -> set[str]:
    """pipeline modules imported by `path`, transitively."""
    seen = set() if seen is None else seen
    for mod in imported_names(path) - seen:
        seen.add(mod)
        pipeline_imports(module_file(mod), seen)
    return seen


def module_file(name: str) -> Path | None:
    """The file of module `name` (a package's __init__.py), or None if it is not a module."""
    base = REPO / name.replace(".", "/")
    for file in (base.with_suffix(".py"), base / "__init__.py"):
        if file.is_file():
            return file
    return None


def stage_modules() -> list[str]:
    return sorted(
        f"{STAGE_PACKAGE}.{p.stem}" for p in (REPO / "pipeline" / "stages").glob("*.py") if p.stem != "__init__"
    )


def entry_modules() -> list[str]:
    """Stage modules and command modules: the only places that read params."""
    return stage_modules() + sorted(
        f"{COMMAND_PACKAGE}.{p.stem}" for p in (REPO / "pipeline" / "commands").glob("*.py") if p.stem != "__init__"
    )


def entry_module(script: str) -> str:
    """The stage module a stages/ script runs (`runtime.run_main(<module>.main)`)."""
    text = (REPO / script).read_text()
    m = re.search(r"run_main\((\w+)\.main\)", text)
    assert m, f"{script} should call runtime.run_main(<stage module>.main)"
    assert re.search(rf"from {re.escape(STAGE_PACKAGE)} import {m.group(1)}\b", text), (
        f"{script} should run a module of {STAGE_PACKAGE}"
    )
    return f"{STAGE_PACKAGE}.{m.group(1)}"


# ------------------------------------------------------------------------------------------ the import graph


@pytest.mark.parametrize("module", entry_modules())
def test_no_stage_module_imports_another(module):
    others = {
        m for m in pipeline_imports(module_file(module)) if m.startswith((STAGE_PACKAGE + ".", COMMAND_PACKAGE + "."))
    }
    assert not others, f"{module} imports entry module(s) {sorted(others)}: move what they share into the library"


def test_the_library_never_imports_a_stage_module():
    for file in sorted((REPO / "pipeline").rglob("*.py")):
        rel = file.relative_to(REPO)
        if rel.parts[1] in ("stages", "commands") or rel.name == "cli.py":  # cli dispatches to them by name
            continue
        bad = {m for m in imported_names(file) if m.startswith((STAGE_PACKAGE, COMMAND_PACKAGE))}
        assert not bad, f"{rel} imports {sorted(bad)}"


def test_every_stage_module_has_a_dvc_stage_and_a_dmms_command():
    from pipeline.cli import COMMANDS

    run_by_dvc = {entry_module(script_of(s)) for s in stages().values()}
    assert run_by_dvc == set(stage_modules())
    modules = [module for module, _ in COMMANDS.values()]
    assert modules[:7] == [
        f"{STAGE_PACKAGE}.{n}" for n in ("make_demo", "ingest", "extract", "train", "predict", "report", "score")
    ], "dmms lists the stages in order"
    assert sorted(modules[7:]) == entry_modules()[len(stage_modules()) :], "then the tools"


@pytest.mark.parametrize("module", ["pipeline.stages.train", "pipeline.stages.predict"])
def test_gpu_stages_import_without_beam_dvc_or_ocr(module):
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'apache_beam', 'dvc', 'easyocr', 'facenet_pytorch', 'transformers',\n"
        "                                  'PIL', 'skimage'}:\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"import {module}\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ------------------------------------------------------------------------------------------ dvc.yaml deps


def code_deps(stage: dict[str, Any]) -> set[str]:
    """The files a stage's script runs: the script, its stage module and what they import, transitively."""
    script = script_of(stage)
    modules = pipeline_imports(REPO / script)
    if "pipeline.extract" in modules:  # Beam loads the Dask runner by its dotted name (extract.job.runner: dask)
        modules |= {"pipeline.dask_runner"} | pipeline_imports(module_file("pipeline.dask_runner"))
    return {script} | {module_file(m).relative_to(REPO).as_posix() for m in modules}


@pytest.mark.parametrize("name", sorted(stages()))
def test_stage_code_deps_are_exactly_what_it_imports(name):
    stage = stages()[name]
    expected = code_deps(stage)
    listed = {d for d in stage.get("deps", []) if isinstance(d, str) and d.endswith(".py")}
    assert expected <= listed, f"missing code deps: {sorted(expected - listed)}"
    extra = listed - expected
    assert not extra, f"listed but not imported: {sorted(extra)}"


def sections_read_by(module: str) -> set[str]:
    """params keys a stage module reads: section(params, "<key>", ...) anywhere in it (an f-string key
    such as f"extract.modalities.{name}" reads as "extract.modalities.{}")."""
    found = set()
    for node in ast.walk(ast.parse(module_file(module).read_text())):
        if isinstance(node, ast.Call):
            fn = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if fn == "section" and len(node.args) > 1:
                arg = node.args[1]
                if isinstance(arg, ast.Constant):
                    found.add(arg.value)
                elif isinstance(arg, ast.JoinedStr):
                    found.add("".join(v.value if isinstance(v, ast.Constant) else "{}" for v in arg.values))
    return found


@pytest.mark.parametrize("name", sorted(stages()))
def test_stage_params_are_exactly_the_sections_it_reads(name):
    stage = stages()[name]
    listed = set()
    for entry in stage.get("params", []):
        listed |= {entry} if isinstance(entry, str) else {k for v in entry.values() for k in v}
    read = {k.replace("{}", str(stage.get("foreach_key"))) for k in sections_read_by(entry_module(script_of(stage)))}
    assert listed == read


def test_library_functions_take_typed_configs_not_params():
    """Library functions take typed configs: only stage modules (and runtime, which loads the files) touch params."""
    for file in sorted((REPO / "pipeline").rglob("*.py")):
        rel = file.relative_to(REPO)
        if rel.parts[1] in ("stages", "commands") or rel.name in ("config.py", "runtime.py"):
            continue
        calls = [
            n
            for n in ast.walk(ast.parse(file.read_text()))
            if isinstance(n, ast.Call)
            and (getattr(n.func, "attr", None) or getattr(n.func, "id", None)) in ("section", "load_params")
        ]
        assert not calls, f"{rel} reads params sections itself; take a typed config instead"


def test_no_function_takes_more_than_six_parameters_without_saying_why():
    """A function of pipeline/ with more than six parameters has a comment right above it saying why it
    needs them (entry points that take one path per DVC output, for instance)."""
    offenders = []
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            a = node.args
            names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            if len(names) > 6 and not lines[first - 2].lstrip().startswith("#"):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({len(names)})")
    assert not offenders, offenders
