"""Thresholds from good images alone: out-of-sample scores, the order-statistic threshold, its exact bound."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import binom

from softpatch.deployment.bundle import load_bundle, save_bundle
from softpatch.errors import SoftPatchError, ThresholdError
from softpatch.evaluation.threshold import (
    GoodImageThreshold,
    fpr_upper_bound,
    out_of_sample_scores,
    threshold_for_fpr,
    threshold_from_good_images,
)
from softpatch.method.model import Embeddings


def _marked(fitted, synthetic_set) -> list[str]:
    return [fitted.train_names_[i] for i in synthetic_set.defective]


def test_threshold_from_good_images_separates_the_test_images(fitted, synthetic_set) -> None:
    result = threshold_from_good_images(fitted, target_fpr=0.01, exclude=_marked(fitted, synthetic_set))
    assert isinstance(result, GoodImageThreshold)
    good = fitted.score(synthetic_set.test_good, with_maps=False).image_scores
    bad = fitted.score(synthetic_set.test_bad, with_maps=False).image_scores
    assert good.max() < result.threshold < bad.min()
    assert result.n_images == len(synthetic_set.train) - len(synthetic_set.defective) == result.scores.size
    assert sorted(result.excluded) == sorted(_marked(fitted, synthetic_set))
    assert not set(result.names) & set(result.excluded)
    assert result.n_flagged == int((result.scores >= result.threshold).sum()) == 0
    assert result.fpr_upper_bound == pytest.approx(fpr_upper_bound(0, result.n_images, 0.95))
    assert fitted.threshold_ is None  # the model is left as it was


def test_in_sample_scores_are_lower_than_out_of_sample(fitted, synthetic_set) -> None:
    """The leakage the k-fold avoids: a training image scored by the model fitted on it looks too good."""
    good = np.setdiff1d(np.arange(len(synthetic_set.train)), synthetic_set.defective)
    features = fitted.train_features_
    in_sample = fitted.score(
        Embeddings(features, fitted.train_names_, fitted.train_sizes_, fitted.config.feature_key()), with_maps=False
    ).image_scores
    out = out_of_sample_scores(fitted, folds=4)
    assert np.isfinite(out).all()
    assert (in_sample[good] < out[good]).mean() >= 0.8
    assert np.median(in_sample[good]) < np.median(out[good])
    in_threshold, _ = threshold_for_fpr(in_sample[good], 0.0)
    out_threshold, _ = threshold_for_fpr(out[good], 0.0)
    assert in_threshold < out_threshold


def test_only_the_chosen_images_are_scored(fitted) -> None:
    only = np.zeros(len(fitted.train_names_), dtype=bool)
    only[[0, 5]] = True
    out = out_of_sample_scores(fitted, folds=3, only=only)
    assert np.isfinite(out[only]).all() and np.isnan(out[~only]).all()


def test_the_most_suspicious_images_can_be_left_out(fitted, synthetic_set) -> None:
    result = threshold_from_good_images(fitted, exclude_most_suspicious=len(synthetic_set.defective))
    # The planted defects rank first, so leaving out that many removes exactly them.
    assert sorted(result.excluded) == sorted(_marked(fitted, synthetic_set))
    with_them = threshold_from_good_images(fitted)
    assert with_them.n_images == len(synthetic_set.train)
    assert with_them.threshold > result.threshold  # a defect's own score would set the threshold


@pytest.mark.parametrize(("flagged", "n", "confidence"), [(0, 14, 0.95), (0, 209, 0.95), (2, 209, 0.95), (3, 40, 0.9)])
def test_upper_bound_is_the_exact_binomial_bound(flagged: int, n: int, confidence: float) -> None:
    bound = fpr_upper_bound(flagged, n, confidence)
    # Directly: the rate p at which seeing <= flagged alarms in n images has probability exactly 1 - confidence.
    direct = brentq(lambda p: binom.cdf(flagged, n, p) - (1 - confidence), 1e-12, 1 - 1e-12)
    assert bound == pytest.approx(direct, rel=1e-6)
    if flagged == 0:
        assert bound == pytest.approx(1 - (1 - confidence) ** (1 / n), rel=1e-9)
    assert fpr_upper_bound(n, n, confidence) == 1.0


def test_bound_covers_the_true_false_alarm_rate() -> None:
    """Scores of good images uniform on [0, 1]: the true false-alarm rate of threshold t is 1 - t."""
    rng = np.random.default_rng(0)
    n, trials, covered = 60, 2000, 0
    for _ in range(trials):
        threshold, flagged = threshold_for_fpr(rng.uniform(size=n), 0.05)
        covered += (1 - threshold) <= fpr_upper_bound(flagged, n, 0.9)
    assert covered / trials >= 0.89  # at least the stated 90%, up to Monte Carlo noise (sd ~0.007)


def test_threshold_for_fpr_flags_at_most_the_target_share() -> None:
    scores = np.arange(100, dtype=float)  # 0..99
    threshold, flagged = threshold_for_fpr(scores, 0.03)
    assert flagged == 3 and 96 < threshold <= 97
    assert threshold == pytest.approx(96.5)
    threshold, flagged = threshold_for_fpr(scores, 0.0)
    assert flagged == 0 and threshold > 99
    threshold, flagged = threshold_for_fpr(np.full(10, 2.0), 0.2)  # ties: nothing below the tie to cut at
    assert flagged == 0 and threshold > 2.0


@pytest.mark.parametrize("target", [-0.1, 1.0, 1.5])
def test_bad_targets_are_one_clear_error(fitted, target: float) -> None:
    with pytest.raises(ThresholdError, match="false-alarm target"):
        threshold_from_good_images(fitted, target_fpr=target)


def test_too_few_good_images_is_one_clear_error(fitted) -> None:
    with pytest.raises(ThresholdError, match="left as good"):
        threshold_from_good_images(fitted, exclude=fitted.train_names_[1:])


def test_a_bundle_without_training_features_is_refused(fitted, tmp_path: Path) -> None:
    loaded = load_bundle(save_bundle(fitted, tmp_path / "m.softpatch"), device="cpu")
    with pytest.raises(SoftPatchError, match="no training features"):
        threshold_from_good_images(loaded)
