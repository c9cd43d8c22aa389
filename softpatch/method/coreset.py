"""Coreset selection for the memory bank (PatchCore sec. 3.2): greedy k-centre, random, or all.

The greedy k-centre runs on a seeded random projection of the patches, as PatchCore does. It is the
exact greedy algorithm (every step adds the point farthest from the chosen centres), batched so that
most steps touch only a small pool of candidates and the full update is one matrix product per round.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from softpatch.runtime.progress import ProgressCallback, report

# Size of one block of the per-round distance update: memory stays flat in the number of patches.
_UPDATE_BLOCK_BYTES = 64 * 1024**2


def projection_matrix(in_dim: int, out_dim: int, seed: int) -> torch.Tensor:
    """A seeded ``(in_dim, out_dim)`` Gaussian projection that roughly preserves distances (Johnson-Lindenstrauss)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(in_dim, out_dim, generator=generator) / math.sqrt(out_dim)


def random_projection(features: torch.Tensor, dim: int, seed: int) -> np.ndarray:
    """Project ``(M, D)`` features to ``(M, dim)`` with ``projection_matrix`` (a copy when ``dim >= D``)."""
    d = features.shape[1]
    if dim >= d:
        return features.float().numpy().astype(np.float32, copy=True)
    return (features.float() @ projection_matrix(d, dim, seed)).numpy()


def greedy_coreset_reference(points: np.ndarray, n_select: int, start: int) -> np.ndarray:
    """The plain greedy k-centre loop, O(M) per step. Kept as the reference the fast version must match."""
    selected = [start]
    min_dist = np.linalg.norm(points - points[start], axis=1)
    for _ in range(n_select - 1):
        nxt = int(np.argmax(min_dist))
        selected.append(nxt)
        np.minimum(min_dist, np.linalg.norm(points - points[nxt], axis=1), out=min_dist)
    return np.asarray(selected, dtype=np.int64)


def greedy_coreset(
    points: np.ndarray, n_select: int, start: int, progress: ProgressCallback | None = None, pool_size: int = 2048
) -> np.ndarray:
    """Exact greedy k-centre selection of ``n_select`` rows of ``points`` ``(M, d)``, starting at ``start``.

    Returns the selected row indices in selection order: the same as ``greedy_coreset_reference``
    (up to ties), in rounds. Each round takes the ``pool_size`` points farthest from the centres so
    far and runs the greedy steps inside that pool while its best point is still at least as far as
    the farthest point outside it (distances only shrink, so then it is the global argmax). Then one
    matrix product brings every point's distance up to date with all of the round's new centres.
    """
    m = points.shape[0]
    n_select = min(n_select, m)
    points = np.ascontiguousarray(points, dtype=np.float32)
    sq_norm = np.einsum("ij,ij->i", points, points)
    # Squared distances throughout: the ordering needs no square roots.
    min_dist = np.maximum(sq_norm - 2.0 * (points @ points[start]) + sq_norm[start], 0.0)
    selected = [start]
    min_dist[start] = 0.0
    pool_size = min(pool_size, m)
    next_report = n_select // 20
    while len(selected) < n_select:
        if pool_size < m:
            pool = np.argpartition(min_dist, m - pool_size)[m - pool_size :]
            outside_best = float(np.max(np.delete(min_dist, pool))) if pool_size < m else -np.inf
        else:
            pool, outside_best = np.arange(m), -np.inf
        pool_points = points[pool]
        pool_sq = sq_norm[pool]
        pool_dist = min_dist[pool].copy()
        round_centres = []
        while len(selected) < n_select:
            j = int(np.argmax(pool_dist))
            if pool_dist[j] < outside_best or pool_dist[j] <= 0.0:
                break
            centre = int(pool[j])
            selected.append(centre)
            round_centres.append(centre)
            gap = np.maximum(pool_sq - 2.0 * (pool_points @ points[centre]) + sq_norm[centre], 0.0)
            np.minimum(pool_dist, gap, out=pool_dist)
            pool_dist[j] = 0.0
        if not round_centres:  # only duplicates of chosen points are left
            rest = np.setdiff1d(np.arange(m), np.asarray(selected), assume_unique=False)
            selected.extend(rest[: n_select - len(selected)].tolist())
            break
        centres = points[round_centres]  # (B, d)
        centre_sq = sq_norm[round_centres][None, :]
        # Row blocks keep the (rows x B) distance block near _UPDATE_BLOCK_BYTES instead of M x B.
        rows = max(1, _UPDATE_BLOCK_BYTES // (4 * len(round_centres)))
        for r in range(0, m, rows):
            block = sq_norm[r : r + rows, None] - 2.0 * (points[r : r + rows] @ centres.T) + centre_sq
            np.minimum(min_dist[r : r + rows], np.maximum(block.min(axis=1), 0.0), out=min_dist[r : r + rows])
        min_dist[round_centres] = 0.0
        if len(selected) >= next_report:
            report(progress, len(selected) / n_select, f"coreset: {len(selected)}/{n_select} patches chosen")
            next_report = len(selected) + n_select // 20
    report(progress, 1.0, f"coreset: {n_select}/{n_select} patches chosen")
    return np.asarray(selected, dtype=np.int64)


def select_coreset(
    features: torch.Tensor,
    *,
    method: str,
    ratio: float,
    projection_dim: int,
    seed: int,
    progress: ProgressCallback | None = None,
) -> np.ndarray:
    """Indices of the memory-bank rows among ``features`` ``(M, D)``: ``method`` "greedy", "random" or "all"."""
    m = features.shape[0]
    if m == 0:
        return np.zeros(0, dtype=np.int64)
    if method == "all" or ratio >= 1.0:
        return np.arange(m, dtype=np.int64)
    n_select = max(1, round(m * ratio))
    rng = np.random.default_rng(seed)
    if method == "random":
        return np.sort(rng.choice(m, size=n_select, replace=False)).astype(np.int64)
    if method != "greedy":
        raise ValueError(f"unknown coreset method {method!r}")
    report(progress, 0.0, "coreset: projecting patches")
    projected = random_projection(features, projection_dim, seed)
    start = int(rng.integers(m))
    return greedy_coreset(projected, n_select, start, progress)
