"""The memory bank: consistency checks and which exact search it runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from softpatch.method import memory_bank as memory_bank_module
from softpatch.method.memory_bank import MemoryBank
from softpatch.method.search import BoundedSearch, ExhaustiveSearch, IVFSearch

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


def test_ivf_below_its_size_is_the_exact_search_and_reports_no_recall() -> None:
    bank = _bank(300, 16, seed=8)
    queries = _queries(40, 16, seed=9)
    match = bank.search(queries, CPU, method="ivf")
    distance, index = _brute_force(bank, queries)
    np.testing.assert_array_equal(match.index.numpy(), index)
    np.testing.assert_allclose(match.distance.numpy(), distance, rtol=1e-4, atol=1e-4)
    assert match.recall is None and bank.search_recall(CPU, "ivf") is None
    assert not any(isinstance(i, IVFSearch) for i in bank._indexes.values())


def test_ivf_on_a_large_bank_reports_the_recall_measured_on_held_out_patches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory_bank_module, "_IVF_MIN_ROWS", 1000)
    monkeypatch.setattr(memory_bank_module, "_IVF_PROBES", 2)
    bank = _bank(3000, 16, seed=10)
    held_out = _queries(200, 16, seed=11)
    index = bank.prepare_search(CPU, "ivf", calibration=held_out)
    assert isinstance(index, IVFSearch) and index.recall_queries_ == 200
    found = bank.search(held_out, CPU, method="ivf")
    truth, _ = _brute_force(bank, held_out)
    assert found.recall == bank.search_recall(CPU, "ivf") == index.recall_
    assert index.recall_ == pytest.approx(float(np.mean(found.distance.numpy() <= truth * (1 + 1e-5) + 1e-5)))
    assert index.recall_ < 1.0, "2 probes of isotropic data miss some nearest rows, and say so"
    exact = bank.search(held_out, CPU, method="bounded")
    assert exact.recall is None and bank.search_recall(CPU, "bounded") is None


def test_the_model_reports_the_recall_of_an_approximate_search(
    monkeypatch: pytest.MonkeyPatch, fitted, eval_embeddings
) -> None:
    exact = fitted.score(eval_embeddings, with_maps=False)
    assert exact.search_recall is None, "the default search is exact"
    monkeypatch.setattr(memory_bank_module, "_IVF_MIN_ROWS", 10)
    monkeypatch.setattr(memory_bank_module, "_IVF_PROBES", 1)
    model = fitted.variant(search="ivf")
    messages: list[str] = []
    approximate = model.score(eval_embeddings, with_maps=False, progress=lambda f, m: messages.append(m))
    bank = model.memory_bank_
    assert approximate.search_recall is not None
    assert approximate.search_recall == bank.search_recall(model.device_, "ivf")
    assert any(m == f"scoring: approximate search, measured recall@1 {approximate.search_recall:.3f}" for m in messages)
    # Plain distances (no soft weights, which differ between rows): a missed neighbour only raises a score.
    plain = fitted.variant(soft_weight=False).score(eval_embeddings, with_maps=False).patch_scores
    plain_approximate = model.variant(soft_weight=False).score(eval_embeddings, with_maps=False).patch_scores
    assert np.all(plain_approximate >= plain - 1e-5) and np.any(plain_approximate > plain + 1e-5)
