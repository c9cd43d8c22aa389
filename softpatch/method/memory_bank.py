"""The memory bank of nominal patches with their soft weights, and the nearest-neighbour search over it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from softpatch.config import SEARCH_METHODS
from softpatch.method.coreset import CoresetPlan
from softpatch.method.search import BoundedSearch, ExhaustiveSearch, IVFSearch, NeighbourMatch, exhaustive_search_torch

__all__ = ["MemoryBank", "NeighbourMatch"]

SearchIndex = ExhaustiveSearch | BoundedSearch | IVFSearch

# Bounded search settings. The number of principal directions is picked per bank from these on the
# first search (random-init wide_resnet50_2 features: 64; real MobileNet features: 256); with 8
# candidates and a wider second pass, almost no query is left to the full search.
_BOUND_DIMS = (32, 64, 128, 256, 384)
_BOUND_CANDIDATES = 8
# Below this many rows a full search is cheap and the bound's set-up would not pay for itself.
_BOUNDED_MIN_ROWS = 4096
# The approximate IVF search is used from this many rows on (below, "ivf" runs the exact bounded search),
# probing this many of its sqrt(rows) cells: about 3% of a million-row bank per query.
_IVF_MIN_ROWS = 262_144
_IVF_PROBES = 32


# Bytes of transient work while a search is set up and run beside the bank, whatever its size: blocks of
# the bank being gathered from a store and rotated, the calibration sample's distances, one block of the
# full search (softpatch.method.search bounds each of these by a fixed number of cells).
_SEARCH_WORK_BYTES = 512 * 1024**2


def search_memory_bytes(rows: int, dim: int, method: str) -> int:
    """Host memory a CPU search over a bank of ``rows`` x ``dim`` takes beside the bank itself (an upper bound).

    "bounded": its bound coordinates (at most the widest of ``_BOUND_DIMS`` + 1 per row); "exhaustive": none,
    faiss reads the bank where it is; "ivf": its index holds a copy of the bank. Plus ``_SEARCH_WORK_BYTES``.
    """
    index_bytes = {
        "bounded": rows * (min(max(_BOUND_DIMS), dim) + 1) * 4,
        "exhaustive": 0,
        "ivf": rows * dim * 4,
    }[search_run(rows, method)]
    return index_bytes + _SEARCH_WORK_BYTES


def search_run(rows: int, method: str) -> str:
    """The search that the ``search`` setting ``method`` runs on a CPU bank of ``rows``: "ivf" is exact (bounded)
    below ``_IVF_MIN_ROWS``, and "bounded" exhaustive below ``_BOUNDED_MIN_ROWS``."""
    if method not in SEARCH_METHODS:
        raise ValueError(f"unknown search method {method!r}; choose one of {', '.join(SEARCH_METHODS)}")
    if method == "ivf" and rows < _IVF_MIN_ROWS:
        method = "bounded"
    if method == "bounded" and rows < _BOUNDED_MIN_ROWS:
        method = "exhaustive"
    return method


@dataclass
class MemoryBank:
    """The coreset of kept training patches.

    ``features`` ``(M, D)`` float32; ``weights`` ``(M,)`` soft weights (1 where soft weighting is off);
    ``provenance`` ``(M, 3)`` int64: source training image, row and column on the patch grid.
    ``coreset_plan``: how the rows were chosen (None when not known, e.g. a bank from a bundle).
    """

    features: torch.Tensor
    weights: torch.Tensor
    provenance: np.ndarray
    coreset_plan: CoresetPlan | None = None
    _indexes: dict[str, SearchIndex] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        m = self.features.shape[0]
        if self.features.ndim != 2 or self.weights.shape != (m,) or self.provenance.shape != (m, 3):
            raise ValueError(
                f"inconsistent memory bank: features {tuple(self.features.shape)}, "
                f"weights {tuple(self.weights.shape)}, provenance {self.provenance.shape}"
            )

    def __len__(self) -> int:
        return self.features.shape[0]

    @property
    def capped_from(self) -> int | None:
        """The number of rows the coreset ratio asked for when the memory budget cut the bank; else None."""
        plan = self.coreset_plan
        return plan.requested_rows if plan is not None and plan.capped else None

    def search_recall(self, device: torch.device, method: str) -> float | None:
        """The measured recall@1 of the search ``search`` runs for ``method`` on ``device``; None when it is exact
        (or not measured yet: an IVF index without held-out patches measures it on its first search)."""
        index = self.prepare_search(device, method)
        return index.recall_ if isinstance(index, IVFSearch) else None

    def search(self, queries: torch.Tensor, device: torch.device, *, method: str) -> NeighbourMatch:
        """Nearest bank row of each ``(Q, D)`` query.

        On CUDA: blocked torch matrix products, exact. On CPU, ``method`` "bounded" prunes with a lower bound
        (``softpatch.method.search.BoundedSearch``, several times faster on large banks) and "exhaustive"
        compares every pair (faiss), both exact; "ivf" is approximate from ``_IVF_MIN_ROWS`` rows on
        (``IVFSearch``; its result's ``recall`` says how often it finds the nearest row) and the bounded
        search below. The index is built on first use and kept with the bank.
        """
        if len(self) == 0:
            raise ValueError("the memory bank is empty: every patch was removed (lower tau)")
        index = self.prepare_search(device, method)
        if index is None:
            return exhaustive_search_torch(self.features, queries, device)
        return index.search(queries)

    def prepare_search(
        self, device: torch.device, method: str, calibration: torch.Tensor | None = None
    ) -> SearchIndex | None:
        """Build (once) and return the CPU index that ``search`` will use; None on CUDA, which needs none.

        ``calibration`` ``(n, D)``: held-out patches like future queries, on which the bounded search tunes
        itself and the IVF search measures its recall now rather than on the first search.
        """
        method = search_run(len(self), method)
        if device.type == "cuda" or len(self) == 0:
            return None
        index = self._indexes.get(method)
        if index is None:
            if method == "ivf":
                index = IVFSearch(_IVF_PROBES).fit(self.features, calibration=calibration)
            elif method == "bounded":
                index = BoundedSearch(_BOUND_CANDIDATES, _BOUND_DIMS).fit(self.features, calibration=calibration)
            else:
                index = ExhaustiveSearch().fit(self.features)
            self._indexes[method] = index
        return index
