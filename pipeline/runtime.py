"""What every entry point does the same way: arguments, params overlays, logging, offline mode,
devices, seeds, metrics JSON and user errors."""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from pipeline.config import ConfigError, load_params
from pipeline.schema import UnreadableFileError

log = logging.getLogger("pipeline")

# Runs never reach the network: models come from installed packages or local paths only.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DVC_NO_ANALYTICS": "1"}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class UserError(RuntimeError):
    """An error the user can fix (bad input, bad params); printed without a traceback."""


def parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """An argument parser with the options every stage shares."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument(
        "--params", action="append",
        help="params file; repeat to overlay files, later ones win key by key (default: params.yaml)",
    )
    p.add_argument(
        "--log-level", default=os.environ.get("DMMS_LOG_LEVEL", "INFO").upper(), choices=LOG_LEVELS,
        help="how much to log (default: $DMMS_LOG_LEVEL or INFO); it changes no output, so it is not a param",
    )
    return p


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `over` into a copy of `base` (mappings merge key by key, other values replace)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_overlaid(paths: Sequence[str | Path] | None) -> dict[str, Any]:
    """The params files (default params.yaml) merged in order: later files win key by key."""
    params: dict[str, Any] = {}
    for path in paths or ["params.yaml"]:
        params = merge(params, load_params(path))
    return params


def configure_logging(level: str = "INFO") -> None:
    """Project log lines to stderr at `level`; Beam's per-bundle chatter only when debugging."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,  # a library may have configured the root logger while being imported
    )
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("apache_beam").setLevel(logging.WARNING)


def setup(args: argparse.Namespace) -> dict[str, Any]:
    """Load (and overlay) the params files, configure logging once and force offline mode."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    configure_logging(args.log_level)
    return load_overlaid(args.params)


def run_main(fn: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> None:
    """Run an entry point; user errors print one clear line and exit with status 2, errors of the
    machine (a full or read-only disk, a missing permission, an output path that is a file) one clear
    line and status 1. Anything else is a bug and keeps its traceback."""
    try:
        fn(argv)
    except (ConfigError, UserError, UnreadableFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as exc:
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        text = f"{exc.strerror}{where}" if exc.strerror else str(exc)
        print(f"error: {text}", file=sys.stderr)
        raise SystemExit(1) from None


@contextmanager
def staged_output(final: str | Path) -> Iterator[Path]:
    """A fresh folder beside `final` to write a run's outputs into; it replaces `final` only when the
    block completes, so a failed run leaves the previous outputs as they were and no mix. A run killed
    outright leaves a hidden `.<name>.partial-*` folder beside it, safe to delete."""
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise UserError(f"output folder {final} exists and is not a folder")
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(work, final)
    shutil.rmtree(old, ignore_errors=True)


def resolve_device(name: str) -> Any:
    """A torch.device: auto -> CUDA when present, else CPU; asking for CUDA without one is a clear error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but torch sees no CUDA device; use auto or cpu")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, numpy and torch (params base.seed); `deterministic` asks torch for deterministic kernels."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # scatter reductions have no deterministic CUDA kernel: warn instead of failing there
        torch.use_deterministic_algorithms(True, warn_only=True)


def rounded(obj: Any) -> Any:
    """Floats rounded to 6 digits (non-finite -> null) through dicts and lists, for metrics JSON."""
    if isinstance(obj, float):
        return round(obj, 6) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: rounded(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> Path:
    """Write metrics or a summary as JSON (floats rounded, parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rounded(obj), indent=2) + "\n", encoding="utf-8")
    return path
