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
