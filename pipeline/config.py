"""Typed, frozen configuration per stage, built from sections of params.yaml.

Every section is a frozen dataclass. Building one from a dict rejects unknown keys (listing the
valid ones) and values of the wrong type, so a typo in params.yaml fails loudly instead of being
silently ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline import schema


class ConfigError(ValueError):
    """A params.yaml section is missing, has unknown keys or a value of the wrong type."""


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is tuple:
        args = typing.get_args(tp)
        return isinstance(value, (list, tuple)) and all(_type_ok(v, args[0]) for v in value)
    if origin is dict:
        kt, vt = typing.get_args(tp)
        return isinstance(value, dict) and all(_type_ok(k, kt) and _type_ok(v, vt) for k, v in value.items())
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


# Keys of earlier versions, and where what they did lives now.
MOVED = {
    "train.seed": "base.seed (one seed for every stage that draws random numbers)",
    "base.log_level": "the --log-level option or $DMMS_LOG_LEVEL (logging changes no output, so it is not a param)",
    "demo.size": "demo.items (DVC 3 leaves any param named `size` out of its run-cache key, so changing it "
    "restored the old dataset)",
    "extract.job.num_shards": "gone: the job writes no shards; its computed items go to the cache in slices "
    "(extract.job.commit_items, commit_every_s) and its work is split by extract.job.partition_items",
}


def from_dict(cls: type, data: Mapping[str, Any] | None, where: str) -> Any:
    """Build dataclass `cls` from `data`; `where` names the params section in error messages."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, found {type(data).__name__}: {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        keys = [f"{where}.{k}" for k in unknown]
        moved = "".join(f"; {key} is now {MOVED[key]}" for key in keys if key in MOVED)
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(fields)}{moved}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = f"{where}.{name}"
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{key}: required key is missing")
            continue
        value = data[name]
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value, key)
            continue
        if not _type_ok(value, tp):
            raise ConfigError(f"{key}: expected {tp}, found {value!r}")
        if typing.get_origin(tp) is tuple or (
            typing.get_origin(tp) in (typing.Union, types.UnionType) and isinstance(value, list)
        ):
            value = tuple(value)
        if tp is float and isinstance(value, int):
            value = float(value)
        kwargs[name] = value
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(where)
    return obj


def to_dict(obj: Any) -> Any:
    """Plain-data view of a config (tuples as lists), for provenance in output metadata."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read a params file; a missing file or a non-mapping top level is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    with path.open("r", encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def section(params: Mapping[str, Any], name: str, cls: Any) -> Any:
    """Build the config of section `name` (dotted for nested sections, e.g. extract.job).

    `cls` is a config dataclass, or a function `(mapping, name) -> config` for a section whose type
    depends on its content (an extraction modality's config depends on its `kind`).
    """
    node: Any = params
    for depth, key in enumerate(name.split(".")):
        if not isinstance(node, Mapping) or key not in node:
            where = ".".join(name.split(".")[:depth]) or "params"
            found = sorted(node) if isinstance(node, Mapping) else node
            raise ConfigError(f"{where}: section '{key}' is missing; found {found}")
        node = node[key]
    if dataclasses.is_dataclass(cls):
        return from_dict(cls, node, name)
    return cls(node, name)


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseConfig:
    """Settings shared by the stages: `seed` governs every random choice of processing (training's
    initialisation, shuffling and dropout). The demo's own `demo.seed` picks which demo dataset is
    generated: it is part of the data, like `demo.items`."""

    seed: int = 0


@dataclass(frozen=True)
class LabelsConfig:
    """Where the labels are and how to read them."""

    column: str | None = None
    kind: str = "multilabel"  # multilabel | multiclass | binary
    separator: str = "|"
    positive_name: str = "positive"  # the label name of a binary task's positive class
    required_in: tuple[str, ...] = schema.SPLITS  # splits whose rows must carry a label

    def validate(self, where: str) -> None:
        bad = sorted(set(self.required_in) - set(schema.SPLITS))
        if bad:
            raise ConfigError(f"{where}.required_in: unknown split(s) {bad}; valid: {list(schema.SPLITS)}")
        if self.kind not in schema.TASK_KINDS:
            raise ConfigError(f"{where}.kind: expected one of {schema.TASK_KINDS}, found {self.kind!r}")
        if self.kind == "multilabel" and not self.separator:
            raise ConfigError(f"{where}.separator: a multilabel task needs a non-empty separator")


@dataclass(frozen=True)
class SplitConfig:
    """Take the split from a column, or derive it from a stable hash of the id."""

    column: str | None = None
    fractions: dict[str, float] = field(default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1})
    salt: str = "dmms-split"

    def validate(self, where: str) -> None:
        if set(self.fractions) != set(schema.SPLITS):
            raise ConfigError(f"{where}.fractions: expected keys {list(schema.SPLITS)}, found {sorted(self.fractions)}")
        if any(v < 0 for v in self.fractions.values()) or abs(sum(self.fractions.values()) - 1) > 1e-6:
            raise ConfigError(
                f"{where}.fractions: expected non-negative fractions summing to 1, found {self.fractions}"
            )


@dataclass(frozen=True)
class DatasetConfig:
    """The dataset contract: where a raw dataset is and how its columns map to roles."""

    dir: str
    format: str = "csv"  # csv | jsonl | mmimdb
    manifest: str = "manifest.csv"  # relative to dir; unused by the mmimdb format
    id: str = "id"
    image: str | None = "image"
    image_required: bool = True
    text: tuple[str, ...] = ()
    lists: dict[str, str] = field(default_factory=dict)  # column -> separator
    numeric: tuple[str, ...] = ()
    categorical: tuple[str, ...] = ()
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    split: SplitConfig = field(default_factory=SplitConfig)

    def validate(self, where: str) -> None:
        if self.format not in schema.DATASET_FORMATS:
            raise ConfigError(f"{where}.format: expected one of {schema.DATASET_FORMATS}, found {self.format!r}")
        fields = self.feature_columns()
        dup = sorted({c for c in fields if fields.count(c) > 1})
        if dup:
            raise ConfigError(f"{where}: column(s) {dup} are mapped to more than one role")
        reserved = sorted(set(fields) & set(schema.RESERVED_COLUMNS))
        if reserved:
            raise ConfigError(
                f"{where}: feature column name(s) {reserved} clash with canonical manifest columns "
                f"{list(schema.RESERVED_COLUMNS)}; rename them in the manifest"
            )
        for col, sep in self.lists.items():
            if not sep:
                raise ConfigError(f"{where}.lists.{col}: separator must be non-empty")

    def feature_columns(self) -> list[str]:
        """Every text, list, numeric and categorical column, in params order."""
        return [*self.text, *self.lists, *self.numeric, *self.categorical]


@dataclass(frozen=True)
class IngestConfig:
    """Validation limits of the ingest stage."""

    max_reject_fraction: float = 0.05
    max_image_pixels: int = 40_000_000
    max_field_chars: int = 1_000_000  # a longer field (text, tags, any column) rejects its row
    min_label_count: int = 1  # labels with fewer accepted train rows are dropped from the task
    workers: int = 4  # threads decoding images (PIL releases the GIL while decoding)

    def validate(self, where: str) -> None:
        if not 0 <= self.max_reject_fraction <= 1:
            raise ConfigError(f"{where}.max_reject_fraction: expected 0..1, found {self.max_reject_fraction}")
        if self.max_image_pixels <= 0 or self.workers <= 0 or self.min_label_count < 1 or self.max_field_chars < 1:
            raise ConfigError(
                f"{where}: max_image_pixels, max_field_chars and workers must be > 0, min_label_count >= 1"
            )


@dataclass(frozen=True)
class DemoConfig:
    """The embedded demo dataset generator."""

    seed: int = 7
    items: int = 300  # not `size`: DVC leaves params named size out of its run-cache key
    width: int = 256
    height: int = 384
    label_noise: float = 0.05
    missing_description: float = 0.05
    jpeg_quality: int = 90
    unlabelled: int = 0  # extra items written without labels: a new batch for `dmms score`
    unlabelled_broken: int = 0  # of those, items whose image file is cut short (they must be dead-lettered)

    def validate(self, where: str) -> None:
        if self.unlabelled < 0 or not 0 <= self.unlabelled_broken <= self.unlabelled:
            raise ConfigError(f"{where}: unlabelled must be >= 0 and unlabelled_broken in [0, unlabelled]")
        if self.items < 1:
            raise ConfigError(f"{where}.items: expected >= 1, found {self.items}")
        if self.width < 128 or self.height < 128:
            raise ConfigError(f"{where}: width and height must be >= 128 so faces and words fit")
        if not 0 <= self.label_noise < 0.5 or not 0 <= self.missing_description <= 1:
            raise ConfigError(f"{where}: label_noise must be in [0, 0.5), missing_description in [0, 1]")
