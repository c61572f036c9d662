"""The `dmms` command: the same code as the stages, with clear errors and exit status 2 for user errors."""
from __future__ import annotations

import json
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
    (tmp_path / "small.yaml").write_text("demo: {size: 8}\n")
    params = ["--params", str(REPO / "params.yaml"), "--params", str(tmp_path / "small.yaml")]
    made = dmms("demo", *params, "--out", str(tmp_path / "raw"))
    assert made.returncode == 0, made.stderr
    done = dmms("ingest", *params, "--dataset-dir", str(tmp_path / "raw"), "--out", str(tmp_path / "ing"),
                "--metrics", str(tmp_path / "m.json"))
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["read"] == metrics["accepted"] == 8
    assert (tmp_path / "ing" / "manifest.parquet").is_file() and (tmp_path / "ing" / "rejects.parquet").is_file()


def test_user_errors_are_one_clear_line_and_status_2(tmp_path):
    missing = dmms("ingest", "--dataset-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"),
                   "--metrics", str(tmp_path / "m.json"))
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1] == f"error: dataset folder not found: {tmp_path / 'nowhere'}"
    assert "Traceback" not in missing.stderr
    (tmp_path / "bad.yaml").write_text("ingest: {max_rejects: 0.1}\n")
    bad = dmms("ingest", "--params", str(REPO / "params.yaml"), "--params", str(tmp_path / "bad.yaml"),
               "--out", str(tmp_path / "o"), "--metrics", str(tmp_path / "m.json"))
    assert bad.returncode == 2 and "unknown key(s) ['max_rejects']" in bad.stderr
    unknown = dmms("nope")
    assert unknown.returncode == 2 and "unknown command 'nope'" in unknown.stderr


def test_bad_bundles_bad_paths_and_full_disks_are_one_line_each(tmp_path, capsys, monkeypatch):
    import errno

    import pyarrow.parquet as pq

    from pipeline import cli

    (tmp_path / "notes.txt").write_text("not a model\n")
    bad = dmms("predict", "--model", str(tmp_path / "notes.txt"), "--manifest", str(tmp_path / "m.parquet"),
               "--features", str(tmp_path), "--out", str(tmp_path / "p"))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'notes.txt'} is not a model bundle")
    (tmp_path / "small.yaml").write_text("demo: {size: 8}\n")
    params = ["--params", str(REPO / "params.yaml"), "--params", str(tmp_path / "small.yaml")]
    assert dmms("demo", *params, "--out", str(tmp_path / "raw")).returncode == 0
    (tmp_path / "afile").write_text("")
    into_file = dmms("ingest", *params, "--dataset-dir", str(tmp_path / "raw"), "--out", str(tmp_path / "afile"),
                     "--metrics", str(tmp_path / "m.json"))
    assert into_file.returncode == 1 and "Traceback" not in into_file.stderr
    assert into_file.stderr.strip().splitlines()[-1] == f"error: File exists: {tmp_path / 'afile'}"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(args[1]))

    monkeypatch.setattr(pq, "write_table", full)
    with pytest.raises(SystemExit) as exc:
        cli.main(["ingest", *params, "--dataset-dir", str(tmp_path / "raw"), "--out", str(tmp_path / "o"),
                  "--metrics", str(tmp_path / "m.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 1 and err[-1] == f"error: No space left on device: {tmp_path / 'o' / 'manifest.parquet'}"
