"""The `dmms` command: the same code as the stages, with clear errors and exit status 2 for user errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO


def dmms(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    exe = shutil.which("dmms", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "pipeline.cli"]
    return subprocess.run([*cmd, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_demo_then_ingest_from_the_console_command(tmp_path):
    (tmp_path / "small.yaml").write_text("demo: {items: 8}\nextract: {job: {cache_dir: cache}}\n")
    params = ["--params", str(REPO / "params.yaml"), "--params", str(tmp_path / "small.yaml")]
    made = dmms("demo", *params, "--out", str(tmp_path / "raw"))
    assert made.returncode == 0, made.stderr
    done = dmms(
        "ingest",
        *params,
        "--dataset-dir",
        str(tmp_path / "raw"),
        "--out",
        str(tmp_path / "ing"),
        "--metrics",
        str(tmp_path / "m.json"),
    )
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["read"] == metrics["accepted"] == 8
    assert (tmp_path / "ing" / "manifest.parquet").is_file() and (tmp_path / "ing" / "rejects.parquet").is_file()


def test_user_errors_are_one_clear_line_and_status_2(tmp_path):
    missing = dmms(
        "ingest",
        "--dataset-dir",
        str(tmp_path / "nowhere"),
        "--out",
        str(tmp_path / "o"),
        "--metrics",
        str(tmp_path / "m.json"),
    )
    assert missing.returncode == 2
    assert (
        missing.stderr.strip().splitlines()[-1]
        == f"error: dataset folder not found: {tmp_path / 'nowhere'} (--dataset-dir)"
    )
    assert "Traceback" not in missing.stderr
    (tmp_path / "bad.yaml").write_text("ingest: {max_rejects: 0.1}\n")
    bad = dmms(
        "ingest",
        "--params",
        str(REPO / "params.yaml"),
        "--params",
        str(tmp_path / "bad.yaml"),
        "--out",
        str(tmp_path / "o"),
        "--metrics",
        str(tmp_path / "m.json"),
    )
    assert bad.returncode == 2 and "unknown key(s) ['max_rejects']" in bad.stderr
    unknown = dmms("nope")
    assert unknown.returncode == 2 and "unknown command 'nope'" in unknown.stderr


def test_bad_bundles_bad_paths_and_full_disks_are_one_line_each(tmp_path, capsys, monkeypatch):
    import errno

    import pyarrow.parquet as pq

    from pipeline import cli

    (tmp_path / "notes.txt").write_text("not a model\n")
    bad = dmms(
        "predict",
        "--model",
        str(tmp_path / "notes.txt"),
        "--manifest",
        str(tmp_path / "m.parquet"),
        "--features",
        str(tmp_path),
        "--out",
        str(tmp_path / "p"),
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'notes.txt'} is not a model bundle")
    (tmp_path / "small.yaml").write_text("demo: {items: 8}\nextract: {job: {cache_dir: cache}}\n")
    params = ["--params", str(REPO / "params.yaml"), "--params", str(tmp_path / "small.yaml")]
    assert dmms("demo", *params, "--out", str(tmp_path / "raw")).returncode == 0
    (tmp_path / "afile").write_text("")
    into_file = dmms(
        "ingest",
        *params,
        "--dataset-dir",
        str(tmp_path / "raw"),
        "--out",
        str(tmp_path / "afile"),
        "--metrics",
        str(tmp_path / "m.json"),
    )
    assert into_file.returncode == 1 and "Traceback" not in into_file.stderr
    assert into_file.stderr.strip().splitlines()[-1] == f"error: File exists: {tmp_path / 'afile'}"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(args[1]))

    monkeypatch.setattr(pq, "write_table", full)
    with pytest.raises(SystemExit) as exc:
        cli.main(
            [
                "ingest",
                *params,
                "--dataset-dir",
                str(tmp_path / "raw"),
                "--out",
                str(tmp_path / "o"),
                "--metrics",
                str(tmp_path / "m.json"),
            ]
        )
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 1 and err[-1] == f"error: No space left on device: {tmp_path / 'o' / 'manifest.parquet'}"


PROJECT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) pipeline(\.[\w.]+)?: ")


@pytest.mark.slow
def test_commands_print_only_the_projects_lines_unless_verbose(tmp_path):
    """Every stderr line of ingest, extract (every modality), train and score on a small demo comes from
    the project; with --verbose, what the libraries say comes back."""
    (tmp_path / "small.yaml").write_text(
        "demo: {items: 16, unlabelled: 4, unlabelled_broken: 1}\n"
        "train: {epochs: 2}\nextract: {job: {cache_dir: cache}}\n"
    )
    params = ["--params", str(REPO / "params.yaml"), "--params", str(tmp_path / "small.yaml")]
    assert (
        dmms("demo", *params, "--out", str(tmp_path / "raw"), "--unlabelled-out", str(tmp_path / "new")).returncode == 0
    )
    manifest = str(tmp_path / "ingest" / "manifest.parquet")
    modalities = ("image", "faces", "ocr", "title", "description", "tags", "meta")
    runs = {
        "ingest": dmms(
            "ingest",
            *params,
            "--dataset-dir",
            str(tmp_path / "raw"),
            "--out",
            str(tmp_path / "ingest"),
            "--metrics",
            str(tmp_path / "m" / "ingest.json"),
        )
    }
    for m in modalities:
        runs[f"extract {m}"] = dmms(
            "extract",
            *params,
            "--modality",
            m,
            "--manifest",
            manifest,
            "--out",
            str(tmp_path / "features" / m),
            "--metrics",
            str(tmp_path / "m" / f"{m}.json"),
        )
    runs["train"] = dmms(
        "train",
        *params,
        "--manifest",
        manifest,
        "--features",
        str(tmp_path / "features"),
        "--out",
        str(tmp_path / "model"),
        "--metrics",
        str(tmp_path / "m" / "train.json"),
        "--plots",
        str(tmp_path / "m" / "curve.csv"),
    )
    runs["score"] = dmms(
        "score",
        *params,
        "--model",
        str(tmp_path / "model" / "model.pt"),
        "--input",
        str(tmp_path / "new"),
        "--output",
        str(tmp_path / "scored"),
    )
    for name, run in runs.items():
        assert run.returncode == 0, f"{name}: {run.stderr}"
        foreign = [line for line in run.stderr.splitlines() if line.strip() and not PROJECT_LINE.match(line)]
        assert not foreign, f"{name} printed lines that are not the project's: {foreign[:5]}"
        assert run.stderr.strip(), f"{name} says what it did"
    verbose = dmms(
        "extract",
        *params,
        "--verbose",
        "--modality",
        "ocr",
        "--manifest",
        manifest,
        "--out",
        str(tmp_path / "v"),
        "--metrics",
        str(tmp_path / "m" / "v.json"),
    )
    assert verbose.returncode == 0 and "apitools" in verbose.stderr, "--verbose shows the libraries' lines"


@pytest.mark.parametrize("command", ["demo", "ingest", "extract", "train", "predict", "report", "score", "compare"])
def test_each_commands_help_names_it_and_gives_an_example(command, capsys):
    import importlib

    from pipeline import cli

    module = importlib.import_module(cli.COMMANDS[command][0])
    with pytest.raises(SystemExit) as exc:
        module.main(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and out.startswith(f"usage: dmms {command} ")
    example = out.split("example:\n", 1)[1].strip()
    assert example.startswith(f"dmms {command} ") and "--verbose" in out


def test_log_level_from_flag_or_environment_in_any_case_and_checked(monkeypatch, capsys):
    from pipeline import runtime

    monkeypatch.setenv("DMMS_LOG_LEVEL", "debug")
    assert runtime.parser("dmms x", None).parse_args([]).log_level == "DEBUG"
    assert runtime.parser("dmms x", None).parse_args(["--log-level", "warning"]).log_level == "WARNING"
    monkeypatch.setenv("DMMS_LOG_LEVEL", "chatty")
    with pytest.raises(SystemExit) as exc:
        runtime.parser("dmms x", None).parse_args([])
    assert exc.value.code == 2 and "'chatty' is not one of DEBUG" in capsys.readouterr().err
