"""Duplicates and leakage: the same image twice in the training folder, or in training and in the test set.

Two kinds of evidence:
- *exact*: the same decoded pixels (a hash of the RGB array and its size, so a re-saved or renamed copy
  with identical pixels counts, whatever its file format or name);
- *near*: image descriptors (the patch features, average-pooled to at most 7 x 7 blocks so that the
  layout is kept) closer than ``near_ratio`` times the typical distance between a training image and its
  nearest other training image. Two photos of two good parts are typical neighbours; a copy that was
  re-encoded, slightly shifted or retouched is far closer than that.

Why it matters: a test image that is also in training scores as if it were good (its own patches are in
the memory bank), so metrics on it are leakage; a defective image repeated in training makes its own
patches look dense and escapes the noise discriminator.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from softpatch.errors import ImageLoadError, SoftPatchError
from softpatch.runtime.progress import ProgressCallback, report

if TYPE_CHECKING:
    import torch

    from softpatch.io.feature_store import FeatureStore

__all__ = ["DEFAULT_NEAR_RATIO", "DuplicateGroup", "DuplicateReport", "find_duplicates", "pixel_hash"]

DEFAULT_NEAR_RATIO = 0.1
_BLOCKS = 7  # descriptor grid: at most 7 x 7 pooled blocks of patch features
_STORE_IMAGES_PER_READ = 64  # images read from a feature store at once (about 200 MB at 224 px)


@dataclass(frozen=True)
class DuplicateGroup:
    """Images that are copies of each other. ``kind``: "exact" (identical pixels) or "near" (by features)."""

    kind: str
    train: list[str]  # names of the group's training images
    test: list[str]  # names of the group's test images (a leak when not empty)
    distance: float  # largest descriptor distance inside the group, relative to the typical neighbour (0 = same)

    @property
    def leaks(self) -> bool:
        """Whether the group spans training and test images."""
        return bool(self.train) and bool(self.test)


@dataclass(frozen=True)
class DuplicateReport:
    """Every group of duplicates that holds a training image; test images appear only next to training ones."""

    groups: list[DuplicateGroup]
    near_ratio: float
    checked_features: bool  # False: only exact copies were looked for (no features given)
    n_train: int
    n_test: int
    unreadable: list[str] = field(default_factory=list)  # images whose pixels could not be hashed
    checked_test_features: bool = False  # whether test images were compared by features too

    @property
    def complete(self) -> bool:
        """Whether every image was compared by pixels and by features."""
        return self.checked_features and (self.n_test == 0 or self.checked_test_features)

    @property
    def within_train(self) -> list[DuplicateGroup]:
        """Groups with more than one training image (each repeat weighs more in the memory bank)."""
        return [g for g in self.groups if len(g.train) > 1]

    @property
    def leaking(self) -> list[DuplicateGroup]:
        """Groups that put the same image in training and in the test set."""
        return [g for g in self.groups if g.leaks]

    @property
    def leaked_test(self) -> list[str]:
        """Names of the test images that are (near) copies of a training image, in test order of appearance."""
        return [name for g in self.leaking for name in g.test]

    def summary(self) -> str:
        """One sentence: how many leaked test images and repeated training images were found."""
        repeats = sum(len(g.train) - 1 for g in self.within_train)
        how = (
            "identical pixels and features"
            if self.complete
            else "identical pixels and training features"
            if self.checked_features
            else "identical pixels only"
        )
        return (
            f"{len(self.leaked_test)} of {self.n_test} test images are also in the training folder; "
            f"{repeats} training images repeat another ({len(self.within_train)} groups); checked by {how}"
        )

    def rows(self) -> list[dict[str, object]]:
        """One row per group, for tables and CSV: kind, where, training and test names, distance."""
        return [
            {
                "kind": g.kind,
                "where": "training and test" if g.leaks else "training",
                "training images": ", ".join(g.train),
                "test images": ", ".join(g.test),
                "relative distance": round(g.distance, 4),
            }
            for g in self.groups
        ]


def pixel_hash(source: str | os.PathLike) -> str:
    """SHA-256 of an image's decoded RGB pixels and size: equal for copies, whatever the file name or format."""
    from softpatch.io.images import load_image

    image = load_image(source)
    digest = hashlib.sha256(f"{image.width}x{image.height}:".encode())
    digest.update(np.asarray(image, dtype=np.uint8).tobytes())
    return digest.hexdigest()


def descriptors(features: torch.Tensor | FeatureStore, grid: tuple[int, int]) -> torch.Tensor:
    """(n, P, D) patch features -> (n, D * h * w) layout-keeping image descriptors, h, w <= 7.

    The grid is average-pooled to at most 7 x 7 blocks: the layout is kept (a mirrored part is another
    picture) while the descriptor stays small whatever the crop (49 * D values per image). A ``FeatureStore``
    is read ``_STORE_IMAGES_PER_READ`` images at a time, never whole (10,000 images are 30 GB in float32).
    """
    import torch

    from softpatch.io.feature_store import FeatureStore

    n, p, d = features.shape
    h, w = grid
    if h * w != p:
        raise SoftPatchError(f"features of {p} positions do not fit the grid {h}x{w}")
    if isinstance(features, FeatureStore):
        step = _STORE_IMAGES_PER_READ
        parts = [descriptors(features.read_images(a, min(a + step, n)), grid) for a in range(0, n, step)]
        return torch.cat(parts) if parts else torch.empty(0, d * min(h, _BLOCKS) * min(w, _BLOCKS))
    x = features.reshape(n, h, w, d).permute(0, 3, 1, 2).float()
    return torch.nn.functional.adaptive_avg_pool2d(x, (min(h, _BLOCKS), min(w, _BLOCKS))).reshape(n, -1)


class _Groups:
    """Union-find over image indices."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def join(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def find_duplicates(
    train: Sequence[str | os.PathLike],
    test: Sequence[str | os.PathLike] = (),
    *,
    train_features: torch.Tensor | FeatureStore | None = None,
    test_features: torch.Tensor | None = None,
    grid: tuple[int, int] | None = None,
    near_ratio: float = DEFAULT_NEAR_RATIO,
    progress: ProgressCallback | None = None,
) -> DuplicateReport:
    """Exact and near duplicates within ``train`` and between ``train`` and ``test`` (paths; names = ``str(path)``).

    train_features (N, P, D) / test_features (n, P, D): patch features in the same order (``SoftPatch.embed``,
    or a fitted model's ``feature_store_`` / ``train_features_``), with ``grid`` (H, W) = P positions; without them only identical
    pixels are looked for (test features are needed for near train-test duplicates). Images that cannot be
    decoded are listed in ``unreadable`` and skipped.
    """
    if near_ratio < 0:
        raise SoftPatchError(f"the near-duplicate ratio cannot be negative, got {near_ratio}")
    names = [str(p) for p in train] + [str(p) for p in test]
    n_train = len(train)
    if train_features is not None and train_features.shape[0] != n_train:
        raise SoftPatchError("the training features do not match the training images")
    if test_features is not None and test_features.shape[0] != len(test):
        raise SoftPatchError("the test features do not match the test images")
    groups = _Groups(len(names))
    exact = _Groups(len(names))
    first: dict[str, int] = {}
    unreadable: list[str] = []
    for i, name in enumerate(names):
        if i % 16 == 0:
            report(progress, i / max(len(names), 1), f"duplicates: hashing {i}/{len(names)} images")
        try:
            digest = pixel_hash(name)
        except ImageLoadError:
            unreadable.append(name)
            continue
        if digest in first:
            groups.join(first[digest], i)
            exact.join(first[digest], i)
        else:
            first[digest] = i

    relative = np.zeros((0, 0))
    checked = train_features is not None and grid is not None and n_train >= 2
    if checked:
        import torch

        report(progress, 1.0, "duplicates: comparing image features")
        parts = [descriptors(train_features, grid)]
        if test_features is not None and len(test):
            parts.append(descriptors(test_features, grid))
        desc = torch.cat(parts)
        dist = torch.cdist(desc, desc).numpy() / np.sqrt(desc.shape[1])
        within = dist[:n_train, :n_train].copy()
        roots = np.asarray([exact.find(i) for i in range(n_train)])
        # Exact copies must not make the typical neighbour distance zero: measure it between distinct images.
        within[roots[:, None] == roots[None, :]] = np.inf
        nearest = within.min(axis=1)
        nearest = nearest[np.isfinite(nearest)]
        typical = float(np.median(nearest)) if nearest.size else 1.0
        relative = dist / max(typical, 1e-12)
        rows, cols = np.nonzero(np.triu(relative <= near_ratio, k=1))
        for a, b in zip(rows.tolist(), cols.tolist(), strict=True):
            if a < n_train:  # a < b: pairs of two test images are not leakage
                groups.join(a, b)

    members: dict[int, list[int]] = {}
    for i in range(len(names)):
        members.setdefault(groups.find(i), []).append(i)
    found = []
    for idx in members.values():
        if len(idx) < 2 or not any(i < n_train for i in idx):
            continue
        kind = "exact" if len({exact.find(i) for i in idx}) == 1 else "near"
        with_features = [i for i in idx if i < relative.shape[0]]
        span = float(relative[np.ix_(with_features, with_features)].max()) if kind == "near" else 0.0
        found.append(
            DuplicateGroup(
                kind=kind,
                train=[names[i] for i in idx if i < n_train],
                test=[names[i] for i in idx if i >= n_train],
                distance=span,
            )
        )
    found.sort(key=lambda g: (not g.leaks, g.kind != "exact", g.train[0]))
    report(progress, 1.0, f"duplicates: {len(found)} groups found")
    return DuplicateReport(
        found,
        float(near_ratio),
        checked,
        n_train,
        len(test),
        unreadable,
        checked_test_features=checked and test_features is not None and len(test) > 0,
    )
