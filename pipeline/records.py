"""Pure per-record functions: path safety, image checks, value parsing, split assignment.

Ingest (and later the Beam jobs) call these same functions; none of them touches global state.
A record that cannot be used raises RejectError with a reason from schema.REJECT_REASONS.
"""
from __future__ import annotations

import hashlib
import io
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

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


def find_bad_utf8(row: Mapping[str, Any]) -> str | None:
    """Name the first field holding bytes that were not valid UTF-8 (read with surrogateescape)."""
    for key, value in row.items():
        for text in (key, value) if isinstance(value, str) else (key,):
            if isinstance(text, str) and any("\udc80" <= ch <= "\udcff" for ch in text):
                return str(key).encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
    return None


def stable_unit(key: str, salt: str) -> float:
    """A number in [0, 1) that depends only on `salt` and `key` (stable across runs and machines)."""
    digest = hashlib.sha256(f"{salt}\x00{key}".encode("utf-8")).digest()
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
        raise RejectError(
            "bad_split", f"split value {value!r} is not one of {sorted(schema.SPLIT_ALIASES)}"
        )
    return schema.SPLIT_ALIASES[text]


def resolve_media_path(root: Path, value: str) -> Path:
    """Resolve a manifest's media path inside `root`, rejecting anything that escapes it."""
    rel = PurePosixPath(value.strip().replace("\\", "/"))
    if rel.is_absolute() or (len(value) > 1 and value[1] == ":"):
        raise RejectError("unsafe_path", f"absolute path {value!r}; paths must be relative to the dataset folder")
    if ".." in rel.parts:
        raise RejectError("unsafe_path", f"path {value!r} contains '..'")
    path = root / Path(*rel.parts)
    real_root = root.resolve()
    real = path.resolve()
    if not real.is_relative_to(real_root):
        raise RejectError("unsafe_path", f"path {value!r} resolves to {real}, outside the dataset folder")
    return path


def inspect_image(path: Path, max_pixels: int) -> ImageInfo:
    """Read and fully decode an image; reject missing, unreadable, undecodable or too large ones."""
    if not path.exists():
        raise RejectError("missing_image", f"file not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as exc:  # a directory, no permission, an I/O error
        raise RejectError("unreadable_image", f"cannot read {path}: {exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
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
    except Exception as exc:  # PIL raises many types for bad data: all mean "not decodable"
        raise RejectError("undecodable_image", f"{path}: {type(exc).__name__}: {exc}") from exc
    return ImageInfo(width=width, height=height, sha256=digest)


def parse_text(value: Any) -> str | None:
    """A text field: a string, or a list of strings joined by newlines (MM-IMDb plots)."""
    if is_blank(value):
        return None
    if isinstance(value, (list, tuple)):
        return "\n".join(str(v).strip() for v in value if not is_blank(v))
    return str(value).strip()


def parse_list(value: Any, separator: str) -> list[str]:
    """A list field: a list, or a string split on `separator`; blanks dropped, order kept, deduplicated."""
    if is_blank(value):
        return []
    items = value if isinstance(value, (list, tuple)) else str(value).split(separator)
    out: list[str] = []
    for item in items:
        if is_blank(item):
            continue
        text = str(item).strip()
        if text not in out:
            out.append(text)
    return out


def parse_number(value: Any, column: str) -> float | None:
    """A numeric field; blank is missing (None), anything non-numeric is rejected."""
    if is_blank(value):
        return None
    if isinstance(value, bool):
        raise RejectError("bad_value", f"column {column!r}: expected a number, found {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RejectError("bad_value", f"column {column!r}: expected a number, found {value!r}") from None
    if not math.isfinite(number):
        raise RejectError("bad_value", f"column {column!r}: expected a finite number, found {value!r}")
    return number


def parse_category(value: Any) -> str | None:
    """A categorical field as a string (ints from JSON become their decimal text)."""
    if is_blank(value):
        return None
    return str(value).strip()


def parse_labels(value: Any, kind: str, separator: str, positive_name: str) -> list[str] | None:
    """Labels of one row as a list of names; None when the cell is blank (no label)."""
    if is_blank(value):
        return None
    if kind == "multilabel":
        return parse_list(value, separator)
    if kind == "multiclass":
        if isinstance(value, (list, tuple)):
            items = [v for v in value if not is_blank(v)]
            if len(items) != 1:
                raise RejectError("bad_label", f"multiclass row has {len(items)} labels: {value!r}")
            value = items[0]
        return [str(value).strip()]
    word = str(value).strip().lower()
    if word in TRUE_WORDS or word == positive_name.lower():
        return [positive_name]
    if word in FALSE_WORDS:
        return []
    raise RejectError(
        "bad_label", f"binary label {value!r} is not one of {sorted(TRUE_WORDS | FALSE_WORDS)}"
    )


def load_rgb(path: Path) -> Image.Image:
    """Decode an image for extraction: EXIF orientation applied, converted to RGB, fully loaded."""
    from PIL import ImageOps

    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
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
