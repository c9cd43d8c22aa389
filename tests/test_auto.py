"""discriminator="auto": the settings chosen from the training set's own suspicion, on synthetic features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from softpatch import SoftPatch
from softpatch.config import SoftPatchConfig
from softpatch.method.contamination import NEIGHBOUR_CACHE_K, choose_settings, estimate_contamination
from softpatch.method.model import Embeddings

N_GOOD = 28
DEFECT = slice(16, 32)  # positions of the planted look-alike defect (of the 8 x 8 grid)


def _features(n_bad: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """``(N, 64, 96)`` patch features: good images scattered around one look per position; ``n_bad`` images
    carry the same defect (look-alikes, tightly packed) at ``DEFECT``. Returns features and the planted mask."""
    rng = np.random.default_rng(seed)
    n = N_GOOD + n_bad
    look = rng.normal(size=(1, 64, 96))
    features = look + 0.3 * rng.normal(size=(n, 64, 96))
    planted = np.zeros((n, 64), dtype=bool)
    if n_bad:
        defect = rng.normal(size=(1, DEFECT.stop - DEFECT.start, 96))
        features[N_GOOD:, DEFECT] = look[:, DEFECT] + defect + 0.05 * rng.normal(size=(n_bad, 16, 96))
        planted[N_GOOD:, DEFECT] = True
    return torch.from_numpy(features.astype(np.float32)), planted


def _fit(config: SoftPatchConfig, extractor, features: torch.Tensor) -> SoftPatch:
    n = features.shape[0]
    embeddings = Embeddings(features, [f"i{i}" for i in range(n)], [(80, 80)] * n, config.feature_key())
    return SoftPatch(config, extractor=extractor).fit_embeddings(embeddings, build_memory_bank=False)


@pytest.fixture(scope="module")
def auto_config(small_config: SoftPatchConfig) -> SoftPatchConfig:
    return small_config.replace(discriminator="auto", lof_k=6, tau=0.1)


def test_auto_keeps_the_users_lof_on_a_clean_set(auto_config: SoftPatchConfig, extractor) -> None:
    features, _ = _features(0)
    model = _fit(auto_config, extractor, features)
    assert estimate_contamination(model.wide_suspicion_) == 0.0
    assert model.resolved_config_.discriminator == "lof" and model.resolved_config_.lof_k == 6
    fixed = _fit(auto_config.replace(discriminator="lof"), extractor, features)
    np.testing.assert_array_equal(model.removed_mask_, fixed.removed_mask_)
    assert model.config.discriminator == "auto", "the config still says auto; the choice is resolved_config_"


def test_auto_switches_and_removes_planted_look_alikes(auto_config: SoftPatchConfig, extractor) -> None:
    # 12 of 40 images (30%) share one defect: more than k=6 look-alikes at each defect position.
    features, planted = _features(12)
    model = _fit(auto_config, extractor, features)
    share = estimate_contamination(model.wide_suspicion_)
    assert share == pytest.approx(12 / 40, abs=0.03)
    chosen = model.resolved_config_
    assert chosen.discriminator == "lof" and 12 < chosen.lof_k <= 39 // 2, "k above the number of look-alikes"
    removed = model.removed_mask_.reshape(40, -1)
    assert removed[planted].mean() > 0.9, "auto removes the planted look-alike patches"
    # The fixed paper setting does not: LOF k=6 sees the 12 look-alikes as one dense, normal cluster.
    fixed = _fit(auto_config.replace(discriminator="lof"), extractor, features)
    assert fixed.removed_mask_.reshape(40, -1)[planted].mean() < 0.2


def test_auto_choice_is_a_pure_function_of_the_suspicion() -> None:
    rng = np.random.default_rng(0)
    clean = 1.0 + 0.02 * rng.standard_normal(60)
    dirty = np.concatenate([clean[:42], 1.5 + 0.05 * rng.random(18)])
    # Clean: at least 8% of 60 images assumed suspect, 1.5 x 4.8 -> k 8.
    assert choose_settings(clean, 6, 60) == {"discriminator": "lof", "lof_k": 8}
    assert choose_settings(dirty, 6, 60) == {"discriminator": "lof", "lof_k": 27}  # 18 suspect, 1.5 x 18
    assert choose_settings(dirty, 6, 60) == choose_settings(dirty.copy(), 6, 60) != choose_settings(clean, 6, 60)
    assert choose_settings(np.ones(3), 6, 3) == {"discriminator": "lof", "lof_k": 6}, "too few images: the user's"
    # 30% of 271 images suspect: k is capped by the neighbour cache; of 20 images, by half the images.
    many = np.concatenate([1.0 + 0.02 * rng.standard_normal(190), 1.5 + 0.05 * rng.random(81)])
    assert choose_settings(many, 6, 271) == {"discriminator": "lof", "lof_k": NEIGHBOUR_CACHE_K}
    few = np.concatenate([1.0 + 0.02 * rng.standard_normal(14), 1.5 + 0.05 * rng.random(6)])
    assert choose_settings(few, 6, 20) == {"discriminator": "lof", "lof_k": 9}  # 1.5 x 6, half of 19 is 9
    assert choose_settings(few, 12, 20)["lof_k"] == 12, "never below the user's k"


def test_auto_is_a_valid_setting_everywhere(small_config: SoftPatchConfig) -> None:
    from softpatch.cli import build_parser
    from softpatch.config import SETTINGS, parse_setting

    assert "auto" in SETTINGS["discriminator"].allowed()
    assert "auto" not in SETTINGS["fusion"].allowed(), "auto is not a fusion member"
    assert parse_setting("discriminator", "auto") == "auto"
    args = build_parser().parse_args(["vet", "folder", "--discriminator", "auto"])
    assert args.discriminator == "auto"


def test_a_bundle_keeps_what_auto_chose(auto_config: SoftPatchConfig, extractor, tmp_path) -> None:
    from softpatch import load_bundle, save_bundle

    features, _ = _features(12)
    model = _fit(auto_config, extractor, features)
    model.build_memory_bank()
    path = save_bundle(model, tmp_path / "auto.softpatch")
    loaded = load_bundle(path, device="cpu")
    # Saved as the concrete settings: a loaded model has no training features to choose again from.
    assert loaded.config.discriminator == "lof" and loaded.config.lof_k == model.resolved_config_.lof_k > 6
    queries = Embeddings(features[:3], ["a", "b", "c"], [(80, 80)] * 3, auto_config.feature_key())
    np.testing.assert_allclose(
        loaded.score(queries, with_maps=False).image_scores, model.score(queries, with_maps=False).image_scores
    )
