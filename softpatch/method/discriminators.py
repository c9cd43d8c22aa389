"""Patch-level noise discriminators (seeds/000 sec. 3.2; fusion from seeds/003).

Every discriminator scores each training patch against the patches at the *same position* in the
other training images. Scores have shape ``(N, P)`` for N images and P positions; higher = more
likely noise. Discriminators are pure functions over a chunk of positions, looked up by name in
``DISCRIMINATORS``; ``score_patches`` runs one over all positions in memory-bounded chunks.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np
import torch

from softpatch.config import DEFAULTS
from softpatch.io.feature_store import DiskArray
from softpatch.runtime.chunking import run_in_chunks
from softpatch.runtime.progress import ProgressCallback, report
from softpatch.runtime.read_ahead import ReadAhead

# Neighbours kept per patch in the cache: LOF-k up to this re-tunes without touching features.
NEIGHBOUR_CACHE_K = 32
# sklearn's LOF adds this to the mean reachability distance; we match it so scores agree exactly.
_LRD_EPS = 1e-10
# Reachability distances are floored at this share of the position's mean k-distance. Exact duplicate
# patches (uniform backgrounds, padding) otherwise get a density of 1e10 and their neighbours LOFs of
# that order; points in general position never come near the floor, so there LOF equals sklearn's.
_REACH_FLOOR = 0.05
# Eigenvalues below this share of the largest are treated as zero when scoring points outside the fit set.
_EIG_FLOOR = 1e-10

# Above neighbour_reference images, each patch is compared with the patches of the M most similar images: images
# are put in groups of at most CANDIDATE_GROUP by look, and each group shares one candidate set. Larger groups
# cost less per comparison (fewer, larger matrix products: at 256 about as fast as one sample for all; at 64,
# 2.7 times slower) but share their candidates among more images. Measured on 2,000 magnetic tiles (ImageNet
# MobileNet at 256/224, M = 1,024, the store of benchmarks/scale.py --sizes 2000 --real-weights, refitted by
# benchmarks/candidate_groups.py), vetting / test image / pixel AUROC against exact 0.7045 / 0.5881 / 0.8434:
# groups of 256 0.7027 / 0.5631 / 0.8434 (the image AUROC 0.025 off), 128 0.7032 / 0.5775 / 0.8396, 64
# 0.7038 / 0.5813 / 0.8371; one random sample of 1,024 for all gave a vetting AUROC of 0.662. At 256 the exact
# search's 6 nearest neighbours were found 0.91 of the time (0.94 with 64; one sample 0.51).
CANDIDATE_GROUP = 128
# The look of an image, to group by: its patch features on a coarse grid of DESCRIPTOR_GRID x DESCRIPTOR_GRID
# cells (the mean over each cell's positions), projected to DESCRIPTOR_DIM seeded random directions.
DESCRIPTOR_GRID = 7
DESCRIPTOR_DIM = 64

if TYPE_CHECKING:
    from softpatch.io.feature_store import FeatureStore

# Training features (N, P, D): in memory, or in an on-disk store read by chunks of positions.
FeatureSource = Union[torch.Tensor, "FeatureStore"]


def position_block(features: FeatureSource, start: int, stop: int) -> torch.Tensor:
    """Positions ``start .. stop`` of all images of ``features`` ``(N, P, D)``: ``(stop - start, N, D)`` float32."""
    if isinstance(features, torch.Tensor):
        return features[:, start:stop].transpose(0, 1).float()
    return features.read_positions(start, stop)


def reads_ahead(features: FeatureSource | None) -> bool:
    """Whether ``position_reader`` holds a second chunk of ``features`` (read ahead): for a store, not a tensor."""
    return features is not None and not isinstance(features, torch.Tensor)


@contextlib.contextmanager
def position_reader(features: FeatureSource, positions: int) -> Iterator[Callable[[int, int], torch.Tensor]]:
    """``position_block`` of ``features`` as a function of ``(start, stop)``. From a store (``reads_ahead``), the
    chunk after each one asked for is read in the background (``ReadAhead``): two chunks are held at a time."""
    if not reads_ahead(features):
        yield partial(position_block, features)
        return
    with ReadAhead(partial(position_block, features), positions) as read:
        yield read


def reference_images(n_images: int, reference_size: int, seed: int) -> np.ndarray | None:
    """None (the exact search: every image compared with all others) up to ``reference_size`` images; above, a
    seeded sample of that many (sorted image indices), on which the position statistics (gaussian) are
    estimated, while each image is compared with that many look-alike images (``CandidatePlan``)."""
    if n_images <= reference_size:
        return None
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_images, size=reference_size, replace=False)).astype(np.int64)


@dataclass(frozen=True)
class CandidatePlan:
    """Whom each image's patches are compared with when there are too many images to compare all pairs.

    Every image belongs to one group of look-alike images (``groups``); at every position its patches are
    compared with those of its group's ``candidates``: the M images nearest to some member of the group, by
    ``image_descriptors``. Nearest neighbours at a position come almost always from images that look alike
    overall, so this finds most of the exact search's neighbours at the cost of M comparisons per image.
    """

    groups: tuple[np.ndarray, ...]  # sorted image indices of each group; every image in exactly one
    candidates: tuple[np.ndarray, ...]  # sorted image indices each group's members are compared with (M each)

    def fingerprint(self) -> str:
        """A short hash of the plan: equal plans, equal neighbours (names the cache files)."""
        digest = hashlib.sha256()
        for members, candidates in zip(self.groups, self.candidates, strict=True):
            digest.update(members.astype(np.int64).tobytes() + b"|" + candidates.astype(np.int64).tobytes() + b";")
        return digest.hexdigest()[:12]


def image_descriptors(
    features: FeatureSource, seed: int, budget_bytes: int, progress: ProgressCallback | None = None
) -> torch.Tensor:
    """``(N, cells * DESCRIPTOR_DIM)`` float32: each image's projected features, pooled on a coarse grid.

    One pass over ``features`` ``(N, P, D)`` by chunks of positions (a store is read once). Positions on a
    square grid (the backbone's patch grid) are pooled in square cells, others in runs of consecutive positions.
    """
    n, p, d = features.shape
    side = math.isqrt(p)
    if side * side == p:
        cells = min(DESCRIPTOR_GRID, side)
        rows, cols = np.divmod(np.arange(p), side)
        cell_of = torch.from_numpy((rows * cells // side) * cells + cols * cells // side)
    else:
        cell_of = torch.from_numpy(np.arange(p) * min(DESCRIPTOR_GRID**2, p) // p)
    n_cells = int(cell_of.max()) + 1
    generator = torch.Generator().manual_seed(seed)
    projection = torch.randn(d, DESCRIPTOR_DIM, generator=generator) / math.sqrt(DESCRIPTOR_DIM)
    per_cell = torch.bincount(cell_of, minlength=n_cells).float()
    pooled = torch.zeros(n_cells, n, DESCRIPTOR_DIM)
    # Per position: the block read, the one read ahead, and room for the product.
    step = max(1, budget_bytes // max(1, n * d * 12))
    with position_reader(features, p) as read:
        for start in range(0, p, step):
            stop = min(p, start + step)
            pooled.index_add_(0, cell_of[start:stop], read(start, stop) @ projection)
            report(progress, stop / p, f"discriminator: grouping images by look, {stop}/{p} positions read")
    return (pooled / per_cell[:, None, None]).transpose(0, 1).reshape(n, -1).contiguous()


def candidate_plan(descriptors: torch.Tensor, n_candidates: int, seed: int) -> CandidatePlan:
    """Groups of look-alike images (at most ``CANDIDATE_GROUP``, and a quarter of ``n_candidates``) and each
    group's ``n_candidates`` candidates.

    ``descriptors`` ``(N, F)`` from ``image_descriptors``. Groups: k-means (seeded) on the descriptors,
    larger clusters cut into pieces by distance to their centre. Candidates of a group:
    the images with the smallest descriptor distance to any member (the members themselves first).
    """
    import faiss

    n = descriptors.shape[0]
    n_candidates = min(n_candidates, n)
    # A group is at most a quarter of its candidates: most of each member's candidates are its own look-alikes.
    group_size = max(1, min(CANDIDATE_GROUP, n_candidates // 4))
    x = np.ascontiguousarray(descriptors.numpy(), dtype=np.float32)
    clusters = max(1, math.ceil(n / group_size))
    if clusters > 1:
        kmeans = faiss.Kmeans(x.shape[1], clusters, niter=20, seed=seed, verbose=False, min_points_per_centroid=1)
        kmeans.train(x)
        distance, assignment = kmeans.index.search(x, 1)
        distance, assignment = distance[:, 0], assignment[:, 0]
    else:
        distance, assignment = np.zeros(n, dtype=np.float32), np.zeros(n, dtype=np.int64)
    groups: list[np.ndarray] = []
    for cluster in range(clusters):
        members = np.flatnonzero(assignment == cluster)
        members = members[np.argsort(distance[members], kind="stable")]  # nearest the centre first
        groups += [np.sort(members[i : i + group_size]) for i in range(0, members.size, group_size)]
    squared_norms = descriptors.square().sum(1)
    candidates = []
    for members in groups:
        member_rows = descriptors[torch.from_numpy(members)]
        # min over members of |m|^2 + |x|^2 - 2 m.x, by blocks of members
        nearest = torch.full((n,), math.inf)
        for start in range(0, members.size, 64):
            block = member_rows[start : start + 64]
            squared = squared_norms[torch.from_numpy(members[start : start + 64])].unsqueeze(1) + squared_norms
            squared = squared - 2.0 * (block @ descriptors.T)
            nearest = torch.minimum(nearest, squared.min(0).values)
        nearest[torch.from_numpy(members)] = -math.inf  # the members themselves are always candidates
        order = torch.topk(nearest, n_candidates, largest=False).indices.numpy()
        candidates.append(np.sort(order).astype(np.int64))
    return CandidatePlan(tuple(g.astype(np.int64) for g in groups), tuple(candidates))


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
    reference: torch.Tensor | None = None  # (R,) images the position's statistics come from; None = all


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
    if chunk.reference is not None:
        return _gaussian_scores_from_reference(x, chunk.reference, params.gaussian_reg)
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


def _gaussian_scores_from_reference(x: torch.Tensor, reference: torch.Tensor, gaussian_reg: float) -> torch.Tensor:
    """``gaussian_scores`` for a large N: the Gaussian is estimated on reference images, every image scored
    out of sample. ``x``: ``(Pc, N, D)`` float64; returns ``(Pc, N)``.

    The reference is split in two halves A and B: A's Gaussian scores every image outside A, B's scores
    A. Scoring the reference in sample and the rest out of sample would not do: with about as many
    reference images as dimensions the in-sample distances are much smaller, and the tau cut would
    remove mostly patches of images outside the reference.
    """
    half_a, half_b = reference[0::2], reference[1::2]
    scores = gaussian_distances(x[:, half_a], x, gaussian_reg)
    scores[:, half_a] = gaussian_distances(x[:, half_b], x[:, half_a], gaussian_reg)
    return scores


def gaussian_distances(fit: torch.Tensor, query: torch.Tensor, gaussian_reg: float) -> torch.Tensor:
    """Mahalanobis distances ``(Pc, M)`` of ``query`` ``(Pc, M, D)`` to the Gaussian of ``fit`` ``(Pc, R, D)``
    (float64, ridge as in ``gaussian_scores``; ``query = fit`` gives ``gaussian_scores`` of ``fit``).

    With fewer fit points than dimensions the covariance's eigenvectors come from the R x R Gram matrix; a
    query's component outside their span is weighted by the ridge alone.
    """
    r, d = fit.shape[1], fit.shape[2]
    mean = fit.mean(dim=1, keepdim=True)
    centred_fit = fit - mean
    centred = query - mean
    dof = max(r - 1, 1)
    if r <= d:
        eigvals, eigvecs = torch.linalg.eigh(centred_fit @ centred_fit.transpose(1, 2))  # (Pc, R), (Pc, R, R)
        eigvals = eigvals.clamp_min(0)
        ridge = (gaussian_reg * eigvals.sum(-1, keepdim=True) / (dof * d)).clamp_min(1e-12)  # (Pc, 1)
        # Coordinates along the covariance eigenvectors v_j = X^T u_j / s_j: (y . v_j) = (y X^T u_j) / s_j.
        coords = (centred @ centred_fit.transpose(1, 2)) @ eigvecs  # (Pc, M, R), times s_j
        valid = eigvals > _EIG_FLOOR * eigvals.amax(-1, keepdim=True)
        inv = torch.where(valid, 1.0 / eigvals.clamp_min(1e-300), torch.zeros_like(eigvals))
        along = coords.square() * inv.unsqueeze(1)  # (Pc, M, R): squared coordinates
        in_span = (along / (eigvals / dof + ridge).unsqueeze(1)).sum(-1)
        outside = (centred.square().sum(-1) - along.sum(-1)).clamp_min(0)
        squared = in_span + outside / ridge
    else:
        cov = centred_fit.transpose(1, 2) @ centred_fit / dof
        ridge = gaussian_reg * torch.diagonal(cov, dim1=1, dim2=2).mean(-1).clamp_min(1e-12)
        cov = cov + ridge[:, None, None] * torch.eye(d, dtype=cov.dtype, device=cov.device)
        chol = torch.linalg.cholesky(cov)
        solved = torch.linalg.solve_triangular(chol, centred.transpose(1, 2), upper=False)
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
    """The K nearest other-image patches of every patch, per position (computed once per fit).

    In memory (tensors) or, for a fit from a feature store, in two raw files beside the store
    (``DiskArray``), read by chunks of positions. ``reference``: None when every image was searched (exact);
    else the sorted sample of images the position statistics (gaussian) come from, and ``plan`` says whom
    each image was compared with (its group's candidates).
    """

    dist: torch.Tensor | DiskArray  # (P, N, K) float32, ascending
    index: torch.Tensor | DiskArray  # (P, N, K) int32 global image indices
    reference: np.ndarray | None = None
    plan: CandidatePlan | None = None

    @property
    def k(self) -> int:
        return self.dist.shape[-1]

    def positions(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dist, index)`` at positions ``start .. stop``: ``(Pc, N, K)`` float32 and int32 tensors."""
        dist, index = self.dist[start:stop], self.index[start:stop]
        if isinstance(dist, np.ndarray):
            return torch.from_numpy(dist), torch.from_numpy(index)
        return dist, index

    def mean_distance(self, k: int) -> np.ndarray:
        """``(N, P)`` mean distance of every patch to its ``k`` nearest neighbours (k <= K).

        By the same chunks of positions whether the cache is in memory or on disk, so that the value does not
        depend on where the cache lives (a reduction over differently laid out tensors may round differently).
        """
        p, n, _ = self.dist.shape
        out = np.empty((n, p), dtype=np.float32)
        step = max(1, (64 * 1024**2) // max(1, n * self.k * 4))
        for start in range(0, p, step):
            stop = min(p, start + step)
            out[:, start:stop] = self.positions(start, stop)[0][:, :, :k].mean(-1).T.numpy()
        return out


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
    """``clamp_lof_k`` (0 with fewer than 2 images), with a warning when it had to clamp."""
    if n_images < 2:
        return 0
    k = clamp_lof_k(lof_k, n_images)
    if k != lof_k:
        warnings.warn(
            f"LOF-k={lof_k} needs at least {lof_k + 1} training images; using k={k} for {n_images} images",
            stacklevel=2,
        )
    return k


def position_work_bytes(n_images: int, n_compared: int, dim: int, with_features: bool, read_ahead: bool) -> int:
    """Bytes one position of neighbour or discriminator work takes: ``n_images`` patches against
    ``n_compared`` (all images, or the reference sample). ``read_ahead``: the features come from a store,
    whose next chunk is held beside the current one (``position_reader``)."""
    per_position = n_images * n_compared * 8 + (n_images * dim * 4 * (2 if read_ahead else 1) if with_features else 0)
    if with_features:
        per_position += min(n_compared, dim) ** 2 * 16  # Gram/covariance and eigenvectors in float64
        if n_compared < n_images:  # the reference Gaussian: float64 copies and coordinates of every image
            per_position += n_images * (dim + 2 * n_compared) * 8
    if n_compared < n_images:  # a group's candidates, gathered
        per_position += n_compared * dim * 4
    return per_position


def _positions_per_chunk(
    n_images: int, dim: int, budget_bytes: int, with_features: bool, read_ahead: bool, n_compared: int | None = None
) -> int:
    per_position = position_work_bytes(n_images, n_compared or n_images, dim, with_features, read_ahead)
    return max(1, budget_bytes // max(per_position, 1))


def neighbour_cache_arrays(
    positions: int,
    n_images: int,
    k: int,
    plan: CandidatePlan | None,
    directory: str | os.PathLike | None,
) -> tuple[torch.Tensor | DiskArray, torch.Tensor | DiskArray]:
    """Empty ``(P, N, k)`` distances (float32) and image indices (int32) of a neighbour cache.

    In memory when ``directory`` is None, else two new ``DiskArray`` files there, named by k and the
    candidate plan (so a cache for other settings never overwrites this one).
    """
    shape = (positions, n_images, k)
    if directory is None:
        return torch.empty(shape, dtype=torch.float32), torch.empty(shape, dtype=torch.int32)
    tag = f"k{k}" + ("" if plan is None else f"_c{len(plan.candidates[0])}_{plan.fingerprint()}")
    return (
        DiskArray.create(Path(directory) / f"neighbours_{tag}_dist.bin", shape, np.float32),
        DiskArray.create(Path(directory) / f"neighbours_{tag}_index.bin", shape, np.int32),
    )


def compute_neighbours(
    features: FeatureSource,
    k: int,
    *,
    device: torch.device,
    budget_bytes: int,
    progress: ProgressCallback | None = None,
    reference: np.ndarray | None = None,
    directory: str | os.PathLike | None = None,
    plan: CandidatePlan | None = None,
    seed: int = 0,
) -> NeighbourCache:
    """For every position, the ``k`` nearest patches of *other* images (L2, unsquared).

    ``features``: ``(N, P, D)`` tensor or feature store. ``reference``: None compares every image with every
    other (exact); else a sorted sample of M images (``reference_images``) and each image is compared with
    the M images of its group's candidates (``plan``; made here from the features with ``seed`` when None).
    ``directory``: write the cache there (``DiskArray`` files) instead of keeping it in memory.
    Chunked over positions so that peak memory stays within ``budget_bytes``.
    """
    n, p, d = features.shape
    if reference is not None and plan is None:
        report(progress, 0.0, f"discriminator: grouping images by look, 0/{p} positions read")
        plan = candidate_plan(image_descriptors(features, seed, budget_bytes, progress), len(reference), seed)
    m = n if plan is None else len(plan.candidates[0])
    k = clamp_lof_k(k, m)
    dist_out, index_out = neighbour_cache_arrays(p, n, k, plan, directory)
    step = _positions_per_chunk(n, d, budget_bytes, with_features=True, read_ahead=reads_ahead(features), n_compared=m)
    groups = (
        []
        if plan is None
        else [(torch.from_numpy(g), torch.from_numpy(c)) for g, c in zip(plan.groups, plan.candidates, strict=True)]
    )

    def work(start: int, stop: int, device: torch.device) -> None:
        x = read(start, stop).to(device, non_blocking=True).contiguous()  # (Pc, N, D)
        # Translate each position so that one of its points is the origin: distances are unchanged, but the
        # expanded form |a|^2+|b|^2-2ab no longer cancels a large common component (float32 precision).
        # Elementwise, so the result does not depend on how positions are chunked (a mean would).
        x = x - x[:, :1, :]
        squared_norm = x.square().sum(-1)
        if plan is None:
            dist = squared_norm.unsqueeze(2) + squared_norm.unsqueeze(1) - 2 * (x @ x.transpose(1, 2))
            dist = dist.clamp_min_(0).sqrt_()
            dist.masked_fill_(torch.eye(n, dtype=torch.bool, device=device), math.inf)  # not its own neighbour
            values, indices = torch.topk(dist, k, dim=-1, largest=False, sorted=True)
        else:
            values = torch.empty(stop - start, n, k, device=device)
            indices = torch.empty(stop - start, n, k, dtype=torch.int64, device=device)
            for members, candidates in groups:
                g, c = members.to(device), candidates.to(device)
                # |c|^2 - 2 g.c ranks a member's candidates as the distance does (|g|^2 is the same along a row):
                # |g|^2 and the square root are applied to the k chosen only, not to all G x M.
                dist = torch.baddbmm(squared_norm[:, c].unsqueeze(1), x[:, g], x[:, c].transpose(1, 2), alpha=-2.0)
                dist.masked_fill_(g.unsqueeze(1) == c.unsqueeze(0), math.inf)  # not its own neighbour
                nearest, local = torch.topk(dist, k, dim=-1, largest=False, sorted=True)  # (Pc, G, k)
                values[:, g] = nearest.add_(squared_norm[:, g].unsqueeze(2)).clamp_min_(0).sqrt_()
                indices[:, g] = c[local]
        values, indices = values.cpu(), indices.to(torch.int32).cpu()
        if isinstance(dist_out, torch.Tensor):
            dist_out[start:stop] = values
            index_out[start:stop] = indices
        else:
            dist_out.write(start, values.numpy())
            index_out.write(start, indices.numpy())
        report(progress, stop / p, f"discriminator: neighbours at {stop}/{p} positions")

    report(progress, 0.0, f"discriminator: neighbours at 0/{p} positions")  # the bar shows before the first chunk
    with position_reader(features, p) as read:
        run_in_chunks(p, step, device, work)
    return NeighbourCache(
        dist_out, index_out, None if reference is None else np.asarray(reference, dtype=np.int64), plan
    )


def score_patches(
    name: str,
    params: DiscriminatorParams,
    neighbours: NeighbourCache,
    features: FeatureSource | None,
    *,
    device: torch.device,
    budget_bytes: int,
    progress: ProgressCallback | None = None,
) -> torch.Tensor:
    """Run discriminator ``name`` over all positions; returns ``(N, P)`` float32 on CPU, higher = noisier.

    ``features`` (``(N, P, D)`` tensor or feature store) is needed only when ``needs_features(name, params)``.
    With a neighbour cache searched among reference images, position statistics (gaussian) come from them.
    """
    discriminator = DISCRIMINATORS[name]
    p, n, _ = neighbours.dist.shape
    use_features = needs_features(name, params)
    if use_features and features is None:
        raise ValueError(f"discriminator {name!r} needs the training features")
    if params.lof_k > neighbours.k and (name == "lof" or (name == "fusion" and "lof" in params.fusion)):
        raise ValueError(f"lof_k={params.lof_k} exceeds the neighbour cache (k={neighbours.k})")
    dim = features.shape[-1] if features is not None else 1
    reference = neighbours.reference
    m = n if reference is None else len(reference)
    read_ahead = use_features and reads_ahead(features)
    step = _positions_per_chunk(n, dim, budget_bytes, with_features=use_features, read_ahead=read_ahead, n_compared=m)
    out = torch.empty(n, p, dtype=torch.float32)
    ref = None if reference is None else torch.from_numpy(reference)

    def work(start: int, stop: int, device: torch.device) -> None:
        knn_dist, knn_index = neighbours.positions(start, stop)
        chunk = PositionChunk(
            features=read(start, stop).to(device) if use_features else None,
            knn_dist=knn_dist.to(device),
            knn_index=knn_index.to(device),
            reference=None if ref is None else ref.to(device),
        )
        out[:, start:stop] = discriminator.score(chunk, params).transpose(0, 1).float().cpu()
        report(progress, stop / p, f"discriminator: {name} at {stop}/{p} positions")

    if not use_features:
        run_in_chunks(p, step, device, work)
    else:
        with position_reader(features, p) as read:
            run_in_chunks(p, step, device, work)
    return out
