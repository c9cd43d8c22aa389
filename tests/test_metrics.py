"""Behavioural tests of softpatch.evaluation.metrics: hand-computed cases, brute-force references, edge cases."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import ndimage

from softpatch.evaluation.metrics import (
    Confusion,
    ThresholdChoice,
    aupro,
    confusion_at,
    f1_threshold,
    image_auroc,
    operating_point,
    percentile_threshold,
    pixel_auroc,
    pro_curve,
    rate_interval,
)

# ----------------------------------------------------------------------------- brute-force references


def brute_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float) -> float:
    """Loop over every distinct threshold; PRO per region with explicit masks; area with exact interpolation."""
    regions = []
    for i in range(masks.shape[0]):
        lab, count = ndimage.label(masks[i], structure=np.ones((3, 3)))
        regions += [(i, lab == r) for r in range(1, count + 1)]
    ok = ~masks
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fpr = pred[ok].mean()
        pro = np.mean([pred[i][region].mean() for i, region in regions])
        points.append((fpr, pro))
    points.append((1.0, 1.0))
    area = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += 0.5 * (y0 + y1) * (x1 - x0)
    return area / fpr_limit


def brute_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Probability that a random anomalous sample outscores a random good one (ties count half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (pos.size * neg.size)


def brute_best_f1(labels: np.ndarray, scores: np.ndarray) -> float:
    return max(confusion_at(labels, scores, t).f1 for t in np.unique(scores))


def random_masks(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(n):
        for _ in range(rng.integers(0, 3)):
            r, c = rng.integers(0, h - 3), rng.integers(0, w - 3)
            masks[i, r : r + rng.integers(1, 4), c : c + rng.integers(1, 4)] = True
    masks[0, 0, 0] = True  # at least one region
    return masks


# ----------------------------------------------------------------------------- image AUROC


def test_image_auroc_hand_case():
    # pairs (pos, neg): 0.8>0.1, 0.8>0.4, 0.35<0.4, 0.35>0.1 -> 3 of 4
    assert image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)


def test_image_auroc_perfect_inverted_and_ties():
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.9, 1.0])
    assert image_auroc(labels, scores) == 1.0
    assert image_auroc(labels, -scores) == 0.0
    assert image_auroc(labels, np.ones(5)) == 0.5


def test_image_auroc_matches_pairwise_definition():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 60)
    scores = np.round(rng.normal(size=60) + labels, 1)  # rounding makes ties
    assert image_auroc(labels, scores) == pytest.approx(brute_auroc(labels, scores))


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1]])
def test_image_auroc_one_class_is_a_clear_error(labels):
    with pytest.raises(ValueError, match="only one class"):
        image_auroc(labels, np.arange(len(labels), dtype=float))


def test_image_auroc_rejects_bad_input():
    with pytest.raises(ValueError, match="same length"):
        image_auroc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"0 .good. or 1"):
        image_auroc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        image_auroc([0, 1], [0.1, np.nan])


# ----------------------------------------------------------------------------- pixel AUROC


def test_pixel_auroc_perfect_and_inverted():
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[0, 2:4, 2:4] = True
    maps = masks.astype(float) + 0.01 * np.arange(128).reshape(2, 8, 8) / 128
    assert pixel_auroc(masks, maps) == 1.0
    assert pixel_auroc(masks, -maps) == 0.0


def test_pixel_auroc_flattens_all_images():
    rng = np.random.default_rng(2)
    masks = rng.random((3, 5, 5)) < 0.3
    maps = rng.random((3, 5, 5)) + masks * 0.3
    expected = brute_auroc(masks.reshape(-1).astype(int), maps.reshape(-1))
    assert pixel_auroc(masks, maps) == pytest.approx(expected)


def test_pixel_auroc_errors():
    with pytest.raises(ValueError, match="only one class"):
        pixel_auroc(np.zeros((2, 4, 4), bool), np.random.default_rng(0).random((2, 4, 4)))
    with pytest.raises(ValueError, match="same shape"):
        pixel_auroc(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 5)))


# ----------------------------------------------------------------------------- AUPRO


def test_aupro_perfect_detector_is_one_and_inverted_is_zero():
    masks = np.zeros((3, 16, 16), dtype=bool)
    masks[0, 2:5, 2:5] = True
    masks[1, 10:12, 3:9] = True  # image 2 has no defect
    maps = np.where(masks, 2.0, 0.0) + np.random.default_rng(3).random(masks.shape)
    assert aupro(masks, maps) == pytest.approx(1.0)
    # Every defect pixel below every good pixel: PRO stays 0 until FPR reaches 1.
    assert aupro(masks, -maps) == pytest.approx(0.0)


def test_aupro_hand_case_with_two_regions():
    # One 1x4 image: pixel 0 good, 1 and 3 are two separate regions (not 8-connected), 2 good.
    masks = np.array([[[False, True, False, True]]])
    maps = np.array([[[0.5, 0.9, 0.1, 0.2]]])
    # Thresholds 0.9 -> fpr 0, pro 0.5; 0.5 -> fpr .5, pro .5; 0.2 -> fpr .5, pro 1; 0.1 -> fpr 1, pro 1.
    fprs, pros = pro_curve(masks, maps)
    np.testing.assert_allclose(fprs, [0, 0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(pros, [0, 0.5, 0.5, 1, 1, 1])
    # Area to 0.3: rectangle 0.3 * 0.5, normalised -> 0.5. Area to 1: 0.5*0.5 + 0.5*1 = 0.75.
    assert aupro(masks, maps, fpr_limit=0.3) == pytest.approx(0.5)
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(0.75)


def test_aupro_interpolates_at_the_limit():
    # Good pixels 0.6, 0.4 (fpr steps of 0.5); region of one pixel at 0.5.
    masks = np.array([[[False, True, False]]])
    maps = np.array([[[0.6, 0.5, 0.4]]])
    # Curve: (0,0) -> (0.5,0) -> (0.5,1) -> (1,1). To 0.75: area 0.25, normalised 1/3.
    assert aupro(masks, maps, fpr_limit=0.75) == pytest.approx(0.25 / 0.75)
    # Curve to 0.25 lies on the segment (0,0)-(0.5,0): zero.
    assert aupro(masks, maps, fpr_limit=0.25) == pytest.approx(0.0)


def test_aupro_weights_regions_equally_not_pixels():
    # A big region fully detected and a tiny region missed: PRO = 0.5, whatever the pixel counts.
    masks = np.zeros((1, 20, 20), dtype=bool)
    masks[0, 0:10, 0:10] = True  # 100 pixels
    masks[0, 15, 15] = True  # 1 pixel
    maps = np.zeros((1, 20, 20))
    maps[0, 0:10, 0:10] = 1.0
    maps[0, 15, 15] = -1.0
    assert aupro(masks, maps) == pytest.approx(0.5)


def test_aupro_uses_eight_connectivity():
    # Two diagonal pixels form ONE region under 8-connectivity (two under 4-connectivity); a third pixel
    # far away is a second region.
    masks = np.zeros((1, 6, 6), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True  # one diagonal region
    masks[0, 4, 4] = True  # second region
    maps = np.zeros((1, 6, 6))
    maps[0, 0, 0] = maps[0, 4, 4] = 1.0  # detect half of region 1, all of region 2
    fprs, pros = pro_curve(masks, maps)
    # 8-connected: (0.5 + 1) / 2 = 0.75 at fpr 0. With 4-connectivity it would be (1 + 0 + 1) / 3.
    assert pros[1] == pytest.approx(0.75)
    assert fprs[1] == 0.0


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_aupro_matches_brute_force(seed, fpr_limit):
    rng = np.random.default_rng(seed)
    masks = random_masks(rng, 4, 12, 12)
    maps = rng.random(masks.shape) + 0.5 * masks
    if seed % 2:
        maps = np.round(maps, 1)  # many ties
    assert aupro(masks, maps, fpr_limit=fpr_limit) == pytest.approx(brute_aupro(masks, maps, fpr_limit), abs=1e-9)


def test_aupro_is_invariant_to_monotone_rescaling():
    rng = np.random.default_rng(7)
    masks = random_masks(rng, 5, 16, 16)
    maps = rng.random(masks.shape) + 0.3 * masks
    assert aupro(masks, maps) == pytest.approx(aupro(masks, np.exp(3 * maps) + 5))


def test_aupro_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="without defect pixels"):
        aupro(np.zeros((2, 4, 4), bool), rng.random((2, 4, 4)))
    with pytest.raises(ValueError, match="defect-free"):
        aupro(np.ones((2, 4, 4), bool), rng.random((2, 4, 4)))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(random_masks(rng, 1, 8, 8), rng.random((1, 8, 8)), fpr_limit=0.0)
    with pytest.raises(ValueError, match=r"\(n, h, w\)"):
        aupro(np.zeros((8,), bool), np.zeros((8,)))


def test_aupro_accepts_single_image_and_soft_01_masks():
    masks = np.zeros((8, 8), dtype=np.uint8)
    masks[2:4, 2:4] = 1
    maps = masks + 0.01 * np.arange(64).reshape(8, 8) / 64
    assert aupro(masks, maps) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="bool"):
        aupro(masks * 255, maps)


def test_aupro_on_100_images_of_224():
    rng = np.random.default_rng(0)
    masks = np.zeros((100, 224, 224), dtype=bool)
    masks[::2, 50:90, 60:120] = True
    masks[1::3, 150:160, 10:20] = True
    maps = (rng.random(masks.shape, dtype=np.float32) + 0.5 * masks).astype(np.float32)
    value = aupro(masks, maps)
    assert 0.5 < value < 1.0


# ----------------------------------------------------------------------------- thresholds and confusion


def test_f1_threshold_hand_case():
    labels = [0, 0, 1, 0, 1, 1]
    scores = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    # t=0.5: tp 2, fp 0, fn 1 -> F1 0.8; t=0.3: tp 3, fp 1 -> F1 6/7 = 0.857 (best).
    choice = f1_threshold(labels, scores)
    assert isinstance(choice, ThresholdChoice)
    assert choice.threshold == pytest.approx(0.25)  # the middle of (0.2, 0.3], where F1 is 6/7
    assert (choice.low, choice.high) == (0.2, 0.3) and choice.margin == pytest.approx(0.05)
    assert choice.f1 == pytest.approx(6 / 7)
    assert choice.precision == pytest.approx(0.75)
    assert choice.recall == pytest.approx(1.0)
    # The choice reproduces itself through confusion_at (score >= threshold is anomalous).
    assert confusion_at(labels, scores, choice.threshold).f1 == pytest.approx(choice.f1)


def test_f1_threshold_perfect_separation_picks_the_middle_of_the_gap():
    choice = f1_threshold([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.9])
    assert choice == ThresholdChoice(
        threshold=pytest.approx(0.45), f1=1.0, precision=1.0, recall=1.0, low=0.2, high=0.7
    )
    assert choice.margin == pytest.approx(0.25)


def test_f1_threshold_takes_the_widest_of_several_best_ranges():
    # Best F1 (1.0 is impossible: a good image at 5.0 sits among the defects) is reached by two cuts:
    # flag >= 6 (tp 2, fp 0, fn 1 -> 0.8) and flag >= 4 (tp 3, fp 1 -> 0.857). Only the second is best,
    # its range (1.0, 4.0] is the wide gap above the good scores, not the narrow (5.0, 6.0] one.
    labels = [0, 0, 0, 1, 0, 1, 1]
    scores = [0.5, 0.8, 1.0, 4.0, 5.0, 6.0, 7.0]
    choice = f1_threshold(labels, scores)
    assert choice.f1 == pytest.approx(brute_best_f1(labels, scores))
    assert choice.threshold == pytest.approx(2.5) and choice.margin == pytest.approx(1.5)
    # Two separate ranges reach the same best F1 (tp 2 fp 1 and tp 3 fp 3 both give 2/3): the wider
    # (1, 6] wins over (7.5, 8], although it is lower.
    labels = [0, 1, 1, 0, 0, 1, 0]
    scores = [10.0, 9.0, 8.0, 7.5, 7.0, 6.0, 1.0]
    choice = f1_threshold(labels, scores)
    assert choice.f1 == pytest.approx(2 / 3) == pytest.approx(brute_best_f1(labels, scores))
    assert confusion_at(labels, scores, 7.75).f1 == pytest.approx(2 / 3)  # the narrow range is as good
    assert (choice.low, choice.high, choice.threshold) == (1.0, 6.0, 3.5)


def test_f1_threshold_when_every_image_must_be_flagged():
    choice = f1_threshold([1, 1, 0], [0.2, 0.3, 0.25])  # flag all: F1 0.8, the best
    assert choice.threshold == 0.2 and choice.low == float("-inf") and choice.margin == 0.0
    assert choice.f1 == pytest.approx(0.8)


@pytest.mark.parametrize(("count", "total"), [(0, 10), (3, 40), (40, 40), (1, 209)])
def test_rate_interval_is_the_exact_clopper_pearson_interval(count: int, total: int):
    from scipy.optimize import brentq
    from scipy.stats import binom

    low, high = rate_interval(count, total, 0.95)
    # Directly from the binomial tails at 2.5% each.
    direct_high = 1.0 if count == total else brentq(lambda p: binom.cdf(count, total, p) - 0.025, 1e-12, 1 - 1e-12)
    direct_low = 0.0 if count == 0 else brentq(lambda p: binom.sf(count - 1, total, p) - 0.025, 1e-12, 1 - 1e-12)
    assert (low, high) == (pytest.approx(direct_low, abs=1e-9), pytest.approx(direct_high, abs=1e-9))
    assert low <= count / total <= high
    assert rate_interval(0, 0) == (0.0, 1.0)


def test_operating_point_states_intervals_and_whether_the_images_chose_the_threshold():
    labels = [0] * 20 + [1] * 5
    scores = [*range(20), 30, 31, 32, 33, 10.5]
    chosen = f1_threshold(labels, scores)
    point = operating_point(labels, scores, chosen.threshold, chosen_here=True)
    assert point.confusion == confusion_at(labels, scores, chosen.threshold)
    rows = point.rows()
    assert "in-sample: these images chose the threshold" in rows["False alarms"]
    lo, hi = rate_interval(point.confusion.fp, 20)
    assert f"{lo:.1%} to {hi:.1%}" in rows["False alarms"]
    assert "in-sample" not in operating_point(labels, scores, 25.0, chosen_here=False).rows()["Misses"]


def test_f1_threshold_ties_are_cut_together():
    # Two samples share 0.5 (one good, one anomalous): no threshold can separate them.
    choice = f1_threshold([0, 1, 1], [0.5, 0.5, 0.9])
    assert choice.threshold in (0.5, 0.9)
    assert confusion_at([0, 1, 1], [0.5, 0.5, 0.9], choice.threshold).f1 == pytest.approx(choice.f1)
    assert choice.f1 == pytest.approx(max(0.8, 2 / 3))


@pytest.mark.parametrize("seed", range(5))
def test_f1_threshold_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 40)
    labels[0] = 1
    scores = np.round(rng.normal(size=40) + labels, 1)
    choice = f1_threshold(labels, scores)
    assert choice.f1 == pytest.approx(brute_best_f1(labels, scores))
    assert confusion_at(labels, scores, choice.threshold).f1 == pytest.approx(choice.f1)


def test_f1_threshold_without_anomalies_is_an_error():
    with pytest.raises(ValueError, match="without anomalous"):
        f1_threshold([0, 0], [0.1, 0.2])


def test_confusion_at_counts_and_rates():
    labels = [0, 0, 0, 1, 1]
    scores = [0.1, 0.5, 0.6, 0.5, 0.9]
    c = confusion_at(labels, scores, 0.5)  # 0.5 itself is anomalous
    assert c == Confusion(tp=2, fp=2, tn=1, fn=0)
    assert c.fpr == pytest.approx(2 / 3)
    assert c.fnr == 0.0
    assert c.precision == pytest.approx(0.5)
    assert c.recall == 1.0
    assert c.f1 == pytest.approx(4 / 6)


def test_confusion_rates_are_safe_with_zero_denominators():
    c = Confusion(tp=0, fp=0, tn=0, fn=0)
    assert (c.fpr, c.fnr, c.precision, c.recall, c.f1) == (0.0,) * 5
    only_good = confusion_at([0, 0], [0.1, 0.2], 1.0)
    assert only_good == Confusion(tp=0, fp=0, tn=2, fn=0)
    assert only_good.fnr == 0.0 and only_good.fpr == 0.0


def test_confusion_is_frozen():
    c = Confusion(1, 2, 3, 4)
    with pytest.raises(AttributeError):
        c.tp = 5  # type: ignore[misc]


def test_percentile_threshold():
    good = np.arange(101, dtype=float)  # 0..100
    assert percentile_threshold(good, 99) == pytest.approx(99.0)
    assert percentile_threshold(good, 0) == 0.0
    assert percentile_threshold([1.0, 2.0], 50) == pytest.approx(1.5)
    # About 1% of good scores are at or above the 99th percentile.
    rng_scores = np.random.default_rng(0).normal(size=10_000)
    t = percentile_threshold(rng_scores, 99)
    assert 0.005 < (rng_scores >= t).mean() < 0.015
    with pytest.raises(ValueError, match="percentile"):
        percentile_threshold(good, 101)
    with pytest.raises(ValueError, match="at least one"):
        percentile_threshold([], 50)
