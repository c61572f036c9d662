"""Faces: facenet-pytorch MTCNN finds 0..N faces per image; each face becomes an element.

Each face is embedded by InceptionResnetV1 (VGGFace2) when its weights file is available locally,
otherwise by the image backbone on the aligned face crop (any backbone the image extractor takes,
Hugging Face models `hf:<hub id or folder>` among them); the file metadata says which.
Box, five landmarks and detection probability are kept per face.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import pipeline.extractors.hf as hf
from pipeline.extractors.base import (
    ImageReading,
    ItemResult,
    MissingModelError,
    SetModelHandler,
    register,
    require_file,
)
from pipeline.extractors.image import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    backbone_dim,
    backbone_files,
    check_backbone,
    load_backbone,
    plan_device,
    with_runs_on,
)
from pipeline.features import element, file_sha256, json_sha256

VGGFACE2_FILE = "20180402-114759-vggface2.pt"


@dataclass(frozen=True)
class FacesConfig:
    """Settings of a `faces` modality."""

    kind: str = "faces"
    min_face_size: int = 20
    thresholds: tuple[float, ...] = (0.6, 0.7, 0.7)  # MTCNN's three stage thresholds
    min_probability: float = 0.9  # faces below this detection probability are dropped
    max_faces: int = 10  # most probable faces kept per image
    crop_size: int = 160
    margin: int = 16
    embedder: str = "auto"  # auto | vggface2 | backbone
    vggface2_weights: str | None = None  # null: $TORCH_HOME/checkpoints/20180402-114759-vggface2.pt
    backbone: str = "efficientnet-lite0"  # the embedder `backbone`: as the image extractor's (hf: too)
    backbone_weights: str | None = None
    allow_download: bool = False  # hf: fetch a hub id missing from the local cache (not part of the cache key)
    precision: str = "fp32"  # of the backbone embedder: or half (float16 on CUDA, bfloat16 on a CPU with AVX512-BF16)
    batch_size: int = 16  # images per batch
    crop_batch_size: int = 32  # face crops per embedder call
    device: str = "auto"

    def validate(self, where: str) -> None:
        check_backbone(self.backbone, self.backbone_weights, self.precision, f"{where}.", "backbone_weights")


def vggface2_path(cfg: FacesConfig) -> Path:
    if cfg.vggface2_weights:
        return Path(cfg.vggface2_weights).expanduser()
    torch_home = os.environ.get("TORCH_HOME", os.path.join(os.path.expanduser("~"), ".cache", "torch"))
    return Path(torch_home) / "checkpoints" / VGGFACE2_FILE


def embedder_choice(cfg: FacesConfig) -> str:
    """Which embedder runs: vggface2 when its file is here (or asked for), else the backbone."""
    if cfg.embedder == "vggface2":
        require_file(vggface2_path(cfg), "faces embedder vggface2")
        return "vggface2"
    if cfg.embedder == "backbone":
        return "backbone"
    if cfg.embedder != "auto":
        raise ValueError(f"faces.embedder must be auto, vggface2 or backbone, found {cfg.embedder!r}")
    return "vggface2" if vggface2_path(cfg).is_file() else "backbone"


def select_faces(boxes: Any, probs: Any, min_probability: float, max_faces: int) -> list[int]:
    """Indices of the faces to keep: probability >= threshold, most probable first, at most max_faces."""
    if boxes is None:
        return []
    keep = [i for i, p in enumerate(probs) if p is not None and p >= min_probability]
    keep.sort(key=lambda i: (-float(probs[i]), float(boxes[i][0]), float(boxes[i][1])))
    return keep[:max_faces]


class FaceModel:
    """MTCNN detector plus the face embedder, loaded once per worker."""

    def __init__(self, cfg: FacesConfig, device: str):
        import torch
        from facenet_pytorch import MTCNN

        self.cfg = cfg
        self.device = device
        self.mtcnn = MTCNN(
            keep_all=True,
            min_face_size=cfg.min_face_size,
            thresholds=list(cfg.thresholds),
            post_process=False,
            device=device,
        ).eval()
        self.kind = embedder_choice(cfg)
        if self.kind == "vggface2":
            from facenet_pytorch import InceptionResnetV1

            net = InceptionResnetV1(pretrained=None, classify=False)
            path = vggface2_path(cfg)
            state = torch.load(path, map_location="cpu", weights_only=True)
            missing, _ = net.load_state_dict(
                {k: v for k, v in state.items() if not k.startswith("logits")}, strict=False
            )  # the classifier head ("logits") is not used
            if missing:  # not a VGGFace2 InceptionResnetV1 checkpoint: its embeddings would be random
                raise MissingModelError(
                    f"{path} lacks {len(missing)} InceptionResnetV1 weights "
                    f"(e.g. {missing[0]}); is it the VGGFace2 checkpoint?"
                )
            self.net = net.to(device).eval()
            self.dim = 512
        else:
            self.backbone = load_backbone(cfg.backbone, cfg.backbone_weights, cfg.allow_download, device, cfg.precision)
            self.dim = self.backbone.dim

    def detect(self, images: list[np.ndarray]) -> list[tuple[Any, Any, Any]]:
        """MTCNN on a batch; images of equal size run together (MTCNN batches only those)."""
        out: list[tuple[Any, Any, Any] | None] = [(None, [None], None)] * len(images)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, img in enumerate(images):
            # an image whose short side is below the smallest face MTCNN looks for has no face to find
            # (MTCNN itself fails on it: its image pyramid is empty)
            if min(img.shape[:2]) >= max(self.cfg.min_face_size, 12):
                by_shape.setdefault(img.shape, []).append(i)
        for idx in by_shape.values():
            stack = np.stack([images[i] for i in idx])
            boxes, probs, points = self.mtcnn.detect(stack, landmarks=True)
            for j, i in enumerate(idx):
                out[i] = (boxes[j], probs[j], points[j])
        return out  # type: ignore[return-value]

    def embed(self, crops: list[np.ndarray]) -> np.ndarray:
        """(n, 3, S, S) crops with values 0..255 -> (n, D)."""
        import torch

        if not crops:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = []
        for start in range(0, len(crops), self.cfg.crop_batch_size):
            x = np.stack(crops[start : start + self.cfg.crop_batch_size]).astype(np.float32)
            if self.kind == "vggface2":
                with torch.inference_mode():
                    out.append(self.net(torch.from_numpy((x - 127.5) / 128.0).to(self.device)).float().cpu().numpy())
            elif isinstance(self.backbone, hf.ImageTower):  # the model's own processor on the crops
                out.append(
                    self.backbone(self.backbone.pixels(list(x.clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1))))
                )
            else:
                x = (x / 255.0 - IMAGENET_MEAN[None, :, None, None]) / IMAGENET_STD[None, :, None, None]
                out.append(self.backbone(x.astype(np.float32)))
        return np.concatenate(out).astype(np.float32)


def crop_face(image: np.ndarray, box: Any, size: int, margin: int) -> np.ndarray:
    """Aligned square crop around a box (margin in output pixels): (3, size, size), values 0..255."""
    from facenet_pytorch.models.utils.detect_face import extract_face
    from PIL import Image

    return extract_face(Image.fromarray(image), box, image_size=size, margin=margin).numpy()


class FacesHandler(SetModelHandler):
    """Input: (H, W, 3) uint8 images; output: one element per detected face (unfiltered)."""

    def load(self) -> FaceModel:
        return FaceModel(self.cfg, plan_device(self.cfg.device))

    def infer_batch(self, batch: list[np.ndarray], model: FaceModel) -> list[ItemResult]:
        detections = model.detect(batch)
        crops, owners, elements = [], [], []
        for i, (image, (boxes, probs, points)) in enumerate(zip(batch, detections)):
            found = [] if boxes is None else [j for j, p in enumerate(probs) if p is not None]
            for rank, j in enumerate(found):  # every detection (unfiltered: `select` filters later)
                crops.append(crop_face(image, boxes[j], self.cfg.crop_size, self.cfg.margin))
                owners.append(i)
                elements.append(
                    element(
                        index=rank,
                        box=[float(v) for v in boxes[j]],
                        score=float(probs[j]),
                        landmarks=[float(v) for v in np.asarray(points[j]).reshape(-1)],
                    )
                )
        vecs = model.embed(crops)
        results = [ItemResult(np.zeros((0, model.dim), dtype=np.float32), []) for _ in batch]
        for i in range(len(batch)):
            rows = [k for k, o in enumerate(owners) if o == i]
            results[i] = ItemResult(vecs[rows] if rows else results[i].vectors, [elements[k] for k in rows])
        return results


@register
class FacesExtractor(ImageReading):
    """Every face MTCNN finds: one element each (box, landmarks, probability kept)."""

    kind = "faces"
    config_class = FacesConfig
    handler_class = FacesHandler
    # MTCNN's weights ship inside facenet-pytorch, so its version covers them
    sources = (
        "pipeline.extractors.faces",
        "pipeline.extractors.image",
        "pipeline.extractors.hf",
        "pipeline.extractors.base",
        "pipeline.records",
    )
    libraries = (
        "torch",
        "torchvision",
        "facenet-pytorch",
        "efficientnet-lite-pytorch",
        "transformers",
        "pillow",
        "numpy",
    )
    filter_params = ("min_probability", "max_faces")  # applied by `select` to the cached unfiltered set

    def describe_files(self) -> dict[str, Any]:
        """Provenance: detector, which embedder runs, its weights checksum and dimension."""
        cfg = self.cfg
        choice = embedder_choice(cfg)
        if choice == "vggface2":
            files = {"weights": file_sha256(vggface2_path(cfg))}
            model_id, dim = "mtcnn+inception_resnet_v1:vggface2", 512
        else:
            _, files = backbone_files(cfg.backbone, cfg.backbone_weights, cfg.allow_download)
            model_id, dim = f"mtcnn+{cfg.backbone}", backbone_dim(cfg.backbone, cfg.allow_download)
        out = {
            "extractor": "faces",
            "model_id": model_id,
            "embedder": choice,
            "weights_sha256": files["weights"],
            "model_files_sha256": json_sha256(files),
            "dim": dim,
        }
        return with_runs_on(out, cfg.precision, cfg.device) if choice == "backbone" else out

    def select(self, elements: list[dict[str, Any]]) -> list[int]:
        """Which faces of a cached (unfiltered) set are kept, in output order."""
        return select_faces(
            [e["box"] for e in elements], [e["score"] for e in elements], self.cfg.min_probability, self.cfg.max_faces
        )
