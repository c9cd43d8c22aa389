"""Coreset selection for the memory bank (PatchCore sec. 3.2): greedy k-centre, random, or all.

The greedy k-centre runs on a seeded random projection of the patches, as PatchCore does. It is the
exact greedy algorithm (every step adds the point farthest from the chosen centres), batched so that
most steps touch only a small pool of candidates and the full update is one matrix product per round.

Its cost is O(patches x centres), quadratic in the patches at a fixed ratio. Beyond ``exact_rows`` kept
patches ``select_rows`` runs it on blocks instead: a seeded random partition of the kept patches into
blocks of at most ``block_rows``, each sampled at the same ratio, so the cost is blocks x B x ratio x B,
linear in the patches. Each block is a random sample of the same patches, so its centres cover it about
as the exact greedy's cover the whole; the union is a bank of the same size. Which of the two runs is a
pure function of the sizes (``plan_coreset``); the partition and each block's first centre come from the seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from softpatch.runtime.progress import ProgressCallback, report

# Size of one block of the per-round distance update: memory stays flat in the number of patches, and a block
# this small stays in the CPU cache between its matrix product and its min (2.7x faster than blocks of 64 MB).
_UPDATE_BLOCK_BYTES = 4 * 1024**2
# Anything indexable by an int64 array of rows, giving (k, d) numbers: an ndarray, an np.memmap, a feature store's view.
ArrayLike = Any


@dataclass
class DistanceCounter:
    """Counts point-to-centre distance evaluations of the greedy coreset: its cost, independent of the machine."""

    evaluations: int = 0


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
    points: np.ndarray,
    n_select: int,
    start: int,
    progress: ProgressCallback | None = None,
    pool_size: int = 2048,
    counter: DistanceCounter | None = None,
) -> np.ndarray:
    """Exact greedy k-centre selection of ``n_select`` rows of ``points`` ``(M, d)``, starting at ``start``.

    Returns the selected row indices in selection order: the same as ``greedy_coreset_reference``
    (up to ties), in rounds. Each round takes the ``pool_size`` points farthest from the centres so
    far and runs the greedy steps inside that pool while its best point is still at least as far as
    the farthest point outside it (distances only shrink, so then it is the global argmax). Then one
    matrix product brings every point's distance up to date with all of the round's new centres.
    ``counter``, when given, is increased by the number of point-to-centre distances evaluated.
    """
    evaluations = 0
    m = points.shape[0]
    n_select = min(n_select, m)
    points = np.ascontiguousarray(points, dtype=np.float32)
    sq_norm = np.einsum("ij,ij->i", points, points)
    # Squared distances throughout: the ordering needs no square roots.
    min_dist = np.maximum(sq_norm - 2.0 * (points @ points[start]) + sq_norm[start], 0.0)
    evaluations += m
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
            evaluations += pool.size
            np.minimum(pool_dist, gap, out=pool_dist)
            pool_dist[j] = 0.0
        if not round_centres:  # only duplicates of chosen points are left
            rest = np.setdiff1d(np.arange(m), np.asarray(selected), assume_unique=False)
            selected.extend(rest[: n_select - len(selected)].tolist())
            break
        # |p|^2 + min_c (|c|^2 - 2 p.c): the factor -2 rides in the matrix product (scaling by 2 is exact) and
        # |p|^2 is added after the min, so the (rows x B) block is passed over twice, not five times.
        scaled_centres = np.ascontiguousarray(-2.0 * points[round_centres].T)  # (d, B)
        centre_sq = sq_norm[round_centres][None, :]
        # Row blocks small enough to stay in the CPU cache between the product and the min.
        rows = max(1, _UPDATE_BLOCK_BYTES // (4 * len(round_centres)))
        for r in range(0, m, rows):
            block = points[r : r + rows] @ scaled_centres
            block += centre_sq
            nearest = block.min(axis=1)
            nearest += sq_norm[r : r + rows]
            np.minimum(min_dist[r : r + rows], np.maximum(nearest, 0.0), out=min_dist[r : r + rows])
        evaluations += m * len(round_centres)
        min_dist[round_centres] = 0.0
        if len(selected) >= next_report:
            report(progress, len(selected) / n_select, f"coreset: {len(selected)}/{n_select} patches chosen")
            next_report = len(selected) + n_select // 20
    report(progress, 1.0, f"coreset: {n_select}/{n_select} patches chosen")
    if counter is not None:
        counter.evaluations += evaluations
    return np.asarray(selected, dtype=np.int64)


# The memory bank's rows are float32.
BANK_VALUE_BYTES = 4


@dataclass(frozen=True)
class CoresetPlan:
    """What a coreset selection will do, decided from sizes and settings alone (``plan_coreset``).

    ``method``: "greedy" (exact greedy k-centre), "blocked" (greedy k-centre on ``blocks`` seeded random
    blocks), "random" or "all". ``rows`` bank rows are chosen among ``kept`` patches; ``requested_rows``
    is what the ratio asked for, more than ``rows`` when the memory budget capped the bank.
    """

    method: str
    kept: int
    rows: int
    requested_rows: int
    blocks: int = 1

    @property
    def capped(self) -> bool:
        return self.rows < self.requested_rows

    def describe(self) -> str:
        """How the bank rows were chosen, in one sentence for the user."""
        return _PLAN_SENTENCES[self.method].format(kept=self.kept, rows=self.rows, blocks=self.blocks)

    def capped_message(self, feature_dim: int, budget_mb: int, ratio: float) -> str:
        """The sentence that tells the user the memory budget cut the bank, with both sizes."""
        mb = BANK_VALUE_BYTES * feature_dim / 1024**2
        return (
            f"memory bank capped at {self.rows:,} patches ({self.rows * mb:,.0f} MB, the bank_budget_mb setting of "
            f"{budget_mb:,}); coreset ratio {ratio:g} of {self.kept:,} kept patches asks for "
            f"{self.requested_rows:,} ({self.requested_rows * mb:,.0f} MB)"
        )


_PLAN_SENTENCES = {
    "greedy": "{rows:,} of {kept:,} kept patches chosen by the exact greedy k-centre coreset.",
    "blocked": "{rows:,} of {kept:,} kept patches chosen by the greedy k-centre coreset on {blocks:,} random blocks "
    "(above coreset_exact_rows the exact one would cost the square of the patches).",
    "random": "{rows:,} of {kept:,} kept patches chosen at random.",
    "all": "Every one of the {kept:,} kept patches.",
}


def plan_coreset(
    kept: int,
    *,
    method: str,
    ratio: float,
    row_bytes: int,
    budget_bytes: int,
    exact_rows: int,
    block_rows: int,
) -> CoresetPlan:
    """The coreset plan for ``kept`` patches: a pure function of its arguments.

    ``method`` "greedy", "random" or "all" (the config's ``coreset``); ``ratio`` the share to keep;
    ``row_bytes`` the size of one bank row; at most ``budget_bytes // row_bytes`` rows are kept. The
    greedy k-centre is exact up to ``exact_rows`` kept patches and blocked beyond, in blocks of at most
    ``block_rows``. "all" over the budget becomes the greedy k-centre of the budgeted size.
    """
    if method not in PLANNED_METHODS:
        raise ValueError(f"unknown coreset method {method!r}")
    if exact_rows < 1 or block_rows < 1 or row_bytes < 1:
        raise ValueError("exact_rows, block_rows and row_bytes must be positive")
    everything = method == "all" or ratio >= 1.0
    requested = kept if everything else (max(1, round(kept * ratio)) if kept else 0)
    rows = min(requested, max(1, budget_bytes // row_bytes))
    if everything:
        if rows == kept:
            return CoresetPlan("all", kept, rows, requested)
        method = "greedy"  # over the budget: the subset of that size that covers the patches best
    if method == "greedy" and kept > exact_rows:
        return CoresetPlan("blocked", kept, rows, requested, blocks=math.ceil(kept / block_rows))
    return CoresetPlan(method, kept, rows, requested)


PLANNED_METHODS = ("greedy", "random", "all")


def _read_rows(projected: ArrayLike, rows: np.ndarray) -> np.ndarray:
    """``projected[rows]`` as a float32 array of its own (``projected`` may be a float16 memmap)."""
    return np.array(projected[rows], dtype=np.float32, copy=True)


def apportion(total: int, sizes: np.ndarray) -> np.ndarray:
    """``total`` split over parts of ``sizes`` in proportion, by largest remainder (ties: first part first)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    whole = int(sizes.sum())
    if whole == 0:
        return np.zeros_like(sizes)
    share, remainder = np.divmod(total * sizes, whole)
    extra = total - int(share.sum())
    share[np.argsort(-remainder, kind="stable")[:extra]] += 1
    return share


def select_rows(
    projected: ArrayLike,
    kept: np.ndarray,
    plan: CoresetPlan,
    *,
    seed: int,
    progress: ProgressCallback | None = None,
    counter: DistanceCounter | None = None,
) -> np.ndarray:
    """The flat indices of the memory-bank rows among ``kept`` (``(K,)`` flat patch indices), as ``plan`` says.

    ``projected``: an array-like ``(N * P, d)`` of projected patches (float16 or float32, possibly a memmap),
    read only at the kept rows, and block by block when the plan is blocked. Greedy picks come in selection
    order (per block, block after block); random picks in increasing order.
    """
    kept = np.asarray(kept, dtype=np.int64)
    m = kept.size
    if m != plan.kept:
        raise ValueError(f"the plan is for {plan.kept} kept patches, got {m}")
    if m == 0:
        return np.zeros(0, dtype=np.int64)
    if plan.method == "all":
        return kept.copy()
    rng = np.random.default_rng(seed)
    if plan.method == "random":
        return kept[np.sort(rng.choice(m, size=plan.rows, replace=False))]
    if plan.method == "greedy":
        start = int(rng.integers(m))
        return kept[greedy_coreset(_read_rows(projected, kept), plan.rows, start, progress, counter=counter)]
    order = rng.permutation(m)
    parts = np.array_split(order, plan.blocks)
    quotas = apportion(plan.rows, np.array([part.size for part in parts]))
    chosen: list[np.ndarray] = []
    done = 0
    for b, (part, quota) in enumerate(zip(parts, quotas.tolist(), strict=True)):
        if quota == 0:
            continue
        rows = kept[np.sort(part)]  # in storage order: a memmap is read forwards
        picked = greedy_coreset(_read_rows(projected, rows), quota, int(rng.integers(rows.size)), counter=counter)
        chosen.append(rows[picked])
        done += quota
        report(
            progress, (b + 1) / plan.blocks, f"coreset: block {b + 1}/{plan.blocks}, {done}/{plan.rows} patches chosen"
        )
    return np.concatenate(chosen)


def select_coreset(
    features: torch.Tensor,
    *,
    method: str,
    ratio: float,
    projection_dim: int,
    seed: int,
    progress: ProgressCallback | None = None,
) -> np.ndarray:
    """Indices of the memory-bank rows among ``features`` ``(M, D)``: ``method`` "greedy", "random" or "all".

    The greedy k-centre here is always the exact one, with no memory budget.
    """
    m = features.shape[0]
    plan = plan_coreset(
        m, method=method, ratio=ratio, row_bytes=1, budget_bytes=max(m, 1), exact_rows=max(m, 1), block_rows=max(m, 1)
    )
    projected = np.zeros((m, 0), dtype=np.float32)
    if plan.method == "greedy" and m:
        report(progress, 0.0, "coreset: projecting patches")
        projected = random_projection(features, projection_dim, seed)
    return select_rows(projected, np.arange(m, dtype=np.int64), plan, seed=seed, progress=progress)
