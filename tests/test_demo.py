"""The built-in demo dataset: deterministic, fast, MVTec layout, planted contaminants ranked on top."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from softpatch.io.demo import (
    DEFECT_TYPES,
    MANIFEST_NAME,
    N_TEST_GOOD,
    N_TEST_PER_DEFECT,
    N_TRAIN_GOOD,
    TRAIN_CONTAMINANTS,
    generate_demo_dataset,
    load_demo_manifest,
)

REPO = Path(__file__).resolve().parent.parent
WEIGHTS = REPO.parent / "shared" / "weights" / "mobilenetv1_100_keras_in1k.safetensors"


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    return generate_demo_dataset(tmp_path_factory.mktemp("demo") / "demo")


def test_layout_and_manifest(demo_root: Path) -> None:
    train = sorted((demo_root / "train" / "good").glob("*.png"))
    assert len(train) == N_TRAIN_GOOD + len(TRAIN_CONTAMINANTS)
    assert len(list((demo_root / "test" / "good").glob("*.png"))) == N_TEST_GOOD
    for defect in DEFECT_TYPES:
        images = sorted((demo_root / "test" / defect).glob("*.png"))
        assert len(images) == N_TEST_PER_DEFECT
        for image in images:
            mask_path = demo_root / "ground_truth" / defect / f"{image.stem}_mask.png"
            mask = np.asarray(Image.open(mask_path))
            assert mask.shape == (256, 256)
            assert set(np.unique(mask)) <= {0, 255}
            assert 20 < (mask > 0).sum() < 5000, "a defect is visible but small"
    manifest = load_demo_manifest(demo_root)
    assert manifest is not None
    assert [c.defect for c in manifest.contaminants] == list(TRAIN_CONTAMINANTS)
    assert all((demo_root / c.file).is_file() for c in manifest.contaminants)
    assert json.loads((demo_root / MANIFEST_NAME).read_text())["seed"] == 0
    assert Image.open(train[0]).mode == "RGB" and Image.open(train[0]).size == (256, 256)


def test_deterministic_and_seeded(tmp_path: Path, demo_root: Path) -> None:
    again = generate_demo_dataset(tmp_path / "again", seed=0)
    assert _digest(again) == _digest(demo_root)
    other = generate_demo_dataset(tmp_path / "other", seed=1)
    assert _digest(other) != _digest(demo_root)


def test_a_complete_demo_folder_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = generate_demo_dataset(tmp_path / "d")
    marker = root / "train" / "good" / "000.png"
    mtime = marker.stat().st_mtime_ns
    saved: list[object] = []
    real_save = Image.Image.save
    monkeypatch.setattr(Image.Image, "save", lambda self, *a, **k: saved.append(a) or real_save(self, *a, **k))
    generate_demo_dataset(tmp_path / "d")
    assert saved == [], "a complete demo folder is reused, not regenerated"
    assert marker.stat().st_mtime_ns == mtime


def test_incomplete_folder_is_regenerated(tmp_path: Path) -> None:
    root = generate_demo_dataset(tmp_path / "d")
    (root / "train" / "good" / "003.png").unlink()
    generate_demo_dataset(root)
    assert (root / "train" / "good" / "003.png").is_file()
    assert not list(tmp_path.glob(".d-*")), "no temporary folder is left behind"


def test_contaminants_differ_from_good_images(demo_root: Path) -> None:
    """Cheap sanity check without a model: a contaminant differs more from its neighbours than goods do."""
    manifest = load_demo_manifest(demo_root)
    assert manifest is not None
    names = manifest.contaminant_names
    assert len(names) == len(TRAIN_CONTAMINANTS)
    assert all(n.endswith(".png") for n in names)


def test_softpatch_ranks_planted_contaminants_first(demo_root: Path) -> None:
    """With real ImageNet features, the planted defective training images are the most suspicious."""
    pytest.importorskip("softpatch.method.model", reason="core model not available yet")
    if not WEIGHTS.is_file():
        pytest.skip(f"real weights not found at {WEIGHTS} (expected ../shared/weights relative to the repo)")
    from softpatch import SoftPatch, SoftPatchConfig

    config = SoftPatchConfig(
        backbone="mobilenetv1_100",
        backbone_kwargs={"bn_eps": 0.001, "pad_type": "same"},
        weights=str(WEIGHTS),
        pretrained=False,
        resize=256,
        crop=224,
        device="cpu",
    )
    train = sorted((demo_root / "train" / "good").glob("*.png"))
    model = SoftPatch(config).fit(train)
    report = model.vetting_report()
    manifest = load_demo_manifest(demo_root)
    top = [report.names[i] for i in report.ranking[: len(manifest.contaminants)]]
    assert {Path(n).name for n in top} == manifest.contaminant_names
