"""Hugging Face models named by hub id or local folder: image towers and text towers.

`hf:<hub id or folder>` names a model. A folder is used as it is; a hub id is looked up in the local
Hugging Face cache (`snapshot_download(local_files_only=True)`), and fetched from the hub only when the
modality says `allow_download: true`. Every file of the folder goes into the provenance (hence the
cache key), and a model whose weights do not fit its own config (random weights where trained ones
were meant) is refused rather than run.

Image towers: CLIP (the projected image embedding), SigLIP (the vision tower's pooled output, which is
its image embedding), any other composite model with `get_image_features`, and plain vision models
(DINOv2, ViT, ConvNeXt, ResNet, ...): the pooled output the model defines, or the CLS token (the
spatial mean for a convolutional map) where the checkpoint has no trained pooler.
Text towers: CLIP (projected text embedding), SigLIP (pooled output), or any encoder (mean-pooled
last hidden state). Each model's own image processor and tokenizer prepare its inputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.extractors.base import MissingModelError
from pipeline.features import digests_sha256, file_digests, file_sha256, json_sha256

PREFIX = "hf:"
PRECISIONS = ("fp32", "half")
# single-file weights, preferred in this order (their digest is the file's own sha256)
WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHTS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def is_hf(name: str | None) -> bool:
    return bool(name) and str(name).startswith(PREFIX)


def hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def first_line(exc: BaseException) -> str:
    """The first line of an error's text (library errors often run over several lines)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextmanager
def _online(allowed: bool) -> Iterator[None]:
    """Lift the hub client's offline mode (the stages set HF_HUB_OFFLINE=1 so that nothing reaches the
    network by accident) for a download the modality asked for with allow_download."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    if allowed:
        constants.HF_HUB_OFFLINE = False
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _looks_like_path(ref: str) -> bool:
    """A folder name rather than a hub id ('org/name', or a legacy bare name such as 'roberta-base')."""
    return ref.startswith(("/", ".", "~")) or ref.count("/") > 1 or Path(ref).expanduser().exists()


def model_folder(ref: str, allow_download: bool = False) -> Path:
    """The local folder of a model: `ref` (with or without `hf:`) is a folder, or a hub id found in
    the local Hugging Face cache (downloaded only when `allow_download`). A missing model is a
    MissingModelError naming what to download and where to put it."""
    ref = ref.removeprefix(PREFIX).strip()
    if not ref:
        raise MissingModelError("an empty model name: use hf:<hub id> or hf:<model folder>")
    path = Path(ref).expanduser()
    if path.is_dir():
        return path.resolve()
    if _looks_like_path(ref):
        raise MissingModelError(f"model folder {path} not found (or not a folder)")
    from huggingface_hub import snapshot_download

    try:
        with _online(allow_download):
            return Path(snapshot_download(ref, local_files_only=not allow_download))
    except Exception as exc:  # the hub client raises several types for "not here" and "no network"
        how = (
            f"it could not be downloaded ({type(exc).__name__}: {first_line(exc)})"
            if allow_download
            else "nothing is downloaded unless the modality sets allow_download: true"
        )
        raise MissingModelError(
            f"model {ref!r} is not a local folder and not in the local Hugging Face cache {hub_cache()}; {how}. "
            f"On a machine with network run `hf download {ref}` and copy that cache folder here (or point "
            f"HF_HUB_CACHE at it), or `hf download {ref} --local-dir DIR` and name the folder: hf:DIR"
        ) from None


def weights_digest(folder: Path, known: dict[str, str] | None = None) -> str:
    """sha256 of the weights transformers loads from a folder, in its order of preference: a single
    file's own sha256 (model.safetensors, pytorch_model.bin), or of every shard an index names.
    `known`: the folder's file_digests, when already computed (weights are not hashed twice)."""
    known = known or {}

    def sha(name: str) -> str:
        return known.get(name) or file_sha256(folder / name)

    for single, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (folder / single).is_file():
            return sha(single)
        if (folder / index).is_file():
            import json

            try:
                shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError) as exc:
                raise MissingModelError(f"{folder / index}: not a weights index ({first_line(exc)})") from None
            missing = [n for n in shards if not (folder / n).is_file()]
            if missing:
                raise MissingModelError(f"model folder {folder}: shard {missing[0]} named by {index} is missing")
            return json_sha256({n: sha(n) for n in shards})
    others = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHTS_SUFFIXES))
    if not others:
        raise MissingModelError(f"model folder {folder} has no weights file ({', '.join(WEIGHTS_SUFFIXES)})")
    return json_sha256({p.name: sha(p.name) for p in others})


def folder_digests(folder: Path) -> dict[str, str]:
    """Checksums of a model folder, each file read once: its weights, and every file of it (config,
    processor, tokenizer)."""
    digests = file_digests(folder)
    return {"weights": weights_digest(folder, digests), "folder": digests_sha256(digests)}


def describe_folder(ref: str, allow_download: bool) -> dict[str, str]:
    """folder_digests of the model `ref` names."""
    return folder_digests(model_folder(ref, allow_download))


def load_config(folder: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise MissingModelError(f"model folder {folder}: no usable config.json ({first_line(exc)})") from None


def _contrastive(config: Any) -> str | None:
    """clip or siglip for those image-text models, None for any other; SigLIP 2 is refused (its
    variable-resolution image inputs go beyond pixel_values)."""
    if config.model_type == "siglip2":
        raise MissingModelError("SigLIP 2 models are not supported (use a SigLIP, CLIP or DINOv2 model)")
    return config.model_type if config.model_type in ("clip", "siglip") else None


def image_family(config: Any) -> str:
    """How an image embedding is read off a model: clip | siglip | features (another composite model:
    its get_image_features) | pooled."""
    return _contrastive(config) or ("features" if hasattr(config, "vision_config") else "pooled")


def image_dim(config: Any) -> int:
    """The dimension of a model's image embedding, from its config (no weights loaded)."""
    family = image_family(config)
    if family == "clip":
        return int(config.projection_dim)
    if family == "siglip":
        return int(config.vision_config.hidden_size)
    if family == "features":
        return int(getattr(config, "projection_dim", None) or config.vision_config.hidden_size)
    for name in ("hidden_sizes", "hidden_size", "hidden_dim"):  # what the model's pooled output has
        value = getattr(config, name, None)
        if value:
            return int(value[-1] if isinstance(value, (list, tuple)) else value)
    raise MissingModelError(f"cannot tell the embedding size of a {config.model_type!r} model from its config")


def text_family(config: Any) -> str:
    """clip | siglip | encoder."""
    return _contrastive(config) or "encoder"


def text_dim(config: Any) -> int:
    family = text_family(config)
    if family == "clip":
        return int(config.projection_dim)
    if family == "siglip":
        text = config.text_config
        return int(getattr(text, "projection_size", None) or text.hidden_size)
    return int(config.hidden_size)


def text_max_length(config: Any) -> int | None:
    """The most tokens a CLIP/SigLIP text tower takes (its position embeddings); None for encoders."""
    if text_family(config) == "encoder":
        return None
    return int(config.text_config.max_position_embeddings)


def torch_dtype(precision: str, device: str) -> Any:
    """fp32, or half where the device runs it natively: float16 on CUDA, bfloat16 on a CPU with
    AVX512-BF16 or AMX. Elsewhere half is refused (ValueError) rather than emulated."""
    import torch

    if precision == "fp32":
        return torch.float32
    if precision != "half":
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if device.startswith("cuda"):
        return torch.float16
    from pipeline.extractors.ocr_runtime import cpu_has_bf16

    if cpu_has_bf16():
        return torch.bfloat16
    raise ValueError("precision half needs a GPU or a CPU with AVX512-BF16/AMX; this CPU has neither: use fp32")


def runs_on(precision: str, device: str) -> dict[str, str] | None:
    """What runs the network where it changes the numbers beyond float noise: half precision names
    its device type and dtype; fp32 is None (CPU and GPU agree within float tolerance)."""
    if precision == "fp32":
        return None
    kind = "cuda" if device.startswith("cuda") else "cpu"
    return {"backbone": f"torch {kind} {str(torch_dtype(precision, device)).split('.')[-1]}"}


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' load reports (unused text-tower weights when only the image tower loads, progress
    bars) at error level while a model loads; what matters is checked from the loading info."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _load(cls: Any, folder: Path, allowed_missing: tuple[str, ...] = (), **kwargs: Any) -> tuple[Any, bool]:
    """Load `cls` from `folder` in float32; refuse weights that leave parameters random (other than
    `allowed_missing` prefixes). Returns (model, whether any allowed part was missing)."""
    import torch

    try:
        with _quiet_transformers():
            # float32 whatever the checkpoint was saved in (transformers would keep its dtype)
            model, info = cls.from_pretrained(
                folder, local_files_only=True, output_loading_info=True, dtype=torch.float32, **kwargs
            )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise MissingModelError(f"model folder {folder}: cannot load {cls.__name__}: {first_line(exc)}") from None
    missing = [*(info.get("missing_keys") or []), *(info.get("mismatched_keys") or [])]
    missing = [k if isinstance(k, str) else str(k[0]) for k in missing]
    unexplained = [k for k in missing if not k.startswith(allowed_missing)]
    if unexplained:
        raise MissingModelError(
            f"model folder {folder}: its weights leave {len(unexplained)} parameters of {cls.__name__} "
            f"random (e.g. {unexplained[0]}); is it the checkpoint its config describes?"
        )
    return model, bool(missing)


def image_processor(folder: Path) -> Any:
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise MissingModelError(f"model folder {folder}: no usable image processor ({first_line(exc)})") from None


def pixels(processor: Any, images: list[Any]) -> np.ndarray:
    """PIL images or (H, W, 3) uint8 arrays -> the model's pixel_values, (n, 3, H, W) float32."""
    out = processor(images=list(images), return_tensors="pt")["pixel_values"]
    return out.float().numpy()


class ImageTower:
    """A Hugging Face image model in eval mode: pixel_values -> (n, D) image embeddings."""

    def __init__(self, ref: str, allow_download: bool, device: str, precision: str = "fp32"):
        import transformers

        self.folder = model_folder(ref, allow_download)
        config = load_config(self.folder)
        self.family = image_family(config)
        self.dim = image_dim(config)
        self.device = device
        self.dtype = torch_dtype(precision, device)
        self.cls_token = False
        if self.family == "clip":  # the vision tower and its projection, sized by the model's projection_dim
            vision = config.vision_config
            vision.projection_dim = config.projection_dim
            net, _ = _load(transformers.CLIPVisionModelWithProjection, self.folder, config=vision)
        elif self.family == "siglip":
            net, _ = _load(transformers.SiglipVisionModel, self.folder)
        elif self.family == "features":
            net, _ = _load(transformers.AutoModel, self.folder)
        else:  # a checkpoint without a trained pooler (a classifier's backbone): the CLS token instead
            net, self.cls_token = _load(transformers.AutoModel, self.folder, allowed_missing=("pooler.",))
        self.net = net.to(device=device, dtype=self.dtype).eval()
        self.processor = image_processor(self.folder)
        # the dimension planned from the config must be the one the model gives: one probe, before any item
        from PIL import Image

        self(self.pixels([Image.new("RGB", (64, 64), (128, 128, 128))]))

    def pixels(self, images: list[Any]) -> np.ndarray:
        return pixels(self.processor, images)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """(n, 3, H, W) pixel_values -> (n, D) float32."""
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(device=self.device, dtype=self.dtype)
            if self.family == "clip":
                out = self.net(pixel_values=x).image_embeds
            elif self.family == "siglip":
                out = self.net(pixel_values=x).pooler_output
            elif self.family == "features":
                out = self.net.get_image_features(pixel_values=x)
                out = out if isinstance(out, torch.Tensor) else out.pooler_output
            else:
                res = self.net(pixel_values=x)
                pooled = getattr(res, "pooler_output", None)
                if pooled is None or self.cls_token:
                    hidden = res.last_hidden_state
                    pooled = hidden.mean(dim=(2, 3)) if hidden.ndim == 4 else hidden[:, 0]
                out = pooled
            out = out.reshape(out.shape[0], -1)
        if out.shape[1] != self.dim:
            raise MissingModelError(
                f"{self.folder}: embeddings of dimension {out.shape[1]}, its config says {self.dim}"
            )
        return out.float().cpu().numpy()


POOLING_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_max_tokens": "max"}


def sentence_pooling(folder: Path) -> str:
    """How a sentence encoder pools its tokens: what a sentence-transformers folder's Pooling module says
    (modules.json), mean for a plain encoder folder. cls | mean | max. A folder with a module this
    extractor does not run (a Dense projection after pooling, another pooling mode) is refused rather
    than embedded without it."""
    import json

    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return "mean"
    pooling = "mean"
    try:
        modules = json.loads(modules_file.read_text())
        for module in modules:
            kind = str(module.get("type", "")).rsplit(".", 1)[-1]
            if kind in ("Transformer", "Normalize"):  # the encoder itself; embeddings are normalised anyway
                continue
            if kind != "Pooling":
                raise MissingModelError(
                    f"model folder {folder}: its sentence-transformers pipeline has a {kind} module "
                    "(modules.json) that the text extractor does not run"
                )
            config = json.loads((folder / module["path"] / "config.json").read_text())
            modes = [name for name, on in config.items() if name.startswith("pooling_mode") and on]
            if len(modes) != 1 or modes[0] not in POOLING_MODES:
                raise MissingModelError(
                    f"model folder {folder}: pooling {modes} is not supported (cls, mean or max tokens)"
                )
            pooling = POOLING_MODES[modes[0]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise MissingModelError(
            f"model folder {folder}: unreadable modules.json or pooling config ({first_line(exc)})"
        ) from None
    return pooling


class TextTower:
    """A Hugging Face text model in eval mode: texts -> (n, D) L2-normalised embeddings (CLIP/SigLIP
    text embeddings, or an encoder's last hidden state pooled as its folder says, mean by default)."""

    def __init__(self, ref: str, allow_download: bool, max_length: int, device: str):
        import transformers

        self.folder = model_folder(ref, allow_download)
        config = load_config(self.folder)
        self.family = text_family(config)
        self.dim = text_dim(config)
        limit = text_max_length(config)
        self.max_length = min(max_length, limit) if limit else max_length
        # SigLIP's pooled token depends on the padding: texts are padded to its full length, as it was trained
        self.pad_to = limit if self.family == "siglip" else None
        self.pooling = sentence_pooling(self.folder) if self.family == "encoder" else None
        self.device = device
        try:
            with _quiet_transformers():
                self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise MissingModelError(f"model folder {self.folder}: no usable tokenizer ({first_line(exc)})") from None
        cls = {
            "clip": transformers.CLIPTextModelWithProjection,
            "siglip": transformers.SiglipTextModel,
            "encoder": transformers.AutoModel,
        }[self.family]
        extra: dict[str, Any] = {}
        if self.family == "clip":  # the text tower and its projection, sized by the model's projection_dim
            extra["config"] = config.text_config
            extra["config"].projection_dim = config.projection_dim
        net, _ = _load(cls, self.folder, allowed_missing=("pooler.",) if self.family == "encoder" else (), **extra)
        self.net = net.to(device).eval()

    def __call__(self, texts: list[str], batch_size: int) -> np.ndarray:
        """(n,) texts -> (n, D) float32, in chunks of `batch_size`."""
        import torch

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                chunk = texts[start : start + batch_size]
                if self.pad_to:
                    enc = self.tokenizer(chunk, truncation=True, max_length=self.max_length)
                    enc = self.tokenizer.pad(enc, padding="max_length", max_length=self.pad_to, return_tensors="pt")
                else:
                    enc = self.tokenizer(
                        chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
                    )
                enc = enc.to(self.device)
                if self.family == "clip":
                    pooled = self.net(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).text_embeds
                elif self.family == "siglip":
                    pooled = self.net(input_ids=enc["input_ids"]).pooler_output
                else:
                    hidden = self.net(**enc).last_hidden_state  # (B, L, D)
                    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
                    if self.pooling == "cls":
                        pooled = hidden[:, 0]
                    elif self.pooling == "max":
                        pooled = hidden.masked_fill(mask == 0, float("-inf")).max(dim=1).values
                    else:
                        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
                out[start : start + len(chunk)] = pooled.cpu().numpy()
        return out
