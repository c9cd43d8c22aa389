"""Patch-level noise discriminators (seeds/000 sec. 3.2; fusion from seeds/003).

Every discriminator scores each training patch against the patches at the *same position* in the
other training images. Scores have shape ``(N, P)`` for N images and P positions; higher = more
likely noise. Discriminators are pure functions over a chunk of positions, looked up by name in
``DISCRIMINATORS``; ``score_patches`` runs one over all positions in memory-bounded chunks.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from softpatch.config import DEFAULTS
from softpatch.runtime.chunking import run_in_chunks
from softpatch.runtime.progress import ProgressCallback, report

# Neighbours kept per patch in the cache: LOF-k up to this re-tunes without touching features.
NEIGHBOUR_CACHE_K = 32
# sklearn's LOF adds this to the mean reachability distance; we match it so scores agree exactly.
_LRD_EPS = 1e-10
# Reachability distances are floored at this share of the position's mean k-distance. Exact duplicate
# patches (uniform backgrounds, padding) otherwise get a density of 1e10 and their neighbours LOFs of
# that order; points in general position never come near the floor, so there LOF equals sklearn's.
_REACH_FLOOR = 0.05


@dataclass(frozen=True)
class DiscriminatorParams:
    """The discriminator settings of a ``SoftPatchConfig`` (defaults: its own, from ``config.DEFAULTS``)."""

    lof_k: int = DEFAULTS["lof_k"]
    gaussian_reg: float = DEFAULTS["gaussian_reg"]
    fusion: tuple[str, ...] = DEFAULTS["fusion"]


@dataclass(frozen=True)
class PositionChunk:
    """The patches of all N images at Pc consecutive positions."""

    features: torch.Tensor | None  # (Pc, N, D), only for discriminators that need features
    knn_dist: torch.Tensor  # (Pc, N, K) ascending distances to the K nearest other images' patches
    knn_index: torch.Tensor  # (Pc, N, K) their image indices


ScoreFunction = Callable[[PositionChunk, DiscriminatorParams], torch.Tensor]


@dataclass(frozen=True)
class Discriminator:
    """A registry entry: the pure scoring function and what it needs."""

    score: ScoreFunction  # (chunk, params) -> (Pc, N) outlier scores, higher = more likely noise
    needs_features: bool  # False: the neighbour cache suffices (re-tunes without features)
    denoises: bool  # False for the plain PatchCore baseline: nothing is removed or re-weighted
    description: str


def nearest_scores(chunk: PositionChunk, params: DiscriminatorParams) -> torch.Tensor:
    """Eq. 1: distance to the nearest patch of another image at the same position."""
    return chunk.knn_dist[..., 0]


def gaussian_scores(chunk: PositionChunk, params: DiscriminatorParams) -> torch.Tensor:
    """Eqs. 2-3: Mahalanobis distance to the position's Gaussian, covariance ridge-regularised.

    The ridge is ``gaussian_reg`` times the mean feature variance, so it does not depend on the
    feature scale. With fewer images than dimensions the exact distance is computed from the
    eigen-decomposition of the N x N Gram matrix instead of inverting a D x D covariance.
    """
    x = chunk.features
    assert x is not None
    x = x.double()  # eigen-decompositions of near-singular Gram matrices need the headroom
    n, d = x.shape[1], x.shape[2]
    centred = x - x.mean(dim=1, keepdim=True)
    dof = max(n - 1, 1)
    if n <= d:
        gram = centred @ centred.transpose(1, 2)  # (Pc, N, N)
        eigvals, eigvecs = torch.linalg.eigh(gram)
        eigvals = eigvals.clamp_min(0)
        ridge = params.gaussian_reg * eigvals.sum(-1, keepdim=True) / (dof * d)  # (Pc, 1)
        ridge = ridge.clamp_min(1e-12)
        # Rows of the centred data lie in the span of the covariance eigenvectors: x_i.v_j = U_ij sqrt(l_j).
        gain = eigvals / (eigvals / dof + ridge)  # (Pc, N)
        squared = (eigvecs.square() * gain.unsqueeze(1)).sum(-1)
    else:
        cov = centred.transpose(1, 2) @ centred / dof  # (Pc, D, D)
        ridge = params.gaussian_reg * torch.diagonal(cov, dim1=1, dim2=2).mean(-1).clamp_min(1e-12)
        cov = cov + ridge[:, None, None] * torch.eye(d, dtype=cov.dtype, device=cov.device)
        chol = torch.linalg.cholesky(cov)
        solved = torch.linalg.solve_triangular(chol, centred.transpose(1, 2), upper=False)  # (Pc, D, N)
        squared = solved.square().sum(1)
    return squared.clamp_min(0).sqrt().float()


def lof_scores_from_neighbours(knn_dist: torch.Tensor, knn_index: torch.Tensor, k: int) -> torch.Tensor:
    """Eqs. 4-6 (with the textbook reach distance, as sklearn): LOF of every point from its k nearest neighbours.

    ``knn_dist``/``knn_index``: ``(Pc, N, K >= k)`` ascending. Returns ``(Pc, N)``; about 1 for inliers,
    larger for outliers. For points in general position equal to
    ``-LocalOutlierFactor(n_neighbors=k).fit(X).negative_outlier_factor_``; exact duplicates get
    bounded scores instead of sklearn's 1e10 (see ``_REACH_FLOOR``).
    """
    dist = knn_dist[..., :k]
    index = knn_index[..., :k].long()
    k_distance = dist[..., -1]  # (Pc, N): distance to the k-th neighbour
    neighbour_k_distance = torch.gather(k_distance.unsqueeze(1).expand(-1, index.shape[1], -1), 2, index)
    reach = torch.maximum(neighbour_k_distance, dist)  # reach-dist_k(i, b) = max(k-distance(b), d(i, b))
    floor = _REACH_FLOOR * k_distance.mean(-1, keepdim=True).unsqueeze(-1)  # (Pc, 1, 1)
    reach = torch.maximum(reach, floor)
    lrd = 1.0 / (reach.mean(-1) + _LRD_EPS)  # (Pc, N)
    neighbour_lrd = torch.gather(lrd.unsqueeze(1).expand(-1, index.shape[1], -1), 2, index)
    return neighbour_lrd.mean(-1) / lrd


def lof_scores(chunk: PositionChunk, params: DiscriminatorParams) -> torch.Tensor:
    """Eqs. 4-6: local outlier factor of each patch among the same position's patches."""
    return lof_scores_from_neighbours(chunk.knn_dist, chunk.knn_index, params.lof_k)


def no_scores(chunk: PositionChunk, params: DiscriminatorParams) -> torch.Tensor:
    """Plain PatchCore: every patch is equally trusted."""
    return torch.ones(chunk.knn_dist.shape[:2], device=chunk.knn_dist.device)


def fusion_scores(chunk: PositionChunk, params: DiscriminatorParams) -> torch.Tensor:
    """SoftPatch+ (seeds/003): the member discriminators' scores, each divided by its per-position median, averaged.

    Dividing by the median over the images at a position puts scores of different units (distances,
    Mahalanobis, LOF ratios) on one scale where a typical patch is 1, so no member dominates by its units.
    """
    fused = torch.zeros(chunk.knn_dist.shape[:2], device=chunk.knn_dist.device)
    for name in params.fusion:
        member = DISCRIMINATORS[name].score(chunk, params)
        fused += member / member.median(dim=1, keepdim=True).values.clamp_min(1e-12)
    return fused / len(params.fusion)


DISCRIMINATORS: dict[str, Discriminator] = {
    "nearest": Discriminator(nearest_scores, False, True, "distance to the nearest other image at the same spot"),
    "gaussian": Discriminator(gaussian_scores, True, True, "Mahalanobis distance from the spot's average look"),
    "lof": Discriminator(lof_scores, False, True, "local outlier factor: how much sparser than its neighbours"),
    "fusion": Discriminator(fusion_scores, True, True, "average of nearest, gaussian and LOF (SoftPatch+)"),
    "none": Discriminator(no_scores, False, False, "no denoising: plain PatchCore"),
}


def needs_features(name: str, params: DiscriminatorParams) -> bool:
    if name == "fusion":
        return any(DISCRIMINATORS[m].needs_features for m in params.fusion)
    return DISCRIMINATORS[name].needs_features


@dataclass(frozen=True)
class NeighbourCache:
    """The K nearest other-image patches of every patch, per position (computed once per fit)."""

    dist: torch.Tensor  # (P, N, K) float32, ascending, CPU
    index: torch.Tensor  # (P, N, K) int32, CPU

    @property
    def k(self) -> int:
        return self.dist.shape[-1]


def clamp_lof_k(lof_k: int, n_images: int) -> int:
    """LOF-k as used on ``n_images``: at most N-1 (there are only N-1 other images), at least 1."""
    return max(1, min(lof_k, n_images - 1))


def neighbour_cache_k(lof_k: int, n_images: int) -> int:
    """Neighbours the per-position cache keeps: NEIGHBOUR_CACHE_K, so that LOF-k can move without a new
    search, or more for a larger LOF-k; at most N-1."""
    return clamp_lof_k(max(NEIGHBOUR_CACHE_K, lof_k), n_images)


def denoises(discriminator: str, n_images: int) -> bool:
    """Whether ``discriminator`` removes anything on ``n_images`` (patches are compared across >= 2 images)."""
    return DISCRIMINATORS[discriminator].denoises and n_images >= 2


def effective_lof_k(lof_k: int, n_images: int) -> int:
    """LOF-k clamped to N-1 (there are only N-1 other images), with a warning when clamped."""
    if n_images < 2:
        return 0
    if lof_k > n_images - 1:
        warnings.warn(
            f"LOF-k={lof_k} needs at least {lof_k + 1} training images; using k={n_images - 1} for {n_images} images",
            stacklevel=2,
        )
        return n_images - 1
    return lof_k


def _positions_per_chunk(n_images: int, dim: int, budget_bytes: int, with_features: bool) -> int:
    per_position = n_images * n_images * 8 + (n_images * dim * 4 if with_features else 0)
    if with_features:
        per_position += min(n_images, dim) ** 2 * 16  # Gram/covariance and eigenvectors in float64
    return max(1, budget_bytes // max(per_position, 1))


def compute_neighbours(
    features: torch.Tensor,
    k: int,
    *,
    device: torch.device,
    budget_bytes: int,
    progress: ProgressCallback | None = None,
) -> NeighbourCache:
    """For every position, the ``k`` nearest patches of *other* images (L2, unsquared).

    ``features``: ``(N, P, D)``. Chunked over positions so that peak memory stays within ``budget_bytes``.
    """
    n, p, d = features.shape
    k = clamp_lof_k(k, n)
    dist_out = torch.empty(p, n, k, dtype=torch.float32)
    index_out = torch.empty(p, n, k, dtype=torch.int32)
    step = _positions_per_chunk(n, d, budget_bytes, with_features=True)

    def work(start: int, stop: int, device: torch.device) -> None:
        x = features[:, start:stop].to(device, non_blocking=True).transpose(0, 1).float().contiguous()  # (Pc, N, D)
        # Translate each position so that one of its points is the origin: distances are unchanged, but the
        # expanded form |a|^2+|b|^2-2ab no longer cancels a large common component (float32 precision).
        # Elementwise, so the result does not depend on how positions are chunked (a mean would).
        x = x - x[:, :1, :]
        squared_norm = x.square().sum(-1)
        dist = squared_norm.unsqueeze(2) + squared_norm.unsqueeze(1) - 2 * (x @ x.transpose(1, 2))
        dist = dist.clamp_min_(0).sqrt_()
        dist.masked_fill_(torch.eye(n, dtype=torch.bool, device=device), math.inf)  # not its own neighbour
        values, indices = torch.topk(dist, k, dim=-1, largest=False, sorted=True)
        dist_out[start:stop] = values.cpu()
        index_out[start:stop] = indices.to(torch.int32).cpu()
        report(progress, stop / p, f"discriminator: neighbours at {stop}/{p} positions")

    run_in_chunks(p, step, device, work)
    return NeighbourCache(dist_out, index_out)


def score_patches(
    name: str,
    params: DiscriminatorParams,
    neighbours: NeighbourCache,
    features: torch.Tensor | None,
    *,
    device: torch.device,
    budget_bytes: int,
    progress: ProgressCallback | None = None,
) -> torch.Tensor:
    """Run discriminator ``name`` over all positions; returns ``(N, P)`` float32 on CPU, higher = noisier.

    ``features`` (``(N, P, D)``) is needed only when ``needs_features(name, params)``.
    """
    discriminator = DISCRIMINATORS[name]
    p, n, _ = neighbours.dist.shape
    use_features = needs_features(name, params)
    if use_features and features is None:
        raise ValueError(f"discriminator {name!r} needs the training features")
    if params.lof_k > neighbours.k and (name == "lof" or (name == "fusion" and "lof" in params.fusion)):
        raise ValueError(f"lof_k={params.lof_k} exceeds the neighbour cache (k={neighbours.k})")
    dim = features.shape[-1] if features is not None else 1
    step = _positions_per_chunk(n, dim, budget_bytes, with_features=use_features)
    out = torch.empty(n, p, dtype=torch.float32)

    def work(start: int, stop: int, device: torch.device) -> None:
        chunk = PositionChunk(
            features=features[:, start:stop].to(device).transpose(0, 1) if use_features else None,
            knn_dist=neighbours.dist[start:stop].to(device),
            knn_index=neighbours.index[start:stop].to(device),
        )
        out[:, start:stop] = discriminator.score(chunk, params).transpose(0, 1).float().cpu()
        report(progress, stop / p, f"discriminator: {name} at {stop}/{p} positions")

    run_in_chunks(p, step, device, work)
    return out
