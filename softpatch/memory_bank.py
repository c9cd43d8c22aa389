"""The memory bank of nominal patches with their soft weights, and nearest-neighbour search over it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Queries per search call: bounds the (queries x bank) distance block on CUDA.
_CUDA_QUERY_CHUNK = 8192


@dataclass(frozen=True)
class NeighbourMatch:
    """The nearest memory-bank patch m* of each query patch (eq. 7)."""

    distance: torch.Tensor  # (Q,) plain L2 distance ||p - m*||, never squared
    index: torch.Tensor  # (Q,) row of m* in the bank


@dataclass
class MemoryBank:
    """The coreset of kept training patches.

    ``features`` ``(M, D)`` float32; ``weights`` ``(M,)`` soft weights (1 where soft weighting is off);
    ``provenance`` ``(M, 3)`` int64: source training image, row and column on the patch grid.
    """

    features: torch.Tensor
    weights: torch.Tensor
    provenance: np.ndarray
    _faiss_index: object | None = None
    _projected: tuple[torch.Tensor, object] | None = None  # (projection matrix, faiss index of projected rows)

    def __post_init__(self) -> None:
        m = self.features.shape[0]
        if self.features.ndim != 2 or self.weights.shape != (m,) or self.provenance.shape != (m, 3):
            raise ValueError(
                f"inconsistent memory bank: features {tuple(self.features.shape)}, "
                f"weights {tuple(self.weights.shape)}, provenance {self.provenance.shape}"
            )

    def __len__(self) -> int:
        return self.features.shape[0]

    def search(
        self,
        queries: torch.Tensor,
        device: torch.device,
        *,
        candidates: int = 0,
        projection: torch.Tensor | None = None,
    ) -> NeighbourMatch:
        """Nearest bank row of each ``(Q, D)`` query: faiss (exact) on CPU, chunked torch on CUDA.

        With ``candidates`` > 0 and a ``projection`` ``(D, d)`` (CPU only), the ``candidates`` nearest
        rows are first found in the projected space, then re-ranked by their exact distance: about
        D/d times less work, and the distance returned is always the exact one to the row chosen.
        """
        if len(self) == 0:
            raise ValueError("the memory bank is empty: every patch was removed (lower tau)")
        if device.type == "cuda":
            return self._search_torch(queries, device)
        if candidates > 0 and projection is not None and candidates < len(self):
            return self._search_reranked(queries, candidates, projection)
        return self._search_faiss(queries)

    def _search_reranked(self, queries: torch.Tensor, candidates: int, projection: torch.Tensor) -> NeighbourMatch:
        import faiss

        if self._projected is None or self._projected[0] is not projection:
            index = faiss.IndexFlatL2(projection.shape[1])
            index.add(np.ascontiguousarray((self.features @ projection).numpy(), dtype=np.float32))
            self._projected = (projection, index)
        q = queries.detach().cpu().float()
        _, nearest = self._projected[1].search(np.ascontiguousarray((q @ projection).numpy()), candidates)
        nearest = torch.from_numpy(nearest.astype(np.int64))  # (Q, k)
        exact = (self.features[nearest] - q.unsqueeze(1)).norm(dim=2)  # (Q, k) plain L2
        best = exact.argmin(dim=1)
        rows = torch.arange(q.shape[0])
        return NeighbourMatch(exact[rows, best], nearest[rows, best])

    def _search_faiss(self, queries: torch.Tensor) -> NeighbourMatch:
        import faiss

        if self._faiss_index is None:
            index = faiss.IndexFlatL2(self.features.shape[1])
            index.add(np.ascontiguousarray(self.features.cpu().numpy(), dtype=np.float32))
            self._faiss_index = index
        q = np.ascontiguousarray(queries.detach().cpu().numpy(), dtype=np.float32)
        squared, index = self._faiss_index.search(q, 1)
        distance = torch.from_numpy(np.sqrt(np.maximum(squared[:, 0], 0.0)))
        return NeighbourMatch(distance, torch.from_numpy(index[:, 0].astype(np.int64)))

    def _search_torch(self, queries: torch.Tensor, device: torch.device) -> NeighbourMatch:
        bank = self.features.to(device)
        bank_sq = bank.square().sum(1)
        distances, indices = [], []
        for start in range(0, queries.shape[0], _CUDA_QUERY_CHUNK):
            q = queries[start : start + _CUDA_QUERY_CHUNK].to(device).float()
            squared = q.square().sum(1, keepdim=True) + bank_sq.unsqueeze(0) - 2.0 * (q @ bank.T)
            _best, where = squared.min(dim=1)
            # Recompute the winner's distance directly: the expanded form loses precision near zero.
            exact = (q - bank[where]).norm(dim=1)
            distances.append(exact.cpu())
            indices.append(where.cpu())
        return NeighbourMatch(torch.cat(distances), torch.cat(indices))
