"""The memory bank of nominal patches with their soft weights, and the nearest-neighbour search over it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from softpatch.config import SEARCH_METHODS
from softpatch.method.search import BoundedSearch, ExhaustiveSearch, NeighbourMatch, exhaustive_search_torch

__all__ = ["MemoryBank", "NeighbourMatch"]

# Bounded search settings. The number of principal directions is picked per bank from these on the
# first search (random-init wide_resnet50_2 features: 64; real MobileNet features: 256); with 8
# candidates and a wider second pass, almost no query is left to the full search.
_BOUND_DIMS = (32, 64, 128, 256, 384)
_BOUND_CANDIDATES = 8
# Below this many rows a full search is cheap and the bound's set-up would not pay for itself.
_BOUNDED_MIN_ROWS = 4096


@dataclass
class MemoryBank:
    """The coreset of kept training patches.

    ``features`` ``(M, D)`` float32; ``weights`` ``(M,)`` soft weights (1 where soft weighting is off);
    ``provenance`` ``(M, 3)`` int64: source training image, row and column on the patch grid.
    """

    features: torch.Tensor
    weights: torch.Tensor
    provenance: np.ndarray
    _indexes: dict[str, ExhaustiveSearch | BoundedSearch] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        m = self.features.shape[0]
        if self.features.ndim != 2 or self.weights.shape != (m,) or self.provenance.shape != (m, 3):
            raise ValueError(
                f"inconsistent memory bank: features {tuple(self.features.shape)}, "
                f"weights {tuple(self.weights.shape)}, provenance {self.provenance.shape}"
            )

    def __len__(self) -> int:
        return self.features.shape[0]

    def search(self, queries: torch.Tensor, device: torch.device, *, method: str) -> NeighbourMatch:
        """Nearest bank row of each ``(Q, D)`` query. Every method is exact.

        On CUDA: blocked torch matrix products. On CPU, ``method`` "bounded" prunes with a lower bound
        (``softpatch.method.search.BoundedSearch``, several times faster on large banks) and "exhaustive"
        compares every pair (faiss). The index is built on first use and kept with the bank.
        """
        if len(self) == 0:
            raise ValueError("the memory bank is empty: every patch was removed (lower tau)")
        index = self.prepare_search(device, method)
        if index is None:
            return exhaustive_search_torch(self.features, queries, device)
        return index.search(queries)

    def prepare_search(
        self, device: torch.device, method: str, calibration: torch.Tensor | None = None
    ) -> ExhaustiveSearch | BoundedSearch | None:
        """Build (once) and return the CPU index that ``search`` will use; None on CUDA, which needs none.

        ``calibration`` ``(n, D)``: patches like future queries, on which the bounded search tunes itself
        now rather than on the first search.
        """
        if method not in SEARCH_METHODS:
            raise ValueError(f"unknown search method {method!r}; choose one of {', '.join(SEARCH_METHODS)}")
        if device.type == "cuda" or len(self) == 0:
            return None
        if method == "bounded" and len(self) < _BOUNDED_MIN_ROWS:
            method = "exhaustive"
        index = self._indexes.get(method)
        if index is None:
            bounded = method == "bounded"
            if bounded:
                index = BoundedSearch(_BOUND_CANDIDATES, _BOUND_DIMS).fit(self.features, calibration=calibration)
            else:
                index = ExhaustiveSearch().fit(self.features)
            self._indexes[method] = index
        return index
