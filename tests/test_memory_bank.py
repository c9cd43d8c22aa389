"""Memory-bank nearest-neighbour search: faiss and the torch path against brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from softpatch import memory_bank as memory_bank_module
from softpatch.memory_bank import MemoryBank

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


@pytest.mark.parametrize(("m", "d", "q"), [(50, 8, 30), (300, 64, 500), (1, 4, 5)])
def test_faiss_search_equals_brute_force(m: int, d: int, q: int) -> None:
    bank = _bank(m, d, seed=m)
    queries = _queries(q, d, seed=q)
    match = bank.search(queries, CPU)
    distance, index = _brute_force(bank, queries)
    np.testing.assert_array_equal(match.index.numpy(), index)
    np.testing.assert_allclose(match.distance.numpy(), distance, rtol=1e-4, atol=1e-4)
    assert match.distance.shape == (q,) and match.index.dtype == torch.int64


def test_distances_are_not_squared() -> None:
    bank = MemoryBank(torch.zeros(1, 3), torch.ones(1), np.zeros((1, 3), dtype=np.int64))
    match = bank.search(torch.tensor([[3.0, 4.0, 0.0]]), CPU)
    assert match.distance.item() == pytest.approx(5.0)


def test_torch_path_on_cpu_equals_faiss() -> None:
    bank = _bank(400, 32, seed=1)
    queries = _queries(700, 32, seed=2)
    via_faiss = bank.search(queries, CPU)
    via_torch = bank._search_torch(queries, CPU)
    np.testing.assert_array_equal(via_torch.index.numpy(), via_faiss.index.numpy())
    np.testing.assert_allclose(via_torch.distance.numpy(), via_faiss.distance.numpy(), rtol=1e-4, atol=1e-4)


def test_torch_path_chunks_queries(monkeypatch: pytest.MonkeyPatch) -> None:
    bank = _bank(60, 8, seed=3)
    queries = _queries(100, 8, seed=4)
    whole = bank._search_torch(queries, CPU)
    monkeypatch.setattr(memory_bank_module, "_CUDA_QUERY_CHUNK", 7)
    chunked = bank._search_torch(queries, CPU)
    assert torch.equal(whole.index, chunked.index) and torch.allclose(whole.distance, chunked.distance)


def test_torch_path_distance_of_an_exact_match_is_zero() -> None:
    bank = _bank(40, 16, seed=5)
    bank.features.mul_(100.0)  # large norms: the expanded |q|^2+|m|^2-2qm form would not give 0 here
    match = bank._search_torch(bank.features[[3, 17]].clone(), CPU)
    assert match.index.tolist() == [3, 17]
    assert match.distance.tolist() == [0.0, 0.0]


def test_faiss_index_is_built_once_and_reused() -> None:
    bank = _bank(30, 4, seed=6)
    first = bank.search(_queries(3, 4, seed=7), CPU)
    index = bank._faiss_index
    assert index is not None
    second = bank.search(_queries(3, 4, seed=7), CPU)
    assert bank._faiss_index is index and torch.equal(first.index, second.index)


def test_empty_bank_is_an_error() -> None:
    bank = MemoryBank(torch.zeros(0, 4), torch.zeros(0), np.zeros((0, 3), dtype=np.int64))
    assert len(bank) == 0
    with pytest.raises(ValueError, match="empty"):
        bank.search(_queries(2, 4, seed=0), CPU)


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


def test_reranked_search_returns_the_exact_distance_of_the_row_it_chose() -> None:
    from softpatch.sampler import projection_matrix

    rng = np.random.default_rng(7)
    rows = rng.normal(size=(500, 64)).astype(np.float32)
    bank = MemoryBank(torch.from_numpy(rows), torch.ones(500), np.zeros((500, 3), np.int64))
    # Test patches lie near some nominal patch (isotropic noise would make every distance alike).
    near = rows[rng.integers(500, size=200)] + 0.3 * rng.normal(size=(200, 64)).astype(np.float32)
    queries = torch.from_numpy(near)
    exact = bank.search(queries, torch.device("cpu"))
    approx = bank.search(queries, torch.device("cpu"), candidates=32, projection=projection_matrix(64, 16, 0))
    direct = (bank.features[approx.index] - queries).norm(dim=1)
    torch.testing.assert_close(approx.distance, direct, rtol=1e-5, atol=1e-5)
    assert torch.all(approx.distance >= exact.distance - 1e-4), "never closer than the true nearest row"
    assert (approx.index == exact.index).float().mean() > 0.9, "32 projected candidates almost always hold the winner"


def test_reranked_search_with_every_row_as_candidate_is_exact() -> None:
    from softpatch.sampler import projection_matrix

    rng = np.random.default_rng(8)
    bank = MemoryBank(
        torch.from_numpy(rng.normal(size=(40, 16)).astype(np.float32)), torch.ones(40), np.zeros((40, 3), np.int64)
    )
    queries = torch.from_numpy(rng.normal(size=(30, 16)).astype(np.float32))
    exact = bank.search(queries, torch.device("cpu"))
    approx = bank.search(queries, torch.device("cpu"), candidates=39, projection=projection_matrix(16, 4, 1))
    # 39 of 40 rows: only the projected-farthest row is excluded, which is never the nearest here.
    assert torch.equal(approx.index, exact.index)
