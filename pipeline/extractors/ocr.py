"""OCR: easyocr (packaged English weights, downloads disabled) finds 0..N text boxes per image;
each box's text is embedded by the text encoder. Text, box and confidence are kept per element."""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.extractors.base import (
    ImageReading,
    ItemResult,
    SetModelHandler,
    register,
    require_file,
)
from pipeline.extractors.text import PACKAGED_MINILM, TextEncoder, _weights_file, encode_sets, text_dim
from pipeline.features import element, file_sha256, json_sha256, tree_sha256
from pipeline.runtime import resolve_device

OCR_FILES = ("craft_mlt_25k.pth", "english_g2.pth")


@dataclass(frozen=True)
class OcrConfig:
    """Settings of an `ocr` modality."""

    kind: str = "ocr"
    min_confidence: float = 0.3  # boxes read with lower confidence are dropped
    canvas_size: int = 2560  # easyocr's detector canvas; images larger than this are shrunk
    min_size: int = 10  # smallest text box in pixels
    max_boxes: int = 32
    model_dir: str | None = None  # folder with the two weights files; null: the packaged ones
    text_model: str = PACKAGED_MINILM
    max_length: int = 32
    batch_size: int = 8  # images per batch
    text_batch_size: int = 64
    device: str = "auto"


def ocr_model_dir(cfg: OcrConfig) -> Path:
    if cfg.model_dir:
        return Path(cfg.model_dir).expanduser()
    import easyocr_en_models

    return Path(easyocr_en_models.model_dir())


def box_of(points: Any) -> list[float]:
    """Axis-aligned [x0, y0, x1, y1] around easyocr's four corner points."""
    pts = np.asarray(points, dtype=np.float32).reshape(-1, 2)
    return [float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()), float(pts[:, 1].max())]


def select_boxes(found: list[tuple[list[float], str, float]], min_confidence: float, max_boxes: int) -> list[int]:
    """Indices of the boxes kept, in reading order (top to bottom, left to right): (box [x0, y0, x1, y1],
    text, confidence) with text and confidence >= threshold, at most max_boxes."""
    keep = [i for i, (_, t, c) in enumerate(found) if t and t.strip() and float(c) >= min_confidence]
    keep.sort(key=lambda i: (found[i][0][1] + found[i][0][3]) / 2)
    lines: list[list[int]] = []
    for i in keep:  # a box joins the current line when its centre is within half a box height of it
        x0, y0, x1, y1 = found[i][0]
        if lines:
            lx0, ly0, lx1, ly1 = found[lines[-1][0]][0]
            if abs((y0 + y1) / 2 - (ly0 + ly1) / 2) <= max(y1 - y0, ly1 - ly0) / 2:
                lines[-1].append(i)
                continue
        lines.append([i])
    ordered = [i for line in lines for i in sorted(line, key=lambda j: found[j][0][0])]
    return ordered[:max_boxes]


class OcrModel:
    """easyocr Reader plus the text encoder, loaded once per worker."""

    def __init__(self, cfg: OcrConfig, device: str):
        import easyocr

        where = ocr_model_dir(cfg)
        for name in OCR_FILES:
            require_file(where / name, "easyocr")
        self._net_dir = tempfile.mkdtemp(prefix="dmms-easyocr-")  # easyocr writes here, not ~/.EasyOCR
        self.reader = easyocr.Reader(
            ["en"],
            gpu=device.startswith("cuda"),
            model_storage_directory=str(where),
            user_network_directory=self._net_dir,
            download_enabled=False,
            verbose=False,
        )
        self.encoder = TextEncoder(cfg.text_model, cfg.max_length, device)
        self.dim = self.encoder.dim


class OcrHandler(SetModelHandler):
    """Input: (H, W, 3) uint8 images; output: one element per kept text box."""

    def load(self) -> OcrModel:
        return OcrModel(self.cfg, str(resolve_device(self.cfg.device)))

    def infer_batch(self, batch: list[np.ndarray], model: OcrModel) -> list[ItemResult]:
        """Every box read with some text, in the detector's order (unfiltered: `select` filters later)."""
        found = []
        for img in batch:
            boxes = model.reader.readtext(img, canvas_size=self.cfg.canvas_size, min_size=self.cfg.min_size)
            found.append([(box_of(p), t.strip(), float(c)) for p, t, c in boxes if t.strip()])
        vecs = encode_sets(model.encoder, [[t for _, t, _ in f] for f in found], self.cfg.text_batch_size)
        return [
            ItemResult(v, [element(index=i, text=t, box=b, score=c) for i, (b, t, c) in enumerate(f)])
            for f, v in zip(found, vecs)
        ]


@register
class OcrExtractor(ImageReading):
    """Every text box easyocr reads: one element each (text, box, confidence kept), embedded by the text
    encoder."""

    kind = "ocr"
    config_class = OcrConfig
    handler_class = OcrHandler
    # easyocr and what it runs (torch, OpenCV, scikit-image, SciPy, Pillow), then the text encoder's libraries
    sources = ("pipeline.extractors.ocr", "pipeline.extractors.text", "pipeline.extractors.base", "pipeline.records")
    libraries = (
        "easyocr",
        "torch",
        "torchvision",
        "opencv-python-headless",
        "scikit-image",
        "scipy",
        "pillow",
        "numpy",
        "transformers",
        "tokenizers",
    )
    filter_params = ("min_confidence", "max_boxes")  # applied by `select` to the cached unfiltered set

    def describe_files(self) -> dict[str, Any]:
        """Provenance: the OCR weights and the text encoder; the vectors are the encoder's."""
        cfg = self.cfg
        where = ocr_model_dir(cfg)
        sums = [file_sha256(require_file(where / n, "easyocr")) for n in OCR_FILES]
        text_weights = _weights_file(cfg.text_model)
        sums.append(file_sha256(text_weights))
        combined = hashlib.sha256("+".join(sums).encode()).hexdigest()  # one checksum over all three files
        files = {**dict(zip(OCR_FILES, sums)), "text_encoder_folder": tree_sha256(text_weights.parent)}
        return {
            "extractor": "ocr",
            "model_id": f"easyocr:en+{cfg.text_model}",
            "weights_sha256": combined,
            "weights_files_sha256": dict(zip([*OCR_FILES, "text_encoder"], sums)),
            "model_files_sha256": json_sha256(files),
            "dim": text_dim(cfg.text_model),
        }

    def select(self, elements: list[dict[str, Any]]) -> list[int]:
        """Which boxes of a cached (unfiltered) set are kept, in output order."""
        return select_boxes(
            [(e["box"], e["text"], e["score"]) for e in elements], self.cfg.min_confidence, self.cfg.max_boxes
        )
