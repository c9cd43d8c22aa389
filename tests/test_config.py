"""SoftPatchConfig: every bad value is refused with a message naming the field; dict round trips are exact."""

from __future__ import annotations

import dataclasses
import json

import pytest

from softpatch.config import ConfigError, SoftPatchConfig

# (field, bad value, the word the message must contain)
INVALID = [
    ("resize", 31, "resize"),
    ("crop", 15, "crop"),
    ("crop", 300, "crop"),  # larger than the default resize 256
    ("layers", (), "layers"),
    ("layers", (-1, 2), "layers"),
    ("layers", (3, 2), "layers"),
    ("layers", (2, 2), "layers"),
    ("feature_dim", 0, "feature_dim"),
    ("patch_size", 2, "patch_size"),
    ("patch_size", 0, "patch_size"),
    ("precision", "fp16", "precision"),
    ("batch_size", 0, "batch_size"),
    ("discriminator", "isolation-forest", "discriminator"),
    ("lof_k", 0, "lof_k"),
    ("gaussian_reg", 0.0, "gaussian_reg"),
    ("gaussian_reg", -1.0, "gaussian_reg"),
    ("fusion", (), "fusion"),
    ("fusion", ("fusion",), "fusion"),
    ("fusion", ("none",), "fusion"),
    ("fusion", ("lof", "unknown"), "fusion"),
    ("tau", 1.0, "tau"),
    ("tau", -0.01, "tau"),
    ("tau", float("nan"), "tau"),
    ("tau_scope", "image", "tau_scope"),
    ("coreset", "kmeans", "coreset"),
    ("coreset_ratio", 0.0, "coreset_ratio"),
    ("coreset_ratio", 1.5, "coreset_ratio"),
    ("projection_dim", 0, "projection_dim"),
    ("blur_sigma", -0.5, "blur_sigma"),
    ("device", "tpu", "device"),
    ("backbone_kwargs", {"act": object()}, "backbone_kwargs"),
]


@pytest.mark.parametrize(("name", "value", "word"), INVALID, ids=[f"{n}={v!r}" for n, v, _ in INVALID])
def test_invalid_value_raises_config_error_naming_the_field(name: str, value: object, word: str) -> None:
    with pytest.raises(ConfigError) as info:
        SoftPatchConfig(**{name: value})
    assert word in str(info.value)
    assert isinstance(info.value, ValueError), "ConfigError stays a ValueError for callers catching that"


def test_defaults_follow_the_paper() -> None:
    config = SoftPatchConfig()
    assert (config.backbone, config.layers, config.resize, config.crop) == ("wide_resnet50_2", (2, 3), 256, 224)
    assert (config.discriminator, config.lof_k, config.tau, config.coreset_ratio) == ("auto", 6, 0.15, 0.1)
    assert config.soft_weight is True


def test_boundary_values_are_accepted() -> None:
    config = SoftPatchConfig(resize=32, crop=16, tau=0.0, coreset_ratio=1.0, blur_sigma=0.0, layers=(0,), lof_k=1)
    assert config.crop == 16 and config.tau == 0.0
    assert SoftPatchConfig(resize=64, crop=64).crop == 64  # crop == resize is allowed


@pytest.mark.parametrize(
    ("name", "value"),
    [("tau", "0.1"), ("batch_size", 2.5), ("layers", ("a",)), ("pretrained", "false")],
    ids=["tau-str", "batch_size-float", "layers-str", "pretrained-str"],
)
def test_wrongly_typed_value_raises_config_error(name: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        SoftPatchConfig(**{name: value})
    assert name in str(info.value)


def test_round_trip_through_dict_and_json_is_exact() -> None:
    config = SoftPatchConfig(
        backbone="mobilenetv1_100",
        layers=[1, 2, 3],
        backbone_kwargs={"bn_eps": 1e-3, "pad_type": "same"},
        weights="/some/file.safetensors",
        feature_dim=300,
        discriminator="fusion",
        fusion=["nearest", "lof"],
        tau=0.07,
        tau_scope="position",
        soft_weight=False,
        coreset="random",
        coreset_ratio=0.25,
        blur_sigma=0.0,
        device="cpu",
        seed=42,
    )
    assert SoftPatchConfig.from_dict(config.to_dict()) == config
    through_json = SoftPatchConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert through_json == config
    assert through_json.layers == (1, 2, 3) and isinstance(through_json.layers, tuple)
    assert through_json.fusion == ("nearest", "lof") and isinstance(through_json.fusion, tuple)


def test_to_dict_is_json_serialisable_and_complete() -> None:
    data = SoftPatchConfig().to_dict()
    json.dumps(data)
    assert set(data) == {f.name for f in dataclasses.fields(SoftPatchConfig)}


def test_from_dict_rejects_unknown_keys_by_name() -> None:
    data = SoftPatchConfig().to_dict()
    data["tua"] = 0.2
    data["zeta"] = 1
    with pytest.raises(ConfigError) as info:
        SoftPatchConfig.from_dict(data)
    assert "tua" in str(info.value) and "zeta" in str(info.value)


def test_from_dict_checks_values() -> None:
    data = SoftPatchConfig().to_dict()
    data["coreset_ratio"] = 0
    with pytest.raises(ConfigError, match="coreset_ratio"):
        SoftPatchConfig.from_dict(data)


def test_from_dict_fills_missing_keys_with_defaults() -> None:
    assert SoftPatchConfig.from_dict({"tau": 0.3}) == SoftPatchConfig(tau=0.3)


@pytest.mark.parametrize(
    ("kwargs", "source"),
    [
        ({}, "pretrained"),
        ({"pretrained": False}, "random"),
        ({"weights": "w.safetensors"}, "file"),
        ({"weights": "w.safetensors", "pretrained": False}, "file"),
        ({"weights": ""}, "pretrained"),
    ],
)
def test_weights_source(kwargs: dict, source: str) -> None:
    assert SoftPatchConfig(**kwargs).weights_source == source


def test_frozen_and_replace_checks_values() -> None:
    config = SoftPatchConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.tau = 0.5  # type: ignore[misc]
    with pytest.raises(ConfigError, match="tau"):
        config.replace(tau=2)
    changed = config.replace(tau=0.3, lof_k=9)
    assert (changed.tau, changed.lof_k) == (0.3, 9)
    assert (config.tau, config.lof_k) == (0.15, 6), "replace returns a copy"


def test_containers_are_normalised_and_copied() -> None:
    kwargs = {"bn_eps": 0.001}
    layers = [2, 3]
    config = SoftPatchConfig(layers=layers, backbone_kwargs=kwargs)
    assert config == SoftPatchConfig(layers=(2, 3), backbone_kwargs={"bn_eps": 0.001})
    kwargs["bn_eps"] = 0.5
    layers.append(4)
    assert config.backbone_kwargs == {"bn_eps": 0.001}, "the caller's dict must not alias the config"
    assert config.layers == (2, 3)


def test_a_retired_key_from_an_earlier_bundle_is_accepted_and_dropped() -> None:
    data = SoftPatchConfig().to_dict()
    data["search_candidates"] = 8  # the approximate search of earlier versions, replaced by an exact one
    assert SoftPatchConfig.from_dict(data) == SoftPatchConfig()
    data["no_such_key"] = 1
    with pytest.raises(ConfigError, match="no_such_key"):
        SoftPatchConfig.from_dict(data)
