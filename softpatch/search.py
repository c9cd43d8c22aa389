"""Nearest-neighbour search over the memory bank: exhaustive (faiss on CPU, torch on CUDA) and bounded.

The bounded search is exact too. It is what makes CPU scoring fast: most bank rows are ruled out by a
cheap lower bound on their distance, and only a handful per query are compared in full dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Queries per block: bounds the (queries x bank) distance block of the torch search and the
# (queries x D) gathers of the re-ranking to a few hundred MB.
_QUERY_BLOCK = 4096
_RERANK_BLOCK = 256
# Queries the bound leaves unproven are retried with this many times more candidates before the full search.
_WIDER_FACTOR = 8
# Rows used to estimate the principal directions; any orthonormal basis keeps the search exact,
# so a subsample only costs pruning power, never correctness.
_PCA_ROWS = 50_000
# Relative slack on the bound test for float32 rounding in faiss's expanded-form distances.
_ROUNDING_SLACK = 1e-5


@dataclass(frozen=True)
class NeighbourMatch:
    """The nearest memory-bank patch m* of each query patch (eq. 7)."""

    distance: torch.Tensor  # (Q,) plain L2 distance ||p - m*||, never squared
    index: torch.Tensor  # (Q,) row of m* in the bank


def exhaustive_search_torch(bank: torch.Tensor, queries: torch.Tensor, device: torch.device) -> NeighbourMatch:
    """Exact nearest row of ``bank`` ``(M, D)`` for each ``(Q, D)`` query, by blocked matrix products."""
    bank = bank.to(device)
    bank_sq = bank.square().sum(1)
    distances, indices = [], []
    for start in range(0, queries.shape[0], _QUERY_BLOCK):
        q = queries[start : start + _QUERY_BLOCK].to(device).float()
        squared = q.square().sum(1, keepdim=True) + bank_sq.unsqueeze(0) - 2.0 * (q @ bank.T)
        where = squared.argmin(dim=1)
        # Recompute the winner's distance directly: the expanded form loses precision near zero.
        distances.append((q - bank[where]).norm(dim=1).cpu())
        indices.append(where.cpu())
    return NeighbourMatch(torch.cat(distances), torch.cat(indices))


class ExhaustiveSearch:
    """Exact nearest-neighbour search that compares every query with every bank row (faiss, CPU)."""

    def fit(self, bank: torch.Tensor) -> ExhaustiveSearch:
        """Index ``bank`` ``(M, D)`` float32."""
        import faiss

        index = faiss.IndexFlatL2(bank.shape[1])
        index.add(np.ascontiguousarray(bank.detach().cpu().numpy(), dtype=np.float32))
        self.index_ = index
        return self

    def search(self, queries: torch.Tensor) -> NeighbourMatch:
        """Nearest bank row of each ``(Q, D)`` query; distances are plain L2."""
        query = np.ascontiguousarray(queries.detach().cpu().numpy(), dtype=np.float32)
        squared, index = self.index_.search(query, 1)
        distance = torch.from_numpy(np.sqrt(np.maximum(squared[:, 0], 0.0)))
        return NeighbourMatch(distance, torch.from_numpy(index[:, 0].astype(np.int64)))


class BoundedSearch:
    """Exact nearest-neighbour search, pruned by a lower bound computed in a few principal directions.

    For an orthonormal ``(D, dim)`` basis ``P`` of the bank's top principal directions, with ``r(v)``
    the part of ``v`` off that subspace,

        ||q - x||^2 = ||P'(q - x)||^2 + ||r(q) - r(x)||^2 >= ||P'(q - x)||^2 + (||r(q)|| - ||r(x)||)^2.

    Appending ``||r(v)||`` to the projection as one more coordinate makes that bound a plain L2
    distance in ``dim + 1`` dimensions, which faiss searches at a fraction of the full cost. The
    ``candidates`` rows with the smallest bound are then compared in full; when the best of them is
    no farther than the next-smallest bound, no other row can be nearer, so the answer is exact.
    The few queries where that test fails are searched exhaustively. Result: the exhaustive search's
    answer (up to ties and float rounding), at about ``dim / D`` of its arithmetic on real features.
    """

    def __init__(self, dim: int, candidates: int) -> None:
        self.dim = dim
        self.candidates = candidates

    def fit(self, bank: torch.Tensor) -> BoundedSearch:
        """Index ``bank`` ``(M, D)`` float32: principal directions, bound coordinates, faiss index."""
        import faiss

        if bank.ndim != 2 or bank.shape[0] <= self.candidates or bank.shape[1] <= self.dim + 1:
            raise ValueError(
                f"bounded search needs more than {self.candidates} rows and more than {self.dim + 1} "
                f"dimensions, got a bank of shape {tuple(bank.shape)}"
            )
        bank = bank.detach().cpu().float().contiguous()
        self.mean_ = bank.mean(dim=0)
        sample = bank[:: max(1, bank.shape[0] // _PCA_ROWS)] - self.mean_
        # eigh of the covariance is deterministic (unlike randomised SVD): the same bank, the same basis.
        _, vectors = torch.linalg.eigh((sample.T @ sample).double())
        self.basis_ = vectors[:, -self.dim :].float().contiguous()  # (D, dim) orthonormal
        self.bank_ = bank
        self.exhaustive_ = None
        bound_rows = self._bound_coordinates(bank)
        self.max_bound_norm_sq_ = float(bound_rows.square().sum(1).max())
        index = faiss.IndexFlatL2(self.dim + 1)
        index.add(bound_rows.numpy())
        self.index_ = index
        return self

    def _bound_coordinates(self, rows: torch.Tensor) -> torch.Tensor:
        """``(n, D)`` -> ``(n, dim + 1)``: coordinates in the basis, then the norm of the residual."""
        out = torch.empty(rows.shape[0], self.dim + 1)
        for start in range(0, rows.shape[0], _QUERY_BLOCK):
            centred = rows[start : start + _QUERY_BLOCK] - self.mean_
            projected = centred @ self.basis_
            # The residual is formed explicitly: subtracting squared norms would cancel badly.
            residual = (centred - projected @ self.basis_.T).norm(dim=1, keepdim=True)
            out[start : start + _QUERY_BLOCK] = torch.cat([projected, residual], dim=1)
        return out.contiguous()

    def search(self, queries: torch.Tensor) -> NeighbourMatch:
        """Nearest bank row of each ``(Q, D)`` query; distances are plain L2, computed directly."""
        if not hasattr(self, "index_"):
            raise RuntimeError("BoundedSearch is not fitted: call fit(bank) first")
        queries = queries.detach().cpu().float()
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
        block = block.contiguous()
        bound_q = self._bound_coordinates(block)
        bound_sq, rows_np = self.index_.search(bound_q.numpy(), candidates + 1)
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
