"""The contamination estimate from training suspicion, and the Denoise page's advice built on it."""

from __future__ import annotations

import numpy as np
import pytest

from softpatch.method import contamination
from softpatch.method.contamination import MIN_IMAGES, WEAK_SPOTS, WeakSpot, advice, estimate_contamination


def _suspicion(n_good: int, n_bad: int, seed: int = 0) -> np.ndarray:
    """Suspicion like SoftPatch's: good images near 1 with some spread, defective ones clearly above."""
    rng = np.random.default_rng(seed)
    good = 1.0 + 0.05 * rng.standard_normal(n_good)
    bad = 1.6 + 0.2 * rng.random(n_bad)
    return np.concatenate([good, bad])


@pytest.mark.parametrize(("n_bad", "expected"), [(0, 0.0), (10, 10 / 110), (30, 30 / 130), (60, 60 / 160)])
def test_estimate_finds_the_planted_share(n_bad: int, expected: float) -> None:
    estimate = estimate_contamination(_suspicion(100, n_bad))
    assert estimate is not None
    assert estimate == pytest.approx(expected, abs=0.02)


def test_estimate_needs_enough_images_and_ignores_non_finite_values() -> None:
    assert estimate_contamination(np.ones(MIN_IMAGES - 1)) is None
    values = _suspicion(40, 4)
    with_nan = np.concatenate([values, [np.nan, np.inf]])
    assert estimate_contamination(with_nan) == estimate_contamination(values)
    # All alike: nothing stands out.
    assert estimate_contamination(np.ones(20)) == 0.0


LOF6 = {"discriminator": "lof", "lof_k": 6}


def test_advice_warns_only_for_a_weak_setting_at_its_level(monkeypatch: pytest.MonkeyPatch) -> None:
    spot = WeakSpot("lof", 0.15, "LOF lost pixel AUROC in the sweep.", {"discriminator": "auto"}, "Use auto", 8)
    monkeypatch.setattr(contamination, "WEAK_SPOTS", (spot,))
    high, low = _suspicion(100, 30), _suspicion(100, 5)
    warned = advice(high, "lof", 6, LOF6)
    assert warned.warning is not None and "23%" in warned.warning and "30 of 130" in warned.warning
    assert warned.better == {"discriminator": "auto"} and warned.button == "Use auto"
    assert warned.n_suspect == 30 and warned.share == pytest.approx(30 / 130)
    quiet = [
        advice(low, "lof", 6, LOF6),  # below the level
        advice(high, "fusion", 6, {"discriminator": "fusion", "lof_k": 6}),  # another discriminator
        advice(high, "lof", 16, {"discriminator": "lof", "lof_k": 16}),  # k already raised
        advice(high, "auto", 6, {"discriminator": "lof", "lof_k": 32}),  # auto adapts by itself
    ]
    for q in quiet:
        assert q.warning is None and q.better == {} and q.share is not None
    assert "Auto uses lof with k=32" in quiet[-1].note
    too_few = advice(np.ones(3), "lof", 6, LOF6)
    assert too_few.share is None and too_few.warning is None and "Too few" in too_few.note


def test_weak_spots_offer_a_different_valid_setting() -> None:
    from softpatch.config import SoftPatchConfig

    assert WEAK_SPOTS, "the sweep found weak settings: the table is filled"
    for spot in WEAK_SPOTS:
        assert 0.0 <= spot.from_share < 1.0 and spot.button and spot.measured
        assert spot.better.get("discriminator", spot.discriminator) != spot.discriminator or len(spot.better) > 0
        SoftPatchConfig(discriminator=spot.discriminator).replace(**spot.better)  # valid settings


def test_the_sweep_weak_spots_fire_where_the_sweep_found_them() -> None:
    # 250 images, a quarter suspect (like magnetic_tile at noise 0.2): every non-default choice is warned about.
    dirty = _suspicion(190, 60)
    for discriminator in ("none", "nearest", "fusion", "lof"):
        hint = advice(dirty, discriminator, 6, LOF6)
        assert hint.warning is not None and hint.better == {"discriminator": "auto"}, discriminator
    assert advice(dirty, "lof", 32, {"discriminator": "lof", "lof_k": 32}).warning is None, "k already large"
    assert advice(dirty, "auto", 6, {"discriminator": "lof", "lof_k": 32}).warning is None
    # 40 images (like battery_weld): auto's k would stay near 6, so LOF k=6 is not warned about.
    small = _suspicion(30, 10)
    assert advice(small, "lof", 6, LOF6).warning is None
    assert advice(small, "none", 6, LOF6).warning is not None
