"""The embedded demo dataset: small multimodal "posters" with labels planted in known modalities.

Everything comes from material that installed packages ship: the real photographs bundled with
scikit-image (backgrounds; the faces of `astronaut`, `camera` and the LFW subset), text drawn with
Pillow's built-in scalable font, and descriptions, tags and years from seeded templates.

Each label is driven by exactly one modality (PLANTED), with some label noise:

    Ensemble  <- faces        two or three faces pasted in (negatives: zero or one)
    Horror    <- ocr          the word FEAR drawn on the poster (negatives: another word, or none)
    Romance   <- description  a sentence about falling in love in the description
    Comedy    <- tags         the tag "funny" among the tags
    Classic   <- year         released before 1960
    Sci-Fi    <- image        a space photograph as the background

The output folder follows the dataset contract (manifest.csv + images/), with planted_labels.json
(the label -> modality map) and planted_items.csv (what was planted in each item) beside it.

Optionally a second folder holds a new batch for scoring: more items from the same generator
(drawn after the labelled ones, so the labelled set does not change), written without a labels
column, some with a cut-short image file; their labels are kept aside in truth.csv.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.config import DemoConfig

log = logging.getLogger(__name__)

PLANTED: dict[str, dict[str, str]] = {
    "Ensemble": {"modality": "faces", "rule": "two or three faces pasted into the poster"},
    "Horror": {"modality": "ocr", "rule": "the word FEAR drawn on the poster"},
    "Romance": {"modality": "description", "rule": "a sentence about falling in love in the description"},
    "Comedy": {"modality": "tags", "rule": "the tag 'funny' among the tags"},
    "Classic": {"modality": "meta", "rule": "the year is before 1960"},
    "Sci-Fi": {"modality": "image", "rule": "a space photograph (rocket, Hubble deep field, moon) as background"},
}
PLANTED_WORD = "FEAR"
PLANTED_TAG = "funny"
CLASSIC_BEFORE = 1960

SPACE_BACKGROUNDS = ("rocket", "hubble_deep_field", "moon")
OTHER_BACKGROUNDS = ("coffee", "chelsea", "brick", "grass", "gravel", "coins", "immunohistochemistry")
# Face boxes (left, top, right, bottom) in the bundled photographs, with a margin around the face.
FACE_CROPS = {"astronaut": (160, 35, 290, 200), "camera": (180, 95, 275, 210)}
N_LFW_FACES = 100  # the first 100 images of skimage's lfw_subset are faces

OTHER_WORDS = ("RIVER", "SUMMER", "GOLD", "HOME", "STORM", "CITY", "LEGEND", "SILVER", "ISLAND", "NORTH")
TAGS = (
    "classic",
    "atmospheric",
    "twist ending",
    "based on a book",
    "soundtrack",
    "cult",
    "visually stunning",
    "slow",
    "quirky",
    "dialogue",
)
COUNTRIES = ("US", "GB", "FR", "IN", "JP")
TITLE_ADJ = ("Silent", "Last", "Broken", "Hidden", "Golden", "Distant", "Second", "Long", "Quiet", "Red")
TITLE_NOUN = ("Harbor", "Road", "Promise", "Garden", "Letter", "Station", "Winter", "Bridge", "Mountain", "Door")
NAMES = ("Anna", "Marco", "Priya", "Tom", "Yuki", "Lena", "Omar", "Clara", "Diego", "Sofia")
PLACES = (
    "a small harbor town",
    "the capital",
    "a mountain village",
    "an old factory",
    "a desert road",
    "a crowded market",
    "a quiet suburb",
    "a river delta",
)
NEUTRAL = (
    "{a} returns to {p} after many years away.",
    "The story follows {a} through one difficult season in {p}.",
    "Old secrets surface when {a} inherits a house in {p}.",
    "{a} and {b} plan a daring heist in {p}.",
    "A long journey across {p} tests {a} and {b}.",
    "{a} trains every morning for the championship in {p}.",
    "A family gathers in {p} for a wedding that keeps going wrong.",
    "{a} investigates a string of thefts in {p}.",
    "Soldiers led by {a} hold a bridge outside {p}.",
    "{a} starts a new job at a newspaper in {p}.",
)
ROMANCE = (
    "{a} and {b} fall deeply in love in {p}.",
    "A chance meeting in {p} becomes a love affair between {a} and {b}.",
    "{a} falls in love with {b}, a stranger from {p}.",
    "Against all odds, {a} and {b} fall in love and marry in {p}.",
)


def _gray_to_rgb(arr: np.ndarray) -> Image.Image:
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255).astype(np.uint8)
    img = Image.fromarray(arr)
    return img.convert("RGB")


def load_material() -> dict[str, Any]:
    """The photographs used as backgrounds and faces, all shipped inside scikit-image."""
    from skimage import data as skd  # imported here: only the generator needs it

    backgrounds = {name: _gray_to_rgb(getattr(skd, name)()) for name in SPACE_BACKGROUNDS + OTHER_BACKGROUNDS}
    faces = [_gray_to_rgb(getattr(skd, name)()).crop(box) for name, box in sorted(FACE_CROPS.items())]
    lfw = skd.lfw_subset()[:N_LFW_FACES]
    faces += [_gray_to_rgb(face) for face in lfw]
    return {"backgrounds": backgrounds, "faces": faces, "n_named_faces": len(FACE_CROPS)}


def _background(rng: np.random.Generator, photo: Image.Image, size: tuple[int, int]) -> Image.Image:
    w, h = photo.size
    target = size[0] / size[1]
    scale = rng.uniform(0.7, 1.0)
    cw = min(w, int(h * target)) * scale
    ch = cw / target
    left = rng.uniform(0, w - cw)
    top = rng.uniform(0, h - ch)
    img = photo.crop((int(left), int(top), int(left + cw), int(top + ch))).resize(size, Image.BICUBIC)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return img


def _paste_faces(rng, img: Image.Image, material: dict[str, Any], n: int, band: tuple[int, int]) -> list[list[int]]:
    """Paste `n` faces side by side in the vertical band; returns their boxes."""
    boxes: list[list[int]] = []
    if n == 0:
        return boxes
    W = img.size[0]
    slot = W // n
    for i in range(n):
        # named photographs (sharper, larger) most of the time, LFW faces for variety
        if rng.random() < 0.7:
            face = material["faces"][int(rng.integers(material["n_named_faces"]))]
        else:
            face = material["faces"][material["n_named_faces"] + int(rng.integers(N_LFW_FACES))]
        fw = int(min(slot - 8, rng.uniform(64, 100)))
        fh = int(fw * face.size[1] / face.size[0])
        f = face.resize((fw, fh), Image.BICUBIC)
        if rng.random() < 0.5:
            f = f.transpose(Image.FLIP_LEFT_RIGHT)
        x = i * slot + int(rng.uniform(4, max(5, slot - fw - 4)))
        y = int(rng.uniform(band[0], max(band[0] + 1, band[1] - fh)))
        img.paste(f, (x, y))
        boxes.append([x, y, x + fw, y + fh])
    return boxes


def _draw_word(rng, img: Image.Image, word: str) -> list[int]:
    """Draw `word` in a contrasting box near the bottom, as a poster title would be; returns the box."""
    W, H = img.size
    draw = ImageDraw.Draw(img)
    size = int(rng.uniform(0.14, 0.18) * W)
    font = ImageFont.load_default(size=size)
    left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
    tw, th = right - left, bottom - top
    x = int(rng.uniform(8, max(9, W - tw - 8)))
    y = int(rng.uniform(0.80 * H, 0.90 * H - th))
    dark = rng.random() < 0.5
    box = [x - 6, y - 6, x + tw + 6, y + th + 6]
    draw.rectangle(box, fill=(20, 20, 20) if dark else (240, 240, 235))
    draw.text((x - left, y - top), word, font=font, fill=(250, 250, 240) if dark else (15, 15, 15))
    return box


def _description(rng, romance: bool) -> str:
    n = int(rng.integers(2, 5))
    picks = [NEUTRAL[int(i)] for i in rng.choice(len(NEUTRAL), size=n, replace=False)]
    if romance:
        picks.insert(int(rng.integers(0, n + 1)), ROMANCE[int(rng.integers(len(ROMANCE)))])
    a, b = rng.choice(len(NAMES), size=2, replace=False)
    p = PLACES[int(rng.integers(len(PLACES)))]
    return " ".join(t.format(a=NAMES[int(a)], b=NAMES[int(b)], p=p) for t in picks)


def _make_item(rng, material: dict[str, Any], cfg: DemoConfig) -> tuple[dict[str, Any], Image.Image, dict[str, Any]]:
    """One item: its manifest row, its poster and what was planted, before ids and noise."""
    size = (cfg.width, cfg.height)
    truth: dict[str, bool] = {
        "Ensemble": rng.random() < 0.35,
        "Horror": rng.random() < 0.35,
        "Romance": rng.random() < 0.35,
        "Comedy": rng.random() < 0.35,
        "Classic": rng.random() < 0.35,
        "Sci-Fi": rng.random() < 0.35,
    }
    has_description = rng.random() >= cfg.missing_description
    truth["Romance"] = truth["Romance"] and has_description

    bg_name = (SPACE_BACKGROUNDS if truth["Sci-Fi"] else OTHER_BACKGROUNDS)[
        int(rng.integers(len(SPACE_BACKGROUNDS if truth["Sci-Fi"] else OTHER_BACKGROUNDS)))
    ]
    img = _background(rng, material["backgrounds"][bg_name], size)
    n_faces = int(rng.integers(2, 4)) if truth["Ensemble"] else int(rng.integers(0, 2))
    face_boxes = _paste_faces(rng, img, material, n_faces, (int(0.2 * cfg.height), int(0.75 * cfg.height)))
    if truth["Horror"]:
        word = PLANTED_WORD
    else:
        word = OTHER_WORDS[int(rng.integers(len(OTHER_WORDS)))] if rng.random() < 0.85 else ""
    word_box = _draw_word(rng, img, word) if word else None

    tags = [TAGS[int(i)] for i in rng.choice(len(TAGS), size=int(rng.integers(0, 4)), replace=False)]
    if truth["Comedy"]:
        tags.insert(int(rng.integers(0, len(tags) + 1)), PLANTED_TAG)
    year = int(rng.integers(1925, CLASSIC_BEFORE)) if truth["Classic"] else int(rng.integers(CLASSIC_BEFORE, 2021))
    row = {
        "title": f"The {TITLE_ADJ[int(rng.integers(10))]} {TITLE_NOUN[int(rng.integers(10))]}",
        "description": _description(rng, truth["Romance"]) if has_description else "",
        "tags": "|".join(tags),
        "year": str(year),
        "country": COUNTRIES[int(rng.integers(len(COUNTRIES)))],
    }
    planted = {
        "faces": n_faces,
        "face_boxes": json.dumps(face_boxes),
        "word": word,
        "word_box": json.dumps(word_box) if word_box else "",
        "background": bg_name,
        "romance_sentence": int(truth["Romance"]),
        "funny_tag": int(truth["Comedy"]),
        "year": year,
    }
    return row, img, {"truth": truth, "planted": planted}


MANIFEST_COLUMNS = ("id", "image", "title", "description", "tags", "year", "country", "labels")
PLANTED_COLUMNS = (
    "id",
    "faces",
    "face_boxes",
    "word",
    "word_box",
    "background",
    "romance_sentence",
    "funny_tag",
    "year",
    "noisy_labels",
)


def _fresh_folder(out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    images = out_dir / "images"
    images.mkdir(exist_ok=True)
    for old in images.glob("*.jpg"):
        old.unlink()
    return images


def _next_item(rng, material: dict[str, Any], cfg: DemoConfig):
    while True:  # every item carries at least one label: a blank label cell means "missing"
        row, img, info = _make_item(rng, material, cfg)
        noisy = {name: (not v) if rng.random() < cfg.label_noise else v for name, v in info["truth"].items()}
        if any(noisy.values()):
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=cfg.jpeg_quality)
            return row, buf.getvalue(), info, noisy


def generate(cfg: DemoConfig, out_dir: Path, unlabelled_dir: Path | None = None) -> dict[str, Any]:
    """Write the demo dataset to `out_dir` (rewritten completely), and the unlabelled batch to
    `unlabelled_dir` when given; returns a summary."""
    rng = np.random.default_rng(cfg.seed)
    material = load_material()
    images = _fresh_folder(out_dir)

    rows, planted_rows = [], []
    positives = {name: 0 for name in PLANTED}
    width = len(str(cfg.items))
    for i in range(cfg.items):
        row, jpeg, info, noisy = _next_item(rng, material, cfg)
        item_id = f"demo-{i:0{width}d}"
        (images / f"{item_id}.jpg").write_bytes(jpeg)
        labels = [name for name in PLANTED if noisy[name]]
        for name in labels:
            positives[name] += 1
        rows.append({"id": item_id, "image": f"images/{item_id}.jpg", **row, "labels": "|".join(labels)})
        flipped = [name for name in PLANTED if noisy[name] != info["truth"][name]]
        planted_rows.append({"id": item_id, **info["planted"], "noisy_labels": "|".join(flipped)})

    _write_csv(out_dir / "manifest.csv", MANIFEST_COLUMNS, rows)
    _write_csv(out_dir / "planted_items.csv", PLANTED_COLUMNS, planted_rows)
    summary = {
        "seed": cfg.seed,
        "items": cfg.items,
        "label_noise": cfg.label_noise,
        "labels": {name: {**PLANTED[name], "positives": positives[name]} for name in PLANTED},
        "planted_word": PLANTED_WORD,
        "planted_tag": PLANTED_TAG,
        "classic_before": CLASSIC_BEFORE,
        "space_backgrounds": list(SPACE_BACKGROUNDS),
    }
    (out_dir / "planted_labels.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    log.info("wrote %d demo items to %s; positives per label: %s", cfg.items, out_dir, positives)
    if unlabelled_dir is not None:
        summary["unlabelled"] = _unlabelled(rng, material, cfg, unlabelled_dir)
    return summary


def _unlabelled(rng, material: dict[str, Any], cfg: DemoConfig, out_dir: Path) -> dict[str, Any]:
    """The new batch: manifest.csv without labels, images (some cut short), truth.csv aside."""
    images = _fresh_folder(out_dir)
    rows, truth = [], []
    width = len(str(max(cfg.unlabelled, 1)))
    broken = (
        set(int(i) for i in rng.choice(cfg.unlabelled, size=cfg.unlabelled_broken, replace=False))
        if cfg.unlabelled_broken
        else set()
    )
    for i in range(cfg.unlabelled):
        row, jpeg, info, noisy = _next_item(rng, material, cfg)
        item_id = f"new-{i:0{width}d}"
        (images / f"{item_id}.jpg").write_bytes(jpeg[: len(jpeg) // 3] if i in broken else jpeg)
        rows.append({"id": item_id, "image": f"images/{item_id}.jpg", **row})
        truth.append(
            {
                "id": item_id,
                "labels": "|".join(name for name in PLANTED if noisy[name]),
                "broken_image": int(i in broken),
            }
        )
    _write_csv(out_dir / "manifest.csv", MANIFEST_COLUMNS[:-1], rows)
    _write_csv(out_dir / "truth.csv", ("id", "labels", "broken_image"), truth)
    log.info("wrote %d unlabelled demo items (%d with a cut-short image) to %s", cfg.unlabelled, len(broken), out_dir)
    return {"items": cfg.unlabelled, "broken": sorted(f"new-{i:0{width}d}" for i in broken)}


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
