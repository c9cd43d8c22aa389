"""Nearest-neighbour search: the bounded search must return the exhaustive search's answer on any data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from softpatch.method import search as search_module
from softpatch.method.search import BoundedSearch, ExhaustiveSearch, IVFSearch, exhaustive_search_torch
from tests.conftest import reset_peak_rss, status_bytes

CPU = torch.device("cpu")


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def _structured(m: int, d: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows on a low-rank subspace plus small noise, like patch features; queries near some rows."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(rank, d)) * np.linspace(3.0, 0.3, rank)[:, None]
    rows = rng.normal(size=(m, rank)) @ basis + 0.05 * rng.normal(size=(m, d))
    queries = rows[rng.integers(m, size=400)] + 0.3 * rng.normal(size=(400, d))
    return _tensor(rows), _tensor(queries)


def _truth(bank: torch.Tensor, queries: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    dist = cdist(queries.double().numpy(), bank.double().numpy())
    return dist.min(axis=1), dist.argmin(axis=1)


def _assert_exact(match, bank: torch.Tensor, queries: torch.Tensor) -> None:
    distance, index = _truth(bank, queries)
    np.testing.assert_allclose(match.distance.numpy(), distance, rtol=1e-5, atol=1e-4)
    # Where rows tie, either is right: the chosen row must be as near as the true nearest.
    chosen = (bank[match.index].double() - queries.double()).norm(dim=1).numpy()
    np.testing.assert_allclose(chosen, distance, rtol=1e-5, atol=1e-4)
    assert (match.index.numpy() == index).mean() > 0.99


def test_bounded_search_is_exact_on_structured_features() -> None:
    bank, queries = _structured(3000, 128, rank=20, seed=0)
    search = BoundedSearch(4, (16,)).fit(bank, dim=16)
    match = search.search(queries)
    _assert_exact(match, bank, queries)
    assert match.distance.shape == (400,) and match.index.dtype == torch.int64
    assert search.fallback_fraction_ < 0.05, "on low-rank data the bound proves almost every answer"


def test_bounded_search_stays_exact_where_the_bound_is_weak() -> None:
    # Isotropic data: 8 of 128 directions say little about distances, so many queries need the
    # wider candidate pass or the full search. The answer must not change.
    rng = np.random.default_rng(1)
    bank, queries = _tensor(rng.normal(size=(2500, 128))), _tensor(rng.normal(size=(300, 128)))
    search = BoundedSearch(2, (8,)).fit(bank, dim=8)
    match = search.search(queries)
    _assert_exact(match, bank, queries)
    assert search.fallback_fraction_ > 0.1, "this case must exercise the exhaustive fallback"


def test_bound_coordinates_give_a_lower_bound_of_every_distance() -> None:
    bank, queries = _structured(800, 64, rank=10, seed=2)
    search = BoundedSearch(3, (6,)).fit(bank, dim=6)
    bound = torch.cdist(search._bound_coordinates(queries).double(), search._bound_coordinates(bank).double())
    true = torch.cdist(queries.double(), bank.double())
    assert torch.all(bound <= true + 1e-4)
    assert (bound / true.clamp_min(1e-9)).mean() > 0.5, "and a useful one on low-rank data"


def test_exact_duplicates_and_bank_rows_as_queries() -> None:
    bank, _ = _structured(1000, 64, rank=8, seed=3)
    bank[500:510] = bank[0]  # ten copies of row 0
    search = BoundedSearch(4, (8,)).fit(bank, dim=8)
    match = search.search(bank[[0, 3, 505, 999]].clone())
    assert match.distance.tolist() == [0.0, 0.0, 0.0, 0.0]
    assert match.index[1].item() == 3 and match.index[3].item() == 999
    assert match.index[0].item() in {0, *range(500, 510)} and match.index[2].item() in {0, *range(500, 510)}


def test_rank_deficient_bank_and_queries_off_its_subspace() -> None:
    rng = np.random.default_rng(4)
    bank = _tensor(np.hstack([rng.normal(size=(600, 5)), np.zeros((600, 59))]))  # spans 5 of 64 dimensions
    queries = _tensor(rng.normal(size=(200, 64)) * 3.0)  # mostly off that subspace
    match = BoundedSearch(4, (8,)).fit(bank, dim=8).search(queries)
    _assert_exact(match, bank, queries)


def test_far_away_queries_with_large_norms() -> None:
    bank, queries = _structured(1500, 64, rank=10, seed=5)
    queries = queries * 50.0 + 1000.0
    match = BoundedSearch(4, (8,)).fit(bank, dim=8).search(queries)
    _assert_exact(match, bank, queries)


def test_blocking_does_not_change_the_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    bank, queries = _structured(1200, 64, rank=10, seed=6)
    whole = BoundedSearch(4, (8,)).fit(bank, dim=8).search(queries)
    monkeypatch.setattr(search_module, "_QUERY_BLOCK", 37)
    monkeypatch.setattr(search_module, "_RERANK_BLOCK", 5)
    blocked = BoundedSearch(4, (8,)).fit(bank, dim=8).search(queries)
    assert torch.equal(whole.index, blocked.index)
    torch.testing.assert_close(whole.distance, blocked.distance)


def test_fitting_is_deterministic() -> None:
    bank, queries = _structured(900, 48, rank=6, seed=7)
    first, second = BoundedSearch(3, (6,)).fit(bank, dim=6), BoundedSearch(3, (6,)).fit(bank, dim=6)
    assert torch.equal(first.basis_, second.basis_)
    assert torch.equal(first.search(queries).index, second.search(queries).index)


def test_bounded_search_refuses_unusable_banks_and_use_before_fit() -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        BoundedSearch(2, (4,)).search(torch.zeros(3, 16))
    with pytest.raises(ValueError, match="more than 8 rows"):
        BoundedSearch(8, (4,)).fit(torch.zeros(8, 16))
    with pytest.raises(ValueError, match=r"dim must be in \[1, 7\]"):
        BoundedSearch(2, (8,)).fit(torch.zeros(50, 9), dim=8)


def test_torch_search_equals_faiss_and_chunks_queries(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(8)
    bank, queries = _tensor(rng.normal(size=(400, 32))), _tensor(rng.normal(size=(700, 32)))
    via_faiss = ExhaustiveSearch().fit(bank).search(queries)
    via_torch = exhaustive_search_torch(bank, queries, CPU)
    assert torch.equal(via_torch.index, via_faiss.index)
    torch.testing.assert_close(via_torch.distance, via_faiss.distance, rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(search_module, "_QUERY_BLOCK", 7)
    chunked = exhaustive_search_torch(bank, queries, CPU)
    assert torch.equal(chunked.index, via_torch.index) and torch.allclose(chunked.distance, via_torch.distance)


def test_torch_search_distance_of_an_exact_match_is_zero() -> None:
    bank = _tensor(np.random.default_rng(9).normal(size=(40, 16)) * 100.0)
    # Large norms: the expanded |q|^2 + |m|^2 - 2qm form alone would not give 0 here.
    match = exhaustive_search_torch(bank, bank[[3, 17]].clone(), CPU)
    assert match.index.tolist() == [3, 17] and match.distance.tolist() == [0.0, 0.0]


def test_the_first_search_picks_few_directions_for_low_rank_features() -> None:
    bank, queries = _structured(4000, 256, rank=12, seed=10)
    search = BoundedSearch(8, (16, 64, 128)).fit(bank)
    assert search.dim_ is None, "chosen on the first search, from its queries"
    match = search.search(queries)
    _assert_exact(match, bank, queries)
    assert search.dim_ == 16, "12 strong directions: the fewest directions already prove almost every answer"


def test_the_first_search_falls_back_to_exhaustive_where_no_bound_helps() -> None:
    # Isotropic 256-d noise: no handful of directions bounds distances usefully.
    rng = np.random.default_rng(11)
    bank, queries = _tensor(rng.normal(size=(3000, 256))), _tensor(rng.normal(size=(300, 256)))
    search = BoundedSearch(8, (16, 32)).fit(bank)
    match = search.search(queries)
    assert search.dim_ == 0 and isinstance(search.exhaustive_, ExhaustiveSearch)
    _assert_exact(match, bank, queries)


def test_dims_that_do_not_fit_the_features_are_skipped() -> None:
    bank, queries = _structured(600, 12, rank=4, seed=12)
    search = BoundedSearch(4, (32, 64)).fit(bank)  # 12-d rows: neither fits, so the full search runs
    _assert_exact(search.search(queries), bank, queries)
    assert search.dim_ == 0


# ---------------------------------------------------------------------------------------------- at scale
def test_query_blocks_shrink_with_the_bank_so_a_block_stays_bounded() -> None:
    assert search_module.query_block(1000) == search_module.query_block(16384) == 4096
    assert search_module.query_block(1_000_000) == 4096 * 16384 // 1_000_000
    assert search_module.query_block(10**12) == 1
    for rows in (65536, 1_000_000, 3_000_000):
        assert search_module.query_block(rows) * rows <= search_module._SEARCH_CELLS
    # Beside a bank at the default budget (2 GiB), one block of distances is at most 256 MiB.
    assert search_module._SEARCH_CELLS * 4 <= 256 * 1024**2


def test_torch_search_with_cell_bounded_blocks_gives_the_same_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(13)
    bank, queries = _tensor(rng.normal(size=(500, 16))), _tensor(rng.normal(size=(300, 16)))
    whole = exhaustive_search_torch(bank, queries, CPU)
    monkeypatch.setattr(search_module, "_SEARCH_CELLS", 500 * 3)  # 3 queries per block
    assert search_module.query_block(500) == 3
    blocked = exhaustive_search_torch(bank, queries, CPU)
    assert torch.equal(whole.index, blocked.index) and torch.equal(whole.distance, blocked.distance)
    assert whole.recall is None, "an exact search reports no recall"


def test_choosing_dims_in_row_blocks_picks_the_same_dim(monkeypatch: pytest.MonkeyPatch) -> None:
    bank, queries = _structured(3000, 128, rank=20, seed=14)
    whole = BoundedSearch(4, (8, 16, 32)).fit(bank, calibration=queries)
    monkeypatch.setattr(search_module, "_CHOOSE_BLOCK_CELLS", 128 * 100)  # 100 bank rows per block
    blocked = BoundedSearch(4, (8, 16, 32)).fit(bank, calibration=queries)
    assert whole.dim_ == blocked.dim_ != 0
    _assert_exact(blocked.search(queries), bank, queries)


def _ivf_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    bank, queries = _structured(6000, 32, rank=12, seed=15)
    held_out, _ = _structured(300, 32, rank=12, seed=16)
    return bank, queries, held_out


def test_ivf_recall_is_measured_on_held_out_patches_and_equals_a_recomputation() -> None:
    bank, queries, held_out = _ivf_case()
    search = IVFSearch(2, lists=64).fit(bank, calibration=held_out)
    found = search.search(held_out)
    truth, _ = _truth(bank, held_out)
    recomputed = float(np.mean(found.distance.numpy() <= truth * (1 + 1e-5) + 1e-5))
    assert search.recall_ == pytest.approx(recomputed, abs=1e-12) and search.recall_queries_ == 300
    assert 0.0 < search.recall_ < 1.0, "2 of 64 cells: some nearest rows are missed, and the recall says so"
    assert found.recall == search.recall_ and search.search(queries).recall == search.recall_
    # Where it misses, the row found is farther: scores can only rise.
    assert np.all(found.distance.numpy() >= truth - 1e-4)
    chosen = (bank[found.index] - held_out).norm(dim=1)
    torch.testing.assert_close(chosen, found.distance)


def test_ivf_probing_every_cell_is_exact_with_recall_one() -> None:
    bank, queries, held_out = _ivf_case()
    search = IVFSearch(64, lists=64).fit(bank, calibration=held_out)
    assert search.recall_ == 1.0
    _assert_exact(search.search(queries), bank, queries)


def test_ivf_without_held_out_patches_measures_recall_on_its_first_queries() -> None:
    bank, queries, _ = _ivf_case()
    search = IVFSearch(2, lists=64).fit(bank)
    assert search.recall_ is None
    match = search.search(queries)
    truth, _ = _truth(bank, queries)
    assert match.recall == pytest.approx(float(np.mean(match.distance.numpy() <= truth * (1 + 1e-5) + 1e-5)))
    assert search.recall_queries_ == queries.shape[0]


def test_ivf_is_seeded_and_refuses_use_before_fit() -> None:
    bank, queries, held_out = _ivf_case()
    first = IVFSearch(4, lists=32, seed=3).fit(bank, calibration=held_out)
    second = IVFSearch(4, lists=32, seed=3).fit(bank, calibration=held_out)
    assert torch.equal(first.search(queries).index, second.search(queries).index) and first.recall_ == second.recall_
    with pytest.raises(RuntimeError, match="not fitted"):
        IVFSearch(2).search(queries)
    with pytest.raises(ValueError, match="lists"):
        IVFSearch(2, lists=10_000).fit(bank)


# ---------------------------------------------------------------------------------------------- memory
def _low_rank_bank(m: int, d: int, rank: int, seed: int = 0) -> torch.Tensor:
    """``(m, d)`` float32 rows on a rank-``rank`` subspace plus noise, made without a second full-size array."""
    generator = torch.Generator().manual_seed(seed)
    if rank >= d:  # isotropic
        return torch.randn(m, d, generator=generator)
    basis = torch.randn(rank, d, generator=torch.Generator().manual_seed(0)) * torch.linspace(3.0, 0.3, rank)[:, None]
    bank = torch.empty(m, d)
    for start in range(0, m, 65536):
        rows = bank[start : start + 65536]
        torch.matmul(torch.randn(rows.shape[0], rank, generator=generator), basis, out=rows)
        rows.add_(torch.randn(rows.shape, generator=generator), alpha=0.05)
    return bank


@pytest.mark.parametrize("rank", [20, 1024], ids=["bounded", "exhaustive"])
def test_building_and_searching_a_large_bank_never_copies_it(rank: int) -> None:
    # A 1 GiB bank, as one beside a 2 GiB budget. Choosing the bound's dims used to hold the bank rotated in
    # 128 dims and each dim's coordinates twice (ours and faiss's) and torch.cdist padded a copy of the bank;
    # the exhaustive search copied the whole bank into a faiss index: over 1 GiB beside the bank, which broke the
    # 6 GB target at 10,000 images. What may grow: the bound coordinates (here at most 129 floats per row, an
    # eighth of the bank), the calibration's distances (128 MiB) and a few blocks of rows: well under a copy.
    dims = (32, 64, 128)
    bank = _low_rank_bank(262_144, 1024, rank)
    calibration = _low_rank_bank(400, 1024, rank, seed=1)  # new rows like the bank's: queries like future ones
    allowed = 0.4 * bank.numel() * 4
    before = reset_peak_rss()
    search = BoundedSearch(8, dims).fit(bank, calibration=calibration)
    match = search.search(calibration[:50])
    grown = status_bytes("VmHWM") - before
    assert (search.dim_ == 0) == (rank == 1024), "isotropic rows: the full search; low-rank rows: a bound"
    assert torch.equal(match.index, exhaustive_search_torch(bank, calibration[:50], CPU).index)
    assert grown < allowed, f"the search took {grown / 1024**2:.0f} MiB beside a 1 GiB bank"
