"""Pure per-record functions: path safety, image checks, value parsing, split assignment.

Ingest (and later the Beam jobs) call these same functions; none of them touches global state.
A record that cannot be used raises RejectError with a reason from schema.REJECT_REASONS.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
import stat
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from pipeline import schema

TRUE_WORDS = frozenset({"1", "true", "yes", "y", "pos", "positive"})
FALSE_WORDS = frozenset({"0", "false", "no", "n", "neg", "negative"})


class RejectError(Exception):
    """A record that cannot be accepted; `reason` is one of schema.REJECT_REASONS."""

    def __init__(self, reason: str, detail: str):
        if reason not in schema.REJECT_REASONS:
            raise ValueError(f"unknown reject reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageInfo:
    """What ingest records about an image that decoded fully."""

    width: int
    height: int
    sha256: str


def is_blank(value: Any) -> bool:
    """True for None, NaN, empty or whitespace-only strings and empty lists."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, (list, tuple)):
        return all(is_blank(v) for v in value)
    return False


def _has_surrogate(text: str) -> bool:
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def find_bad_utf8(row: Mapping[str, Any]) -> str | None:
    """Name the first field holding text that is not valid Unicode: bytes that were not UTF-8 (kept by
    surrogateescape) or a lone surrogate (a JSON escape such as \\ud800), in keys, values or nested lists."""

    def bad(value: Any) -> bool:
        if isinstance(value, str):
            return _has_surrogate(value)
        if isinstance(value, (list, tuple)):
            return any(bad(v) for v in value)
        if isinstance(value, dict):
            return any(bad(k) or bad(v) for k, v in value.items())
        return False

    for key, value in row.items():
        if bad(key) or bad(value):
            return str(key).encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
    return None


def stable_unit(key: str, salt: str) -> float:
    """A number in [0, 1) that depends only on `salt` and `key` (stable across runs and machines)."""
    digest = hashlib.sha256(f"{salt}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_split(key: str, fractions: Mapping[str, float], salt: str) -> str:
    """Deterministic split from a stable hash of the id, in the order of schema.SPLITS."""
    u = stable_unit(key, salt)
    edge = 0.0
    for name in schema.SPLITS:
        edge += fractions[name]
        if u < edge:
            return name
    return schema.SPLITS[-1]  # only reachable through float rounding when u is ~1


def normalise_split(value: Any) -> str:
    """Map a split value from a manifest to train/val/test, or reject it."""
    text = "" if is_blank(value) else str(value).strip().lower()
    if text not in schema.SPLIT_ALIASES:
        raise RejectError("bad_split", f"split value {value!r} is not one of {sorted(schema.SPLIT_ALIASES)}")
    return schema.SPLIT_ALIASES[text]


def resolve_media_path(root: Path, value: str) -> Path:
    """Resolve a manifest's media path inside `root`, rejecting anything that escapes it."""
    if "\x00" in value:
        raise RejectError("unsafe_path", f"path {value!r} contains a NUL byte")
    rel = PurePosixPath(value.strip().replace("\\", "/"))
    if rel.is_absolute() or (len(value) > 1 and value[1] == ":"):
        raise RejectError("unsafe_path", f"absolute path {value!r}; paths must be relative to the dataset folder")
    if ".." in rel.parts:
        raise RejectError("unsafe_path", f"path {value!r} contains '..'")
    path = root / Path(*rel.parts)
    try:
        real = path.resolve()
    except (RuntimeError, OSError) as exc:  # a symlink loop, a name the file system refuses
        raise RejectError("unreadable_image", f"cannot resolve {value!r}: {exc}") from None
    if not real.is_relative_to(root.resolve()):
        raise RejectError("unsafe_path", f"path {value!r} resolves to {real}, outside the dataset folder")
    return path


def open_regular(path: Path) -> BinaryIO:
    """Open a file for reading only if it is a regular file: a FIFO, a device or a folder named like an
    image is a reject, never a read that waits forever."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opened without O_NONBLOCK waits for a writer
    except (FileNotFoundError, NotADirectoryError):
        raise RejectError("missing_image", f"file not found: {path}") from None
    except OSError as exc:  # no permission, a symlink loop, a name too long
        raise RejectError("unreadable_image", f"cannot open {path}: {exc.strerror or exc}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        what = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
        raise RejectError("unreadable_image", f"{path} is {what}, not a regular file")
    return os.fdopen(fd, "rb")


def inspect_image(path: Path, max_pixels: int) -> ImageInfo:
    """Check an image: a regular file whose header size is within `max_pixels`, then fully decoded; its
    sha256 is streamed, so a huge file is never held in memory. Rejects missing, unreadable,
    undecodable and too large images."""
    with open_regular(path) as fh:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(fh) as img:  # reads the header only
                    width, height = img.size
                    if width * height > max_pixels:
                        raise RejectError(
                            "image_too_large",
                            f"{path}: {width}x{height} = {width * height} pixels exceeds the limit {max_pixels}",
                        )
                    img.load()
        except RejectError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise RejectError("image_too_large", f"{path}: {exc}") from exc
        except OSError as exc:  # PIL's "cannot identify", truncated data, and read errors
            raise RejectError("undecodable_image", f"{path}: {type(exc).__name__}: {exc}") from exc
        except Exception as exc:  # PIL raises many types for bad data: all mean "not decodable"
            raise RejectError("undecodable_image", f"{path}: {type(exc).__name__}: {exc}") from exc
        fh.seek(0)
        digest = hashlib.sha256()
        while block := fh.read(1 << 20):
            digest.update(block)
    return ImageInfo(width=width, height=height, sha256=digest.hexdigest())


def _scalars(value: Any, column: str, reason: str = "bad_value") -> list[str]:
    """The text items of a value: strings and numbers as text, lists flattened, blanks dropped; a JSON
    object is a reject (it has no one text)."""
    if isinstance(value, dict):
        raise RejectError(reason, f"column {column!r}: expected text or a list of texts, found a JSON object")
    if isinstance(value, (list, tuple)):
        return [text for v in value for text in _scalars(v, column, reason)]
    if is_blank(value):
        return []
    return [str(value).strip()]


def parse_text(value: Any, column: str = "text") -> str | None:
    """A text field: a string, or a list of strings joined by newlines (MM-IMDb plots)."""
    items = _scalars(value, column)
    return "\n".join(items) if items else None


def parse_list(value: Any, separator: str, column: str = "list", reason: str = "bad_value") -> list[str]:
    """A list field: a list, or a string split on `separator`; blanks dropped, order kept, deduplicated."""
    if isinstance(value, str):
        value = value.split(separator)
    out: list[str] = []
    for text in _scalars(value, column, reason):
        if text not in out:
            out.append(text)
    return out


def parse_number(value: Any, column: str) -> float | None:
    """A numeric field; blank is missing (None), anything non-numeric is rejected."""
    if is_blank(value):
        return None
    if isinstance(value, (bool, list, tuple, dict)):
        raise RejectError("bad_value", f"column {column!r}: expected a number, found {str(value)[:80]!r}")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise RejectError("bad_value", f"column {column!r}: expected a number, found {str(value)[:80]!r}") from None
    if not math.isfinite(number):
        raise RejectError("bad_value", f"column {column!r}: expected a finite number, found {str(value)[:80]!r}")
    return number


def parse_category(value: Any, column: str = "category") -> str | None:
    """A categorical field as a string (ints from JSON become their decimal text)."""
    items = _scalars(value, column)
    if len(items) > 1:
        raise RejectError("bad_value", f"column {column!r}: expected one value, found {len(items)}: {items[:5]}")
    return items[0] if items else None


def parse_labels(value: Any, kind: str, separator: str, positive_name: str, column: str = "labels") -> list[str] | None:
    """Labels of one row as a list of names; None when the cell is blank (no label)."""
    if is_blank(value):
        return None
    if kind == "multilabel":
        return parse_list(value, separator, column, "bad_label")
    items = _scalars(value, column, "bad_label")
    if kind == "multiclass":
        if len(items) != 1:
            raise RejectError("bad_label", f"multiclass row has {len(items)} labels: {items[:5]}")
        return items
    if len(items) != 1:
        raise RejectError("bad_label", f"binary row has {len(items)} labels: {items[:5]}")
    word = items[0].lower()
    if word in TRUE_WORDS or word == positive_name.lower():
        return [positive_name]
    if word in FALSE_WORDS:
        return []
    raise RejectError("bad_label", f"binary label {value!r} is not one of {sorted(TRUE_WORDS | FALSE_WORDS)}")


class ContentChangedError(ValueError):
    """A file whose bytes are no longer those ingest recorded."""


def read_checked(path: Path, sha256: str | None) -> bytes:
    """A file's bytes, checked against the sha256 ingest recorded (None: unchecked): what an extractor
    computes from them is stored under that sha256, so other bytes must never get that far."""
    with open_regular(path) as fh:
        data = fh.read()
    if sha256 is not None:
        found = hashlib.sha256(data).hexdigest()
        if found != sha256:
            raise ContentChangedError(
                f"{path} changed since ingest (sha256 {found[:16]}..., the manifest recorded "
                f"{sha256[:16]}...): run ingest again"
            )
    return data


def load_rgb(path: Path, sha256: str | None = None) -> Image.Image:
    """Decode an image for extraction: EXIF orientation applied, converted to 8-bit RGB, fully loaded.
    With `sha256` (the manifest's), bytes that differ from it are refused (ContentChangedError).

    High bit-depth greyscale (16-bit PNG, 32-bit integer or float TIFF) is scaled to 0..255 instead of
    clipped (a plain conversion turns a 16-bit image white); transparency is composited over white;
    palette, CMYK and bilevel images convert as usual.
    """
    from PIL import ImageOps

    with Image.open(io.BytesIO(read_checked(path, sha256))) as img:
        img = ImageOps.exif_transpose(img)
        img.load()
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
            arr = np.asarray(img, dtype=np.float64)
            top = 65535.0 if img.mode != "F" and arr.max(initial=0) > 255 else 255.0
            if img.mode == "F" and arr.max(initial=0) <= 1.0:
                top = 1.0
            img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).round().astype(np.uint8), "L")
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return img.convert("RGB")


_ABBREVIATION = re.compile(r"(?:^|\s)(?:Mr|Mrs|Ms|Dr|Prof|St|Jr|Sr|vs|etc|e\.g|i\.e)\.$", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?…])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9À-Ý])")


def split_sentences(text: str | None, max_sentences: int, min_chars: int = 2) -> list[str]:
    """Split a text into sentences (paragraph breaks first, then sentence ends); blanks dropped.

    A short text is one element; past `max_sentences` the rest is merged into the last element so
    no text is lost.
    """
    if text is None or not text.strip():
        return []
    out: list[str] = []
    for para in re.split(r"\n\s*\n|\n", text):
        pieces: list[str] = []
        for sent in _SENTENCE_END.split(para.strip()):
            if pieces and _ABBREVIATION.search(pieces[-1]):
                pieces[-1] = f"{pieces[-1]} {sent}"  # "Mr. Smith" is not a sentence end
            else:
                pieces.append(sent)
        out.extend(s for s in (" ".join(p.split()) for p in pieces) if len(s) >= min_chars)
    if max_sentences > 0 and len(out) > max_sentences:
        out = out[: max_sentences - 1] + [" ".join(out[max_sentences - 1 :])]
    return out
