"""Shared fixtures for the core tests: a tiny synthetic dataset, a fast config, the shared weights.

The synthetic "part" is a striped, noisy texture (so that every position has a typical look); a
defective image carries one bright round blob. Images are small PNGs so that a fit with a random
resnet18 at crop 64 takes well under a second.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from softpatch.config import SoftPatchConfig

# The shared data and weights sit beside the repository; SOFTPATCH_SHARED_DIR points elsewhere (e.g. from a worktree).
SHARED = Path(os.environ.get("SOFTPATCH_SHARED_DIR") or Path(__file__).resolve().parents[2] / "shared")
MOBILENET_WEIGHTS = SHARED / "weights" / "mobilenetv1_100_keras_in1k.safetensors"
MOBILENET_KWARGS = {"bn_eps": 1e-3, "pad_type": "same"}

IMAGE_SIZE = 80
BLOB_RADIUS = 9


def part_array(rng: np.random.Generator, *, blob: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One textured part (uint8 (S, S, 3)) and its defect mask (bool (S, S)); ``blob`` = (x, y) of a bright blob."""
    s = IMAGE_SIZE
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    shift = rng.uniform(-1.0, 1.0)
    stripes = 0.5 + 0.18 * np.sin(2 * np.pi * (xx + shift) / 10.0) + 0.08 * np.sin(2 * np.pi * yy / 23.0)
    gray = stripes * rng.uniform(0.95, 1.05) + 0.03 * rng.normal(size=(s, s))
    mask = np.zeros((s, s), dtype=bool)
    if blob is not None:
        r = np.hypot(xx - blob[0], yy - blob[1])
        mask = r <= BLOB_RADIUS
        gray = np.where(mask, 0.98, gray)
    rgb = np.clip(gray[..., None] * np.array([1.0, 0.97, 0.92]) * 255 + 0.5, 0, 255).astype(np.uint8)
    return rgb, mask


def random_blob_centre(rng: np.random.Generator) -> tuple[float, float]:
    # Inside the centre crop (resize 72 / crop 64 keeps 8/9 of the image) and away from its border.
    return float(rng.uniform(25, 55)), float(rng.uniform(25, 55))


def write_parts(
    folder: Path, n: int, *, seed: int, defective: tuple[int, ...] = (), masks: dict[int, np.ndarray] | None = None
) -> list[Path]:
    """Write ``n`` part PNGs into ``folder`` (those in ``defective`` with a blob); returns their paths.

    ``masks``, when given, receives the blob mask of each defective image by index.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        blob = random_blob_centre(rng) if i in defective else None
        rgb, mask = part_array(rng, blob=blob)
        if blob is not None and masks is not None:
            masks[i] = mask
        path = folder / f"{i:03d}.png"
        Image.fromarray(rgb).save(path)
        paths.append(path)
    return paths


@dataclass(frozen=True)
class SyntheticSet:
    """A training folder with a few planted defective images, and a small labelled test set."""

    train_dir: Path
    train: list[Path]
    defective: tuple[int, ...]  # indices into ``train`` of the images with a blob
    test_good: list[Path]
    test_bad: list[Path]
    test_masks: list[np.ndarray] = field(default_factory=list)  # bool (S, S) per test_bad image
    train_masks: dict[int, np.ndarray] = field(default_factory=dict)  # bool (S, S) per defective training image

    @property
    def test(self) -> list[Path]:
        return [*self.test_good, *self.test_bad]


def make_synthetic_set(root: Path, *, n_train: int = 16, defective: tuple[int, ...] = (3, 11)) -> SyntheticSet:
    train_masks: dict[int, np.ndarray] = {}
    train = write_parts(root / "train", n_train, seed=1, defective=defective, masks=train_masks)
    test_good = write_parts(root / "test_good", 3, seed=2)
    rng = np.random.default_rng(3)
    bad_dir = root / "test_bad"
    bad_dir.mkdir(parents=True, exist_ok=True)
    test_bad, masks = [], []
    for i in range(3):
        rgb, mask = part_array(rng, blob=random_blob_centre(rng))
        path = bad_dir / f"bad{i:03d}.png"
        Image.fromarray(rgb).save(path)
        test_bad.append(path)
        masks.append(mask)
    return SyntheticSet(root / "train", train, defective, test_good, test_bad, masks, train_masks)


def make_mvtec(root: Path, *, n_train: int = 12, n_test_good: int = 5, n_test_bad: int = 5) -> Path:
    """A tiny MVTec AD layout: train/good, test/good, test/blob with ground_truth/blob/<stem>_mask.png."""
    write_parts(root / "train" / "good", n_train, seed=11)
    write_parts(root / "test" / "good", n_test_good, seed=12)
    rng = np.random.default_rng(13)
    for folder in (root / "test" / "blob", root / "ground_truth" / "blob"):
        folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_test_bad):
        rgb, mask = part_array(rng, blob=random_blob_centre(rng))
        Image.fromarray(rgb).save(root / "test" / "blob" / f"{i:03d}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "ground_truth" / "blob" / f"{i:03d}_mask.png")
    return root


def reset_peak_rss() -> int:
    """Reset this process's peak RSS (VmHWM) to its current RSS and return that, in bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pytest.skip("peak RSS cannot be reset here (/proc/self/clear_refs)")
    return status_bytes("VmRSS")


def status_bytes(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    pytest.skip(f"no {key} in /proc/self/status")


@pytest.fixture(scope="session")
def small_config() -> SoftPatchConfig:
    """Random-init resnet18 at crop 64 (8x8 grid), small features: fits in well under a second on a CPU."""
    return SoftPatchConfig(
        backbone="resnet18",
        pretrained=False,
        resize=72,
        crop=64,
        layers=(2, 3),
        feature_dim=96,
        batch_size=8,
        device="cpu",
        discriminator="lof",  # the paper's: tests of LOF, k and tau mean LOF with exactly that k
    )


@pytest.fixture(scope="session")
def synthetic_set(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSet:
    return make_synthetic_set(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="session")
def mvtec_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mvtec(tmp_path_factory.mktemp("mvtec") / "part")


@pytest.fixture(scope="session")
def mobilenet_weights() -> Path:
    if not MOBILENET_WEIGHTS.is_file():
        pytest.skip(f"shared ImageNet weights not found at {MOBILENET_WEIGHTS} (see shared/weights/README.md)")
    return MOBILENET_WEIGHTS


@pytest.fixture(scope="session")
def mobilenet_config(mobilenet_weights: Path, small_config: SoftPatchConfig) -> SoftPatchConfig:
    """The real ImageNet mobilenetv1 from the shared folder, at the small geometry."""
    return small_config.replace(
        backbone="mobilenetv1_100", backbone_kwargs=MOBILENET_KWARGS, weights=str(mobilenet_weights)
    )


@pytest.fixture
def app_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mobilenet_weights: Path) -> Path:
    """App settings for tests: the real mobilenet at 128/112 on the CPU, a private work folder."""
    monkeypatch.setenv("SOFTPATCH_BACKBONE", "mobilenetv1_100")
    monkeypatch.setenv("SOFTPATCH_WEIGHTS", str(mobilenet_weights))
    monkeypatch.setenv("SOFTPATCH_BACKBONE_KWARGS", json.dumps(MOBILENET_KWARGS))
    monkeypatch.setenv("SOFTPATCH_RESIZE", "128")
    monkeypatch.setenv("SOFTPATCH_CROP", "112")
    monkeypatch.setenv("SOFTPATCH_DEVICE", "cpu")
    monkeypatch.setenv("SOFTPATCH_WORK_DIR", str(tmp_path / "work"))
    return tmp_path


@pytest.fixture(scope="session")
def extractor(small_config: SoftPatchConfig):
    """One random-init resnet18 extractor, built under a fixed torch seed and shared (read-only) by the tests."""
    from softpatch.method.model import build_extractor

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build_extractor(small_config, torch.device("cpu"))


@pytest.fixture(scope="session")
def train_embeddings(small_config: SoftPatchConfig, extractor, synthetic_set: SyntheticSet):
    from softpatch.method.model import SoftPatch

    return SoftPatch(small_config, extractor=extractor).embed(synthetic_set.train)


@pytest.fixture(scope="session")
def eval_embeddings(small_config: SoftPatchConfig, extractor, synthetic_set: SyntheticSet):
    from softpatch.method.model import SoftPatch

    return SoftPatch(small_config, extractor=extractor).embed(synthetic_set.test)


@pytest.fixture
def fitted(small_config: SoftPatchConfig, extractor, train_embeddings):
    """A fresh model fitted on the synthetic training set (features shared, so this takes milliseconds)."""
    from softpatch.method.model import SoftPatch

    return SoftPatch(small_config, extractor=extractor).fit_embeddings(train_embeddings)
