"""What every extractor shares: results, errors, the ModelHandler base, weight files.

Extraction draws no random numbers: models run in eval mode on loaded weights, so no seed is set."""
from __future__ import annotations

import logging
import socket
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from apache_beam.ml.inference.base import ModelHandler

log = logging.getLogger(__name__)


@dataclass
class ItemResult:
    """The set extracted for one item: n vectors of the modality's dimension and n element records."""

    vectors: np.ndarray  # (n, D) float32; n may be 0
    elements: list[dict[str, Any]] = field(default_factory=list)
    category_ids: list[int] | None = None


@dataclass
class ItemError:
    """Why one item could not be extracted; it becomes a dead letter."""

    stage: str  # prepare | inference
    error: str


# what a worker checks of the model files it loads (extraction provenance keys)
MODEL_CHECK_KEYS = ("model_id", "weights_sha256", "model_files_sha256", "dim")


class MissingModelError(RuntimeError):
    """A configured model or weights file is not available locally."""


def error_text(exc: BaseException) -> str:
    """One-line error with its type and the innermost frame, for dead letters."""
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
    return f"{type(exc).__name__}: {exc}{where}"


def files_sha256(files: dict[str, str]) -> str:
    """One checksum over named file checksums (a model made of several files or folders)."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def require_file(path: str | Path, what: str) -> Path:
    """Return `path` if it is a file, else raise MissingModelError naming it."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingModelError(f"{what}: weights file not found: {p}")
    return p


def empty_result(dim: int) -> ItemResult:
    return ItemResult(np.zeros((0, dim), dtype=np.float32), [])


class SetModelHandler(ModelHandler):
    """Base ModelHandler: fixed batch sizes from params and per-item fallback when a batch fails.

    Subclasses implement `load` (the model), `describe` (its provenance from the files on this machine,
    checked against the job's on every worker) and `infer_batch(batch, model) -> list[ItemResult | ItemError]`.
    A failing batch is retried item by item, so one bad item never takes its neighbours down.
    """

    def __init__(self, batch_size: int):
        super().__init__()
        self.batch_size = batch_size
        self.empty_dim = 0  # set by the job: the dimension of an empty set's (0, D) array
        self.expect: dict[str, Any] | None = None  # set by the job: the provenance its cache keys were made with

    def describe(self) -> dict[str, Any]:
        """The provenance of this extractor from the model files on this machine (its module's describe)."""
        raise NotImplementedError

    def load(self) -> Any:
        """Load the model (once per worker)."""
        raise NotImplementedError

    def load_model(self) -> Any:
        """Check the model files on this worker against the job's record of them, then load the model:
        results are cached under that record, so a worker with other files must not compute any."""
        if self.expect is not None:
            found = self.describe()
            diffs = [f"{k}: job {self.expect.get(k)!r}, here {found.get(k)!r}" for k in MODEL_CHECK_KEYS
                     if found.get(k) != self.expect.get(k)]
            if diffs:
                raise MissingModelError(f"the model files on worker {socket.gethostname()} differ from those the job "
                                        f"was started with ({'; '.join(diffs)}): install the same files on every worker")
        return self.load()

    def batch_elements_kwargs(self) -> dict[str, Any]:
        # min == max: batches do not depend on Beam's adaptive sizing, so outputs are reproducible
        return {"min_batch_size": self.batch_size, "max_batch_size": self.batch_size}

    def infer_batch(self, batch: list[Any], model: Any) -> list[ItemResult | ItemError]:
        raise NotImplementedError

    def run_inference(self, batch: Sequence[Any], model: Any, inference_args: dict | None = None) -> Iterable[Any]:
        """Results in input order; a None input (an item without this modality) is an empty set."""
        batch = list(batch)
        present = [i for i, x in enumerate(batch) if x is not None]
        out: list[Any] = [empty_result(self.empty_dim) for _ in batch]
        if present:
            for i, r in zip(present, self._infer_present([batch[i] for i in present], model)):
                out[i] = r
        return out

    def _infer_present(self, batch: list[Any], model: Any) -> list[Any]:
        try:
            return self.infer_batch(batch, model)
        except Exception as exc:  # retried one by one below; nothing is dropped
            if len(batch) == 1:
                return [ItemError("inference", error_text(exc))]
            log.warning("batch of %d failed (%s); retrying item by item", len(batch), error_text(exc))
        out: list[ItemResult | ItemError] = []
        for example in batch:
            try:
                out.extend(self.infer_batch([example], model))
            except Exception as exc:
                out.append(ItemError("inference", error_text(exc)))
        return out


def image_array(row: dict[str, Any], root: Path) -> np.ndarray | None:
    """Per-record work shared by image-reading extractors: the decoded RGB image (EXIF applied) as
    (H, W, 3) uint8; None when the item has no image."""
    from pipeline import records, schema

    if row.get(schema.IMAGE) is None:
        return None
    return np.asarray(records.load_rgb(root / row[schema.IMAGE], row.get(schema.IMAGE_SHA256)), dtype=np.uint8)


def image_cache_column(cfg: Any) -> str:
    """`cache_column` of every image-reading extractor: an item's result depends, besides the extractor,
    on its image's content, which ingest records as the manifest's image sha256 (and image_array checks
    the bytes it decodes against)."""
    from pipeline import schema

    return schema.IMAGE_SHA256
