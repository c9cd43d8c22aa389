"""Patch-level noise discriminators checked against independent references (sklearn, numpy, brute force)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from sklearn.neighbors import LocalOutlierFactor

from softpatch.method.discriminators import (
    DISCRIMINATORS,
    NEIGHBOUR_CACHE_K,
    DiscriminatorParams,
    NeighbourCache,
    compute_neighbours,
    effective_lof_k,
    needs_features,
    score_patches,
)

CPU = torch.device("cpu")
BIG = 1 << 30


def _neighbours(features: torch.Tensor, k: int = NEIGHBOUR_CACHE_K, budget: int = BIG) -> NeighbourCache:
    return compute_neighbours(features, k, device=CPU, budget_bytes=budget)


def _score(name: str, features: torch.Tensor, budget: int = BIG, **params: object) -> np.ndarray:
    n = features.shape[0]
    neighbours = _neighbours(features, max(NEIGHBOUR_CACHE_K, int(params.get("lof_k", 1))) if n > 1 else 1, budget)
    return score_patches(
        name, DiscriminatorParams(**params), neighbours, features, device=CPU, budget_bytes=budget
    ).numpy()


def _points(n: int, p: int, d: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(n, p, d)))  # float64, general position


# ---------------------------------------------------------------- neighbours


def test_compute_neighbours_matches_brute_force_and_excludes_self() -> None:
    features = _points(12, 3, 5, seed=0)
    cache = _neighbours(features, k=4)
    assert cache.dist.shape == (3, 12, 4) and cache.index.shape == (3, 12, 4) and cache.k == 4
    for p in range(3):
        dist = cdist(features[:, p].numpy(), features[:, p].numpy())
        np.fill_diagonal(dist, np.inf)
        expected_index = np.argsort(dist, axis=1)[:, :4]
        np.testing.assert_array_equal(cache.index[p].numpy(), expected_index)
        np.testing.assert_allclose(cache.dist[p].numpy(), np.take_along_axis(dist, expected_index, 1), rtol=1e-5)
        assert not (cache.index[p].numpy() == np.arange(12)[:, None]).any(), "a patch is never its own neighbour"


def test_compute_neighbours_caps_k_at_other_images() -> None:
    cache = _neighbours(_points(5, 2, 3, seed=1), k=32)
    assert cache.k == 4


# ---------------------------------------------------------------- LOF


@pytest.mark.parametrize(("n", "k"), [(8, 1), (8, 3), (8, 7), (20, 2), (20, 6), (40, 6), (40, 15), (40, 39)])
def test_lof_equals_sklearn_in_general_position(n: int, k: int) -> None:
    features = _points(n, 3, 4, seed=n * 100 + k)
    ours = _score("lof", features, lof_k=k)
    for p in range(3):
        reference = -LocalOutlierFactor(n_neighbors=k).fit(features[:, p].numpy()).negative_outlier_factor_
        np.testing.assert_allclose(ours[:, p], reference, rtol=1e-5)


def test_lof_ranks_an_isolated_point_first_and_inliers_near_one() -> None:
    features = _points(30, 1, 3, seed=3) * 0.1
    features[7, 0] += 5.0
    scores = _score("lof", features, lof_k=6)[:, 0]
    assert int(np.argmax(scores)) == 7 and scores[7] > 5
    assert np.median(scores) == pytest.approx(1.0, abs=0.2)


def test_lof_with_exact_duplicates_is_finite_and_bounded() -> None:
    # A uniform background: many identical patches, plus a few spread ones and a clear outlier.
    rng = np.random.default_rng(4)
    x = np.concatenate([np.zeros((14, 3)), rng.normal(scale=0.5, size=(5, 3)), [[6.0, 6.0, 6.0]]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # sklearn warns about the duplicates itself
        sklearn_scores = -LocalOutlierFactor(n_neighbors=6).fit(x).negative_outlier_factor_
    assert sklearn_scores.max() > 1e6, "the reference blows up on duplicates (the case this floor exists for)"
    ours = _score("lof", torch.from_numpy(x[:, None, :]), lof_k=6)[:, 0]
    assert np.isfinite(ours).all()
    assert ours.max() < 1e3
    assert int(np.argmax(ours)) == 19, "the real outlier still ranks first"
    np.testing.assert_allclose(ours[:14], ours[0], err_msg="identical patches get identical scores")


def test_effective_lof_k_clamps_with_a_warning() -> None:
    with pytest.warns(UserWarning, match="LOF-k=10"):
        assert effective_lof_k(10, 5) == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert effective_lof_k(4, 5) == 4
        assert effective_lof_k(6, 100) == 6
        assert effective_lof_k(6, 1) == 0


def test_lof_k_larger_than_the_cache_is_refused() -> None:
    features = _points(10, 2, 3, seed=5)
    cache = _neighbours(features, k=3)
    with pytest.raises(ValueError, match="lof_k"):
        score_patches("lof", DiscriminatorParams(lof_k=5), cache, None, device=CPU, budget_bytes=BIG)
    # nearest needs only the first neighbour, whatever lof_k says
    score_patches("nearest", DiscriminatorParams(lof_k=5), cache, None, device=CPU, budget_bytes=BIG)


# ---------------------------------------------------------------- nearest and gaussian


def test_nearest_is_the_unsquared_distance_to_the_closest_other_image() -> None:
    features = _points(15, 4, 6, seed=6)
    ours = _score("nearest", features)
    for p in range(4):
        dist = cdist(features[:, p].numpy(), features[:, p].numpy())
        np.fill_diagonal(dist, np.inf)
        np.testing.assert_allclose(ours[:, p], dist.min(axis=1), rtol=1e-5)


def test_neighbour_distances_do_not_depend_on_a_common_offset() -> None:
    features = _points(20, 4, 16, seed=13).float()
    plain = _score("nearest", features)
    np.testing.assert_allclose(_score("nearest", features + 100.0), plain, rtol=1e-4)
    np.testing.assert_allclose(_score("lof", features + 100.0, lof_k=6), _score("lof", features, lof_k=6), rtol=1e-4)


def _mahalanobis_reference(x: np.ndarray, reg: float) -> np.ndarray:
    """Explicit numpy: ridge = reg * mean variance = reg * trace(cov) / D, then sqrt(c^T (cov + ridge I)^-1 c)."""
    n, d = x.shape
    centred = x - x.mean(axis=0)
    cov = centred.T @ centred / (n - 1)
    ridge = reg * np.trace(cov) / d
    inv = np.linalg.inv(cov + ridge * np.eye(d))
    return np.sqrt(np.einsum("nd,de,ne->n", centred, inv, centred))


@pytest.mark.parametrize(("n", "d"), [(6, 20), (12, 12), (10, 40), (30, 5), (50, 8)])
@pytest.mark.parametrize("reg", [0.01, 0.5])
def test_gaussian_equals_numpy_mahalanobis(n: int, d: int, reg: float) -> None:
    # n <= d takes the Gram route, n > d the covariance route; both must equal the same formula.
    rng = np.random.default_rng(n * d)
    scale = rng.uniform(0.1, 3.0, size=d)  # unequal variances, so the ridge's definition matters
    features = torch.from_numpy(rng.normal(size=(n, 3, d)) * scale)
    ours = _score("gaussian", features, gaussian_reg=reg)
    for p in range(3):
        np.testing.assert_allclose(ours[:, p], _mahalanobis_reference(features[:, p].numpy(), reg), rtol=1e-5)


def test_gaussian_ridge_follows_the_feature_scale() -> None:
    features = _points(10, 2, 16, seed=7)
    # Mahalanobis distances with a relative ridge do not depend on the units.
    np.testing.assert_allclose(_score("gaussian", features * 1000.0), _score("gaussian", features), rtol=1e-5)


# ---------------------------------------------------------------- fusion and none


def test_fusion_is_the_mean_of_median_normalised_members() -> None:
    n = 15  # odd: the per-position median is one of the values, whatever the convention
    features = _points(n, 4, 6, seed=8)
    members = ("nearest", "gaussian", "lof")
    fused = _score("fusion", features, lof_k=4, fusion=members)
    expected = np.zeros_like(fused)
    for name in members:
        scores = _score(name, features, lof_k=4)
        expected += scores / np.median(scores, axis=0, keepdims=True)
    np.testing.assert_allclose(fused, expected / len(members), rtol=1e-5)
    np.testing.assert_allclose(
        _score("fusion", features, fusion=("nearest",)),
        (lambda s: s / np.median(s, axis=0, keepdims=True))(_score("nearest", features)),
        rtol=1e-5,
    )


def test_none_scores_every_patch_equally() -> None:
    scores = _score("none", _points(9, 5, 3, seed=9))
    assert scores.shape == (9, 5)
    assert np.all(scores == scores[0, 0])


def test_registry() -> None:
    assert {"nearest", "gaussian", "lof", "fusion", "none"} <= set(DISCRIMINATORS)
    assert DISCRIMINATORS["none"].denoises is False
    assert all(DISCRIMINATORS[n].denoises for n in ("nearest", "gaussian", "lof", "fusion"))
    assert all(entry.description for entry in DISCRIMINATORS.values())
    params = DiscriminatorParams()
    assert not needs_features("lof", params) and not needs_features("nearest", params)
    assert needs_features("gaussian", params)
    assert needs_features("fusion", DiscriminatorParams(fusion=("nearest", "gaussian")))
    assert not needs_features("fusion", DiscriminatorParams(fusion=("nearest", "lof")))


def test_feature_hungry_discriminator_without_features_is_refused() -> None:
    cache = _neighbours(_points(6, 2, 3, seed=10))
    with pytest.raises(ValueError, match="features"):
        score_patches("gaussian", DiscriminatorParams(), cache, None, device=CPU, budget_bytes=BIG)


@pytest.mark.parametrize("name", ["nearest", "gaussian", "lof", "fusion"])
def test_every_discriminator_ranks_a_planted_outlier_first(name: str) -> None:
    features = _points(25, 6, 8, seed=11)
    features[13, 2] += 8.0  # image 13 is odd at position 2 only
    scores = _score(name, features, lof_k=5)
    assert int(np.argmax(scores[:, 2])) == 13
    assert scores[13, 2] > 1.5 * np.median(scores[:, 2])


# ---------------------------------------------------------------- chunking


@pytest.mark.parametrize("name", ["nearest", "gaussian", "lof", "fusion", "none"])
def test_chunked_results_equal_unchunked(name: str) -> None:
    features = _points(11, 9, 7, seed=12).float()
    calls: list[float] = []
    tiny = compute_neighbours(features, 8, device=CPU, budget_bytes=1, progress=lambda f, m: calls.append(f))
    assert calls[0] == 0.0 and len(calls) == 1 + 9, "a report before the search, then one position per chunk"
    large = compute_neighbours(features, 8, device=CPU, budget_bytes=BIG)
    # Batched matrix products round differently for different batch sizes: equal to float32 rounding.
    torch.testing.assert_close(tiny.dist, large.dist, rtol=1e-6, atol=1e-6)
    assert torch.equal(tiny.index, large.index)
    params = DiscriminatorParams(lof_k=4)
    fractions: list[float] = []
    chunked = score_patches(
        name, params, tiny, features, device=CPU, budget_bytes=1, progress=lambda f, m: fractions.append(f)
    )
    whole = score_patches(name, params, large, features, device=CPU, budget_bytes=BIG)
    assert len(fractions) == 9 and fractions[-1] == 1.0 and fractions == sorted(fractions)
    np.testing.assert_allclose(chunked.numpy(), whole.numpy(), rtol=1e-6)
    assert chunked.shape == (11, 9) and chunked.dtype == torch.float32
