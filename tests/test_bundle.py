"""Model bundles: exact round trips, and damaged, tampered or hostile files refused with a BundleError."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from softpatch.config import SoftPatchConfig
from softpatch.deployment.bundle import FORMAT_VERSION, load_bundle, save_bundle
from softpatch.errors import BundleError, NotFittedError, SoftPatchError
from softpatch.method.model import SoftPatch
from tests.conftest import SyntheticSet


def _fitted(small_config: SoftPatchConfig, extractor, train_embeddings, **changes: object) -> SoftPatch:
    return SoftPatch(small_config.replace(**changes), extractor=extractor).fit_embeddings(train_embeddings)


@pytest.fixture
def nearest_model(small_config: SoftPatchConfig, extractor, train_embeddings) -> SoftPatch:
    # The checks that use this are about the file format, not the discriminator.
    return _fitted(small_config, extractor, train_embeddings, discriminator="nearest")


@pytest.fixture
def bundle_path(tmp_path: Path, nearest_model: SoftPatch) -> Path:
    return save_bundle(nearest_model, tmp_path / "model.softpatch", threshold=0.5)


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata()), {k: fh.get_tensor(k) for k in fh.keys()}


def _rewrite(path: Path, out: Path, *, metadata: dict | None = None, tensors: dict | None = None) -> Path:
    meta, ts = _read(path)
    meta.update(metadata or {})
    ts.update(tensors or {})
    save_file({k: v.contiguous() for k, v in ts.items() if v is not None}, str(out), metadata=meta)
    return out


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    "discriminator",
    [
        "nearest",
        "gaussian",
        "none",
        "lof",
        "fusion",
    ],
)
def test_round_trip_reproduces_scores_and_maps_exactly(
    tmp_path: Path, small_config, extractor, train_embeddings, synthetic_set: SyntheticSet, discriminator: str
) -> None:
    model = _fitted(small_config, extractor, train_embeddings, discriminator=discriminator)
    before = model.score(synthetic_set.test)
    loaded = load_bundle(save_bundle(model, tmp_path / "m.softpatch"), device="cpu")
    after = loaded.score(synthetic_set.test)
    assert np.array_equal(after.image_scores, before.image_scores)
    assert np.array_equal(after.patch_scores, before.patch_scores)
    assert np.array_equal(after.anomaly_maps, before.anomaly_maps)
    assert loaded.config == model.config
    assert loaded.grid_shape_ == model.grid_shape_
    assert loaded.train_names_ == model.train_names_ and loaded.train_sizes_ == model.train_sizes_
    assert torch.equal(loaded.memory_bank_.features, model.memory_bank_.features)
    assert torch.equal(loaded.memory_bank_.weights, model.memory_bank_.weights)
    np.testing.assert_array_equal(loaded.memory_bank_.provenance, model.memory_bank_.provenance)
    np.testing.assert_array_equal(loaded.outlier_scores_, model.outlier_scores_)
    np.testing.assert_array_equal(loaded.removed_mask_, model.removed_mask_)


def test_the_model_serialises_itself_without_files(nearest_model: SoftPatch, synthetic_set: SyntheticSet) -> None:
    state = nearest_model.to_state()
    rebuilt = SoftPatch.from_state(state, device="cpu")
    before, after = nearest_model.score(synthetic_set.test), rebuilt.score(synthetic_set.test)
    assert np.array_equal(after.image_scores, before.image_scores)
    assert np.array_equal(after.anomaly_maps, before.anomaly_maps)
    np.testing.assert_array_equal(rebuilt.removed_mask_, nearest_model.removed_mask_)
    np.testing.assert_array_equal(state.removed_mask.reshape(rebuilt.removed_mask_.shape), rebuilt.removed_mask_)
    assert rebuilt.vetting_report().names == nearest_model.vetting_report().names
    with_features = nearest_model.to_state(training_features=True)
    assert with_features.training_features is not None and state.training_features is None
    assert tuple(with_features.training_features.shape) == tuple(nearest_model.train_features_.shape)


def test_a_removed_mask_that_disagrees_with_the_scores_is_refused(tmp_path: Path, bundle_path: Path) -> None:
    _, tensors = _read(bundle_path)
    flipped = tensors["train.removed"].clone()
    flipped[0, 0] = 1 - flipped[0, 0]
    tampered = _rewrite(bundle_path, tmp_path / "flipped.softpatch", tensors={"train.removed": flipped})
    with pytest.raises(BundleError, match="removed-patch mask"):
        load_bundle(tampered, device="cpu")


def test_threshold_round_trips(tmp_path: Path, nearest_model: SoftPatch, bundle_path: Path) -> None:
    assert load_bundle(bundle_path, device="cpu").threshold_ == 0.5
    assert load_bundle(save_bundle(nearest_model, tmp_path / "none.softpatch"), device="cpu").threshold_ is None
    nearest_model.threshold_ = 1.75
    assert load_bundle(save_bundle(nearest_model, tmp_path / "attr.softpatch"), device="cpu").threshold_ == 1.75
    assert (
        load_bundle(save_bundle(nearest_model, tmp_path / "arg.softpatch", threshold=3), device="cpu").threshold_ == 3.0
    )


def test_loaded_model_vetting_report_equals_the_original(nearest_model: SoftPatch, bundle_path: Path) -> None:
    original = nearest_model.vetting_report()
    loaded = load_bundle(bundle_path, device="cpu").vetting_report()
    assert loaded.names == original.names
    np.testing.assert_array_equal(loaded.ranking, original.ranking)
    np.testing.assert_array_equal(loaded.suspicion, original.suspicion)
    np.testing.assert_array_equal(loaded.removed_fraction, original.removed_fraction)


@pytest.mark.parametrize(
    "changes",
    [{"tau": 0.3}, {"discriminator": "gaussian"}, {"tau_scope": "position"}],
    ids=lambda c: next(iter(c)),
)
def test_retune_of_a_loaded_model_that_needs_features_is_refused(bundle_path: Path, changes: dict) -> None:
    loaded = load_bundle(bundle_path, device="cpu")
    config = loaded.config
    with pytest.raises(SoftPatchError, match="fit again"):
        loaded.retune(**changes)
    assert loaded.config == config
    with pytest.raises(SoftPatchError, match="no training features"):
        _ = loaded.train_features_


def test_retune_of_a_loaded_model_that_needs_no_features(bundle_path: Path, synthetic_set: SyntheticSet) -> None:
    loaded = load_bundle(bundle_path, device="cpu")
    before = loaded.score(synthetic_set.test)
    loaded.retune(blur_sigma=0.0)
    after = loaded.score(synthetic_set.test)
    np.testing.assert_array_equal(after.image_scores, before.image_scores)
    assert not np.allclose(after.anomaly_maps, before.anomaly_maps)


@pytest.mark.parametrize(
    "changes",
    [{"soft_weight": False}, {"coreset_ratio": 1.0}, {"coreset": "random"}],
    ids=lambda c: next(iter(c)),
)
def test_retune_of_a_loaded_model_never_silently_ignores_a_bank_setting(
    bundle_path: Path, nearest_model: SoftPatch, eval_embeddings, changes: dict
) -> None:
    loaded = load_bundle(bundle_path, device="cpu")
    try:
        loaded.retune(**changes)
    except SoftPatchError:
        return  # refusing is fine
    expected = nearest_model.variant(**changes).score(eval_embeddings).image_scores
    np.testing.assert_allclose(loaded.score(eval_embeddings).image_scores, expected, rtol=1e-5)


def test_variant_of_a_loaded_model_scores_like_the_model(bundle_path: Path, eval_embeddings) -> None:
    loaded = load_bundle(bundle_path, device="cpu")
    variant = loaded.variant(blur_sigma=1.0)
    np.testing.assert_array_equal(
        variant.score(eval_embeddings).image_scores, loaded.score(eval_embeddings).image_scores
    )


def test_save_leaves_no_partial_file_and_writes_no_pickle(tmp_path: Path, bundle_path: Path) -> None:
    assert [p.name for p in bundle_path.parent.iterdir()] == ["model.softpatch"]
    head = bundle_path.read_bytes()[:9]
    header_len = int.from_bytes(head[:8], "little")
    assert 0 < header_len < bundle_path.stat().st_size and head[8:9] == b"{", "a safetensors header, not a pickle"
    metadata, tensors = _read(bundle_path)
    assert metadata["format"] == "softpatch-bundle" and metadata["format_version"] == str(FORMAT_VERSION)
    assert any(k.startswith("backbone.") for k in tensors), "the backbone travels with the bundle"


def test_save_needs_a_fitted_model(tmp_path: Path, small_config: SoftPatchConfig) -> None:
    with pytest.raises(SoftPatchError):
        save_bundle(object(), tmp_path / "x.softpatch")
    with pytest.raises(NotFittedError):
        save_bundle(SoftPatch(small_config), tmp_path / "y.softpatch")


def test_save_creates_missing_parent_folders(tmp_path: Path, nearest_model: SoftPatch) -> None:
    path = save_bundle(nearest_model, tmp_path / "a" / "b" / "m.softpatch")
    assert path.is_file()


def test_unwritable_destination_is_a_clear_error(nearest_model: SoftPatch) -> None:
    if not Path("/proc/self").is_dir():
        pytest.skip("needs Linux /proc as an unwritable folder")
    with pytest.raises((SoftPatchError, OSError)):
        save_bundle(nearest_model, Path("/proc") / "softpatch-test.softpatch")


# ---------------------------------------------------------------- damaged and hostile files


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nope.softpatch")


@pytest.mark.parametrize("version", ["2", "0", "", "1.0"])
def test_unknown_format_version(tmp_path: Path, bundle_path: Path, version: str) -> None:
    path = _rewrite(bundle_path, tmp_path / "v.softpatch", metadata={"format_version": version})
    with pytest.raises(BundleError, match="format version"):
        load_bundle(path, device="cpu")


def test_a_safetensors_file_that_is_not_a_bundle(tmp_path: Path) -> None:
    path = tmp_path / "weights.softpatch"
    save_file({"x": torch.zeros(3)}, str(path))
    with pytest.raises(BundleError, match="not a SoftPatch bundle"):
        load_bundle(path)


@pytest.mark.parametrize("keep", [0.5, 0.99, 8 / 1e9])
def test_truncated_file(tmp_path: Path, bundle_path: Path, keep: float) -> None:
    data = bundle_path.read_bytes()
    path = tmp_path / "cut.softpatch"
    path.write_bytes(data[: max(1, int(len(data) * keep))])
    with pytest.raises(BundleError):
        load_bundle(path, device="cpu")


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize(
    ("kind", "refused_as"),
    [
        ("torch.save", "zip"),
        ("torch.save-legacy", "pickle"),
        ("pickle", "pickle"),
        ("pickle-protocol-5", "pickle"),
        ("zip-of-a-pickle", "zip"),
    ],
)
def test_a_pickle_renamed_to_softpatch_is_refused_unopened(tmp_path: Path, kind: str, refused_as: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "model.softpatch"
    payload = {"bank.features": _Payload(marker)}
    if kind == "torch.save":
        torch.save(payload, path)
    elif kind == "torch.save-legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    elif kind == "zip-of-a-pickle":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("data.pkl", pickle.dumps(payload))
    else:
        path.write_bytes(pickle.dumps(payload, protocol=5 if kind.endswith("5") else 2))
    with pytest.raises(BundleError, match=f"is a {refused_as} file, not a SoftPatch bundle"):
        load_bundle(path, device="cpu")
    assert not marker.exists(), "a bundle is never unpickled"


@pytest.fixture(scope="module")
def tiny(small_config: SoftPatchConfig, synthetic_set: SyntheticSet) -> tuple:
    """resnet18's first stage only (a bundle of about 0.6 MB), so that many saves and loads stay cheap."""
    from softpatch.method.model import build_extractor

    config = small_config.replace(layers=(1,), feature_dim=16, discriminator="nearest")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        extractor = build_extractor(config, torch.device("cpu"))
    probe = SoftPatch(config, extractor=extractor)
    return config, extractor, probe.embed(synthetic_set.train), probe.embed(synthetic_set.test)


def test_every_header_length_residue_loads_back(tmp_path: Path, tiny: tuple) -> None:
    """A bundle's first byte is its header length mod 256; 0x80 (a pickle's first byte) must load like any other."""
    config, extractor, train, test = tiny
    expected = SoftPatch(config, extractor=extractor).fit_embeddings(train).score(test, with_maps=False)
    path = tmp_path / "m.softpatch"
    first_bytes = set()
    for extra in range(0, 256, 8):  # 8 more characters of one training name: 8 more header bytes
        names = [train.names[0] + "x" * extra, *train.names[1:]]
        model = SoftPatch(config, extractor=extractor).fit_embeddings(dataclasses.replace(train, names=names))
        save_bundle(model, path)
        with open(path, "rb") as fh:
            first_bytes.add(fh.read(1)[0])
        loaded = load_bundle(path, device="cpu")
        assert loaded.train_names_ == names
        got = loaded.score(test, with_maps=False)
        assert np.array_equal(got.image_scores, expected.image_scores)
        assert np.array_equal(got.patch_scores, expected.patch_scores)
    # safetensors pads its header to a multiple of 8: these are all 32 possible first bytes, 0x80 among them.
    assert first_bytes == set(range(0, 256, 8))


def _n(bundle_path: Path) -> tuple[int, int, int]:
    _, tensors = _read(bundle_path)
    m = tensors["bank.features"].shape[0]
    n, p = tensors["train.outlier_scores"].shape
    return m, n, p


TAMPERING = {
    "weights_too_long": lambda m, n, p, t: {"bank.weights": torch.ones(m + 1)},
    "weights_wrong_dtype": lambda m, n, p, t: {"bank.weights": torch.ones(m, dtype=torch.float64)},
    "weights_2d": lambda m, n, p, t: {"bank.weights": torch.ones(m, 1)},
    "features_nan": lambda m, n, p, t: {"bank.features": t["bank.features"].clone().fill_(float("nan"))},
    "features_wrong_dim": lambda m, n, p, t: {"bank.features": torch.zeros(m, 7)},
    "weights_inf": lambda m, n, p, t: {"bank.weights": torch.full((m,), float("inf"))},
    "provenance_out_of_range": lambda m, n, p, t: {
        "bank.provenance": t["bank.provenance"].clone().index_fill_(1, torch.tensor([0]), n + 5)
    },
    "provenance_negative": lambda m, n, p, t: {"bank.provenance": torch.full((m, 3), -1, dtype=torch.int64)},
    "scores_wrong_shape": lambda m, n, p, t: {"train.outlier_scores": torch.zeros(n, p + 1)},
    "removed_wrong_count": lambda m, n, p, t: {"train.removed": torch.zeros(n - 1, p, dtype=torch.uint8)},
    "backbone_tensor_wrong_shape": lambda m, n, p, t: {"backbone.conv1.weight": torch.zeros(3, 3)},
}


@pytest.mark.parametrize("name", sorted(TAMPERING))
def test_tampered_tensors_are_refused(tmp_path: Path, bundle_path: Path, name: str) -> None:
    metadata, tensors = _read(bundle_path)
    m, n, p = _n(bundle_path)
    tensors.update(TAMPERING[name](m, n, p, tensors))
    path = tmp_path / "tampered.softpatch"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    with pytest.raises(BundleError):
        load_bundle(path, device="cpu")


@pytest.mark.parametrize("key", ["bank.weights", "train.removed", "backbone.conv1.weight"])
def test_missing_tensor_is_refused(tmp_path: Path, bundle_path: Path, key: str) -> None:
    metadata, tensors = _read(bundle_path)
    del tensors[key]
    path = tmp_path / "missing.softpatch"
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(BundleError):
        load_bundle(path, device="cpu")


@pytest.mark.parametrize(
    "metadata",
    [
        {"config": "{not json"},
        {"config": json.dumps({"tau": 0.1, "unknown_key": 1})},
        {"config": json.dumps({"tau": 7})},
        {"grid": json.dumps([8])},
        {"grid": json.dumps([0, 8])},
        {"train_names": json.dumps(["a"])},
        {"threshold": json.dumps("high")},
        {"train_sizes": "[[1, 2, 3]]"},
    ],
    ids=["config-json", "config-key", "config-value", "grid-1d", "grid-zero", "names", "threshold", "sizes"],
)
def test_damaged_metadata_is_refused(tmp_path: Path, bundle_path: Path, metadata: dict) -> None:
    path = _rewrite(bundle_path, tmp_path / "meta.softpatch", metadata=metadata)
    with pytest.raises(BundleError):
        load_bundle(path, device="cpu")


def test_config_of_another_backbone_is_refused(tmp_path: Path, bundle_path: Path) -> None:
    metadata, _ = _read(bundle_path)
    config = json.loads(metadata["config"])
    config["backbone"] = "resnet34"  # same key names as resnet18 in part, different structure
    path = _rewrite(bundle_path, tmp_path / "other.softpatch", metadata={"config": json.dumps(config)})
    with pytest.raises(BundleError, match="resnet34"):
        load_bundle(path, device="cpu")


# ---------------------------------------------------------------- bundles with the training features


def test_a_bundle_with_training_features_retunes_like_the_fitted_model(
    tmp_path: Path, small_config: SoftPatchConfig, extractor, train_embeddings, eval_embeddings
) -> None:
    fitted = _fitted(small_config, extractor, train_embeddings, discriminator="lof", lof_k=4)
    plain = save_bundle(fitted, tmp_path / "plain.softpatch")
    full = save_bundle(fitted, tmp_path / "full.softpatch", training_features=True)
    n, p, d = fitted.train_features_.shape
    assert full.stat().st_size - plain.stat().st_size >= n * p * d * 4
    loaded = load_bundle(full, device="cpu")
    torch.testing.assert_close(loaded.train_features_, fitted.train_features_, rtol=0, atol=0)
    for changes in ({"tau": 0.05}, {"lof_k": 3}, {"coreset_ratio": 0.5, "soft_weight": False}):
        fitted.retune(**changes)
        loaded.retune(**changes)  # refused for a bundle without the features
        np.testing.assert_array_equal(loaded.removed_mask_, fitted.removed_mask_)
        np.testing.assert_array_equal(loaded.vetting_report().ranking, fitted.vetting_report().ranking)
        np.testing.assert_allclose(
            loaded.score(eval_embeddings).image_scores, fitted.score(eval_embeddings).image_scores, rtol=1e-5
        )
    with pytest.raises(SoftPatchError, match="without its training features"):
        load_bundle(plain, device="cpu").retune(tau=0.05)


@pytest.mark.parametrize(
    "features",
    [
        lambda f: f[:, :-1],  # one position short
        lambda f: f[:-1],  # one image short
        lambda f: f.double(),
        lambda f: torch.full_like(f, float("nan")),
    ],
    ids=["positions", "images", "dtype", "nan"],
)
def test_tampered_training_features_are_refused(tmp_path: Path, nearest_model: SoftPatch, features) -> None:
    full = save_bundle(nearest_model, tmp_path / "full.softpatch", training_features=True)
    _, tensors = _read(full)
    path = _rewrite(full, tmp_path / "bad.softpatch", tensors={"train.features": features(tensors["train.features"])})
    with pytest.raises(BundleError):
        load_bundle(path, device="cpu")
