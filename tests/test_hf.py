"""Hugging Face backbones (`hf:<hub id or folder>`) and image views, on tiny random models the tests
build themselves (`from_config` + `save_pretrained` into a temp folder; nothing is downloaded)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO, extract_modality, ingested_demo
from PIL import Image

from pipeline.config import ConfigError
from pipeline.extractors import hf
from pipeline.extractors.image import ImageConfig, ImageExtractor, view_regions
from pipeline.features import read_features

transformers = pytest.importorskip("transformers")

SMALL = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
VISION = {**SMALL, "image_size": 32, "patch_size": 8}


def clip_tokenizer() -> tuple[object, int]:
    """A real byte-level BPE CLIP tokenizer over a tiny vocabulary (every byte, a few merges)."""
    from tokenizers.pre_tokenizers import ByteLevel

    chars = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges), len(vocab)


def build(kind: str, folder: Path) -> Path:
    """A tiny random model of `kind` with its image processor (and tokenizer) saved to `folder`."""
    T = transformers
    torch.manual_seed(0)
    if kind == "clip":
        tok, vocab = clip_tokenizer()
        text = {**SMALL, "vocab_size": vocab, "max_position_embeddings": 77}
        text.update(bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
        T.CLIPModel(T.CLIPConfig(text_config=text, vision_config=VISION, projection_dim=24)).save_pretrained(folder)
        tok.save_pretrained(folder)
        T.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    elif kind == "siglip":
        text = {**SMALL, "vocab_size": 99, "max_position_embeddings": 16, "bos_token_id": 1, "eos_token_id": 2}
        T.SiglipModel(T.SiglipConfig(text_config=text, vision_config=VISION)).save_pretrained(folder)
        T.SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    elif kind == "dinov2":
        T.Dinov2Model(T.Dinov2Config(**VISION)).save_pretrained(folder)
        T.BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    elif kind == "convnext":
        T.ConvNextModel(T.ConvNextConfig(hidden_sizes=[8, 16, 24, 40], depths=[1, 1, 1, 1])).save_pretrained(folder)
        T.ConvNextImageProcessor(size={"shortest_edge": 32}).save_pretrained(folder)
    elif kind == "vit-classifier":  # a classifier checkpoint: its backbone has no trained pooler
        T.ViTForImageClassification(T.ViTConfig(**VISION, num_labels=3)).save_pretrained(folder)
        T.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


DIMS = {"clip": 24, "siglip": 32, "dinov2": 32, "convnext": 40, "vit-classifier": 32}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-models")
    return {kind: build(kind, root / kind) for kind in DIMS}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Eight demo posters, ingested (no cache)."""
    return ingested_demo(tmp_path_factory.mktemp("hf-demo"), 8, 5, None)


def image_params(params: dict, name: str, **modality) -> dict:
    out = json.loads(json.dumps(params))
    out["extract"]["modalities"] = {name: {"kind": "image", "device": "cpu", "batch_size": 4, **modality}}
    return out


def vectors(out: Path) -> tuple[np.ndarray, list[list[dict]], dict]:
    table, meta = read_features(out / "features.parquet")
    sets = table.column("vectors").to_pylist()
    flat = np.array([v for s in sets for v in s], dtype=np.float32)
    return flat, table.column("elements").to_pylist(), meta


def image_of(seed: int = 0, size: tuple[int, int] = (40, 60)) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8))


# ------------------------------------------------------------------------------------------ image towers


@pytest.mark.parametrize("kind", ["clip", "siglip", "dinov2", "convnext"])
def test_each_hf_image_model_runs_through_the_image_stage_offline(kind, models, demo, tmp_path):
    params, manifest = demo
    p = image_params(params, "image", backbone=f"hf:{models[kind]}")
    m1 = extract_modality(p, "image", manifest, tmp_path / "a", tmp_path / "a.json")
    m2 = extract_modality(p, "image", manifest, tmp_path / "b", tmp_path / "b.json")
    assert m2["computed"] == 8, "the cache is off: the second run computes again"
    assert m1["written"] == m1["items_in"] == 8 and m1["failed"] == 0
    a, elements, meta = vectors(tmp_path / "a")
    b, _, _ = vectors(tmp_path / "b")
    assert a.shape == (8, DIMS[kind]), "one element per poster, of the model's embedding dimension"
    assert np.abs(a - b).max() < 1e-5, "two runs give the same vectors"
    assert np.abs(a).max() > 0 and np.unique(a.round(5), axis=0).shape[0] == 8, "each poster its own vector"
    prov = meta
    assert prov["model_id"] == f"hf:{models[kind]}" and prov["dim"] == DIMS[kind]
    assert all(len(s) == 1 and s[0]["box"] is not None for s in elements)


def test_clip_and_siglip_towers_give_the_models_own_image_embeddings(models):
    """The projected CLIP image embedding and SigLIP's image embedding, as the full models compute them."""
    imgs = [image_of(0), image_of(1, (64, 30))]
    for kind in ("clip", "siglip"):
        tower = hf.ImageTower(str(models[kind]), False, "cpu")
        px = tower.pixels(imgs)
        full = transformers.AutoModel.from_pretrained(models[kind], local_files_only=True).eval()
        with torch.inference_mode():
            want = full.get_image_features(pixel_values=torch.from_numpy(px))
        want = want if isinstance(want, torch.Tensor) else want.pooler_output
        assert np.abs(tower(px) - want.numpy()).max() < 1e-5, kind


def test_a_classifier_checkpoint_without_a_pooler_uses_the_cls_token(models):
    tower = hf.ImageTower(str(models["vit-classifier"]), False, "cpu")
    assert tower.cls_token and tower.dim == 32
    px = tower.pixels([image_of()])
    with torch.inference_mode():
        cls = tower.net(pixel_values=torch.from_numpy(px)).last_hidden_state[:, 0]
    assert np.abs(tower(px) - cls.numpy()).max() < 1e-6


def test_weights_that_leave_the_model_random_are_refused(models, tmp_path):
    import shutil

    folder = shutil.copytree(models["dinov2"], tmp_path / "dinov2")
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 3  # a layer the weights do not have would run with random weights
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf.MissingModelError, match="random"):
        hf.ImageTower(str(folder), False, "cpu")


def test_the_fingerprint_covers_every_file_of_the_model_folder(models, demo, tmp_path):
    """A changed processor config (any file of the folder) changes the provenance, so nothing is reused."""
    import shutil

    params, manifest = demo
    folder = shutil.copytree(models["convnext"], tmp_path / "convnext")
    p = image_params(params, "image", backbone=f"hf:{folder}")
    p["extract"]["job"]["cache_dir"] = str(tmp_path / "cache")
    ext = ImageExtractor(ImageConfig(backbone=f"hf:{folder}", device="cpu"))
    before = ext.describe_files()
    first = extract_modality(p, "image", manifest, tmp_path / "a", tmp_path / "a.json")
    again = extract_modality(p, "image", manifest, tmp_path / "b", tmp_path / "b.json")
    assert (first["computed"], again["computed"], again["reused"]) == (8, 0, 8)
    proc = json.loads((folder / "preprocessor_config.json").read_text())
    proc["image_mean"] = [0.1, 0.5, 0.9]  # was 0.5 each
    (folder / "preprocessor_config.json").write_text(json.dumps(proc))
    after = ext.describe_files()
    assert after["model_files_sha256"] != before["model_files_sha256"]
    assert after["weights_sha256"] == before["weights_sha256"], "the weights themselves did not change"
    changed = extract_modality(p, "image", manifest, tmp_path / "c", tmp_path / "c.json")
    assert changed["computed"] == 8, "a changed file of the model folder recomputes every item"
    a, _, _ = vectors(tmp_path / "a")
    c, _, _ = vectors(tmp_path / "c")
    assert np.abs(a - c).max() > 1e-3, "and the new processor settings give other vectors"


def test_the_faces_embedder_takes_an_hf_backbone(models):
    from pipeline.extractors.faces import FaceModel, FacesConfig, FacesExtractor

    cfg = FacesConfig(embedder="backbone", backbone=f"hf:{models['dinov2']}", device="cpu")
    described = FacesExtractor(cfg).describe_files()
    assert described["dim"] == 32 and described["model_id"] == f"mtcnn+hf:{models['dinov2']}"
    crops = [np.asarray(image_of(i, (160, 160))).transpose(2, 0, 1).astype(np.float32) for i in range(3)]
    vecs = FaceModel(cfg, "cpu").embed(crops)
    assert vecs.shape == (3, 32) and np.isfinite(vecs).all()


def test_half_precision_is_refused_where_the_device_cannot_run_it(models):
    from pipeline.extractors.ocr_runtime import cpu_has_bf16

    ext = ImageExtractor(ImageConfig(backbone=f"hf:{models['dinov2']}", precision="half", device="cpu"))
    if cpu_has_bf16():
        assert ext.describe_files()["runs_on"] == {"backbone": "torch cpu bfloat16"}
    else:
        with pytest.raises(ConfigError, match="precision"):
            ext.describe_files()
    with pytest.raises(ConfigError, match="precision"):
        ImageConfig(precision="fp8").validate("extract.modalities.image")
    with pytest.raises(ConfigError, match="weights"):
        ImageConfig(backbone=f"hf:{models['dinov2']}", weights="x.pt").validate("extract.modalities.image")


# ------------------------------------------------------------------------------------------ text towers


def test_a_clip_text_tower_runs_through_the_title_stage(models, demo, tmp_path):
    params, manifest = demo
    p = json.loads(json.dumps(params))
    title = {**p["extract"]["modalities"]["title"], "model": f"hf:{models['clip']}", "device": "cpu"}
    p["extract"]["modalities"] = {"title": title}
    m = extract_modality(p, "title", manifest, tmp_path / "t", tmp_path / "t.json")
    assert m["written"] == 8 and m["failed"] == 0
    vecs, elements, meta = vectors(tmp_path / "t")
    assert meta["dim"] == 24 and vecs.shape[1] == 24
    texts = [e["text"] for s in elements for e in s]
    full = transformers.CLIPModel.from_pretrained(models["clip"], local_files_only=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(models["clip"], local_files_only=True)
    with torch.inference_mode():
        enc = tok(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        want = full.get_text_features(**enc)
    want = want if isinstance(want, torch.Tensor) else want.pooler_output
    want = torch.nn.functional.normalize(want, dim=-1).numpy()
    assert np.abs(vecs - want).max() < 1e-5, "the projected, L2-normalised CLIP text embedding of each title"


# ------------------------------------------------------------------------------------------ missing model


def test_a_missing_model_is_one_line_naming_it_and_status_2(demo, tmp_path):
    params, manifest = demo
    (tmp_path / "p.yaml").write_text(
        "extract:\n  modalities:\n    image: {kind: image, backbone: 'hf:nobody/no-such-model', device: cpu}\n"
    )
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "extract",
            "--params",
            str(REPO / "params.yaml"),
            "--params",
            str(tmp_path / "p.yaml"),
            "--modality",
            "image",
            "--manifest",
            str(manifest),
            "--out",
            str(tmp_path / "out"),
            "--metrics",
            str(tmp_path / "m.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**__import__("os").environ, "HF_HUB_CACHE": str(tmp_path / "hub")},
    )
    assert run.returncode == 2, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "nobody/no-such-model" in last and "hf download" in last
    assert str(tmp_path / "hub") in last, "it says where the model was looked for"
    assert "Traceback" not in run.stderr


def test_a_hub_id_in_the_local_cache_loads_without_network(models, tmp_path, monkeypatch):
    """A model in the local hub cache's layout (refs/main -> snapshots/<rev>) is found by its id."""
    import shutil

    repo = tmp_path / "hub" / "models--someone--tiny-dinov2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123456789abcdef0123456789abcdef01234567")
    shutil.copytree(models["dinov2"], repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    folder = hf.model_folder("hf:someone/tiny-dinov2")
    assert folder.name == "0123456789abcdef0123456789abcdef01234567"
    assert hf.ImageTower("hf:someone/tiny-dinov2", False, "cpu").dim == 32


# ------------------------------------------------------------------------------------------ views


def test_four_views_give_four_elements_with_their_boxes(demo, tmp_path):
    params, manifest = demo
    p = image_params(params, "image", views=["full", "top", "middle", "bottom"])
    m = extract_modality(p, "image", manifest, tmp_path / "v", tmp_path / "v.json")
    assert m["elements"] == 4 * 8 and m["max_elements"] == 4
    vecs, elements, _ = vectors(tmp_path / "v")
    table = pq.read_table(manifest).to_pylist()
    sizes = {r["id"]: Image.open(Path(p["dataset"]["dir"]) / r["image"]).size for r in table}
    ids = pq.read_table(tmp_path / "v" / "features.parquet", columns=["id"]).column("id").to_pylist()
    for item, els in zip(ids, elements):
        w, h = sizes[item]
        assert [e["index"] for e in els] == [0, 1, 2, 3]
        boxes = [e["box"] for e in els]
        assert boxes[0] == [0, 0, w, h]
        assert boxes[1][1] == 0 and boxes[3][3] == h and boxes[1][3] == boxes[2][1] and boxes[2][3] == boxes[3][1]
        assert all(b[0] == 0 and b[2] == w for b in boxes[1:]), "thirds span the width"
    assert vecs.shape == (32, 1280)
    full_only = extract_modality(image_params(params, "image"), "image", manifest, tmp_path / "f", tmp_path / "f.json")
    f, _, _ = vectors(tmp_path / "f")
    assert full_only["elements"] == 8 and np.abs(vecs[0::4] - f).max() < 1e-4, "the full view is the default element"


def test_view_names_grids_and_boxes():
    assert view_regions(["full"]) == [(0.0, 0.0, 1.0, 1.0)]
    assert len(view_regions(["grid:2x3"])) == 6 and view_regions(["grid:2x3"])[1] == (1 / 3, 0.0, 2 / 3, 0.5)
    assert view_regions(["box:0,0.5,1,1"]) == [(0.0, 0.5, 1.0, 1.0)]
    for bad, why in [
        ([], "at least one"),
        (["corner"], "unknown view"),
        (["grid:0x2"], "1..8"),
        (["box:0,0,2,1"], "x1"),
    ]:
        with pytest.raises(ValueError, match=why):
            view_regions(bad)
    with pytest.raises(ValueError, match="twice"):
        view_regions(["full", "box:0,0,1,1"])
    with pytest.raises(ConfigError, match=r"image\.views"):
        ImageConfig(views=("full", "sideways")).validate("extract.modalities.image")


# ------------------------------------------------------------------------------------------ edge cases


def copy_minilm_tokenizer(folder: Path) -> None:
    """The packaged MiniLM's WordPiece tokenizer into `folder` (a real tokenizer for tiny text models)."""
    import shutil

    from pipeline.extractors import text

    minilm = text.model_dir(text.PACKAGED_MINILM)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (minilm / name).is_file():
            shutil.copy(minilm / name, folder / name)


def tiny_bert_folder(folder: Path, pooling: dict | None, extra_module: str | None = None) -> Path:
    """A tiny random BERT with the packaged MiniLM tokenizer, as a sentence-transformers folder when
    `pooling` is given (modules.json + 1_Pooling/config.json)."""
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(vocab_size=30522, **SMALL)).save_pretrained(folder)
    copy_minilm_tokenizer(folder)
    if pooling is not None:
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]
        if extra_module:
            modules.append(
                {"idx": 2, "name": "2", "path": "2_x", "type": f"sentence_transformers.models.{extra_module}"}
            )
        (folder / "modules.json").write_text(json.dumps(modules))
        (folder / "1_Pooling").mkdir()
        (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **pooling}))
    return folder


def test_a_sentence_encoder_pools_as_its_folder_says_or_is_refused(tmp_path):
    texts = ["the cat sat", "a much longer title about a dog and a cat"]
    mean = hf.TextTower(str(tiny_bert_folder(tmp_path / "plain", None)), False, 32, "cpu")
    cls = hf.TextTower(str(tiny_bert_folder(tmp_path / "cls", {"pooling_mode_cls_token": True})), False, 32, "cpu")
    assert (mean.pooling, cls.pooling) == ("mean", "cls")
    with torch.inference_mode():
        enc = cls.tokenizer(texts, padding=True, return_tensors="pt")
        want = torch.nn.functional.normalize(cls.net(**enc).last_hidden_state[:, 0], dim=-1).numpy()
    assert np.abs(cls(texts, 2) - want).max() < 1e-5, "the CLS token, as the Pooling module says"
    assert np.abs(cls(texts, 2) - mean(texts, 2)).max() > 1e-3
    dense = tiny_bert_folder(tmp_path / "dense", {"pooling_mode_mean_tokens": True}, extra_module="Dense")
    with pytest.raises(hf.MissingModelError, match="Dense module"):
        hf.TextTower(str(dense), False, 32, "cpu")
    weighted = tiny_bert_folder(tmp_path / "weighted", {"pooling_mode_weightedmean_tokens": True})
    with pytest.raises(hf.MissingModelError, match="not supported"):
        hf.TextTower(str(weighted), False, 32, "cpu")


def test_siglip_text_is_padded_to_the_models_length_whatever_the_batch(tmp_path):
    """SigLIP pools the last position: each text is padded to the model's full length, so its embedding
    does not depend on its batch, and equals the model's own text embedding of that padded input."""
    torch.manual_seed(0)
    folder = tmp_path / "siglip"
    text_cfg = {**SMALL, "vocab_size": 30522, "max_position_embeddings": 16, "bos_token_id": 101, "eos_token_id": 102}
    transformers.SiglipModel(transformers.SiglipConfig(text_config=text_cfg, vision_config=VISION)).save_pretrained(
        folder
    )
    copy_minilm_tokenizer(folder)
    tower = hf.TextTower(str(folder), False, 8, "cpu")  # truncated at 8 tokens, padded to the model's 16
    assert (tower.max_length, tower.pad_to) == (8, 16)
    short, long = "a cat", "a long title about a dog that runs through a very long story"
    alone = tower([short], 1)
    together = tower([short, long], 2)
    assert np.abs(alone[0] - together[0]).max() < 1e-5
    full = transformers.SiglipModel.from_pretrained(folder, local_files_only=True).eval()
    ids = tower.tokenizer([short, long], truncation=True, max_length=8)
    ids = tower.tokenizer.pad(ids, padding="max_length", max_length=16, return_tensors="pt")
    assert ids["input_ids"].shape == (2, 16)
    with torch.inference_mode():
        want = full.get_text_features(input_ids=ids["input_ids"])
    want = want if isinstance(want, torch.Tensor) else want.pooler_output
    assert np.abs(together - torch.nn.functional.normalize(want, dim=-1).numpy()).max() < 1e-5


def test_a_half_precision_checkpoint_runs_in_float32(models, tmp_path):
    torch.manual_seed(0)
    net = transformers.Dinov2Model(transformers.Dinov2Config(**VISION)).half()
    net.save_pretrained(tmp_path / "fp16")
    import shutil

    shutil.copy(models["dinov2"] / "preprocessor_config.json", tmp_path / "fp16")
    tower = hf.ImageTower(str(tmp_path / "fp16"), False, "cpu")
    assert next(tower.net.parameters()).dtype == torch.float32
    enc = hf.TextTower(str(tiny_bert_folder(tmp_path / "bert", None)), False, 32, "cpu")
    assert next(enc.net.parameters()).dtype == torch.float32


def test_allow_download_lifts_the_stages_offline_mode_for_that_call_only(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub import constants

    seen = {}

    def fake_download(ref, local_files_only):
        seen.update(ref=ref, local_files_only=local_files_only, offline=constants.is_offline_mode())
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as the stages set it
    assert hf.model_folder("hf:org/model", allow_download=True) == tmp_path
    assert seen == {"ref": "org/model", "local_files_only": False, "offline": False}
    assert constants.HF_HUB_OFFLINE is True, "offline again after the call"
    hf.model_folder("hf:org/model")
    assert seen["local_files_only"] is True and seen["offline"] is True


def test_unsupported_or_empty_models_are_refused_at_plan_time(models):
    with pytest.raises(hf.MissingModelError, match="SigLIP 2"):
        hf.image_family(transformers.Siglip2Config())
    with pytest.raises(hf.MissingModelError, match="SigLIP 2"):
        hf.text_family(transformers.Siglip2Config())
    with pytest.raises(ConfigError, match="backbone: name the model"):
        ImageConfig(backbone="hf:").validate("extract.modalities.image")
    with pytest.raises(hf.MissingModelError, match="empty model name"):
        hf.model_folder("hf: ")


def test_a_thin_strip_is_cut_to_its_central_part_before_the_processor(models, tmp_path):
    image_of(0, (4000, 3)).save(tmp_path / "strip.png")
    ext = ImageExtractor(ImageConfig(backbone=f"hf:{models['clip']}", views=("full", "top"), device="cpu"))
    views, boxes = ext.prepare({"image": "strip.png"}, tmp_path)
    assert views.shape == (2, 3, 32, 32) and boxes == [[0, 0, 4000, 3], [0, 0, 4000, 1]]
