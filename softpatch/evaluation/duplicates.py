"""Duplicates and leakage: the same image twice in the training folder, or in training and in the test set.

Two kinds of evidence:
- *exact*: the same decoded pixels (a hash of the RGB array and its size, so a re-saved or renamed copy
  with identical pixels counts, whatever its file format or name);
- *near*: image descriptors (the patch features, average-pooled to at most 7 x 7 blocks so that the
  layout is kept) closer than ``near_ratio`` times the typical distance between a training image and its
  nearest other training image. Two photos of two good parts are typical neighbours; a copy that was
  re-encoded, slightly shifted or retouched is far closer than that. Each image is compared with its 16
  nearest images by a random projection of the descriptors, each of those pairs on the full descriptors: the
  cost grows with N, not N x N (10,000 images would need a 400 MB matrix of distances, and minutes).

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
from softpatch.runtime.read_ahead import ReadAhead

if TYPE_CHECKING:
    import torch

    from softpatch.io.feature_store import FeatureStore

__all__ = ["DEFAULT_NEAR_RATIO", "DuplicateGroup", "DuplicateReport", "find_duplicates", "pixel_hash"]

DEFAULT_NEAR_RATIO = 0.1
_BLOCKS = 7  # descriptor grid: at most 7 x 7 pooled blocks of patch features
_STORE_IMAGES_PER_READ = 32  # images read from a feature store at once (about 100 MB at 224 px; two are held)
_HASH_CHUNK = 64  # images hashed between two progress reports
# Near copies are looked for among each image's nearest images by a random projection of the descriptors (cheap
# at any N), then every such pair is measured on the full descriptors: no N x N distance matrix.
_NEIGHBOURS = 16  # candidates per image
_PROJECTED_DIM = 256  # the candidate search's dimension (distances kept within a few percent)
_PAIR_BLOCK_BYTES = 64 << 20  # gathered descriptor rows per block of exact pair distances
_FALLBACK_ROWS = 64  # images measured against all others at once when their candidates are all copies


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


def _hash_or_none(name: str) -> str | None:
    try:
        return pixel_hash(name)
    except ImageLoadError:
        return None


def _pixel_hashes(names: list[str], progress: ProgressCallback | None) -> list[str | None]:
    """``pixel_hash`` of each image (None: unreadable), decoded in the job's decoding threads."""
    from softpatch.runtime.threads import decode_pool, decode_workers

    digests: list[str | None] = []
    with decode_pool(decode_workers()) as pool:
        for start in range(0, len(names), _HASH_CHUNK):
            report(progress, start / max(len(names), 1), f"duplicates: hashing {start}/{len(names)} images")
            digests.extend(pool.map(_hash_or_none, names[start : start + _HASH_CHUNK]))
    return digests


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
        out = torch.empty(n, d * min(h, _BLOCKS) * min(w, _BLOCKS))  # filled in place: no second copy
        with ReadAhead(features.read_images, n) as read:  # the disk reads the next images meanwhile
            for a in range(0, n, _STORE_IMAGES_PER_READ):
                b = min(a + _STORE_IMAGES_PER_READ, n)
                out[a:b] = descriptors(read(a, b), grid)
        return out
    x = features.reshape(n, h, w, d).permute(0, 3, 1, 2).float()
    return torch.nn.functional.adaptive_avg_pool2d(x, (min(h, _BLOCKS), min(w, _BLOCKS))).reshape(n, -1)


def _candidate_neighbours(desc: torch.Tensor, k: int) -> np.ndarray:
    """``(M, F)`` descriptors -> ``(M, min(k, M))`` indices of each row's nearest rows (usually itself first).

    Exact L2 search on a seeded Gaussian projection to ``_PROJECTED_DIM`` dimensions when ``F`` is larger.
    """
    import faiss
    import torch

    m, f = desc.shape
    if f > _PROJECTED_DIM:
        generator = torch.Generator().manual_seed(0)
        desc = desc @ (torch.randn(f, _PROJECTED_DIM, generator=generator) / np.sqrt(_PROJECTED_DIM))
    x = np.ascontiguousarray(desc.numpy(), dtype=np.float32)
    _, neighbours = faiss.knn(x, x, min(k, m))
    return neighbours.astype(np.int64)


def _pair_distances(desc: torch.Tensor, neighbours: np.ndarray) -> np.ndarray:
    """``(M, k)`` exact distances between each row of ``desc`` and its ``neighbours``, per descriptor value."""
    import torch

    m, k = neighbours.shape
    scale = float(np.sqrt(desc.shape[1]))
    out = np.empty((m, k), dtype=np.float32)
    step = max(1, _PAIR_BLOCK_BYTES // max(1, k * desc.shape[1] * 4))
    index = torch.from_numpy(neighbours)
    for start in range(0, m, step):
        stop = min(m, start + step)
        diff = desc[index[start:stop]] - desc[start:stop, None, :]  # (b, k, F)
        out[start:stop] = (torch.linalg.vector_norm(diff, dim=-1) / scale).numpy()
    return out


def _typical_distance(
    desc: torch.Tensor, neighbours: np.ndarray, dist: np.ndarray, roots: np.ndarray, n_train: int
) -> float:
    """Median over training images of the distance to the nearest other training image (exact copies aside).

    Read from the candidates; an image whose candidates are all its own exact copies or test images (more
    than ``_NEIGHBOURS`` - 1 copies) is measured against every training image.
    """
    import torch

    train_rows = neighbours[:n_train]
    distinct = (train_rows < n_train) & (roots[train_rows] != roots[:n_train, None])
    nearest = np.where(distinct, dist[:n_train], np.inf).min(axis=1)
    scale = float(np.sqrt(desc.shape[1]))
    unresolved = np.flatnonzero(~distinct.any(axis=1))
    for start in range(0, len(unresolved), _FALLBACK_ROWS):
        rows = unresolved[start : start + _FALLBACK_ROWS]
        full = torch.cdist(desc[torch.from_numpy(rows)], desc[:n_train]).numpy() / scale  # (b, n_train)
        full[roots[rows, None] == roots[None, :n_train]] = np.inf
        nearest[rows] = full.min(axis=1)
    nearest = nearest[np.isfinite(nearest)]
    return max(float(np.median(nearest)) if nearest.size else 1.0, 1e-12)


def _span(desc: torch.Tensor, members: list[int]) -> float:
    """The largest distance between two of ``members`` (rows of ``desc``), per descriptor value."""
    import torch

    if len(members) < 2:
        return 0.0
    rows = desc[members]
    return float(torch.cdist(rows, rows).max()) / float(np.sqrt(desc.shape[1]))


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
    for i, (name, digest) in enumerate(zip(names, _pixel_hashes(names, progress), strict=True)):
        if digest is None:
            unreadable.append(name)
            continue
        if digest in first:
            groups.join(first[digest], i)
            exact.join(first[digest], i)
        else:
            first[digest] = i

    desc = typical = None
    checked = train_features is not None and grid is not None and n_train >= 2
    if checked:
        import torch

        report(progress, 1.0, "duplicates: comparing image features")
        parts = [descriptors(train_features, grid)]
        if test_features is not None and len(test):
            parts.append(descriptors(test_features, grid))
        desc = torch.cat(parts) if len(parts) > 1 else parts[0]
        roots = np.asarray([exact.find(i) for i in range(desc.shape[0])])
        neighbours = _candidate_neighbours(desc, _NEIGHBOURS)
        dist = _pair_distances(desc, neighbours)
        typical = _typical_distance(desc, neighbours, dist, roots, n_train)
        rows = np.repeat(np.arange(desc.shape[0]), neighbours.shape[1])
        cols = neighbours.reshape(-1)
        near = (dist.reshape(-1) / typical <= near_ratio) & (rows != cols) & (np.minimum(rows, cols) < n_train)
        for a, b in zip(rows[near].tolist(), cols[near].tolist(), strict=True):
            groups.join(a, b)  # pairs of two test images are not leakage: one of the two is a training image

    members: dict[int, list[int]] = {}
    for i in range(len(names)):
        members.setdefault(groups.find(i), []).append(i)
    found = []
    for idx in members.values():
        if len(idx) < 2 or not any(i < n_train for i in idx):
            continue
        kind = "exact" if len({exact.find(i) for i in idx}) == 1 else "near"
        span = _span(desc, [i for i in idx if i < desc.shape[0]]) / typical if kind == "near" else 0.0
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
