"""The set model: invariances, empty and missing sets, packed == padded pooling, training, bundles."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import write_features, write_generated

from pipeline import features, metrics, pooling, setdata
from pipeline import train as train_mod
from pipeline.bundle import check_store_matches, load_bundle, predict
from pipeline.config import from_dict
from pipeline.features import FeatureMismatchError
from pipeline.model import ModalityBatch, ModelConfig, SetBatch, build_model
from pipeline.predict import PredictConfig, run_predict
from pipeline.runtime import UserError
from pipeline.setdata import FeatureStore, PackedModality
from pipeline.train import TrainConfig, fit

DIMS = {"a": 6, "b": 4, "meta": 2}
CATS = {"meta": [3]}


def random_batch(gen: torch.Generator, sizes: dict[str, list[int]]) -> SetBatch:
    """A batch whose item i has sizes[m][i] elements of modality m."""
    B = len(next(iter(sizes.values())))
    batch = SetBatch(size=B)
    for m, counts in sizes.items():
        seg = torch.repeat_interleave(torch.arange(B), torch.tensor(counts))
        cats = torch.randint(0, 4, (B, 1), generator=gen) if m == "meta" else None
        batch.modalities[m] = ModalityBatch(torch.randn(len(seg), DIMS[m], generator=gen), seg, cats)
    return batch


def model(**over) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = from_dict(ModelConfig, {"dim": 8, "dropout": 0.0, **over}, "m")
    return build_model(cfg, DIMS, CATS, 3).eval()


SIZES = {"a": [2, 0, 3, 1], "b": [1, 4, 0, 0], "meta": [1, 1, 1, 0]}


@pytest.mark.parametrize(
    "over",
    [
        {"pooling": "max"},
        {"pooling": "sum"},
        {"pooling": "mean"},
        {"pooling": "max", "hierarchical": True},
        {"pooling": "mean", "hierarchical": True},
    ],
)
def test_invariant_to_element_and_modality_order(over):
    net = model(**over)
    batch = random_batch(torch.Generator().manual_seed(1), SIZES)
    ref = net(batch)
    shuffled = SetBatch(size=batch.size)
    for m in reversed(list(batch.modalities)):  # modality order reversed
        mb = batch.modalities[m]
        perm = torch.randperm(mb.segment.numel(), generator=torch.Generator().manual_seed(2))
        shuffled.modalities[m] = ModalityBatch(mb.vectors[perm], mb.segment[perm], mb.category_ids)
    assert torch.allclose(ref, net(shuffled), atol=1e-5)
    # and an item's output does not depend on the other items of its batch
    one = SetBatch(
        size=1,
        modalities={
            m: ModalityBatch(
                mb.vectors[mb.segment == 0],
                mb.segment[mb.segment == 0] * 0,
                None if mb.category_ids is None else mb.category_ids[:1],
            )
            for m, mb in batch.modalities.items()
        },
    )
    assert torch.allclose(ref[:1], net(one), atol=1e-5)


@pytest.mark.parametrize("arch", ["set", "concat"])
def test_empty_sets_and_missing_modalities_give_finite_outputs(arch):
    net = model(architecture=arch)
    batch = random_batch(torch.Generator().manual_seed(3), {"a": [0, 0, 2], "b": [0, 1, 0]})  # no meta at all
    out = net(batch)
    assert out.shape == (3, 3) and torch.isfinite(out).all()
    nothing = SetBatch(size=2)
    assert torch.isfinite(net(nothing)).all()
    if arch == "set":  # an item with no element pools to zeros: its output is the head's bias path
        assert torch.allclose(net(nothing)[0], net.head(torch.zeros(1, 8))[0])


def test_packed_pooling_equals_a_padded_reference():
    gen = torch.Generator().manual_seed(4)
    counts = torch.tensor([3, 0, 1, 5, 2])
    x = torch.randn(int(counts.sum()), 7, generator=gen)
    seg = torch.repeat_interleave(torch.arange(5), counts)
    pad = torch.zeros(5, int(counts.max()), 7)
    mask = torch.zeros(5, int(counts.max()), dtype=torch.bool)
    at = 0
    for i, c in enumerate(counts.tolist()):
        pad[i, :c], mask[i, :c] = x[at : at + c], True
        at += c
    ref_max = pad.masked_fill(~mask[..., None], float("-inf")).amax(1)
    ref_max[counts == 0] = 0
    ref_sum = (pad * mask[..., None]).sum(1)
    ref_mean = ref_sum / counts.clamp(min=1)[:, None]
    assert torch.allclose(pooling.get("max").reduce(x, seg, 5), ref_max)
    assert torch.allclose(pooling.get("sum").reduce(x, seg, 5), ref_sum, atol=1e-6)
    assert torch.allclose(pooling.get("mean").reduce(x, seg, 5), ref_mean, atol=1e-6)


def test_store_batches_gather_the_right_elements():
    vec = torch.arange(12, dtype=torch.float32).view(6, 2)  # item0: rows 0-1, item1: none, item2: rows 2-5
    store = FeatureStore(["x", "y", "z"], {"a": PackedModality(vec, torch.tensor([0, 2, 2, 6]), None)}, {})
    b = store.batch(torch.tensor([2, 1, 0])).modalities["a"]
    assert b.segment.tolist() == [0, 0, 0, 0, 2, 2]
    assert b.vectors[:, 0].tolist() == [4, 6, 8, 10, 0, 2]
    assert store.batch(torch.tensor([0]), drop={"a"}).modalities == {}


def test_metrics_match_scikit_learn():
    from sklearn.metrics import average_precision_score, f1_score

    rng = np.random.default_rng(0)
    y = rng.random((60, 5)) < 0.3
    y[:, 4] = False  # a label with no positives
    scores = np.clip(y * 0.4 + rng.random((60, 5)) * 0.7, 0, 1)
    pred = scores >= 0.5
    got = metrics.f1_scores(y, pred)
    for avg in ("micro", "macro", "weighted", "samples"):
        assert got[f"f1_{avg}"] == pytest.approx(f1_score(y, pred, average=avg, zero_division=0), abs=1e-12)
    ap = metrics.average_precision(y, scores)
    for j in range(4):
        assert ap[j] == pytest.approx(average_precision_score(y[:, j], scores[:, j]), abs=1e-12)
    assert np.isnan(ap[4])


# ------------------------------------------------------------------ training on generated feature sets


def test_tune_thresholds_maximises_each_labels_f1():
    y = np.array([[1, 0, 1], [1, 0, 0], [0, 0, 1], [0, 0, 0]])
    probs = np.array([[0.9, 0.2, 0.6], [0.35, 0.1, 0.2], [0.3, 0.8, 0.7], [0.1, 0.4, 0.1]])
    t = metrics.tune_thresholds(y, probs)
    assert t[0] == pytest.approx(0.35), "0.35 keeps both positives and drops the 0.30 negative"
    assert t[1] == 0.5, "a label without positives keeps 0.5"
    assert metrics.f1_scores(y[:, 2:], probs[:, 2:] >= t[2])["f1_micro"] == 1.0


def test_tuned_threshold_splits_float32_scores_as_prediction_does():
    """A score that sits on a grid value in float32 is on the threshold, in tuning as in `decide`."""
    y = np.array([[1], [0]])
    probs = np.array([[0.35], [0.3]], dtype=np.float32)  # float32(0.35) < 0.35 in float64
    t = metrics.tune_thresholds(y, probs)
    assert metrics.f1_scores(y, metrics.decide("multilabel", probs, t))["f1_micro"] == 1.0


def write_synthetic(
    root: Path, n: int = 240, seed: int = 0, rates: tuple[float, float] = (0.4, 0.4), strength: float = 4.0
) -> Path:
    """A manifest and two modalities whose label 'A' is driven by modality a, 'B' by modality b
    (`rates`: how often each label is on; `strength`: how far its element stands out)."""
    rng = np.random.default_rng(seed)
    ids = [f"i{k:04d}" for k in range(n)]
    ya, yb = rng.random(n) < rates[0], rng.random(n) < rates[1]
    labels = [[name for name, on in (("A", a), ("B", b)) if on] for a, b in zip(ya, yb)]
    split = ["train" if k % 10 < 7 else "val" if k % 10 < 9 else "test" for k in range(n)]
    sets = {}
    for name, dim, signal in (("a", 6, ya), ("b", 4, yb)):
        vectors = []
        for on in signal:
            k = int(rng.integers(0, 4))  # 0..3 elements; the signal lives in one element
            vecs = rng.normal(size=(k, dim)).astype(np.float32)
            if k and on:
                vecs[0, 0] += strength
            vectors.append(vecs)
        sets[name] = (dim, vectors)
    return write_generated(root, ids, split, labels, sets)


def train_cfg(**over) -> TrainConfig:
    base = {
        "epochs": 25,
        "batch_size": 32,
        "lr": 0.01,
        "patience": 25,
        "device": "cpu",
        "model": {"dim": 16, "dropout": 0.0, "head_hidden": [16]},
    }
    base.update(over)
    return from_dict(TrainConfig, base, "train")


def test_training_lowers_the_loss_and_beats_label_frequencies(tmp_path):
    manifest = write_synthetic(tmp_path)
    res = fit(train_cfg(), manifest, tmp_path / "features", tmp_path / "model", tmp_path / "m.json", tmp_path / "c.csv")
    curve = (tmp_path / "c.csv").read_text().splitlines()
    first, last = (float(curve[i].split(",")[1]) for i in (1, -1))
    assert last < 0.5 * first, f"train loss {first} -> {last}"
    assert (
        res["test"]["f1_micro"] > 0.8
        and res["test"]["f1_micro"] > res["test_label_frequency_baseline"]["f1_micro"] + 0.3
    )
    on_disk = json.loads((tmp_path / "m.json").read_text())
    assert on_disk["best_epoch"] >= 1 and set(on_disk["test"]) >= {"f1_micro", "f1_macro", "f1_weighted", "f1_samples"}


def test_bundle_round_trip_and_feature_mismatch(tmp_path):
    manifest = write_synthetic(tmp_path)
    fit(
        train_cfg(epochs=3, model={"dim": 8, "pooling": "mean", "hierarchical": True}),
        manifest,
        tmp_path / "features",
        tmp_path / "model",
        tmp_path / "m.json",
        tmp_path / "c.csv",
    )
    net, bundle = load_bundle(tmp_path / "model" / "model.pt")
    assert bundle.label_names == ["A", "B"] and bundle.provenance["a"].model_id == "gen-a"
    assert bundle.model_config.pooling == "mean" and bundle.model_config.hierarchical and bundle.format == 2
    ids = pq.read_table(manifest)["id"].to_pylist()
    store = FeatureStore.load({m: tmp_path / "features" / m for m in ("a", "b")}, ids)
    check_store_matches(bundle, store)
    p1 = predict(net, store, torch.arange(len(ids)), "multilabel")
    net2, _ = load_bundle(tmp_path / "model" / "model.pt")
    assert torch.equal(p1, predict(net2, store, torch.arange(len(ids)), "multilabel"))
    bundle.provenance["a"] = dataclasses.replace(bundle.provenance["a"], model_id="other-encoder")
    with pytest.raises(FeatureMismatchError, match=r"a\.model_id: model has 'other-encoder', features have 'gen-a'"):
        check_store_matches(bundle, store)
    with pytest.raises(FeatureMismatchError, match="dim: expected 99"):
        features.read_features(tmp_path / "features" / "a" / "features.parquet", {"dim": 99})


@pytest.mark.gpu
def test_training_on_cuda(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    manifest = write_synthetic(tmp_path)
    res = fit(
        train_cfg(device="cuda", amp=True),
        manifest,
        tmp_path / "features",
        tmp_path / "model",
        tmp_path / "m.json",
        tmp_path / "c.csv",
    )
    assert res["device"].startswith("cuda") and res["test"]["f1_micro"] > 0.8


# ------------------------------------------------------------------ stage outputs a stage can trust


def corrupt(path: Path, where: float = 0.5, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    at = int(len(data) * where)
    data[at : at + n] = bytes(b ^ 0xFF for b in data[at : at + n])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flipped bytes", "truncated", "values changed"])
def test_damaged_features_are_refused_by_train_and_predict_naming_the_file(tmp_path, damage):
    manifest = write_synthetic(tmp_path)
    fit(
        train_cfg(epochs=2),
        manifest,
        tmp_path / "features",
        tmp_path / "model",
        tmp_path / "m.json",
        tmp_path / "c.csv",
    )
    path = tmp_path / "features" / "b" / "features.parquet"
    if damage == "flipped bytes":
        corrupt(path)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # a file whose pages are intact but whose values are not the ones written: the content checksum
        table = pq.read_table(path)
        vecs = table["vectors"].to_pylist()
        k = next(i for i, v in enumerate(vecs) if v)
        vecs[k][0][0] += 1e24
        pq.write_table(
            table.set_column(1, "vectors", pa.array(vecs, table.schema.field("vectors").type)),
            path,
            write_page_checksum=True,
        )
    with pytest.raises(features.FeaturesUnreadableError, match=r"features/b/features\.parquet.*(corrupted|truncated)"):
        fit(
            train_cfg(epochs=2),
            manifest,
            tmp_path / "features",
            tmp_path / "m2",
            tmp_path / "m2.json",
            tmp_path / "c2.csv",
        )
    with pytest.raises(features.FeaturesUnreadableError, match=r"features/b/features\.parquet"):
        run_predict(
            PredictConfig(device="cpu"),
            tmp_path / "model" / "model.pt",
            manifest,
            tmp_path / "features",
            tmp_path / "pred",
        )
    assert not (tmp_path / "pred").exists() and not (tmp_path / "m2" / "model.pt").exists()


def test_an_unfinished_modality_is_refused_unless_the_modalities_are_named(tmp_path):
    manifest = write_synthetic(tmp_path)
    killed = tmp_path / "features" / "ocr"
    (killed / "_shards").mkdir(parents=True)  # what an extraction killed half-way leaves
    with pytest.raises(UserError, match=r"\['ocr'\] hold no features.parquet: their extraction did not finish"):
        fit(
            train_cfg(epochs=2),
            manifest,
            tmp_path / "features",
            tmp_path / "model",
            tmp_path / "m.json",
            tmp_path / "c.csv",
        )
    res = fit(
        train_cfg(epochs=2, modalities=["a", "b"]),
        manifest,
        tmp_path / "features",
        tmp_path / "model",
        tmp_path / "m.json",
        tmp_path / "c.csv",
    )
    assert res["modalities"] == ["a", "b"]
    with pytest.raises(UserError, match=r"train.modalities \['ocr'\] have no features"):
        fit(
            train_cfg(epochs=2, modalities=["a", "ocr"]),
            manifest,
            tmp_path / "features",
            tmp_path / "model",
            tmp_path / "m.json",
            tmp_path / "c.csv",
        )


def test_a_file_that_is_not_a_bundle_is_one_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model\n")
    with pytest.raises(UserError, match=r"notes.txt is not a model bundle written by train"):
        load_bundle(tmp_path / "notes.txt")
    torch.save({"format": 1, "model_config": {}}, tmp_path / "partial.pt")
    with pytest.raises(UserError, match=r"partial.pt: the model bundle is incomplete or damaged"):
        load_bundle(tmp_path / "partial.pt")


@pytest.mark.parametrize("tune", [False, True])
def test_train_metrics_record_the_thresholds_and_where_they_were_tuned(tmp_path, tune):
    manifest = write_synthetic(tmp_path)
    fit(
        train_cfg(epochs=3, tune_thresholds=tune),
        manifest,
        tmp_path / "features",
        tmp_path / "model",
        tmp_path / "m.json",
        tmp_path / "c.csv",
    )
    rec = json.loads((tmp_path / "m.json").read_text())["thresholds"]
    bundle = torch.load(tmp_path / "model" / "model.pt", weights_only=True)
    assert list(rec["values"]) == ["A", "B"] and list(rec["values"].values()) == pytest.approx(bundle["thresholds"])
    assert rec["tuned"] is tune and rec["tuned_on"] == ("val" if tune else None)
    assert ("optimistic" in rec.get("note", "")) is tune
    if not tune:
        assert set(rec["values"].values()) == {0.5}


# ------------------------------------------------------------------ imbalance and set regularisation


def test_class_weights_follow_train_frequencies_and_are_capped():
    y = torch.tensor([[1, 0, 0]] * 2 + [[0, 1, 0]] * 6 + [[0, 0, 0]] * 92, dtype=torch.float32)  # 2%, 6%, 0%
    w = train_mod.class_weights("multilabel", y, cap=20.0)
    assert w.tolist() == pytest.approx([20.0, 94 / 6, 1.0]), "(n - n_pos) / n_pos, capped; no positive: 1"
    yc = torch.tensor([[1, 0]] * 90 + [[0, 1]] * 10, dtype=torch.float32)
    assert train_mod.class_weights("multiclass", yc, cap=10.0).tolist() == pytest.approx([100 / 180, 5.0])


def test_pos_weight_raises_the_rare_labels_probabilities(tmp_path):
    """On generated data with a rare, weakly signalled label, weighing positives by rarity makes the
    model predict it more often, as intended (the frequent label barely moves)."""
    manifest = write_synthetic(tmp_path, n=400, seed=3, rates=(0.06, 0.5), strength=1.0)
    rates = {}
    for mode in ("none", "pos_weight"):
        fit(
            train_cfg(epochs=15, patience=15, imbalance=mode, tune_thresholds=False),
            manifest,
            tmp_path / "features",
            tmp_path / mode,
            tmp_path / f"{mode}.json",
            tmp_path / f"{mode}.csv",
        )
        net, bundle = load_bundle(tmp_path / mode / "model.pt")
        ids = pq.read_table(manifest)["id"].to_pylist()
        store = FeatureStore.load({m: tmp_path / "features" / m for m in ("a", "b")}, ids)
        rates[mode] = (predict(net, store, torch.arange(len(ids)), "multilabel") >= 0.5).float().mean(0)
    assert rates["pos_weight"][0] > rates["none"][0] + 0.03, rates


def test_element_and_modality_dropout_masks():
    gen = torch.Generator().manual_seed(0)
    seg = torch.arange(1000).repeat_interleave(10)  # 1000 items x 10 elements
    batch = SetBatch(
        size=1000,
        modalities={
            "a": ModalityBatch(torch.arange(10000.0)[:, None], seg),
            "meta": ModalityBatch(torch.ones(1000, 2), torch.arange(1000), torch.full((1000, 1), 3)),
        },
    )
    assert setdata.drop_elements(batch, 0.0, 0.0, gen) is batch, "no dropout: the batch as it is"
    out = setdata.drop_elements(batch, 0.3, 0.0, gen)
    kept = out.modalities["a"].segment.numel() / 10000
    assert 0.67 < kept < 0.73 and torch.equal(
        out.modalities["a"].vectors[:, 0].long() // 10, out.modalities["a"].segment
    )
    out = setdata.drop_elements(batch, 0.0, 0.5, gen)
    per_item = torch.zeros(1000).index_add_(
        0, out.modalities["a"].segment, torch.ones(out.modalities["a"].segment.numel())
    )
    assert set(per_item.tolist()) == {0.0, 10.0}, "a modality of an item is kept or dropped whole"
    meta = out.modalities["meta"]
    dropped = set(range(1000)) - set(meta.segment.tolist())
    assert 400 < len(dropped) < 600 and all(meta.category_ids[i, 0] == 0 for i in dropped), (
        "dropped ids read as missing"
    )
    again = setdata.drop_elements(batch, 0.3, 0.5, torch.Generator().manual_seed(7))
    assert torch.equal(
        again.modalities["a"].segment,
        setdata.drop_elements(batch, 0.3, 0.5, torch.Generator().manual_seed(7)).modalities["a"].segment,
    )


def test_dropout_changes_training_not_prediction(tmp_path):
    manifest = write_synthetic(tmp_path)
    plain = fit(
        train_cfg(epochs=8, patience=8),
        manifest,
        tmp_path / "features",
        tmp_path / "p",
        tmp_path / "p.json",
        tmp_path / "p.csv",
    )
    dropped = fit(
        train_cfg(epochs=8, patience=8, element_dropout=0.3, modality_dropout=0.2),
        manifest,
        tmp_path / "features",
        tmp_path / "d",
        tmp_path / "d.json",
        tmp_path / "d.csv",
    )
    assert (tmp_path / "p.csv").read_text() != (tmp_path / "d.csv").read_text(), "the masks change the training path"
    assert dropped["test"]["mean_average_precision"] > 0.7 and plain["test"]["mean_average_precision"] > 0.7
    net, _ = load_bundle(tmp_path / "d" / "model.pt")
    ids = pq.read_table(manifest)["id"].to_pylist()
    store = FeatureStore.load({m: tmp_path / "features" / m for m in ("a", "b")}, ids)
    idx = torch.arange(len(ids))
    assert torch.equal(predict(net, store, idx, "multilabel"), predict(net, store, idx, "multilabel")), (
        "prediction uses every element, every time"
    )


def test_val_loss_is_the_training_loss(tmp_path):
    """With positive weights, the curve's val loss and the metrics' losses are the weighted training loss."""
    manifest = write_synthetic(tmp_path)
    cfg = train_cfg(epochs=3, imbalance="pos_weight", patience=10)
    result = fit(cfg, manifest, tmp_path / "features", tmp_path / "model", tmp_path / "m.json", tmp_path / "c.csv")
    data = train_mod.load_train_data(cfg, manifest, tmp_path / "features", torch.device("cpu"))
    model, _ = load_bundle(tmp_path / "model" / "model.pt")
    val = data.index["val"]
    logits = train_mod.logits(model, data.store, val)
    weighted = float(train_mod.training_loss(cfg, data)(logits, data.y[val]))
    plain = float(train_mod.loss_fn(data.task)(logits, data.y[val]))
    assert abs(weighted - plain) > 1e-3, "the weights matter on this data"
    assert abs(result["val"]["loss"] - weighted) < 1e-5
    assert result["loss"].startswith("the training loss with per-label positive weights")
    curve = (tmp_path / "c.csv").read_text().splitlines()
    assert curve[0].startswith("epoch,train_loss,val_loss")


def test_a_val_split_without_positives_trains_and_says_so(tmp_path, caplog):
    """No val item carries a label: val mAP is NaN in every epoch; training keeps the last weights and the
    metrics and the log name the labels without val positives."""
    import logging

    manifest = write_synthetic(tmp_path)
    table = pq.read_table(manifest)
    labels = [[] if s == "val" else lab for s, lab in zip(table["split"].to_pylist(), table["labels"].to_pylist())]
    table = table.set_column(
        table.schema.get_field_index("labels"), "labels", pa.array(labels, table.schema.field("labels").type)
    )
    pq.write_table(table, manifest)
    for m in ("a", "b"):  # the features recorded the manifest's checksum: record the new one
        path = tmp_path / "features" / m / "features.parquet"
        got, meta = features.read_features(path)
        meta = {k: v for k, v in meta.items() if k in features.PROVENANCE_KEYS or k == "modality"}
        write_features(got, meta["dim"], {**meta, "manifest_sha256": features.file_sha256(manifest)}, path)
    cfg = train_cfg(epochs=3, monitor="mean_average_precision", tune_thresholds=False)
    with caplog.at_level(logging.WARNING):
        result = fit(cfg, manifest, tmp_path / "features", tmp_path / "model", tmp_path / "m.json", tmp_path / "c.csv")
    assert result["labels_without_positives"]["val"] == ["A", "B"]
    assert result["best_epoch"] == result["epochs_run"] == 3
    assert "val has no positive item for label(s) ['A', 'B']" in caplog.text
    assert "never a number" in caplog.text
    assert (tmp_path / "model" / "model.pt").is_file()


def test_a_bundle_of_an_unknown_format_is_refused_saying_how_to_retrain(tmp_path):
    manifest = write_synthetic(tmp_path)
    fit(
        train_cfg(epochs=1),
        manifest,
        tmp_path / "features",
        tmp_path / "model",
        tmp_path / "m.json",
        tmp_path / "c.csv",
    )
    raw = torch.load(tmp_path / "model" / "model.pt", weights_only=True)
    assert isinstance(raw, dict) and isinstance(raw["model_config"], dict), "saved as plain data"
    torch.save({**raw, "format": 99}, tmp_path / "future.pt")
    with pytest.raises(UserError, match="bundle format 99 not supported.*retrain"):
        load_bundle(tmp_path / "future.pt")
