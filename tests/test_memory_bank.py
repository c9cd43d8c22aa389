"""The memory bank: consistency checks and which exact search it runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from softpatch.method import memory_bank as memory_bank_module
from softpatch.method.memory_bank import MemoryBank
from softpatch.method.search import BoundedSearch, ExhaustiveSearch

CPU = torch.device("cpu")


def _bank(m: int, d: int, seed: int) -> MemoryBank:
    rng = np.random.default_rng(seed)
    features = torch.from_numpy(rng.normal(size=(m, d)).astype(np.float32))
    weights = torch.from_numpy(rng.uniform(0.5, 2.0, size=m).astype(np.float32))
    provenance = np.stack([np.arange(m) // 4, np.arange(m) % 4, np.zeros(m, dtype=np.int64)], axis=1)
    return MemoryBank(features, weights, provenance.astype(np.int64))


def _queries(q: int, d: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(q, d)).astype(np.float32))


def _brute_force(bank: MemoryBank, queries: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    dist = cdist(queries.double().numpy(), bank.features.double().numpy())
    return dist.min(axis=1), dist.argmin(axis=1)


@pytest.mark.parametrize("method", ["bounded", "exhaustive"])
@pytest.mark.parametrize(("m", "d", "q"), [(50, 8, 30), (300, 64, 500), (1, 4, 5)])
def test_search_equals_brute_force(m: int, d: int, q: int, method: str) -> None:
    bank = _bank(m, d, seed=m)
    queries = _queries(q, d, seed=q)
    match = bank.search(queries, CPU, method=method)
    distance, index = _brute_force(bank, queries)
    np.testing.assert_array_equal(match.index.numpy(), index)
    np.testing.assert_allclose(match.distance.numpy(), distance, rtol=1e-4, atol=1e-4)
    assert match.distance.shape == (q,) and match.index.dtype == torch.int64


def test_distances_are_not_squared() -> None:
    bank = MemoryBank(torch.zeros(1, 3), torch.ones(1), np.zeros((1, 3), dtype=np.int64))
    match = bank.search(torch.tensor([[3.0, 4.0, 0.0]]), CPU, method="exhaustive")
    assert match.distance.item() == pytest.approx(5.0)


def test_large_banks_use_the_bounded_search_and_small_ones_the_exhaustive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory_bank_module, "_BOUNDED_MIN_ROWS", 100)
    large, small = _bank(300, 32, seed=1), _bank(60, 32, seed=2)
    queries = _queries(50, 32, seed=3)
    bounded = large.search(queries, CPU, method="bounded")
    assert isinstance(large._indexes["bounded"], BoundedSearch)
    exhaustive = large.search(queries, CPU, method="exhaustive")
    assert isinstance(large._indexes["exhaustive"], ExhaustiveSearch)
    assert torch.equal(bounded.index, exhaustive.index)
    torch.testing.assert_close(bounded.distance, exhaustive.distance, rtol=1e-4, atol=1e-4)
    small.search(queries, CPU, method="bounded")
    assert set(small._indexes) == {"exhaustive"}, "a small bank is searched exhaustively whatever was asked"


def test_the_index_is_built_once_and_reused() -> None:
    bank = _bank(30, 4, seed=6)
    first = bank.search(_queries(3, 4, seed=7), CPU, method="exhaustive")
    index = bank._indexes["exhaustive"]
    second = bank.search(_queries(3, 4, seed=7), CPU, method="exhaustive")
    assert bank._indexes["exhaustive"] is index and torch.equal(first.index, second.index)


def test_unknown_search_method_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown search method 'annoy'"):
        _bank(10, 4, seed=0).search(_queries(2, 4, seed=0), CPU, method="annoy")


def test_empty_bank_is_an_error() -> None:
    bank = MemoryBank(torch.zeros(0, 4), torch.zeros(0), np.zeros((0, 3), dtype=np.int64))
    assert len(bank) == 0
    with pytest.raises(ValueError, match="empty"):
        bank.search(_queries(2, 4, seed=0), CPU, method="bounded")


@pytest.mark.parametrize(
    ("features", "weights", "provenance"),
    [
        (torch.zeros(5, 4), torch.ones(4), np.zeros((5, 3), dtype=np.int64)),
        (torch.zeros(5, 4), torch.ones(5), np.zeros((5, 2), dtype=np.int64)),
        (torch.zeros(5), torch.ones(5), np.zeros((5, 3), dtype=np.int64)),
    ],
    ids=["weights", "provenance", "features-1d"],
)
def test_inconsistent_parts_are_refused(features: torch.Tensor, weights: torch.Tensor, provenance: np.ndarray) -> None:
    with pytest.raises(ValueError, match="inconsistent"):
        MemoryBank(features, weights, provenance)
