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
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, load_params
from pipeline.schema import UnreadableFileError

log = logging.getLogger("pipeline")

# Runs never reach the network: models come from installed packages or local paths only.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DVC_NO_ANALYTICS": "1"}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


# Paths in params: a relative one in an overlay file resolves against that file's folder (in the first
# file, params.yaml, against the working directory, where DVC runs the stages). `*` matches any key.
PATH_KEYS = (
    "dataset.dir",
    "score.input",
    "extract.job.cache_dir",
    "extract.modalities.*.weights",
    "extract.modalities.*.backbone_weights",
    "extract.modalities.*.vggface2_weights",
    "extract.modalities.*.model_dir",
)
# Third-party chatter hidden unless --verbose: progress bars of model loading, hub and tokenizer notes.
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1"}


class UserError(RuntimeError):
    """An error the user can fix (bad input, bad params); printed without a traceback."""


# Inputs several commands take, with one help text each (`inputs=` of parser()).
INPUTS = {
    "manifest": "canonical manifest written by ingest (manifest.parquet)",
    "features": "folder holding <modality>/features.parquet, written by extract",
    "model": "model bundle (model.pt) written by train",
}


def _log_level(value: str) -> str:
    """--log-level (or $DMMS_LOG_LEVEL, which argparse passes through here too) in any case."""
    level = value.strip().upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not one of {', '.join(LOG_LEVELS)} (from --log-level or $DMMS_LOG_LEVEL)"
        )
    return level


def parser(
    prog: str, description: str | None, example: str | None = None, inputs: Sequence[str] = ()
) -> argparse.ArgumentParser:
    """An argument parser with the options every stage shares, plus the required `inputs` (keys of
    INPUTS, e.g. "manifest" for --manifest); `example` is shown under --help."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=f"example:\n  {example}" if example else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for name in inputs:
        p.add_argument(f"--{name}", required=True, help=INPUTS[name])
    p.add_argument(
        "--params",
        action="append",
        help="params file; repeat to overlay files, later ones win key by key (default: params.yaml); "
        "relative paths in an overlay resolve against the overlay's folder",
    )
    p.add_argument(
        "--log-level",
        default=os.environ.get("DMMS_LOG_LEVEL") or "INFO",
        type=_log_level,
        help=f"how much to log: {', '.join(LOG_LEVELS)} (default: $DMMS_LOG_LEVEL or INFO); it changes no "
        "output, so it is not a param",
    )
    p.add_argument(
        "--verbose", action="store_true", help="also show what other libraries log and warn (hidden by default)"
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


def _path_keys(params: dict[str, Any]) -> Iterator[tuple[str, ...]]:
    """The PATH_KEYS present in `params`, as key tuples (wildcards expanded)."""

    def walk(node: Any, pattern: list[str], done: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
        if not pattern:
            yield done
            return
        if not isinstance(node, dict):
            return
        keys = list(node) if pattern[0] == "*" else [pattern[0]] if pattern[0] in node else []
        for k in keys:
            yield from walk(node[k], pattern[1:], (*done, k))

    for dotted in PATH_KEYS:
        yield from walk(params, dotted.split("."), ())


def _resolve_paths(params: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A copy of one overlay file's params with its relative PATH_KEYS made absolute against `folder`."""
    out = json.loads(json.dumps(params))
    for keys in _path_keys(out):
        node = out
        for k in keys[:-1]:
            node = node[k]
        value = node[keys[-1]]
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            node[keys[-1]] = str((folder / Path(value).expanduser()).resolve())
    return out


def load_overlaid(paths: Sequence[str | Path] | None) -> dict[str, Any]:
    """The params files (default params.yaml) merged in order: later files win key by key. The first
    file's relative paths stay relative to the working directory; an overlay's resolve against its folder."""
    params: dict[str, Any] = {}
    for i, path in enumerate(paths or ["params.yaml"]):
        layer = load_params(path)
        params = merge(params, layer if i == 0 else _resolve_paths(layer, Path(path).resolve().parent))
    return params


def origin_of(paths: Sequence[str | Path] | None, dotted: str) -> str:
    """Which params file set key `dotted` (the last one that names it), for error messages."""
    for path in reversed(list(paths or ["params.yaml"])):
        node: Any = load_params(path)
        for k in dotted.split("."):
            node = node.get(k) if isinstance(node, dict) else None
        if node is not None:
            return str(path)
    return "the defaults"


def require_folder(path: str | Path, what: str, source: str) -> Path:
    """`path` if it is a folder; else one clear error with the absolute path tried and where the value
    came from (`source`, e.g. "dataset.dir in params.yaml")."""
    path = Path(path).expanduser()
    if not path.is_dir():
        rel = "" if path.is_absolute() else f", relative to the working directory {Path.cwd()}"
        raise UserError(f"{what} not found: {path.absolute()} ({source}{rel})")
    return path


class _ProjectOnly(logging.Filter):
    """Without --verbose: the project's own lines, and other libraries' errors only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name == "pipeline" or record.name.startswith("pipeline.") or record.levelno >= logging.ERROR


def quiet_imports(argv: Sequence[str] | None = None) -> None:
    """Call before importing Beam, torch or transformers: what they log or warn while importing (Beam's
    apitools note, deprecations) goes to a buffer that configure_logging drops (or shows, with
    --verbose), and their progress bars stay off. `argv` (default sys.argv) is checked for --verbose."""
    if "--verbose" in (sys.argv if argv is None else argv):
        return
    root = logging.getLogger()
    if not any(isinstance(h, _Buffer) for h in root.handlers):
        root.addHandler(_Buffer())
    logging.captureWarnings(True)
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


class _Buffer(logging.Handler):
    """Holds records logged before logging is configured (a root handler also stops logging.warning()
    from configuring the root logger on its own, which is what printed 'WARNING:root:...')."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


# how this process configured its logging (a cluster runner configures its workers the same way)
LOGGING: dict[str, Any] = {"level": "INFO", "verbose": False}


def configure_logging(level: str = "INFO", verbose: bool = False) -> None:
    """Project log lines to stderr at `level`; other libraries' lines only when `verbose` (their errors
    always). Records buffered by quiet_imports are shown now if `verbose`, else dropped."""
    LOGGING.update(level=level, verbose=verbose)
    root = logging.getLogger()
    buffered = [r for h in root.handlers if isinstance(h, _Buffer) for r in h.records]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    if not verbose:
        handler.addFilter(_ProjectOnly())
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler], force=True)
    logging.captureWarnings(True)  # warnings.warn() from libraries becomes a py.warnings record, filtered like any
    if verbose:
        for key in QUIET_ENV:  # let progress bars and hub notes through again
            if os.environ.get(key) == QUIET_ENV[key]:
                os.environ.pop(key)
        for record in buffered:
            handler.handle(record)
    elif root.level > logging.DEBUG:
        logging.getLogger("apache_beam").setLevel(logging.WARNING)


def setup(args: argparse.Namespace) -> dict[str, Any]:
    """Load (and overlay) the params files, configure logging once and force offline mode."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    configure_logging(args.log_level, getattr(args, "verbose", False))
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


class Progress:
    """Items done, rate and ETA of a long loop: on a terminal a bar redrawn in place, otherwise (DVC, CI,
    a log file) a log line every `every_s` seconds and at the end. The rate is the average over the
    whole run, so the ETA does not swing with one slow interval of a busy machine."""

    def __init__(
        self,
        what: str,
        total: int,
        unit: str = "items",
        every_s: float = 10.0,
        logger: logging.Logger | None = None,
        stream: Any = None,
    ):
        self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
        self.log = logger or log
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = self.last = time.perf_counter()
        self.done = 0

    def text(self) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate and self.total >= self.done else float("nan")
        return (
            f"{self.what}: {self.done}/{self.total} {self.unit} ({rate:.1f} {self.unit}/s, "
            f"{f'ETA {eta:.0f} s' if math.isfinite(eta) else 'ETA unknown'})"
        )

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self.tty and (now - self.last >= 0.2 or self.done >= self.total):
            width = 30
            filled = int(width * min(self.done / self.total, 1.0)) if self.total else width
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.text()}\x1b[K")
            self.stream.flush()
            self.last = now
        elif not self.tty and now - self.last >= self.every_s:
            self.log.info("%s", self.text())
            self.last = now

    def close(self) -> None:
        """End the bar's line (terminal) or log the final count (elsewhere)."""
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
        elif self.done and time.perf_counter() - self.start >= self.every_s:
            self.log.info("%s", self.text())


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
