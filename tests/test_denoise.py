"""The tau cut, soft weights and image suspicion."""

from __future__ import annotations

import numpy as np
import pytest

from softpatch.method.denoise import image_suspicion, select_removed, soft_weights


def _scores(n: int, p: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).gamma(2.0, size=(n, p)).astype(np.float32)


@pytest.mark.parametrize(("n", "p", "tau"), [(10, 64, 0.15), (7, 49, 0.1), (3, 5, 0.5), (20, 784, 0.01), (4, 4, 0.99)])
def test_global_scope_removes_exactly_the_highest_share(n: int, p: int, tau: float) -> None:
    scores = _scores(n, p, seed=n)
    removed = select_removed(scores, tau, "global")
    assert removed.shape == (n, p) and removed.dtype == bool
    assert removed.sum() == round(tau * n * p)
    if 0 < removed.sum() < removed.size:
        assert scores[removed].min() > scores[~removed].max()


@pytest.mark.parametrize(("n", "p", "tau"), [(10, 64, 0.15), (7, 49, 0.3), (20, 16, 0.05), (5, 9, 0.8)])
def test_position_scope_removes_the_same_count_at_every_position(n: int, p: int, tau: float) -> None:
    scores = _scores(n, p, seed=p)
    removed = select_removed(scores, tau, "position")
    count = round(tau * n)
    np.testing.assert_array_equal(removed.sum(axis=0), np.full(p, count))
    for j in range(p):
        if 0 < count < n:
            assert scores[removed[:, j], j].min() > scores[~removed[:, j], j].max()


def test_global_and_position_scopes_differ_when_one_image_is_noisy() -> None:
    scores = _scores(10, 16, seed=1)
    scores[4] += 100  # image 4 is odd everywhere
    global_cut = select_removed(scores, 0.1, "global")
    position_cut = select_removed(scores, 0.1, "position")
    assert global_cut[4].all(), "the global cut takes all of the noisy image first"
    assert global_cut.sum() == position_cut.sum() == 16
    assert position_cut[4].all() and position_cut.sum(axis=0).tolist() == [1] * 16


def test_tau_zero_removes_nothing() -> None:
    for scope in ("global", "position"):
        assert not select_removed(_scores(5, 9), 0.0, scope).any()
    assert select_removed(np.zeros((0, 9)), 0.2, "global").shape == (0, 9)


def test_ties_still_remove_the_exact_count_reproducibly() -> None:
    scores = np.ones((6, 10), dtype=np.float32)
    a = select_removed(scores, 0.25, "global")
    assert a.sum() == 15
    np.testing.assert_array_equal(a, select_removed(scores.copy(), 0.25, "global"))


def test_unknown_scope_is_an_error() -> None:
    with pytest.raises(ValueError, match="scope"):
        select_removed(_scores(3, 3), 0.5, "image")


def test_soft_weights_have_median_one_and_keep_the_order() -> None:
    scores = _scores(9, 25, seed=2) * 37.0  # odd count: the median is an element
    weights = soft_weights(scores)
    assert weights.shape == scores.shape and weights.dtype == np.float32
    assert np.median(weights) == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(weights * np.median(scores), scores, rtol=1e-5)


@pytest.mark.parametrize("bad", [0.0, np.nan, -1.0])
def test_soft_weights_fall_back_to_ones_without_a_usable_median(bad: float) -> None:
    scores = np.full((3, 4), bad, dtype=np.float32)
    np.testing.assert_array_equal(soft_weights(scores), np.ones((3, 4), dtype=np.float32))


def test_image_suspicion_ranks_an_image_with_a_defect_region_first() -> None:
    scores = _scores(12, 64, seed=3) * 0.1 + 1.0
    scores[7, [5, 6, 13, 14, 21, 22, 29, 30]] = 8.0  # a defect covering an eighth of the part
    suspicion = image_suspicion(scores)
    assert suspicion.shape == (12,)
    assert int(np.argmax(suspicion)) == 7
    assert suspicion[7] > 1.5 * np.median(suspicion)


def test_image_suspicion_counts_an_image_that_differs_everywhere() -> None:
    # e.g. a wrong part or lighting: no single patch stands out, the whole image is far from the rest
    scores = _scores(12, 64, seed=3) * 0.1 + 1.0
    scores[4] *= 1.6
    assert int(np.argmax(image_suspicion(scores))) == 4


def test_image_suspicion_is_invariant_to_per_position_and_global_scale() -> None:
    scores = _scores(10, 36, seed=4)
    per_position = np.random.default_rng(5).uniform(0.01, 100.0, size=(1, 36)).astype(np.float32)
    base = image_suspicion(scores)
    np.testing.assert_allclose(image_suspicion(scores * per_position), base, rtol=1e-5)
    np.testing.assert_allclose(image_suspicion(scores * 1234.0), base, rtol=1e-5)


def test_image_suspicion_is_not_fooled_by_a_naturally_busy_region() -> None:
    scores = np.ones((8, 20), dtype=np.float32) + _scores(8, 20, seed=6) * 0.01
    scores[:, 0] *= 50.0  # position 0 is busy in every image
    scores[3, 0] *= 1.01
    scores[5, 10:13] = 6.0  # image 5 has a real local anomaly
    assert int(np.argmax(image_suspicion(scores))) == 5


def test_image_suspicion_empty() -> None:
    assert image_suspicion(np.zeros((0, 5))).shape == (0,)
