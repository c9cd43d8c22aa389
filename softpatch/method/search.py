"""Nearest-neighbour search over the memory bank: exhaustive (faiss on CPU, torch on CUDA), bounded, and IVF.

The bounded search is exact too. It is what makes CPU scoring fast: most bank rows are ruled out by a
cheap lower bound on their distance, and only a handful per query are compared in full dimension.
The IVF search (``IVFSearch``) is the one approximate search, for banks of millions of rows: it reports
its recall@1 against the exact search, measured on held-out patches, with every answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# Queries per block: bounds the (queries x bank) distance block of the torch search and the
# (queries x D) gathers of the re-ranking to a few hundred MB.
_QUERY_BLOCK = 4096
_RERANK_BLOCK = 256
# Most cells of one (queries x bank) block of the torch search: 256 MiB of float32, whatever the bank's size
# (full 4096-query blocks up to 16,384 bank rows, fewer queries per block beyond). It sits beside a bank of up
# to bank_budget_mb, so it stays small: a fit's peak memory is the bank plus little more.
_SEARCH_CELLS = 4096 * 16384
# Bank rows per block while the bounded search scores its candidate dims: about 16 MB of rotated rows (each
# block has a few temporaries of that size).
_CHOOSE_BLOCK_CELLS = 4 * 1024**2
# Queries the bound leaves unproven are retried with this many times more candidates before the full search.
_WIDER_FACTOR = 8
# Rows used to estimate the principal directions; any orthonormal basis keeps the search exact,
# so a subsample only costs pruning power, never correctness.
_PCA_ROWS = 50_000
# Relative slack on the bound test for float32 rounding in faiss's expanded-form distances.
_ROUNDING_SLACK = 1e-5
# Cost model of the choice of dim, in units of one multiply-add of the exhaustive search (faiss, BLAS),
# measured on the speed benchmark's bank (15,261 x 1024, 784 queries per image; 0.12 s per image):
# faiss's bound search costs (dim + 1 + _SELECTION_COST) per bank row (0.014 s per image at dim 64,
# 0.050 s at dim 384), and gathering a candidate's row for the exact distance _GATHER_COST per coordinate.
_SELECTION_COST = 60
_GATHER_COST = 67
# The first search picks dim on a sample of this many queries, and at most this many query x bank cells.
_CALIBRATION_QUERIES = 1024
_CALIBRATION_CELLS = 32_000_000


@dataclass(frozen=True)
class NeighbourMatch:
    """The nearest memory-bank patch m* of each query patch (eq. 7)."""

    distance: torch.Tensor  # (Q,) plain L2 distance ||p - m*||, never squared
    index: torch.Tensor  # (Q,) row of m* in the bank
    recall: float | None = None  # None: exact; else the approximate search's measured recall@1 (0..1)


def query_block(bank_rows: int) -> int:
    """Queries per block of the torch search for a bank of ``bank_rows``: at most ``_SEARCH_CELLS`` cells."""
    return max(1, min(_QUERY_BLOCK, _SEARCH_CELLS // max(1, bank_rows)))


def _row_squared_norms(rows: torch.Tensor) -> torch.Tensor:
    """``(M,)`` squared norms of ``(M, D)`` rows, by row blocks (``rows.square()`` would be a copy of them)."""
    out = torch.empty(rows.shape[0], device=rows.device, dtype=rows.dtype)
    step = max(1, _CHOOSE_BLOCK_CELLS // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        out[start : start + step] = rows[start : start + step].square().sum(1)
    return out


def _squared_distances(queries: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``(Q, M)`` squared L2 distances of ``(Q, D)`` queries to ``(M, D)`` rows, by row blocks: unlike
    ``torch.cdist``, which pads a copy of ``rows``, it holds nothing of the size of ``rows`` but the result."""
    out = torch.empty(queries.shape[0], rows.shape[0])
    q_sq = queries.square().sum(1, keepdim=True)
    step = max(1, _CHOOSE_BLOCK_CELLS // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        block = rows[start : start + step]
        part = out[:, start : start + step]
        torch.matmul(queries, block.T, out=part)
        part.mul_(-2.0).add_(_row_squared_norms(block)).add_(q_sq).clamp_min_(0.0)
    return out


def exhaustive_search_torch(bank: torch.Tensor, queries: torch.Tensor, device: torch.device) -> NeighbourMatch:
    """Exact nearest row of ``bank`` ``(M, D)`` for each ``(Q, D)`` query, by blocked matrix products."""
    bank = bank.to(device)
    bank_sq = _row_squared_norms(bank)
    distances, indices = [], []
    block = query_block(bank.shape[0])
    for start in range(0, queries.shape[0], block):
        q = queries[start : start + block].to(device).float()
        # In place: one (block x bank) matrix, not the four temporaries of the plain expression.
        squared = (q @ bank.T).mul_(-2.0).add_(bank_sq.unsqueeze(0)).add_(q.square().sum(1, keepdim=True))
        where = squared.argmin(dim=1)
        del squared
        # Recompute the winner's distance directly: the expanded form loses precision near zero.
        distances.append((q - bank[where]).norm(dim=1).cpu())
        indices.append(where.cpu())
    return NeighbourMatch(torch.cat(distances), torch.cat(indices))


class ExhaustiveSearch:
    """Exact nearest-neighbour search that compares every query with every bank row (faiss, CPU).

    faiss reads the bank where it is (``faiss.knn``): an index would hold a second copy of it.
    """

    def fit(self, bank: torch.Tensor) -> ExhaustiveSearch:
        """Index ``bank`` ``(M, D)`` float32 (no copy when it already is a contiguous CPU float32 tensor)."""
        self.bank_ = bank.detach().cpu().float().contiguous()
        return self

    def search(self, queries: torch.Tensor) -> NeighbourMatch:
        """Nearest bank row of each ``(Q, D)`` query; distances are plain L2."""
        import faiss

        if not hasattr(self, "bank_"):
            raise RuntimeError("ExhaustiveSearch is not fitted: call fit(bank) first")
        queries = queries.detach().cpu().float()
        _, index = faiss.knn(np.ascontiguousarray(queries.numpy()), self.bank_.numpy(), 1)
        rows = torch.from_numpy(index[:, 0].astype(np.int64))
        # faiss ranks by the expanded |q|^2 + |m|^2 - 2qm form, which is off by up to ~0.04 near zero on
        # real features: the winner's distance is measured directly.
        distance = torch.empty(queries.shape[0])
        for start in range(0, queries.shape[0], _QUERY_BLOCK):
            part = slice(start, start + _QUERY_BLOCK)
            distance[part] = (queries[part] - self.bank_[rows[part]]).norm(dim=1)
        return NeighbourMatch(distance, rows)


class BoundedSearch:
    """Exact nearest-neighbour search, pruned by a lower bound computed in a few principal directions.

    For an orthonormal ``(D, dim)`` basis ``P`` of the bank's top principal directions, with ``r(v)``
    the part of ``v`` off that subspace,

        ||q - x||^2 = ||P'(q - x)||^2 + ||r(q) - r(x)||^2 >= ||P'(q - x)||^2 + (||r(q)|| - ||r(x)||)^2.

    Appending ``||r(v)||`` to the projection as one more coordinate makes that bound a plain L2
    distance in ``dim + 1`` dimensions, which faiss searches at a fraction of the full cost. The
    ``candidates`` rows with the smallest bound are then compared in full; when the best of them is
    no farther than the next-smallest bound, no other row can be nearer, so the answer is exact.
    Queries where that test fails get a pass with more candidates, then the exhaustive search.
    Result: the exhaustive search's answer (up to ties and float rounding).

    How many directions pay off depends on the features: random-init wide_resnet50_2 features need 64,
    real MobileNet features about 256. So ``dim`` is chosen on the first search from ``dims``, by the
    measured share of a sample of its queries that each would leave unproven; where none would beat
    the exhaustive search, that is what runs.
    """

    def __init__(self, candidates: int, dims: tuple[int, ...]) -> None:
        self.candidates = candidates
        self.dims = dims

    def fit(
        self, bank: torch.Tensor, *, dim: int | None = None, calibration: torch.Tensor | None = None
    ) -> BoundedSearch:
        """Index ``bank`` ``(M, D)`` float32.

        ``dim``: use that many directions. Otherwise it is chosen now on ``calibration`` ``(n, D)``,
        queries like the future ones (held-out nominal patches), or else on the first search's queries.
        """
        if bank.ndim != 2 or bank.shape[0] <= self.candidates:
            raise ValueError(
                f"bounded search needs more than {self.candidates} rows, got a bank of shape {tuple(bank.shape)}"
            )
        if dim is not None and not 1 <= dim < bank.shape[1] - 1:
            raise ValueError(f"dim must be in [1, {bank.shape[1] - 2}] for {bank.shape[1]}-d rows, got {dim}")
        bank = bank.detach().cpu().float().contiguous()
        self.bank_ = bank
        self.mean_ = bank.mean(dim=0)
        # The scatter of every step-th row, a block at a time: a sample of _PCA_ROWS rows held at once would
        # be hundreds of MB beside a large bank.
        step = max(1, bank.shape[0] // _PCA_ROWS)
        scatter = torch.zeros(bank.shape[1], bank.shape[1])
        for start in range(0, bank.shape[0], step * 4096):
            sample = bank[start : start + step * 4096 : step] - self.mean_
            scatter.addmm_(sample.T, sample)
        # eigh of the covariance is deterministic (unlike randomised SVD): the same bank, the same basis.
        _, vectors = torch.linalg.eigh(scatter.double())
        self.rotation_ = vectors.flip(1).float().contiguous()  # (D, D), columns by decreasing variance
        self.dim_: int | None = None
        self.fallback_fraction_ = 0.0
        if dim is not None:
            self._use_dim(dim)
        elif calibration is not None and calibration.shape[0] > 0:
            self._use_dim(self._choose_dim(calibration.detach().cpu().float()))
        return self

    def _use_dim(self, dim: int) -> None:
        """Compute the bank's bound coordinates in ``dim`` directions, searched by faiss (0: exhaustive)."""

        self.dim_ = dim
        if dim == 0:
            self.exhaustive_ = ExhaustiveSearch().fit(self.bank_)
            return
        self.basis_ = self.rotation_[:, :dim].contiguous()
        # Searched where it is (faiss.knn): a faiss index would hold a second copy of these coordinates.
        self.bound_rows_ = self._bound_coordinates(self.bank_)
        self.max_bound_norm_sq_ = float(self.bound_rows_.square().sum(1).max())

    def _choose_dim(self, queries: torch.Tensor) -> int:
        """The cheapest of ``dims`` (or 0 = exhaustive) for queries like these, by a measured cost model."""
        m, d_full = self.bank_.shape
        n = max(1, min(_CALIBRATION_QUERIES, queries.shape[0], _CALIBRATION_CELLS // m))
        sample = queries[torch.linspace(0, queries.shape[0] - 1, n).long()].float()
        usable = [dim for dim in self.dims if dim < d_full - 1]
        wide = min(self.candidates * _WIDER_FACTOR, m - 1)
        exact_sq = _squared_distances(sample, self.bank_)  # (n, M)
        rotated_sample = (sample - self.mean_) @ self.rotation_
        tail_sample = rotated_sample.square().flip(1).cumsum(1).flip(1)  # [:, j]: squared norm from direction j on
        sample_coords = [
            torch.cat([rotated_sample[:, :dim], tail_sample[:, dim : dim + 1].sqrt()], dim=1) for dim in usable
        ]
        # Each dim's wide + 1 smallest bounds per query, merged block by block over the bank: the bank is
        # rotated a block at a time and no (M x dim) array is ever held (that would be a copy of the bank).
        best_sq = [torch.full((n, 0), math.inf) for _ in usable]
        best_rows = [torch.zeros((n, 0), dtype=torch.int64) for _ in usable]
        rows_per_block = max(1, _CHOOSE_BLOCK_CELLS // d_full)
        for start in range(0, m, rows_per_block):
            rotated = (self.bank_[start : start + rows_per_block] - self.mean_) @ self.rotation_
            tail = rotated.square().flip(1).cumsum(1).flip(1)
            ids = torch.arange(start, start + rotated.shape[0]).expand(n, -1)
            for j, dim in enumerate(usable):
                coords = torch.cat([rotated[:, :dim], tail[:, dim : dim + 1].sqrt()], dim=1)
                bound = torch.cdist(sample_coords[j], coords).square()  # (n, block)
                merged_sq = torch.cat([best_sq[j], bound], dim=1)
                merged_rows = torch.cat([best_rows[j], ids], dim=1)
                keep = min(wide + 1, merged_sq.shape[1])
                best_sq[j], where = merged_sq.topk(keep, dim=1, largest=False, sorted=True)
                best_rows[j] = merged_rows.gather(1, where)
        best_dim, best_cost = 0, float(d_full * m)  # the exhaustive search
        for j, dim in enumerate(usable):
            bound_sq, rows = best_sq[j], best_rows[j]
            candidate_sq = exact_sq.gather(1, rows)
            first = candidate_sq[:, : self.candidates].min(1).values > bound_sq[:, self.candidates]
            second = candidate_sq[:, :wide].min(1).values > bound_sq[:, wide]
            # Per query, in units of one exhaustive-search multiply-add: a bound pass over the bank, the
            # projection, and the gathers of each pass's candidates; then the full search where needed.
            bound_pass = (dim + 1 + _SELECTION_COST) * m
            cost = (
                bound_pass
                + 2 * dim * d_full
                + _GATHER_COST * self.candidates * d_full
                + first.float().mean().item() * (bound_pass + _GATHER_COST * wide * d_full)
                + second.float().mean().item() * d_full * m
            )
            if cost < best_cost:
                best_dim, best_cost = dim, cost
        return best_dim

    def _bound_coordinates(self, rows: torch.Tensor) -> torch.Tensor:
        """``(n, D)`` -> ``(n, dim + 1)``: coordinates in the basis, then the norm of the residual."""
        out = torch.empty(rows.shape[0], self.dim_ + 1)
        for start in range(0, rows.shape[0], _QUERY_BLOCK):
            centred = rows[start : start + _QUERY_BLOCK] - self.mean_
            projected = centred @ self.basis_
            # The residual is formed explicitly: subtracting squared norms would cancel badly.
            residual = (centred - projected @ self.basis_.T).norm(dim=1, keepdim=True)
            out[start : start + _QUERY_BLOCK] = torch.cat([projected, residual], dim=1)
        return out.contiguous()

    def search(self, queries: torch.Tensor) -> NeighbourMatch:
        """Nearest bank row of each ``(Q, D)`` query; distances are plain L2, computed directly."""
        if not hasattr(self, "bank_"):
            raise RuntimeError("BoundedSearch is not fitted: call fit(bank) first")
        queries = queries.detach().cpu().float()
        if self.dim_ is None:
            self._use_dim(self._choose_dim(queries))
        if self.dim_ == 0:
            return self.exhaustive_.search(queries)
        distances = torch.empty(queries.shape[0])
        indices = torch.empty(queries.shape[0], dtype=torch.int64)
        pending = torch.arange(queries.shape[0])
        # Most queries are proven with a few candidates; the rest get many more, then the full search.
        for candidates in (self.candidates, self.candidates * _WIDER_FACTOR):
            if pending.numel() == 0 or candidates >= self.bank_.shape[0]:
                break
            proven = torch.zeros(pending.numel(), dtype=torch.bool)
            for start in range(0, pending.numel(), _QUERY_BLOCK):
                which = pending[start : start + _QUERY_BLOCK]
                d, i, ok = self._search_block(queries[which], candidates)
                distances[which], indices[which], proven[start : start + which.numel()] = d, i, ok
            pending = pending[~proven]
        self.fallback_fraction_ = pending.numel() / max(1, queries.shape[0])
        if pending.numel():
            match = exhaustive_search_torch(self.bank_, queries[pending], torch.device("cpu"))
            distances[pending] = match.distance
            indices[pending] = match.index
        return NeighbourMatch(distances, indices)

    def _search_block(self, block: torch.Tensor, candidates: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Best of ``candidates`` rows per query: distance, row, and whether the bound proves it nearest."""
        import faiss

        block = block.contiguous()
        bound_q = self._bound_coordinates(block)
        bound_sq, rows_np = faiss.knn(bound_q.numpy(), self.bound_rows_.numpy(), candidates + 1)
        rows = torch.from_numpy(rows_np[:, :candidates].astype(np.int64))
        best_sq = torch.empty(block.shape[0])
        best_row = torch.empty(block.shape[0], dtype=torch.int64)
        # Small sub-blocks keep the gathered bank rows in cache: about 3x faster than one large gather.
        for start in range(0, block.shape[0], _RERANK_BLOCK):
            part = slice(start, start + _RERANK_BLOCK)
            q, r = block[part], rows[part]
            exact_sq = torch.stack([(q - self.bank_[r[:, j]]).square().sum(1) for j in range(candidates)], dim=1)
            best_sq[part], where = exact_sq.min(dim=1)
            best_row[part] = r.gather(1, where.unsqueeze(1)).squeeze(1)
        slack = _ROUNDING_SLACK * (bound_q.square().sum(1) + self.max_bound_norm_sq_)
        proven = best_sq <= torch.from_numpy(bound_sq[:, candidates]) - slack
        return best_sq.sqrt(), best_row, proven


# A found row counts as the nearest when it is no farther than the exact nearest, up to float rounding.
_RECALL_TOLERANCE = 1e-5
# Queries of the first search on which an IVF index without held-out patches measures its recall.
_RECALL_QUERIES = 1024


def recall_at_1(found: torch.Tensor, exact: torch.Tensor) -> float:
    """Share of queries whose ``found`` ``(Q,)`` distance equals the ``exact`` nearest distance (ties count as found)."""
    if exact.numel() == 0:
        return 1.0
    hit = found <= exact * (1.0 + _RECALL_TOLERANCE) + _RECALL_TOLERANCE
    return float(hit.double().mean())


class IVFSearch:
    """Approximate nearest-neighbour search for banks of millions of rows (faiss ``IndexIVFFlat``).

    The bank is clustered into ``lists`` cells by k-means on a seeded sample of ``lists x train_per_list``
    rows; a query is compared with the rows of its ``probes`` nearest cells only. The answer may miss the
    true nearest row, and then the distance is larger (the score too): ``recall_`` is the measured share
    of queries that get the exact nearest distance (recall@1), on ``calibration`` held-out patches at fit,
    or else on a sample of the first search's queries. Every result carries it.
    Memory: the index holds a copy of the bank.
    """

    def __init__(self, probes: int, *, lists: int | None = None, train_per_list: int = 40, seed: int = 0) -> None:
        self.probes = probes
        self.lists = lists
        self.train_per_list = train_per_list
        self.seed = seed

    def fit(self, bank: torch.Tensor, *, calibration: torch.Tensor | None = None) -> IVFSearch:
        """Index ``bank`` ``(M, D)`` float32; measure the recall on ``calibration`` ``(n, D)`` when given."""
        import faiss

        bank = bank.detach().cpu().float().contiguous()
        m, d = bank.shape
        lists = self.lists or max(1, round(math.sqrt(m)))
        if not 1 <= lists <= m:
            raise ValueError(f"an IVF index of {m} rows needs 1 to {m} lists, got {lists}")
        self.bank_ = bank
        self.lists_ = lists
        train_rows = min(m, lists * self.train_per_list)
        sample = np.sort(np.random.default_rng(self.seed).choice(m, size=train_rows, replace=False))
        quantizer = faiss.IndexFlatL2(d)
        index = faiss.IndexIVFFlat(quantizer, d, lists, faiss.METRIC_L2)
        index.cp.seed = self.seed
        index.train(np.ascontiguousarray(bank[torch.from_numpy(sample)].numpy()))
        index.add(bank.numpy())
        index.nprobe = min(self.probes, lists)
        self.quantizer_, self.index_ = quantizer, index  # the index refers to its quantizer: keep both
        self.recall_: float | None = None
        self.recall_queries_ = 0
        if calibration is not None and calibration.shape[0] > 0:
            self._measure_recall(calibration.detach().cpu().float())
        return self

    def _measure_recall(self, queries: torch.Tensor) -> None:
        found = self._search_ivf(queries)
        exact = exhaustive_search_torch(self.bank_, queries, torch.device("cpu"))
        self.recall_ = recall_at_1(found.distance, exact.distance)
        self.recall_queries_ = queries.shape[0]

    def _search_ivf(self, queries: torch.Tensor) -> NeighbourMatch:
        _, index = self.index_.search(np.ascontiguousarray(queries.numpy()), 1)
        rows = torch.from_numpy(index[:, 0].astype(np.int64))
        # faiss answers -1 where the probed cells hold no row: the first row stands in, measured like any other.
        rows[rows < 0] = 0
        distance = torch.empty(queries.shape[0])
        for start in range(0, queries.shape[0], _QUERY_BLOCK):
            part = slice(start, start + _QUERY_BLOCK)
            distance[part] = (queries[part] - self.bank_[rows[part]]).norm(dim=1)
        return NeighbourMatch(distance, rows)

    def search(self, queries: torch.Tensor) -> NeighbourMatch:
        """Approximate nearest bank row of each ``(Q, D)`` query, plain L2 distances, with ``recall_``."""
        if not hasattr(self, "index_"):
            raise RuntimeError("IVFSearch is not fitted: call fit(bank) first")
        queries = queries.detach().cpu().float()
        if self.recall_ is None and queries.shape[0] > 0:
            n = min(_RECALL_QUERIES, queries.shape[0])
            self._measure_recall(queries[torch.linspace(0, queries.shape[0] - 1, n).long()])
        match = self._search_ivf(queries)
        return NeighbourMatch(match.distance, match.index, recall=self.recall_)
