"""What every entry point does the same way: argument parsing, params, logging, offline mode, errors."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Callable, Sequence

from pipeline.config import BaseConfig, ConfigError, load_params, section

log = logging.getLogger("pipeline")

# Runs never reach the network: models come from installed packages or local paths only.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DVC_NO_ANALYTICS": "1"}


class UserError(RuntimeError):
    """An error the user can fix (bad input, bad params); printed without a traceback."""


def parser(description: str | None) -> argparse.ArgumentParser:
    """An argument parser with the options every stage shares."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--params", action="append",
        help="params file; repeat to overlay files, later ones win key by key (default: params.yaml)",
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


def setup(params_paths: Sequence[str] | None) -> tuple[dict[str, Any], BaseConfig]:
    """Load (and overlay) params, configure logging once and force offline mode."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    params: dict[str, Any] = {}
    for path in params_paths or ["params.yaml"]:
        params = merge(params, load_params(path))
    base = section(params, "base", BaseConfig)
    logging.basicConfig(
        level=getattr(logging, base.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,  # a library may have configured the root logger while being imported
    )
    # Beam logs every bundle and type hint at INFO; keep it to warnings unless debugging
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("apache_beam").setLevel(logging.WARNING)
    return params, base


def run_main(fn: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> None:
    """Run an entry point; user errors print one clear line and exit with status 2."""
    try:
        fn(argv)
    except (ConfigError, UserError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
