"""OCR: easyocr (packaged English weights, downloads disabled) finds 0..N text boxes per image;
each box's text is embedded by the text encoder. Text, box and confidence are kept per element."""

from __future__ import annotations

import hashlib
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import pipeline.extractors.hf as hf
import pipeline.extractors.ocr_runtime as ocr_runtime
from pipeline.extractors.base import (
    ImageReading,
    ItemResult,
    MissingModelError,
    SetModelHandler,
    register,
    require_file,
)
from pipeline.extractors.text import PACKAGED_MINILM, TextEncoder, encode_sets, model_dir, text_dim
from pipeline.features import element, file_sha256, json_sha256
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
    batch_size: int = 16  # images per batch (16 rather than 8: less idle time at a batch's end, 1.39x vs 1.31x)
    text_batch_size: int = 64
    device: str = "auto"
    # what runs easyocr's networks on the CPU (torch | onnxruntime | openvino) and at which precision
    # (easyocr: its own reads | fp32 | bf16 | int8); on CUDA easyocr's torch path runs (ocr_runtime)
    runtime: str = "onnxruntime"
    precision: str = "easyocr"
    parallel_images: int | None = None  # images read at once, one thread each; null: the threads given

    def validate(self, where: str) -> None:
        from pipeline.config import ConfigError

        try:
            ocr_runtime.check(self.runtime, self.precision, where)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.parallel_images is not None and self.parallel_images < 1:
            raise ConfigError(f"{where}.parallel_images: must be >= 1 (or null), not {self.parallel_images}")


def runs_on(cfg: OcrConfig, device: str) -> dict[str, str]:
    """What runs each of easyocr's networks for this config on `device`: on CUDA easyocr's own torch path
    (float32 on the GPU, the runtime and precision params apply to the CPU only)."""
    if device.startswith("cuda"):
        import torch

        return {
            "detector": f"torch {torch.__version__} cuda fp32",
            "recogniser": f"torch {torch.__version__} cuda fp32",
        }
    return ocr_runtime.describe(cfg.runtime, cfg.precision)


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


_THREADS_LOCK = threading.Lock()
_READERS = 0  # batches being read in parallel in this process, on one torch thread each
_SAVED_THREADS = 1


class OcrModel:
    """easyocr Reader (its networks run by the configured runtime) plus the text encoder, loaded once per
    worker."""

    def __init__(self, cfg: OcrConfig, device: str, graphs: Path):
        import easyocr
        import torch

        where = ocr_model_dir(cfg)
        for name in OCR_FILES:
            require_file(where / name, "easyocr")
        cuda = device.startswith("cuda")
        if not cuda:  # this worker's CPU and packages, not only the stage's (bf16 needs the instructions)
            ocr_runtime.check(cfg.runtime, cfg.precision)
        threads = torch.get_num_threads()
        # CPU: images are read `parallel` at a time, each on one thread (torch and the runtimes release
        # the GIL; small per-box ops leave a second thread idle): the same reads, measured 1.17x faster
        self.parallel = 1 if cuda else (cfg.parallel_images or threads)
        self._net_dir = tempfile.mkdtemp(prefix="dmms-easyocr-")  # easyocr writes here, not ~/.EasyOCR
        self.reader = easyocr.Reader(
            ["en"],
            gpu=cuda,
            model_storage_directory=str(where),
            user_network_directory=self._net_dir,
            download_enabled=False,
            verbose=False,
            quantize=cfg.precision in ("easyocr", "int8"),  # easyocr's dynamic int8 recogniser (CPU only)
        )
        if not cuda and cfg.runtime != "torch":
            op_threads = 1 if self.parallel > 1 else threads
            ocr_runtime.install(self.reader, where, graphs, cfg, op_threads, self.parallel)
        self.encoder = TextEncoder(cfg.text_model, cfg.max_length, device)
        self.dim = self.encoder.dim

    @contextmanager
    def _one_thread_each(self):
        """torch on one thread per call while images are read in parallel. torch's thread count is the
        process's: batches read at once by several Beam threads share one count of readers, so the
        last one out (not the first) restores the threads."""
        global _READERS, _SAVED_THREADS
        import torch

        if self.parallel == 1:
            yield
            return
        with _THREADS_LOCK:
            if _READERS == 0:
                _SAVED_THREADS = torch.get_num_threads()
                torch.set_num_threads(1)
            _READERS += 1
        try:
            yield
        finally:
            with _THREADS_LOCK:
                _READERS -= 1
                if _READERS == 0:
                    torch.set_num_threads(_SAVED_THREADS)

    def read(self, images: list[np.ndarray], canvas_size: int, min_size: int) -> list[list]:
        """easyocr's readtext of each image, in order."""

        def one(img: np.ndarray) -> list:
            return self.reader.readtext(img, canvas_size=canvas_size, min_size=min_size)

        if self.parallel == 1 or len(images) == 1:
            return [one(img) for img in images]
        with self._one_thread_each(), ThreadPoolExecutor(min(self.parallel, len(images))) as pool:
            return list(pool.map(one, images))


class OcrHandler(SetModelHandler):
    """Input: (H, W, 3) uint8 images; output: one element per kept text box."""

    def load(self) -> OcrModel:
        return OcrModel(self.cfg, str(resolve_device(self.cfg.device)), self.extractor.graph_folder())

    def infer_batch(self, batch: list[np.ndarray], model: OcrModel) -> list[ItemResult]:
        """Every box read with some text, in the detector's order (unfiltered: `select` filters later)."""
        found = [
            [(box_of(p), t.strip(), float(c)) for p, t, c in boxes if t.strip()]
            for boxes in model.read(batch, self.cfg.canvas_size, self.cfg.min_size)
        ]
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
    # easyocr and what it runs (torch, OpenCV, scikit-image, SciPy, Pillow), then the text encoder's libraries;
    # the version of the runtime that runs easyocr's networks is in `runs_on` (describe_files)
    sources = (
        "pipeline.extractors.ocr",
        "pipeline.extractors.ocr_runtime",
        "pipeline.extractors.text",
        "pipeline.extractors.hf",
        "pipeline.extractors.base",
        "pipeline.records",
    )
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
        text_files = hf.folder_digests(model_dir(cfg.text_model))
        sums.append(text_files["weights"])
        combined = hashlib.sha256("+".join(sums).encode()).hexdigest()  # one checksum over all three files
        files = {**dict(zip(OCR_FILES, sums)), "text_encoder_folder": text_files["folder"]}
        # a named CUDA device is planned as such even where the stage runs without one (cluster workers
        # with GPUs); `auto` is what this machine has, and a worker that resolves it otherwise refuses
        device = cfg.device if cfg.device.startswith("cuda") else str(resolve_device(cfg.device))
        try:
            runs = runs_on(cfg, device)
        except ValueError as exc:  # the runtime's package is not installed here
            raise MissingModelError(str(exc)) from None
        return {
            "extractor": "ocr",
            "model_id": f"easyocr:en+{cfg.text_model}",
            "weights_sha256": combined,
            "weights_files_sha256": dict(zip([*OCR_FILES, "text_encoder"], sums)),
            "model_files_sha256": json_sha256(files),
            "dim": text_dim(cfg.text_model),
            "runs_on": runs,  # in the cache key; a worker running the networks otherwise refuses the job
        }

    def graph_folder(self) -> Path:
        """Where the runtime's graphs exported from easyocr's weights are kept: the job's artifacts folder
        (inside the extraction cache), else the user's cache folder."""
        return self.artifacts / "ocr-onnx" if self.artifacts else ocr_runtime.default_folder()

    def select(self, elements: list[dict[str, Any]]) -> list[int]:
        """Which boxes of a cached (unfiltered) set are kept, in output order."""
        return select_boxes(
            [(e["box"], e["text"], e["score"]) for e in elements], self.cfg.min_confidence, self.cfg.max_boxes
        )
