"""The SoftPatch estimator: fit, retune without re-extraction, scoring by brute force, vetting."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.spatial.distance import cdist
from sklearn.neighbors import LocalOutlierFactor

import softpatch.method.model as model_module
from softpatch.config import ConfigError, SoftPatchConfig
from softpatch.errors import NotFittedError, ResourceError, SoftPatchError
from softpatch.io.datasets import ImageRecord
from softpatch.method.anomaly_map import anomaly_maps
from softpatch.method.denoise import soft_weights
from softpatch.method.model import Embeddings, SoftPatch
from tests.conftest import SyntheticSet


class CallCounter:
    """Wraps a callable and counts the calls."""

    def __init__(self, target) -> None:
        self.target = target
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.target(*args, **kwargs)


@pytest.fixture
def spies(monkeypatch: pytest.MonkeyPatch, fitted: SoftPatch) -> dict[str, CallCounter]:
    """Count backbone passes, neighbour searches and discriminator runs of ``fitted``."""
    counters = {
        "forward": CallCounter(fitted._extractor.forward),
        "neighbours": CallCounter(model_module.compute_neighbours),
        "discriminator": CallCounter(model_module.score_patches),
    }
    monkeypatch.setattr(fitted._extractor, "forward", counters["forward"])
    monkeypatch.setattr(model_module, "compute_neighbours", counters["neighbours"])
    monkeypatch.setattr(model_module, "score_patches", counters["discriminator"])
    return counters


def _grid_mask(model: SoftPatch, mask: np.ndarray) -> np.ndarray:
    """Patch-grid cells (8x8 at crop 64) that lie mostly inside a bool image mask."""
    crop_mask = model.transform_.mask(mask)
    h, w = model.grid_shape_
    return crop_mask.reshape(h, crop_mask.shape[0] // h, w, crop_mask.shape[1] // w).mean(axis=(1, 3)) > 0.5


# ---------------------------------------------------------------- fit


def test_fit_from_paths(
    small_config: SoftPatchConfig, extractor, synthetic_set: SyntheticSet, train_embeddings
) -> None:
    model = SoftPatch(small_config, extractor=extractor).fit(synthetic_set.train)
    n, p = len(synthetic_set.train), 64
    assert model.grid_shape_ == (8, 8)
    assert model.device_ == torch.device("cpu")
    assert model.train_features_.shape == (n, p, 96)
    # The fit streams its features through a float16 store: they are the embeddings' differences from the
    # store's per-position offset, rounded to float16, plus the offset.
    store = model.feature_store_
    assert store is not None and store.dtype == "float16"
    offset = np.fromfile(store.directory / "offset.bin", dtype=np.float32).reshape(p, 96)
    x = train_embeddings.features.numpy()
    expected = (x - offset).astype(np.float16).astype(np.float32) + offset
    np.testing.assert_array_equal(model.train_features_.numpy(), expected)
    assert model.train_names_ == [str(path) for path in synthetic_set.train]
    assert model.train_sizes_ == [(80, 80)] * n
    assert model.outlier_scores_.shape == (n, 8, 8) and np.isfinite(model.outlier_scores_).all()
    assert model.removed_mask_.shape == (n, 8, 8) and model.removed_mask_.dtype == bool
    assert model.removed_fraction_.shape == (n,)
    assert model.removed_fraction_.mean() == pytest.approx(round(0.15 * n * p) / (n * p))
    assert model.threshold_ is None
    assert (model.transform_.resize, model.transform_.crop) == (72, 64)


def test_memory_bank_is_a_weighted_coreset_of_kept_patches(fitted: SoftPatch) -> None:
    bank = fitted.memory_bank_
    removed = fitted.removed_mask_
    kept = int((~removed).sum())
    assert len(bank) == round(kept * 0.1)
    img, row, col = bank.provenance.T
    assert not removed[img, row, col].any(), "removed patches never enter the bank"
    positions = row * 8 + col
    torch.testing.assert_close(
        bank.features, fitted.train_features_[torch.from_numpy(img), torch.from_numpy(positions)]
    )
    expected_weights = soft_weights(fitted.outlier_scores_.reshape(len(fitted.train_names_), -1))[img, positions]
    np.testing.assert_allclose(bank.weights.numpy(), expected_weights, rtol=1e-6)
    assert len(set(zip(img.tolist(), positions.tolist(), strict=True))) == len(bank), "no patch twice"


def test_coreset_all_keeps_exactly_the_kept_patches(fitted: SoftPatch) -> None:
    fitted.retune(coreset="all", tau=0.4)
    bank = fitted.memory_bank_
    kept = {tuple(ix) for ix in np.argwhere(~fitted.removed_mask_).tolist()}
    assert {tuple(row) for row in bank.provenance.tolist()} == kept


def test_model_outlier_scores_compare_patches_at_the_same_position(fitted: SoftPatch) -> None:
    fitted.retune(discriminator="nearest")
    features = fitted.train_features_.numpy()
    scores = fitted.outlier_scores_.reshape(len(features), -1)
    for position in (0, 27, 63):
        dist = cdist(features[:, position], features[:, position])
        np.fill_diagonal(dist, np.inf)
        np.testing.assert_allclose(scores[:, position], dist.min(axis=1), rtol=1e-4)


def test_lof_scores_equal_sklearn_even_beyond_the_neighbour_cache(small_config: SoftPatchConfig, extractor) -> None:
    # 40 images, lof_k 35 > NEIGHBOUR_CACHE_K (32): the cache must grow, not truncate.
    rng = np.random.default_rng(0)
    features = torch.from_numpy(rng.normal(size=(40, 64, 96)).astype(np.float32))
    embeddings = Embeddings(features, [f"i{i}" for i in range(40)], [(80, 80)] * 40, small_config.feature_key())
    model = SoftPatch(small_config.replace(lof_k=35), extractor=extractor).fit_embeddings(embeddings)
    scores = model.outlier_scores_.reshape(40, -1)
    for position in (0, 50):
        reference = -LocalOutlierFactor(n_neighbors=35).fit(features[:, position].numpy()).negative_outlier_factor_
        np.testing.assert_allclose(scores[:, position], reference, rtol=1e-4)


def test_fit_accepts_pil_images_and_records(
    small_config: SoftPatchConfig, extractor, synthetic_set: SyntheticSet
) -> None:
    paths = synthetic_set.train[:4]
    pil = [Image.open(p).convert("RGB") for p in paths]
    config = small_config.replace(lof_k=3)  # 4 images: k must stay <= N-1
    from_pil = SoftPatch(config, extractor=extractor).fit(pil)
    from_records = SoftPatch(config, extractor=extractor).fit([ImageRecord(path=p) for p in paths])
    torch.testing.assert_close(from_pil.train_features_, from_records.train_features_)
    assert from_records.train_names_ == [str(p) for p in paths]
    assert len(set(from_pil.train_names_)) == 4


def test_fit_on_nothing_is_an_error(small_config: SoftPatchConfig, extractor) -> None:
    with pytest.raises(SoftPatchError, match="no training images"):
        SoftPatch(small_config, extractor=extractor).fit([])


def test_fit_refuses_a_job_larger_than_memory(
    monkeypatch: pytest.MonkeyPatch, small_config: SoftPatchConfig, extractor, synthetic_set: SyntheticSet
) -> None:
    monkeypatch.setattr(model_module, "available_memory", lambda device: 1024)
    with pytest.raises(ResourceError, match="fewer images"):
        SoftPatch(small_config, extractor=extractor).fit(synthetic_set.train)


def test_single_training_image_fits_and_removes_nothing(
    small_config: SoftPatchConfig, extractor, synthetic_set: SyntheticSet
) -> None:
    with pytest.warns(UserWarning, match="at least 2 training images"):
        model = SoftPatch(small_config, extractor=extractor).fit(synthetic_set.train[:1])
    assert not model.removed_mask_.any()
    assert len(model.memory_bank_) == round(64 * 0.1)
    assert torch.all(model.memory_bank_.weights == 1)
    result = model.score(synthetic_set.test)
    assert np.isfinite(result.image_scores).all()
    assert model.vetting_report().ranking.tolist() == [0]


def test_lof_k_above_n_minus_one_warns_and_equals_the_clamped_fit(
    small_config: SoftPatchConfig, extractor, train_embeddings
) -> None:
    n = len(train_embeddings)
    with pytest.warns(UserWarning, match="LOF-k"):
        too_large = SoftPatch(small_config.replace(lof_k=n + 10), extractor=extractor).fit_embeddings(train_embeddings)
    clamped = SoftPatch(small_config.replace(lof_k=n - 1), extractor=extractor).fit_embeddings(train_embeddings)
    np.testing.assert_array_equal(too_large.outlier_scores_, clamped.outlier_scores_)
    assert too_large.config.lof_k == n + 10, "the config keeps what the user asked for"
    assert len(too_large.memory_bank_) == len(clamped.memory_bank_)


def test_fit_progress_reports_every_stage(
    small_config: SoftPatchConfig, extractor, synthetic_set: SyntheticSet
) -> None:
    seen: list[tuple[float, str]] = []
    model = SoftPatch(small_config, extractor=extractor).fit(
        synthetic_set.train, progress=lambda f, m: seen.append((f, m))
    )
    stages = {m.split(":", 1)[0] for _, m in seen}
    assert {"features", "discriminator", "coreset"} <= stages
    assert stages <= {"features", "discriminator", "coreset", "scoring"}
    assert all(0.0 <= f <= 1.0 for f, _ in seen)
    assert all(": " in m for _, m in seen)
    features = [f for f, m in seen if m.startswith("features")]
    assert features[0] == 0.0 and features[-1] == 1.0 and features == sorted(features)
    scoring: list[tuple[float, str]] = []
    model.score(synthetic_set.test, progress=lambda f, m: scoring.append((f, m)))
    assert any(m.startswith("scoring") and f == 1.0 for f, m in scoring)
    assert all(0.0 <= f <= 1.0 for f, _ in scoring)


def test_same_seed_gives_identical_memory_banks(fitted: SoftPatch, small_config, extractor, train_embeddings) -> None:
    again = SoftPatch(small_config, extractor=extractor).fit_embeddings(train_embeddings)
    a, b = fitted.memory_bank_, again.memory_bank_
    assert torch.equal(a.features, b.features) and torch.equal(a.weights, b.weights)
    np.testing.assert_array_equal(a.provenance, b.provenance)
    other = SoftPatch(small_config.replace(seed=7), extractor=extractor).fit_embeddings(train_embeddings)
    assert not np.array_equal(other.memory_bank_.provenance, a.provenance)


def test_not_fitted_errors(small_config: SoftPatchConfig, extractor, synthetic_set: SyntheticSet) -> None:
    model = SoftPatch(small_config, extractor=extractor)
    actions = [
        lambda: model.score(synthetic_set.test),
        lambda: model.retune(tau=0.2),
        lambda: model.variant(tau=0.2),
        lambda: model.vetting_report(),
        lambda: model.memory_bank_,
        lambda: model.outlier_scores_,
        lambda: model.removed_mask_,
        lambda: model.train_names_,
        lambda: model.build_memory_bank(),
    ]
    for action in actions:
        with pytest.raises(NotFittedError, match="fit"):
            action()


# ---------------------------------------------------------------- retune and variants


def test_retune_tau_rethresholds_without_touching_images_or_neighbours(
    fitted: SoftPatch, spies: dict[str, CallCounter]
) -> None:
    n, p = len(fitted.train_names_), 64
    before = fitted.removed_mask_.sum()
    bank_before = len(fitted.memory_bank_)
    fitted.retune(tau=0.3)
    assert fitted.config.tau == 0.3
    assert fitted.removed_mask_.sum() == round(0.3 * n * p) != before
    assert len(fitted.memory_bank_) == round((n * p - round(0.3 * n * p)) * 0.1) != bank_before
    assert spies["forward"].calls == 0 and spies["neighbours"].calls == 0 and spies["discriminator"].calls == 0


def test_retune_lof_k_rescores_from_cached_neighbours(fitted: SoftPatch, spies: dict[str, CallCounter]) -> None:
    original = fitted.outlier_scores_.copy()
    fitted.retune(lof_k=3)
    assert spies["discriminator"].calls == 1, "a new k runs the discriminator once"
    assert not np.allclose(fitted.outlier_scores_, original)
    fitted.retune(lof_k=6)
    np.testing.assert_array_equal(fitted.outlier_scores_, original)
    fitted.retune(discriminator="gaussian")
    fitted.build_memory_bank()
    assert spies["discriminator"].calls == 2, "lof k=6 came from the cache, gaussian ran once"
    assert spies["forward"].calls == 0 and spies["neighbours"].calls == 0


@pytest.mark.parametrize(
    "changes",
    [
        {"backbone": "resnet34"},
        {"crop": 56},
        {"resize": 80},
        {"layers": (1, 2)},
        {"feature_dim": 64},
        {"patch_size": 5},
        {"weights": "w.safetensors"},
        {"pretrained": True},
        {"backbone_kwargs": {"drop_rate": 0.1}},
    ],
    ids=lambda c: next(iter(c)),
)
def test_retune_of_a_feature_setting_is_refused(fitted: SoftPatch, changes: dict) -> None:
    config = fitted.config
    with pytest.raises(SoftPatchError, match="fit again"):
        fitted.retune(**changes)
    assert fitted.config == config


def test_retune_unknown_or_invalid_setting(fitted: SoftPatch) -> None:
    config = fitted.config
    with pytest.raises(SoftPatchError, match="unknown settings: taus"):
        fitted.retune(taus=0.2)
    with pytest.raises(ConfigError, match="tau"):
        fitted.retune(tau=1.5)
    assert fitted.config == config


def test_retune_blur_keeps_the_bank_and_image_scores(fitted: SoftPatch, eval_embeddings) -> None:
    bank = fitted.memory_bank_
    before = fitted.score(eval_embeddings)
    fitted.retune(blur_sigma=0.0)
    after = fitted.score(eval_embeddings)
    assert fitted.memory_bank_ is bank
    np.testing.assert_array_equal(after.image_scores, before.image_scores)
    assert not np.allclose(after.anomaly_maps, before.anomaly_maps)


def test_variant_leaves_the_original_unchanged(fitted: SoftPatch, spies: dict[str, CallCounter]) -> None:
    config = fitted.config
    bank = fitted.memory_bank_
    bank_features = bank.features.clone()
    removed = fitted.removed_mask_.copy()
    variant = fitted.variant(tau=0.05, discriminator="nearest", soft_weight=False)
    assert variant.config.tau == 0.05 and variant.config.discriminator == "nearest"
    variant_bank = variant.memory_bank_
    assert variant_bank is not bank and torch.all(variant_bank.weights == 1)
    assert fitted.config == config
    assert fitted.memory_bank_ is bank and torch.equal(bank.features, bank_features)
    np.testing.assert_array_equal(fitted.removed_mask_, removed)
    assert fitted.config.discriminator == "lof"
    assert spies["forward"].calls == 0, "a variant shares the features"


def test_soft_weight_switch(fitted: SoftPatch) -> None:
    weights = fitted.memory_bank_.weights
    assert not torch.all(weights == 1), "soft weighting on: the outlier scores weigh the bank"
    assert torch.all(weights > 0)
    fitted.retune(soft_weight=False)
    assert torch.all(fitted.memory_bank_.weights == 1)


def test_discriminator_none_is_plain_patchcore(fitted: SoftPatch) -> None:
    fitted.retune(discriminator="none")
    assert not fitted.removed_mask_.any()
    assert fitted.removed_fraction_.max() == 0.0
    assert torch.all(fitted.memory_bank_.weights == 1)
    assert len(fitted.memory_bank_) == round(len(fitted.train_names_) * 64 * 0.1)


def test_position_scope_removes_tau_at_every_position(fitted: SoftPatch) -> None:
    fitted.retune(tau_scope="position", tau=0.25)
    n = len(fitted.train_names_)
    np.testing.assert_array_equal(fitted.removed_mask_.sum(axis=0), np.full((8, 8), round(0.25 * n)))


# ---------------------------------------------------------------- scoring


def test_patch_score_is_weighted_distance_to_the_nearest_bank_patch(fitted: SoftPatch, eval_embeddings) -> None:
    result = fitted.score(eval_embeddings)
    bank = fitted.memory_bank_
    queries = eval_embeddings.features.reshape(-1, 96).double().numpy()
    dist = cdist(queries, bank.features.double().numpy())
    nearest = dist.argmin(axis=1)
    expected = bank.weights.double().numpy()[nearest] * dist[np.arange(len(queries)), nearest]
    n = len(eval_embeddings)
    assert result.patch_scores.shape == (n, 8, 8)
    np.testing.assert_allclose(result.patch_scores.reshape(-1), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(result.image_scores, result.patch_scores.reshape(n, -1).max(axis=1))


def test_score_paths_equals_score_embeddings_and_maps_follow_patch_scores(
    fitted: SoftPatch, eval_embeddings, synthetic_set: SyntheticSet
) -> None:
    from_paths = fitted.score(synthetic_set.test)
    from_embeddings = fitted.score(eval_embeddings)
    np.testing.assert_allclose(from_paths.image_scores, from_embeddings.image_scores, rtol=1e-5)
    assert from_paths.names == [str(p) for p in synthetic_set.test]
    assert from_paths.sizes == [(80, 80)] * len(synthetic_set.test)
    assert from_paths.anomaly_maps.shape == (len(synthetic_set.test), 64, 64)
    expected_maps = anomaly_maps(torch.from_numpy(from_paths.patch_scores), 64, fitted.config.blur_sigma).numpy()
    np.testing.assert_allclose(from_paths.anomaly_maps, expected_maps, rtol=1e-5)
    assert fitted.score(eval_embeddings, with_maps=False).anomaly_maps is None


def test_scores_do_not_depend_on_the_other_images_scored(fitted: SoftPatch, synthetic_set: SyntheticSet) -> None:
    together = fitted.score(synthetic_set.test)
    for i in (0, 4):
        alone = fitted.score([synthetic_set.test[i]])
        np.testing.assert_allclose(alone.image_scores[0], together.image_scores[i], rtol=1e-5)
        np.testing.assert_allclose(alone.anomaly_maps[0], together.anomaly_maps[i], rtol=1e-4, atol=1e-6)


def test_defective_test_images_score_higher_and_maps_point_at_the_defect(
    fitted: SoftPatch, eval_embeddings, synthetic_set: SyntheticSet
) -> None:
    result = fitted.score(eval_embeddings)
    n_good = len(synthetic_set.test_good)
    assert result.image_scores[n_good:].min() > result.image_scores[:n_good].max()
    from scipy.ndimage import binary_dilation

    for j, mask in enumerate(synthetic_set.test_masks):
        amap = result.anomaly_maps[n_good + j]
        y, x = np.unravel_index(int(amap.argmax()), amap.shape)
        assert binary_dilation(fitted.transform_.mask(mask), iterations=4)[y, x]


def test_embeddings_from_other_feature_settings_are_refused(
    small_config: SoftPatchConfig, fitted: SoftPatch, eval_embeddings
) -> None:
    foreign_key = small_config.replace(crop=56).feature_key()
    assert foreign_key != eval_embeddings.feature_key
    foreign = Embeddings(eval_embeddings.features, eval_embeddings.names, eval_embeddings.sizes, foreign_key)
    with pytest.raises(SoftPatchError, match="other feature settings"):
        fitted.score(foreign)
    with pytest.raises(SoftPatchError, match="other feature settings"):
        SoftPatch(small_config, extractor=fitted._extractor).fit_embeddings(foreign)
    # settings that do not change features keep the key
    assert small_config.replace(tau=0.4, discriminator="nearest").feature_key() == eval_embeddings.feature_key


# ---------------------------------------------------------------- what the denoising achieves


def test_blob_patches_of_defective_training_images_are_removed(fitted: SoftPatch, synthetic_set: SyntheticSet) -> None:
    removed = fitted.removed_mask_
    for i, mask in synthetic_set.train_masks.items():
        blob_cells = _grid_mask(fitted, mask)
        assert blob_cells.sum() >= 2
        assert removed[i][blob_cells].mean() >= 0.75, f"training image {i}: its defect stays in the bank"


def test_vetting_report_ranks_the_defective_training_images_first(fitted: SoftPatch, synthetic_set) -> None:
    report = fitted.vetting_report()
    n = len(synthetic_set.train)
    assert report.suspicion.shape == (n,) and report.removed_fraction.shape == (n,)
    assert sorted(report.ranking.tolist()) == list(range(n))
    assert set(report.ranking[: len(synthetic_set.defective)].tolist()) == set(synthetic_set.defective)
    assert np.all(np.diff(report.suspicion[report.ranking]) <= 0), "most suspicious first"
    rows = report.rows()
    assert [r["rank"] for r in rows] == list(range(1, n + 1))
    assert {Path(str(rows[0]["path"])).name, Path(str(rows[1]["path"])).name} == {
        synthetic_set.train[i].name for i in synthetic_set.defective
    }
    assert all(set(r) == {"rank", "path", "suspicion", "removed_fraction"} for r in rows)
    np.testing.assert_array_equal(report.removed_fraction, fitted.removed_fraction_)


def test_suspicion_does_not_depend_on_tau_but_the_removed_share_does(fitted: SoftPatch) -> None:
    before = fitted.vetting_report()
    after = fitted.retune(tau=0.3).vetting_report()
    np.testing.assert_array_equal(after.suspicion, before.suspicion)
    assert after.removed_fraction.mean() > before.removed_fraction.mean()


def test_vetting_needs_no_memory_bank(small_config: SoftPatchConfig, extractor, train_embeddings) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = SoftPatch(small_config, extractor=extractor).fit_embeddings(train_embeddings, build_memory_bank=False)
    assert model._bank is None
    assert len(model.vetting_report().ranking) == len(train_embeddings)
    assert model._bank is None, "vetting did not build the memory bank"


# ---------------------------------------------------------------- real weights on real data


@pytest.mark.slow
def test_real_weights_vet_real_defects_above_chance(mobilenet_weights: Path) -> None:
    """Magnetic tiles: 40 defect-free + 4 defective training images per category; the vetting ranks the
    defective ones high with the shared ImageNet weights (about 0.8 mean AUROC; random weights: about 0.43)."""
    from softpatch.evaluation.metrics import image_auroc
    from tests.conftest import MOBILENET_KWARGS, SHARED

    root = SHARED / "data" / "magnetic_tile"
    if not (root / "MT_Free" / "Imgs").is_dir():
        pytest.skip(f"shared magnetic_tile data not found at {root} (see shared/data/README.md)")
    config = SoftPatchConfig(
        backbone="mobilenetv1_100",
        backbone_kwargs=MOBILENET_KWARGS,
        weights=str(mobilenet_weights),
        resize=128,
        crop=128,
        feature_dim=256,
        device="cpu",
    )
    extractor = model_module.build_extractor(config, torch.device("cpu"))
    free = sorted((root / "MT_Free" / "Imgs").glob("*.jpg"))
    aurocs = []
    for category in ("MT_Break", "MT_Fray", "MT_Blowhole", "MT_Uneven"):
        defective = sorted((root / category / "Imgs").glob("*.jpg"))
        rng = np.random.default_rng(0)
        good = [free[i] for i in rng.choice(len(free), 40, replace=False)]
        planted = [defective[i] for i in rng.choice(len(defective), 4, replace=False)]
        report = SoftPatch(config, extractor=extractor).fit(good + planted).vetting_report()
        aurocs.append(image_auroc(np.r_[np.zeros(40), np.ones(4)], report.suspicion))
    assert np.mean(aurocs) >= 0.7, aurocs


# ---------------------------------------------------------------- known bugs


def test_scoring_no_images_is_empty_or_a_clear_error(fitted: SoftPatch) -> None:
    try:
        result = fitted.score([])
    except SoftPatchError:
        return
    assert result.image_scores.shape == (0,) and result.patch_scores.shape == (0, 8, 8)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_refused_retune_leaves_the_config_unchanged(fitted: SoftPatch) -> None:
    config = fitted.config
    with pytest.raises(SoftPatchError, match="cuda"):
        fitted.retune(device="cuda")
    assert fitted.config == config


def test_search_method_is_a_scoring_setting_and_both_are_exact(
    fitted: SoftPatch, eval_embeddings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from softpatch.method import memory_bank as memory_bank_module

    # The test bank is small: lower the thresholds so that "bounded" really runs the bounded search.
    monkeypatch.setattr(memory_bank_module, "_BOUNDED_MIN_ROWS", 16)
    monkeypatch.setattr(memory_bank_module, "_BOUND_DIMS", (8,))
    exhaustive = fitted.retune(search="exhaustive").score(eval_embeddings, with_maps=False)
    bank = fitted.memory_bank_
    bounded = fitted.retune(search="bounded").score(eval_embeddings, with_maps=False)
    assert fitted.memory_bank_ is bank, "changing the search does not rebuild the memory bank"
    assert set(bank._indexes) == {"exhaustive", "bounded"}
    np.testing.assert_allclose(bounded.patch_scores, exhaustive.patch_scores, rtol=1e-5, atol=1e-5)


def test_the_bounded_search_is_tuned_on_held_out_patches_when_the_bank_is_built(
    fitted: SoftPatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    from softpatch.method import memory_bank as memory_bank_module

    monkeypatch.setattr(memory_bank_module, "_BOUNDED_MIN_ROWS", 16)
    monkeypatch.setattr(memory_bank_module, "_BOUND_DIMS", (4, 8))
    bank = fitted.variant(tau=0.2).build_memory_bank()
    index = bank._indexes["bounded"]
    assert index.dim_ in (0, 4, 8), "chosen while the bank was built, before any score()"
