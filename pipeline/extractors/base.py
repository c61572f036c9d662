"""What every extractor shares: the Extractor interface and its registry, results, errors, the
ModelHandler base, weight files.

Extraction draws no random numbers: models run in eval mode on loaded weights, so no seed is set."""

from __future__ import annotations

import logging
import socket
import traceback
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
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
MODEL_CHECK_KEYS = ("model_id", "weights_sha256", "model_files_sha256", "dim", "runs_on")


class MissingModelError(RuntimeError):
    """A configured model or weights file is not available locally."""


def error_text(exc: BaseException) -> str:
    """One-line error with its type and the innermost frame, for dead letters."""
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
    return f"{type(exc).__name__}: {exc}{where}"


def require_file(path: str | Path, what: str) -> Path:
    """Return `path` if it is a file, else raise MissingModelError naming it."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingModelError(f"{what}: weights file not found: {p}")
    return p


def empty_result(dim: int) -> ItemResult:
    return ItemResult(np.zeros((0, dim), dtype=np.float32), [])


def check_software(extractor: Extractor, expect: dict[str, Any]) -> None:
    """Refuse a worker whose library versions, Python or project code (as imported into this process:
    pipeline.cache records them at import) differ from the job's, whose cache keys name them."""
    from pipeline import cache

    job = expect.get("software")
    if job is None:
        return
    here = cache.software(extractor.libraries, extractor.sources)
    diffs = [
        f"{d} {v} in the job, {here['libraries'].get(d)} here"
        for d, v in job["libraries"].items()
        if here["libraries"].get(d) != v
    ]
    diffs += [
        f"{k}: job {job[k]!r}, here {here[k]!r}"
        for k in ("python", "code", "cache_format")
        if here.get(k) != job.get(k)
    ]
    if diffs:
        raise MissingModelError(
            f"the software on worker {socket.gethostname()} differs from the job's ({'; '.join(diffs)}): "
            "install the same versions and project code on every worker"
        )


class SetModelHandler(ModelHandler):
    """Base ModelHandler: fixed batch sizes from params and per-item fallback when a batch fails.

    Built by its extractor (`Extractor.handler`) with the provenance the job was planned with: the
    dimension of an empty set, and the checksums every worker checks the model files it loads against
    (results are cached under them). Subclasses implement `load` (the model, once per worker) and
    `infer_batch(batch, model) -> list[ItemResult | ItemError]`. A failing batch is retried item by item,
    so one bad item never takes its neighbours down.
    """

    def __init__(self, extractor: Extractor, described: dict[str, Any]):
        super().__init__()
        self.extractor, self.cfg = extractor, extractor.cfg
        self.batch_size = int(getattr(extractor.cfg, "batch_size", 32))
        self.empty_dim = int(described["dim"])  # an item without input is a (0, D) set
        self.expect = described

    def load(self) -> Any:
        """Load the model (once per worker): an object Beam can hold a weak reference to (a class
        instance, not a bare dict or list)."""
        raise NotImplementedError

    def load_model(self) -> Any:
        """Check the model files on this worker against the job's record of them, then load the model:
        results are cached under that record, so a worker with other files must not compute any."""
        if self.extractor.checks_model_files:
            found = self.extractor.describe_files()
            diffs = [
                f"{k}: job {self.expect.get(k)!r}, here {found.get(k)!r}"
                for k in MODEL_CHECK_KEYS
                if found.get(k) != self.expect.get(k)
            ]
            if diffs:
                raise MissingModelError(
                    f"the model files or what runs them on worker {socket.gethostname()} differ from those the "
                    f"job was started with ({'; '.join(diffs)}): install the same files and runtimes on "
                    "every worker (and set the modality's device where workers and the stage differ)"
                )
        self.check_software()
        return self.load()

    def check_software(self) -> None:
        """The libraries and project code on this worker must be those the job's cache keys name."""
        check_software(self.extractor, self.expect)

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


class Extractor:
    """One extractor kind: everything the extraction job, the cache and scoring need to know of it.

    A kind is a subclass registered under its `kind` name (`@register`); `extract.modalities.<name>.kind`
    chooses it and the rest of that params mapping builds its `config_class`. The job calls, in order:

    - `describe(manifest, fields, expect)` in the process that starts the job: the provenance of the
      output (model id, checksums of the model files, dimension; what a fitted kind fitted), without
      running a model. It refuses a column the manifest lacks and a missing model file. `expect` is a
      model bundle's record when scoring new data (a fitted kind reuses its statistics).
    - `item_inputs(manifest, described)`: each row's input as the cache key sees it (default: the values
      of `input_columns()`).
    - `prepare(row, root)`: pure per-record work on a worker (decode, split); None = no input here.
    - `handler(described)`: the Beam ModelHandler that turns prepared inputs into ItemResults.
    - `select(elements)`: after the cache, which elements of an (unfiltered) set are kept, by the params
      in `filter_params` (None: all).

    The cache fingerprint covers `describe`'s provenance, the params but `filter_params` and the runtime
    ones, the installed versions of `libraries` and the code of the modules in `sources`.
    """

    kind: ClassVar[str]
    config_class: ClassVar[type]
    handler_class: ClassVar[type[SetModelHandler] | None] = None
    libraries: ClassVar[tuple[str, ...]] = ()  # distributions whose version is in the cache key
    sources: ClassVar[tuple[str, ...]] = ()  # project modules whose code shapes the output
    filter_params: ClassVar[tuple[str, ...]] = ()  # params `select` applies to cached, unfiltered sets
    fitted: ClassVar[bool] = False  # its provenance depends on statistics fitted on a manifest
    checks_model_files: ClassVar[bool] = True  # workers check describe_files() before loading

    def __init__(self, cfg: Any):
        self.cfg = cfg
        # a folder the job lends for files derived from the model files (exported graphs), inside the
        # extraction cache; None: the extractor's own default. Where, not what: not in the cache key.
        self.artifacts: Path | None = None

    def input_columns(self) -> list[str]:
        """The manifest columns an item's output depends on."""
        raise NotImplementedError

    def describe_files(self) -> dict[str, Any]:
        """Provenance from the model files on this machine (no model load): extractor, model_id,
        weights_sha256, model_files_sha256, dim."""
        raise NotImplementedError

    def check_columns(self, fields: dict[str, list[str]]) -> None:
        """Refuse a configuration that reads a column the manifest lacks (`fields`: its columns by role)."""

    def describe(
        self, manifest: pa.Table | None, fields: dict[str, list[str]] | None, expect: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """The provenance of this extractor's output (see the class docstring)."""
        if fields is not None:
            self.check_columns(fields)
        return self.describe_files()

    def item_inputs(self, manifest: pa.Table, described: dict[str, Any]) -> list[Any]:
        """Each row's input, the item half of its cache key (read column by column)."""
        return column_rows(manifest, self.input_columns())

    def prepare(self, row: dict[str, Any], root: Path) -> Any:
        """Per-record work (pure): the handler's input for one row; None when the item has no input."""
        raise NotImplementedError

    def handler(self, described: dict[str, Any]) -> ModelHandler:
        """The ModelHandler of this kind, bound to the job's provenance."""
        if self.handler_class is None:
            raise NotImplementedError(f"{type(self).__name__} names no handler_class")
        return self.handler_class(self, described)

    def select(self, elements: list[dict[str, Any]]) -> list[int] | None:
        """Indices of the elements kept from an unfiltered set, in output order; None keeps all."""
        return None


def column_rows(manifest: pa.Table, columns: Sequence[str]) -> list[list[Any]]:
    """Each manifest row's values of `columns`, in that order (read column by column)."""
    if not columns:
        return [[] for _ in range(manifest.num_rows)]
    return [list(values) for values in zip(*(manifest[c].to_pylist() for c in columns))]


REGISTRY: dict[str, type[Extractor]] = {}
ENTRY_POINTS = "dmms.extractors"  # third-party kinds: [project.entry-points."dmms.extractors"] name = "pkg:Class"


def register(cls: type[Extractor]) -> type[Extractor]:
    """Class decorator: make an extractor kind available by its `kind` name."""
    if not getattr(cls, "kind", None) or not getattr(cls, "config_class", None):
        raise ValueError(f"{cls.__name__} needs a `kind` and a `config_class`")
    REGISTRY[cls.kind] = cls
    from pipeline import cache

    cache.record(cls.libraries, cls.sources)  # this process's versions and code, as imported now
    return cls


def _load_entry_points() -> None:
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINTS):
        if ep.name not in REGISTRY:
            register(ep.load())


def get(kind: Any) -> type[Extractor]:
    """The extractor class registered as `kind` (built-in, registered in-process, or an entry point)."""
    if kind not in REGISTRY:
        _load_entry_points()
    if kind not in REGISTRY:
        raise ValueError(f"unknown extractor kind {kind!r}; registered: {kinds()}")
    return REGISTRY[kind]


def kinds() -> list[str]:
    """The registered kinds."""
    return sorted(REGISTRY)


def image_array(row: dict[str, Any], root: Path) -> np.ndarray | None:
    """Per-record work shared by image-reading extractors: the decoded RGB image (EXIF applied) as
    (H, W, 3) uint8; None when the item has no image."""
    from pipeline import records, schema

    if row.get(schema.IMAGE) is None:
        return None
    return np.asarray(records.load_rgb(root / row[schema.IMAGE], row.get(schema.IMAGE_SHA256)), dtype=np.uint8)


class ImageReading(Extractor):
    """An extractor whose input is the item's image: its output depends on the image's content, which
    ingest records as the manifest's image sha256 (and `prepare` checks the bytes it decodes against)."""

    def input_columns(self) -> list[str]:
        from pipeline import schema

        return [schema.IMAGE_SHA256]

    def prepare(self, row: dict[str, Any], root: Path) -> Any:
        """The decoded RGB image as (H, W, 3) uint8; None when the item has no image."""
        return image_array(row, root)
