"""Duplicates and leakage: exact copies by pixels, near copies by features, within training and across to test."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from softpatch.errors import SoftPatchError
from softpatch.evaluation.duplicates import find_duplicates, pixel_hash
from softpatch.method.model import SoftPatch
from tests.conftest import SyntheticSet


@pytest.fixture(scope="module")
def copies(tmp_path_factory: pytest.TempPathFactory, synthetic_set: SyntheticSet) -> dict[str, Path]:
    """A training image re-saved as BMP under another name, one copied into the test set, one retouched."""
    root = tmp_path_factory.mktemp("copies")
    resaved = root / "resaved.bmp"
    Image.open(synthetic_set.train[5]).save(resaved)
    leaked = root / "leaked_test.png"
    shutil.copy(synthetic_set.train[3], leaked)  # a planted defective training image, also "in the test set"
    pixels = np.asarray(Image.open(synthetic_set.train[8])).astype(np.int16)
    pixels[::7, ::5] += 2  # a retouched copy: not the same pixels, the same picture
    retouched = root / "retouched_test.png"
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(retouched)
    broken = root / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    return {"resaved": resaved, "leaked": leaked, "retouched": retouched, "broken": broken}


def _features(small_config, extractor, paths):
    model = SoftPatch(small_config, extractor=extractor)
    return model.embed(list(paths)).features, extractor.grid_shape(small_config.crop)


def test_pixel_hash_ignores_format_and_name(synthetic_set: SyntheticSet, copies) -> None:
    assert pixel_hash(copies["resaved"]) == pixel_hash(synthetic_set.train[5])
    assert pixel_hash(copies["retouched"]) != pixel_hash(synthetic_set.train[8])


def test_exact_duplicates_within_training_and_leaks_to_test(synthetic_set: SyntheticSet, copies) -> None:
    train = [*synthetic_set.train, copies["resaved"]]
    test = [*synthetic_set.test, copies["leaked"], copies["broken"]]
    found = find_duplicates(train, test)
    assert not found.checked_features
    assert [(g.kind, sorted(g.train)) for g in found.within_train] == [
        ("exact", sorted([str(synthetic_set.train[5]), str(copies["resaved"])]))
    ]
    assert found.leaked_test == [str(copies["leaked"])]
    assert found.leaking[0].train == [str(synthetic_set.train[3])]
    assert found.unreadable == [str(copies["broken"])]
    assert "1 of 8 test images are also in the training folder" in found.summary()
    # The retouched copy differs in pixels: without features it is not found.
    assert str(copies["retouched"]) not in found.leaked_test


def test_near_duplicates_by_features(small_config, extractor, synthetic_set: SyntheticSet, copies) -> None:
    train = [*synthetic_set.train, copies["resaved"]]
    test = [*synthetic_set.test, copies["leaked"], copies["retouched"]]
    train_f, grid = _features(small_config, extractor, train)
    test_f, _ = _features(small_config, extractor, test)
    found = find_duplicates(train, test, train_features=train_f, test_features=test_f, grid=grid)
    assert found.checked_features
    assert sorted(found.leaked_test) == sorted([str(copies["leaked"]), str(copies["retouched"])])
    near = [g for g in found.leaking if g.kind == "near"]
    assert [g.train for g in near] == [[str(synthetic_set.train[8])]] and 0 < near[0].distance <= found.near_ratio
    # Distinct parts are never taken for copies: only the resaved pair repeats inside training.
    assert len(found.within_train) == 1 and len(found.groups) == 3


def test_no_duplicates_in_a_clean_set(small_config, extractor, synthetic_set: SyntheticSet) -> None:
    train_f, grid = _features(small_config, extractor, synthetic_set.train)
    test_f, _ = _features(small_config, extractor, synthetic_set.test)
    found = find_duplicates(
        synthetic_set.train, synthetic_set.test, train_features=train_f, test_features=test_f, grid=grid
    )
    assert found.groups == [] and found.leaked_test == []


def test_mismatched_features_are_one_clear_error(small_config, extractor, synthetic_set: SyntheticSet) -> None:
    train_f, grid = _features(small_config, extractor, synthetic_set.train[:4])
    with pytest.raises(SoftPatchError, match="training features do not match"):
        find_duplicates(synthetic_set.train, train_features=train_f, grid=grid)


def _brute_force_groups(desc: np.ndarray, roots: np.ndarray, n_train: int, ratio: float) -> dict:
    """What the report must hold, from the full matrix of distances: {(train, test): span relative to typical}."""
    scale = np.sqrt(desc.shape[1])
    dist = np.sqrt(((desc[:, None, :] - desc[None, :, :]) ** 2).sum(-1)) / scale
    within = dist[:n_train, :n_train].copy()
    within[roots[:n_train, None] == roots[None, :n_train]] = np.inf
    typical = float(np.median(within.min(axis=1)))
    parent = list(range(len(desc)))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for a, b in zip(*np.nonzero(np.triu(dist / typical <= ratio, k=1)), strict=True):
        if a < n_train:
            parent[max(find(a), find(b))] = min(find(a), find(b))
    members: dict[int, list[int]] = {}
    for i in range(len(desc)):
        members.setdefault(find(i), []).append(i)
    return {
        (tuple(i for i in idx if i < n_train), tuple(i for i in idx if i >= n_train)): (
            0.0 if len(set(roots[idx])) == 1 else dist[np.ix_(idx, idx)].max() / typical
        )
        for idx in members.values()
        if len(idx) > 1
    }


def test_near_copies_equal_the_full_distance_matrix_without_forming_it(tmp_path: Path, monkeypatch) -> None:
    # 300 training and 40 test images with 392-value descriptors (above the projected search's 256): an exact
    # copy group larger than the 16 candidates an image gets (its typical distance needs the fallback), near
    # copies inside training and across to test, and pairs just inside and just outside the near ratio.
    import torch

    rng = np.random.default_rng(0)
    n_train, n_test, grid, dim = 300, 40, (7, 7), 8
    features = rng.normal(size=(n_train + n_test, 49, dim)).astype(np.float32)
    pixels = rng.integers(0, 256, size=(n_train + n_test, 6, 6, 3), dtype=np.uint8)
    for i in range(1, 20):  # images 0-19: identical pixels and features
        features[i], pixels[i] = features[0], pixels[0]
    features[51] = features[50] + 0.005 * rng.normal(size=(49, dim))
    features[52] = features[50] + 0.004 * rng.normal(size=(49, dim))
    # Random images are about 1.3 per value from their nearest: 0.12 is just inside the 0.1 ratio, 0.145 outside.
    features[61] = features[60] + 0.12 * rng.normal(size=(49, dim))
    features[71] = features[70] + 0.145 * rng.normal(size=(49, dim))
    features[n_train + 3] = features[100] + 0.005 * rng.normal(size=(49, dim))  # a retouched leak
    features[n_train + 4], pixels[n_train + 4] = features[120], pixels[120]  # an exact leak
    paths = []
    for i, p in enumerate(pixels):
        paths.append(tmp_path / f"{i:03d}.png")
        Image.fromarray(p).save(paths[-1])
    cells: list[int] = []
    real_cdist = torch.cdist
    monkeypatch.setattr(
        torch, "cdist", lambda a, b, *k, **kw: cells.append(a.shape[0] * b.shape[0]) or real_cdist(a, b)
    )

    found = find_duplicates(
        paths[:n_train],
        paths[n_train:],
        train_features=torch.from_numpy(features[:n_train]),
        test_features=torch.from_numpy(features[n_train:]),
        grid=grid,
    )
    desc = features.reshape(len(features), 7, 7, dim).transpose(0, 3, 1, 2).reshape(len(features), -1)
    roots = np.asarray([int(np.flatnonzero((pixels == p).all(axis=(1, 2, 3)))[0]) for p in pixels])
    expected = _brute_force_groups(desc, roots, n_train, found.near_ratio)
    index = {str(p): i for i, p in enumerate(paths)}
    got = {
        (tuple(sorted(index[t] for t in g.train)), tuple(sorted(index[t] for t in g.test))): g.distance
        for g in found.groups
    }
    assert got.keys() == expected.keys()
    assert set(expected) >= {
        (tuple(range(20)), ()),
        ((50, 51, 52), ()),
        ((100,), (n_train + 3,)),
        ((120,), (n_train + 4,)),
    }
    assert 0.08 < expected[((60, 61), ())] < 0.1 and ((70, 71), ()) not in expected  # near the ratio, both ways
    # Spans are relative to the typical distance, which is read from each image's 16 candidates: on random
    # descriptors (all distances alike, the hardest case for the projection) it is within a percent.
    for key, span in expected.items():
        assert got[key] == pytest.approx(span, rel=0.02, abs=1e-6)
    assert max(cells) <= 64 * n_train  # the fallback's rows and the groups' spans: never all pairs
