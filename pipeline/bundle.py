"""The model bundle: how a trained model is saved, loaded, checked against features, and run.

A bundle (`model.pt`) holds plain tensors and data only (loaded with `weights_only=True`): the
weights, the model and training config, the task, label names and thresholds, the dimension and
categorical vocabulary sizes of each modality, the provenance of every feature set it was trained on,
and the dataset contract of training (so a new folder can be scored the same way).

Train writes bundles; predict and score load them as a typed `Bundle` (with a `ModalityRecord` per
modality); nothing else reads the saved mapping. Importable with torch, pyarrow, numpy and pyyaml.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline import features, runtime
from pipeline.config import from_dict, to_dict
from pipeline.features import FeatureMismatchError, file_sha256
from pipeline.model import ModelConfig, build_model
from pipeline.setdata import FeatureStore, read_manifest_labels

BUNDLE_FORMAT = 2  # 2: meta statistics as ordered lists (format 1 is migrated on load)


@dataclass(frozen=True)
class ModalityRecord:
    """What a bundle records of one modality's features (features.PROVENANCE_KEYS), checked again at
    prediction and handed to extraction when scoring new data."""

    modality: str
    kind: str
    dim: int
    params: dict[str, Any] = dataclasses.field(default_factory=dict)  # the extractor's, as extraction read them
    extractor: str | None = None
    model_id: str | None = None
    weights_sha256: str | None = None
    model_files_sha256: str | None = None  # absent from bundles written before model folders were digested
    runs_on: dict[str, str] | None = None  # what ran the networks (OCR's runtime); absent before runtimes
    manifest_sha256: str | None = None
    embedder: str | None = None  # faces
    stats: dict[str, Any] | None = None  # meta: statistics in column order
    software: dict[str, Any] | None = None  # libraries, Python and code version the features were made with

    @classmethod
    def from_meta(cls, name: str, meta: dict[str, Any]) -> ModalityRecord:
        """The record of a feature set's provenance (unknown keys are not kept)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{"modality": name, **{k: meta[k] for k in features.PROVENANCE_KEYS if k in meta and k in known}})

    def as_dict(self) -> dict[str, Any]:
        """The recorded keys (None and empty params left out, as a provenance mapping): what comparisons
        and extraction read."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None and v != {}}

    def vocabularies(self) -> list[tuple[str, list[str]]]:
        """(column, train vocabulary) of each categorical meta column, in category-id order."""
        return features.vocabularies(self.as_dict(), f"bundle.provenance.{self.modality}")


@dataclass(frozen=True)
class Bundle:
    """A trained model: its weights and everything needed to rebuild, check and apply it to new data.

    Saved as plain data (`to_file`, loaded with torch's weights_only); `load` checks the format and
    migrates earlier ones."""

    model_config: ModelConfig
    train_config: dict[str, Any]
    task: str
    label_names: list[str]
    thresholds: list[float]  # one per label
    dims: dict[str, int]  # modality -> vector dimension
    categories: dict[str, list[int]]  # modality -> vocabulary size of each categorical column
    provenance: dict[str, ModalityRecord]
    dataset: dict[str, Any] | None = None  # the dataset contract of training (scoring reads new folders with it)
    fields: dict[str, list[str]] | None = None  # the manifest's columns by role
    state_dict: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict, repr=False)
    format: int = BUNDLE_FORMAT

    @property
    def modalities(self) -> list[str]:
        return sorted(self.provenance)

    def build_model(self, device: str | torch.device = "cpu") -> nn.Module:
        """The model with its weights, in eval mode on `device`."""
        model = build_model(self.model_config, self.dims, self.categories, len(self.label_names))
        model.load_state_dict(self.state_dict)
        return model.to(device).eval()

    def to_file(self, path: Path) -> None:
        """Save as plain tensors and data (no pickled classes)."""
        raw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        raw["model_config"] = to_dict(self.model_config)
        raw["provenance"] = {m: rec.as_dict() for m, rec in self.provenance.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(raw, path)

    @classmethod
    def from_raw(cls, raw: Any, path: Path) -> Bundle:
        """A bundle from what torch.load returned: format checked (format 1 migrated), types built."""
        if isinstance(raw, dict) and raw.get("format") == 1:
            raw = migrate_format_1(raw, path)
        if not isinstance(raw, dict) or raw.get("format") != BUNDLE_FORMAT:
            found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise runtime.UserError(
                f"{path}: bundle format {found!r} not supported (this version reads "
                f"{BUNDLE_FORMAT} and migrates 1); retrain the model with this version"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(
            **{
                **{k: v for k, v in raw.items() if k in known},
                "model_config": from_dict(ModelConfig, raw["model_config"], "bundle.model_config"),
                "provenance": {m: ModalityRecord.from_meta(m, rec) for m, rec in raw["provenance"].items()},
            }
        )


def load_bundle(path: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Bundle]:
    """Rebuild a model from a bundle (weights_only: no arbitrary code is unpickled)."""
    try:
        raw = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise runtime.UserError(f"model bundle not found: {path}") from None
    except IsADirectoryError:
        raise runtime.UserError(f"{path} is a folder; give the model.pt inside it") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a file that is not a bundle
        raise runtime.UserError(
            f"{path} is not a model bundle written by train ({type(exc).__name__}: {str(exc)[:160]})"
        ) from None
    try:
        bundle = Bundle.from_raw(raw, path)
        model = bundle.build_model(device)
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise runtime.UserError(
            f"{path}: the model bundle is incomplete or damaged ({type(exc).__name__}: {str(exc)[:160]})"
        ) from None
    return model, bundle


def _ordered_meta_stats(rec: dict[str, Any], fields: dict[str, Any] | None) -> dict[str, Any]:
    """Format-1 meta statistics (objects keyed by column, read back in sorted order) as the ordered lists
    of format 2, in the order extraction encoded them: the params' column lists, or (null) the manifest's."""
    stats, params = rec["stats"], rec.get("params") or {}
    order = {}
    for role in ("numeric", "categorical"):
        chosen = params.get(role)
        if chosen is None:
            if not fields or role not in fields:
                raise KeyError(f"{role} column order (neither the params nor the manifest fields record it)")
            chosen = fields[role]
        order[role] = [c for c in chosen if c in stats[role]]
    return {
        "numeric": [{"column": c, **stats["numeric"][c]} for c in order["numeric"]],
        "categorical": [{"column": c, "values": list(stats["categorical"][c])} for c in order["categorical"]],
    }


def migrate_format_1(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    """A format-1 bundle as format 2: its meta statistics as ordered lists (and their checksum recomputed
    the way extraction now computes it). Its model is unchanged: the embedding tables keep their sizes."""
    raw = {**raw, "provenance": {m: dict(rec) for m, rec in raw.get("provenance", {}).items()}}
    for m, rec in raw["provenance"].items():
        if isinstance(rec.get("stats"), dict) and isinstance(rec["stats"].get("numeric"), dict):
            try:
                rec["stats"] = _ordered_meta_stats(rec, raw.get("fields"))
            except (KeyError, TypeError, AttributeError) as exc:
                raise runtime.UserError(
                    f"{path}: a bundle of an earlier version whose meta modality {m!r} cannot be "
                    f"read ({exc}); retrain the model with this version (dvc repro train)"
                ) from None
            rec.pop("categorical", None)
            rec["weights_sha256"] = features.json_sha256(rec["stats"])  # as extractors.meta computes it
    raw["format"] = BUNDLE_FORMAT
    return raw


def check_store_matches(bundle: Bundle, store: FeatureStore) -> None:
    """Refuse features whose extractor, model, weights, dimension or meta statistics differ from the bundle's."""
    problems = []
    for m, record in bundle.provenance.items():
        meta = store.meta.get(m)
        if meta is None:
            problems.append(f"{m}: missing")
            continue
        rec = record.as_dict()
        problems += [
            f"{m}.{d}"
            for d in features.provenance_diffs(
                rec, meta, features.keys_to_match(rec, features.MATCH_KEYS), "model has", "features have"
            )
        ]
    if problems:
        raise FeatureMismatchError("features do not match the model bundle: " + "; ".join(problems))


def check_same_manifest(store: FeatureStore, manifest: Path, features_root: Path) -> None:
    """Refuse feature sets extracted from another manifest than `manifest`."""
    sha = file_sha256(manifest)  # FeatureStore.load already checked that all sets share one manifest
    if any(meta["manifest_sha256"] != sha for meta in store.meta.values()):
        raise FeatureMismatchError(
            f"features under {features_root} were extracted from another manifest than {manifest}"
        )


def feature_dirs(root: Path, modalities: Sequence[str] | None, what: str = "train.modalities") -> dict[str, Path]:
    """Modality -> feature folder: the `modalities` named, or (null) every folder under `root`.

    A folder without features.parquet is an extraction that did not finish (killed, or failed): with
    `modalities` null it is an error naming it, never a modality silently left out.
    """
    if not root.is_dir():
        raise runtime.UserError(f"features folder not found: {root}")
    folders = {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")}
    found = {name: p for name, p in folders.items() if (p / "features.parquet").is_file()}
    if modalities is None:
        unfinished = sorted(set(folders) - set(found))
        if unfinished:
            raise runtime.UserError(
                f"{root}: modality folder(s) {unfinished} hold no features.parquet: their extraction did not finish. "
                f"Run it again (dvc repro extract@{unfinished[0]}), or name the modalities to use in {what}"
            )
        if not found:
            raise runtime.UserError(f"no feature sets under {root} (expected <modality>/features.parquet)")
        return found
    missing = [m for m in modalities if m not in found]
    if missing:
        raise runtime.UserError(f"{what} {missing} have no features under {root}; found {sorted(found)}")
    return {m: found[m] for m in modalities}


@dataclass
class ScoringInputs:
    """A loaded bundle with the manifest's items and the matching features, on the model's device."""

    model: nn.Module
    bundle: Bundle
    store: FeatureStore
    dirs: dict[str, Path]  # modality -> feature folder
    ids: list[str]
    splits: list[str]
    labels: list[list[str] | None]


def load_scoring_inputs(model_path: Path, manifest: Path, features_root: Path, device: str) -> ScoringInputs:
    """The bundle's model, the manifest's items and the matching feature store (mismatches refused)."""
    model, bundle = load_bundle(model_path, runtime.resolve_device(device))
    ids, splits, labels, _ = read_manifest_labels(manifest)
    dirs = feature_dirs(features_root, bundle.modalities, f"the model's modalities {bundle.modalities}:")
    store = FeatureStore.load(dirs, ids)
    check_store_matches(bundle, store)
    check_same_manifest(store, manifest, features_root)
    return ScoringInputs(model, bundle, store.to(next(model.parameters()).device), dirs, ids, splits, labels)


# --------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------


def to_probs(task: str, logits: torch.Tensor) -> torch.Tensor:
    """Softmax over classes (multiclass) or a sigmoid per label."""
    return logits.softmax(1) if task == "multiclass" else logits.sigmoid()


@torch.no_grad()
def logits(
    model: nn.Module, store: FeatureStore, idx: torch.Tensor, batch_size: int = 1024, drop: frozenset[str] = frozenset()
) -> torch.Tensor:
    """Logits (len(idx), L) in eval mode, in chunks of `batch_size`; `drop` removes modalities."""
    model.eval()
    out = [model(store.batch(idx[s : s + batch_size], drop)).float() for s in range(0, idx.numel(), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, 0)


@torch.no_grad()
def predict(
    model: nn.Module,
    store: FeatureStore,
    idx: torch.Tensor,
    task: str,
    batch_size: int = 1024,
    drop: frozenset[str] = frozenset(),
) -> torch.Tensor:
    """Probabilities (len(idx), L) in eval mode; `drop` removes modalities at inference."""
    return to_probs(task, logits(model, store, idx, batch_size, drop))
