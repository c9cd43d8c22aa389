"""Coreset selection: the batched greedy k-centre equals the plain loop; random/all; seeds; coverage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from softpatch.method.coreset import greedy_coreset, greedy_coreset_reference, random_projection, select_coreset


def _continuous(m: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(m, d)).astype(np.float32)


def _coverage_radius(points: np.ndarray, chosen: np.ndarray) -> float:
    """The largest distance from any point to its nearest chosen centre (the k-centre objective)."""
    return float(cdist(points, points[chosen]).min(axis=1).max())


@pytest.mark.parametrize(
    ("m", "d", "n_select", "pool_size", "start"),
    [
        (400, 8, 40, 16, 0),  # pool much smaller than the selection: many rounds
        (400, 8, 40, 2048, 5),  # pool >= M: one round over everything
        (600, 16, 120, 120, 17),  # pool == n_select
        (300, 3, 300, 32, 299),  # select every point
        (1500, 32, 60, 7, 100),  # tiny pool, higher dimension
        (200, 2, 50, 199, 3),  # pool just below M
    ],
)
def test_greedy_equals_reference(m: int, d: int, n_select: int, pool_size: int, start: int) -> None:
    points = _continuous(m, d, seed=m + d)
    fast = greedy_coreset(points, n_select, start, pool_size=pool_size)
    reference = greedy_coreset_reference(points, n_select, start)
    np.testing.assert_array_equal(fast, reference)
    assert fast.dtype == np.int64 and fast[0] == start


@pytest.mark.parametrize("pool_size", [16, 2048])
def test_greedy_equals_reference_when_each_round_updates_the_distances_in_many_row_blocks(
    monkeypatch: pytest.MonkeyPatch, pool_size: int
) -> None:
    from softpatch.method import coreset

    # 256 bytes: 64 distances per block, so a round of B centres updates the 700 rows in blocks of 64 // B rows.
    monkeypatch.setattr(coreset, "_UPDATE_BLOCK_BYTES", 256)
    points = _continuous(700, 6, seed=5)
    np.testing.assert_array_equal(
        greedy_coreset(points, 90, 3, pool_size=pool_size), greedy_coreset_reference(points, 90, 3)
    )


def test_greedy_with_duplicates_returns_distinct_indices_covering_every_distinct_point() -> None:
    distinct = _continuous(5, 4, seed=1) * 10
    points = np.concatenate([np.repeat(distinct[:1], 60, axis=0), distinct[1:]])  # 60 copies + 4 others
    chosen = greedy_coreset(points, 20, 0, pool_size=8)
    assert len(chosen) == 20 and len(set(chosen.tolist())) == 20
    assert {60, 61, 62, 63} <= set(chosen.tolist()), "every distinct point is a centre before any duplicate"
    assert _coverage_radius(points, chosen) == 0.0


def test_greedy_progress_fractions() -> None:
    seen: list[tuple[float, str]] = []
    greedy_coreset(_continuous(500, 4, seed=2), 100, 0, progress=lambda f, m: seen.append((f, m)), pool_size=10)
    fractions = [f for f, _ in seen]
    assert fractions and all(0.0 <= f <= 1.0 for f in fractions) and fractions[-1] == 1.0
    assert fractions == sorted(fractions)
    assert all(m.startswith("coreset: ") for _, m in seen)


def test_greedy_covers_better_than_random() -> None:
    points = _continuous(2000, 6, seed=3)
    features = torch.from_numpy(points)
    # projection_dim >= D: the greedy runs in the original space, so its radius is directly comparable
    greedy = select_coreset(features, method="greedy", ratio=0.05, projection_dim=6, seed=0)
    for seed in range(3):
        random = select_coreset(features, method="random", ratio=0.05, projection_dim=6, seed=seed)
        assert len(random) == len(greedy) == 100
        assert _coverage_radius(points, greedy) < _coverage_radius(points, random)


def test_greedy_on_a_projection_still_covers_better_than_random() -> None:
    points = np.random.default_rng(4).normal(size=(1500, 64)).astype(np.float32)
    points[:50] += 6.0  # a small far cluster that random sampling tends to miss
    features = torch.from_numpy(points)
    greedy = select_coreset(features, method="greedy", ratio=0.02, projection_dim=16, seed=0)
    random = select_coreset(features, method="random", ratio=0.02, projection_dim=16, seed=0)
    assert _coverage_radius(points, greedy) < _coverage_radius(points, random)


@pytest.mark.parametrize("method", ["greedy", "random"])
def test_select_coreset_size_uniqueness_and_seed(method: str) -> None:
    features = torch.from_numpy(_continuous(333, 10, seed=5))
    a = select_coreset(features, method=method, ratio=0.1, projection_dim=4, seed=1)
    b = select_coreset(features, method=method, ratio=0.1, projection_dim=4, seed=1)
    c = select_coreset(features, method=method, ratio=0.1, projection_dim=4, seed=2)
    assert len(a) == round(333 * 0.1) and len(set(a.tolist())) == len(a)
    assert a.min() >= 0 and a.max() < 333 and a.dtype == np.int64
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c), "the seed changes the selection"


def test_select_coreset_all_and_full_ratio_keep_everything() -> None:
    features = torch.from_numpy(_continuous(50, 3, seed=6))
    np.testing.assert_array_equal(
        select_coreset(features, method="all", ratio=0.1, projection_dim=2, seed=0), np.arange(50)
    )
    np.testing.assert_array_equal(
        select_coreset(features, method="greedy", ratio=1.0, projection_dim=2, seed=0), np.arange(50)
    )


def test_select_coreset_small_ratio_and_edge_cases() -> None:
    features = torch.from_numpy(_continuous(10, 3, seed=7))
    assert len(select_coreset(features, method="greedy", ratio=0.001, projection_dim=2, seed=0)) == 1
    assert len(select_coreset(torch.empty(0, 3), method="greedy", ratio=0.5, projection_dim=2, seed=0)) == 0
    with pytest.raises(ValueError, match="coreset method"):
        select_coreset(features, method="kmeans", ratio=0.5, projection_dim=2, seed=0)


def test_random_projection_is_seeded_and_roughly_preserves_distances() -> None:
    features = torch.from_numpy(_continuous(200, 256, seed=8))
    a = random_projection(features, 128, seed=3)
    assert a.shape == (200, 128) and a.dtype == np.float32
    np.testing.assert_array_equal(a, random_projection(features, 128, seed=3))
    assert not np.array_equal(a, random_projection(features, 128, seed=4))
    ratio = cdist(a, a)[np.triu_indices(200, 1)] / cdist(features.numpy(), features.numpy())[np.triu_indices(200, 1)]
    assert 0.7 < ratio.min() and ratio.max() < 1.3, "Johnson-Lindenstrauss: distances kept within ~30%"


def test_random_projection_to_a_larger_dimension_is_the_identity_copy() -> None:
    features = torch.from_numpy(_continuous(20, 8, seed=9))
    out = random_projection(features, 8, seed=0)
    np.testing.assert_array_equal(out, features.numpy())
    out[0, 0] = 1e6
    assert features[0, 0] != 1e6, "a copy, not a view of the caller's tensor"
