"""Cost per item of the Hugging Face models README "Choosing models" names, on this CPU, beside the
packaged defaults in the same run.

    python benchmarks/hf_backbones.py --posters ../shared/data/movie-posters --n 96

What is real and what is not: none of these models can be downloaded here, so each is built from its
published architecture (the config values below: layers, widths, patch size, input size, the
processor's resize and crop) with random weights. A dense network's arithmetic does not depend on its
weight values, so the time per item is the real model's on this machine; its vectors are not. A model
found locally (`--real`: a folder or the local hub cache, e.g. after `hf download`) is timed as it is
instead. The baselines are real: EfficientNet-Lite0 and all-MiniLM-L6-v2 with their packaged weights.

What is timed, per model: the extractor's own path over the same real posters (decode, the model's
image processor, the network, in batches of `--batch` items) or the same titles (tokenise, encode),
after the model has loaded and warmed up on one batch; median of `--repeats` rounds, interleaved.
Image models also run with four views (whole, top, middle, bottom thirds): the cost of `views`.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.extractors import hf, image, text  # noqa: E402

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
ViT_B = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}

# hub id -> how to build its architecture (published configs), and its processor
IMAGE_MODELS = {
    "openai/clip-vit-base-patch32": "clip",
    "google/siglip-base-patch16-224": "siglip",
    "facebook/dinov2-small": "dinov2",
}
TEXT_MODELS = {
    "sentence-transformers/all-mpnet-base-v2": "mpnet",
    "openai/clip-vit-base-patch32": "clip",
}


def build_image(kind: str, folder: Path) -> None:
    import transformers as T

    if kind == "clip":
        text = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12}
        text.update(num_attention_heads=8, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
        cfg = T.CLIPConfig(text_config=text, vision_config={**ViT_B, "image_size": 224, "patch_size": 32})
        T.CLIPModel(cfg).save_pretrained(folder)
        T.CLIPImageProcessor(
            size={"shortest_edge": 224},
            crop_size={"height": 224, "width": 224},
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
        ).save_pretrained(folder)
    elif kind == "siglip":
        text = {**ViT_B, "vocab_size": 32000, "max_position_embeddings": 64, "bos_token_id": 1, "eos_token_id": 1}
        cfg = T.SiglipConfig(text_config=text, vision_config={**ViT_B, "image_size": 224, "patch_size": 16})
        T.SiglipModel(cfg).save_pretrained(folder)
        T.SiglipImageProcessor(size={"height": 224, "width": 224}).save_pretrained(folder)
    elif kind == "dinov2":
        cfg = T.Dinov2Config(
            hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6, patch_size=14
        )
        T.Dinov2Model(cfg).save_pretrained(folder)
        T.BitImageProcessor(
            size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, do_center_crop=True
        ).save_pretrained(folder)


def build_text(kind: str, folder: Path) -> None:
    """The architecture with random weights and the packaged MiniLM's WordPiece tokenizer (token counts
    of English titles close to the real tokenizers': what the time depends on)."""
    import transformers as T

    if kind == "mpnet":
        T.MPNetModel(T.MPNetConfig(vocab_size=30527, **ViT_B)).save_pretrained(folder)
    elif kind == "clip":
        build_image("clip", folder)
    minilm = text.model_dir(text.PACKAGED_MINILM)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (minilm / name).is_file():
            shutil.copy(minilm / name, folder / name)


def posters(root: Path, n: int) -> list[tuple[Path, str]]:
    with open(root / "movies.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))[:n]
    return [(root / r["image"], r["title"]) for r in rows]


def time_images(backbone: str, views: list[str], items: list[Path], batch: int) -> float:
    """Seconds per item: decode, views, processor, network, as ImageExtractor + ImageHandler do."""
    ext = image.ImageExtractor(image.ImageConfig(backbone=backbone, views=tuple(views), device="cpu"))
    handler = ext.handler(ext.describe_files())
    model = handler.load_model()
    rows = [{"image": p.name, "image_sha256": None} for p in items]
    root = items[0].parent

    def run(chunk: list[dict[str, Any]]) -> None:
        handler.run_inference([ext.prepare(r, root) for r in chunk], model)

    run(rows[:batch])  # warm-up
    t0 = time.perf_counter()
    for s in range(0, len(rows), batch):
        run(rows[s : s + batch])
    return (time.perf_counter() - t0) / len(rows)


def time_texts(model: str, titles: list[str], batch: int) -> float:
    ext = text.TextExtractor(text.TextConfig(column="title", model=model, split_sentences=False, device="cpu"))
    handler = ext.handler(ext.describe_files())
    enc = handler.load_model()
    sets = [ext.prepare({"title": t}, Path(".")) for t in titles]
    sets = [s for s in sets if s]
    handler.run_inference(sets[:batch], enc)
    t0 = time.perf_counter()
    for s in range(0, len(sets), batch):
        handler.run_inference(sets[s : s + batch], enc)
    return (time.perf_counter() - t0) / len(sets)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--posters", type=Path, default=REPO.parent / "shared" / "data" / "movie-posters")
    ap.add_argument("--n", type=int, default=96, help="posters (and titles) timed")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--real", action="store_true", help="time a model found locally as it is")
    args = ap.parse_args()
    import torch

    items = posters(args.posters, args.n)
    tmp = Path(tempfile.mkdtemp(prefix="hf-bench-"))
    image_runs: dict[str, tuple[str, str]] = {"efficientnet-lite0 (packaged)": ("efficientnet-lite0", "real weights")}
    for hub_id, kind in IMAGE_MODELS.items():
        try:
            if not args.real:
                raise hf.MissingModelError("not asked for")
            image_runs[hub_id] = (f"hf:{hf.model_folder(hub_id)}", "real weights")
        except hf.MissingModelError:
            build_image(kind, tmp / f"img-{kind}")
            image_runs[hub_id] = (f"hf:{tmp / f'img-{kind}'}", "architecture, random weights")
    text_runs: dict[str, tuple[str, str]] = {"all-MiniLM-L6-v2 (packaged)": (text.PACKAGED_MINILM, "real weights")}
    for hub_id, kind in TEXT_MODELS.items():
        build_text(kind, tmp / f"txt-{kind}")
        text_runs[hub_id] = (str(tmp / f"txt-{kind}"), "architecture, random weights")

    print(f"# {len(items)} real posters / titles, batch {args.batch}, torch threads {torch.get_num_threads()}")
    results: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeats):
        for name, (backbone, _) in image_runs.items():
            for label, views in (("1 view", ["full"]), ("4 views", ["full", "top", "middle", "bottom"])):
                results.setdefault((name, label), []).append(
                    time_images(backbone, views, [p for p, _ in items], args.batch)
                )
        for name, (model, _) in text_runs.items():
            results.setdefault((name, "title"), []).append(time_texts(model, [t for _, t in items], args.batch))
    base = {
        "image": statistics.median(results[("efficientnet-lite0 (packaged)", "1 view")]),
        "text": statistics.median(results[("all-MiniLM-L6-v2 (packaged)", "title")]),
    }
    print(f"{'model':42s} {'what':8s} {'weights':30s} {'ms/item':>8s} {'items/s':>8s} {'vs default':>10s}")
    for (name, label), secs in results.items():
        med = statistics.median(secs)
        what = image_runs.get(name, text_runs.get(name))[1] if label != "title" else text_runs[name][1]
        ref = base["text"] if label == "title" else base["image"]
        print(f"{name:42s} {label:8s} {what:30s} {1000 * med:8.1f} {1 / med:8.1f} {med / ref:9.1f}x")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
