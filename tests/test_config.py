"""Typed params: unknown keys and wrong types fail loudly; overlays merge key by key."""

from __future__ import annotations

import pytest
from conftest import REPO

from pipeline import runtime
from pipeline.config import (
    BaseConfig,
    ConfigError,
    DatasetConfig,
    DemoConfig,
    IngestConfig,
    from_dict,
    load_params,
    section,
)


def test_repo_params_build_every_section():
    params = load_params(REPO / "params.yaml")
    section(params, "base", BaseConfig)
    section(params, "demo", DemoConfig)
    ds = section(params, "dataset", DatasetConfig)
    section(params, "ingest", IngestConfig)
    assert ds.lists == {"tags": "|"} and ds.text == ("title", "description")


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(
        ConfigError, match=r"ingest: unknown key\(s\) \['max_reject'\]; valid keys are .*max_reject_fraction"
    ):
        from_dict(IngestConfig, {"max_reject": 0.1}, "ingest")


def test_keys_of_earlier_versions_say_where_they_went():
    from pipeline.config import BaseConfig
    from pipeline.train import TrainConfig

    with pytest.raises(ConfigError, match=r"train.seed is now base.seed"):
        from_dict(TrainConfig, {"seed": 3}, "train")
    with pytest.raises(ConfigError, match=r"base.log_level is now the --log-level option"):
        from_dict(BaseConfig, {"log_level": "DEBUG"}, "base")


def test_wrong_types_and_values_are_errors():
    with pytest.raises(ConfigError, match="demo.items: expected <class 'int'>"):
        from_dict(DemoConfig, {"items": "many"}, "demo")
    with pytest.raises(ConfigError, match="dataset.labels.kind"):
        from_dict(DatasetConfig, {"dir": "x", "labels": {"kind": "regression"}}, "dataset")
    with pytest.raises(ConfigError, match="fractions"):
        from_dict(
            DatasetConfig, {"dir": "x", "split": {"fractions": {"train": 0.5, "val": 0.2, "test": 0.2}}}, "dataset"
        )
    with pytest.raises(ConfigError, match="more than one role"):
        from_dict(DatasetConfig, {"dir": "x", "text": ["t"], "categorical": ["t"]}, "dataset")
    with pytest.raises(ConfigError, match="clash with canonical"):
        from_dict(DatasetConfig, {"dir": "x", "text": ["split"]}, "dataset")
    with pytest.raises(ConfigError, match="dataset.dir: required"):
        from_dict(DatasetConfig, {}, "dataset")


def test_overlay_merges_key_by_key(tmp_path):
    (tmp_path / "over.yaml").write_text("dataset:\n  dir: elsewhere\n  labels: {column: genres}\n")
    args = runtime.parser("dmms test", None).parse_args(
        ["--params", str(REPO / "params.yaml"), "--params", str(tmp_path / "over.yaml")]
    )
    params = runtime.setup(args)
    ds = section(params, "dataset", DatasetConfig)
    assert ds.dir == str(tmp_path / "elsewhere"), "a relative path in an overlay is taken from the overlay's folder"
    assert ds.labels.column == "genres" and ds.labels.separator == "|"
    assert ds.text == ("title", "description"), "keys the overlay does not name are kept"


def test_paths_resolve_against_the_overlay_that_declares_them(tmp_path, monkeypatch):
    (tmp_path / "conf" / "data").mkdir(parents=True)
    (tmp_path / "conf" / "mine.yaml").write_text(
        "dataset: {dir: data}\nscore: {input: /abs/batch}\n"
        "extract: {modalities: {image: {weights: w/lite.pth}, title: {model: minilm}}}\n"
    )
    (tmp_path / "base.yaml").write_text("dataset: {dir: data/demo/raw}\nscore: {input: data/demo/unlabelled}\n")
    monkeypatch.chdir(tmp_path / "conf" / "data")  # any working directory
    params = runtime.load_overlaid([tmp_path / "base.yaml"])
    assert params["dataset"]["dir"] == "data/demo/raw", "the first file's paths stay relative to the working directory"
    params = runtime.load_overlaid([tmp_path / "base.yaml", tmp_path / "conf" / "mine.yaml"])
    assert params["dataset"]["dir"] == str(tmp_path / "conf" / "data")
    assert params["score"]["input"] == "/abs/batch", "absolute paths are kept"
    assert params["extract"]["modalities"]["image"]["weights"] == str(tmp_path / "conf" / "w" / "lite.pth")
    assert params["extract"]["modalities"]["title"]["model"] == "minilm", "only path keys are resolved"
    assert runtime.origin_of([tmp_path / "base.yaml", tmp_path / "conf" / "mine.yaml"], "dataset.dir") == str(
        tmp_path / "conf" / "mine.yaml"
    )
    with pytest.raises(
        runtime.UserError,
        match=r"dataset folder not found: .*/conf/data/nope \(dataset.dir in x.yaml, "
        r"relative to the working directory .*/conf/data\)",
    ):
        runtime.require_folder("nope", "dataset folder", "dataset.dir in x.yaml")
