"""The SoftPatch estimator: fit on a (possibly noisy) folder of nominal images, then score test images."""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import tempfile
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np
import torch
from PIL import Image
from torch import nn

from softpatch.config import FEATURE_FIELDS, RETUNE_FIELDS, SoftPatchConfig
from softpatch.errors import NotFittedError, ResourceError, SoftPatchError
from softpatch.io.feature_store import DiskArray, FeatureStore
from softpatch.io.images import ImageTransform, load_image
from softpatch.method.anomaly_map import anomaly_maps
from softpatch.method.contamination import AUTO, choose_settings
from softpatch.method.coreset import (
    BANK_VALUE_BYTES,
    plan_coreset,
    projection_matrix,
    random_projection,
    select_rows,
)
from softpatch.method.denoise import image_suspicion, select_removed, soft_weights
from softpatch.method.discriminators import (
    DISCRIMINATORS,
    NEIGHBOUR_CACHE_K,
    DiscriminatorParams,
    FeatureSource,
    NeighbourCache,
    clamp_lof_k,
    compute_neighbours,
    denoises,
    effective_lof_k,
    needs_features,
    neighbour_cache_k,
    reference_images,
    score_patches,
)
from softpatch.method.features import BackboneInfo, FeatureExtractor, backbone_info, create_backbone
from softpatch.method.memory_bank import MemoryBank
from softpatch.runtime.chunking import run_in_chunks
from softpatch.runtime.device import default_batch_size, resolve_device
from softpatch.runtime.progress import ProgressCallback, report
from softpatch.runtime.read_ahead import ReadAhead
from softpatch.runtime.resources import (
    MemoryEstimate,
    available_memory,
    check_disk_space,
    estimate_embed_memory,
    estimate_fit_disk,
    estimate_fit_memory,
    work_budget,
)
from softpatch.runtime.threads import decode_pool, decode_workers
from softpatch.runtime.write_behind import STORE_WRITES_PENDING, WriteBehind

if TYPE_CHECKING:
    from softpatch.runtime.distributed import RayCluster

# Computes the per-position neighbour cache: compute_neighbours' signature (a cluster's runs it elsewhere).
NeighbourSearch = Callable[..., NeighbourCache]

ImageInput = Union[str, os.PathLike, Image.Image, "ImageRecord"]  # noqa: F821 - ImageRecord from softpatch.io.datasets

# Held-out training patches on which the bounded nearest-neighbour search picks its settings.
_CALIBRATION_PATCHES = 1024
# Work between two progress messages while scoring: patches per search call, map pixels per block.
_SCORING_PATCHES_PER_STEP = 8192
_MAP_PIXELS_PER_STEP = 32 * 224 * 224
# Element type of the fit's feature store: float16 halves disk and reads and leaves the results unchanged
# within the tolerance tests/test_feature_store.py and benchmarks/scale.py measure on real images.
STORE_DTYPE = "float16"
# Patches per block when the coreset's projection is computed from a store (two blocks are held: one read ahead).
_PROJECTION_ROWS_PER_STEP = 32768


@dataclass(frozen=True)
class Embeddings:
    """Patch features of some images, reusable across re-tunes and model variants."""

    features: FeatureSource  # (n, P, D): a float32 CPU tensor, or a FeatureStore read by chunks
    names: list[str]
    sizes: list[tuple[int, int]]  # original (width, height)
    feature_key: str  # fingerprint of the feature settings that produced them

    def __len__(self) -> int:
        return self.features.shape[0]


@dataclass(frozen=True)
class ScoreResult:
    """Scores of n test images; higher = more anomalous. Raw distances, never normalised per set."""

    image_scores: np.ndarray  # (n,) max patch score per image
    patch_scores: np.ndarray  # (n, H, W) soft-weighted nearest-neighbour distances (eq. 8)
    anomaly_maps: np.ndarray | None  # (n, crop, crop) upsampled and blurred patch scores
    names: list[str]
    sizes: list[tuple[int, int]]  # original (width, height), for mapping maps back onto the images
    search_recall: float | None = None  # None: exact nearest neighbours; else the approximate search's recall@1


@dataclass(frozen=True)
class VettingReport:
    """Training images ranked by how likely they are defective (seeds/004: image-level filtering)."""

    names: list[str]
    suspicion: np.ndarray  # (N,) higher = more likely defective
    removed_fraction: np.ndarray  # (N,) share of the image's patches removed as noise
    ranking: np.ndarray  # (N,) image indices, most suspicious first

    def rows(self) -> list[dict[str, object]]:
        """One dict per image in ranking order: rank (1-based), path, suspicion, removed_fraction."""
        return [
            {
                "rank": rank,
                "path": self.names[i],
                "suspicion": float(self.suspicion[i]),
                "removed_fraction": float(self.removed_fraction[i]),
            }
            for rank, i in enumerate(self.ranking.tolist(), start=1)
        ]


@dataclass
class _TrainingState:
    """What a fit learned and caches; shared (read-only) between a model and its variants."""

    features: FeatureSource | None  # (N, P, D) tensor or FeatureStore; None for a model loaded from a bundle
    names: list[str]
    sizes: list[tuple[int, int]]
    neighbours: NeighbourCache | None = None
    scores: dict[tuple, torch.Tensor] = field(default_factory=dict)  # discriminator key -> (N, P)
    # (dim, seed) -> (N*P, dim) indexable by flat index arrays: an ndarray, or a DiskArray beside the store
    projections: dict[tuple, np.ndarray | DiskArray] = field(default_factory=dict)
    coresets: dict[tuple, np.ndarray] = field(default_factory=dict)  # selection key -> flat patch indices
    suspicion: np.ndarray | None = None  # (N,) as stored in a bundle; computed from neighbours otherwise
    suspicion_k: int | None = None  # the lof_k the stored suspicion was computed with
    auto_choices: dict[int, dict] = field(default_factory=dict)  # LOF-k -> the settings "auto" resolved to
    # Removes the store's private temporary directory when the state is collected (None: the caller's folder).
    cleanup: weakref.finalize | None = None


@dataclass(frozen=True)
class FittedState:
    """A fitted model as plain data: what ``SoftPatch.to_state`` gives and ``SoftPatch.from_state`` takes.

    Shapes: N training images, P = H * W patch positions, M memory-bank rows, D = ``config.feature_dim``.
    Outlier scores: higher = more likely noise.
    """

    config: SoftPatchConfig
    grid: tuple[int, int]  # (H, W) patch grid
    names: list[str]  # (N,) training image names
    sizes: list[tuple[int, int]]  # (N,) original (width, height)
    threshold: float | None  # image score at or above which an image is anomalous
    backbone: nn.Module  # the timm backbone with its weights as loaded (not batch-norm folded)
    bank_features: torch.Tensor  # (M, D) float32
    bank_weights: torch.Tensor  # (M,) float32 soft weights, >= 0
    bank_provenance: np.ndarray  # (M, 3) int64 [image, row, col]
    outlier_scores: torch.Tensor  # (N, P) float32 under config's discriminator
    suspicion: np.ndarray  # (N,) float32 image suspicion, for config.lof_k
    training_features: torch.Tensor | None  # (N, P, D) float32, or None: then the model cannot be re-tuned

    @property
    def removed_mask(self) -> np.ndarray:
        """``(N, P)`` bool: the patches ``config``'s tau cut removes from ``outlier_scores``."""
        scores = self.outlier_scores.numpy()
        if not denoises(self.config.discriminator, scores.shape[0]):
            return np.zeros(scores.shape, dtype=bool)
        return select_removed(scores, self.config.tau, self.config.tau_scope)


def build_extractor(config: SoftPatchConfig, device: torch.device) -> FeatureExtractor:
    """The backbone + patch feature module for ``config`` on ``device`` (the app caches this)."""
    extractor = FeatureExtractor(create_backbone(config), config)
    return extractor.to(device).to(memory_format=torch.channels_last)


class SoftPatch:
    """SoftPatch (seeds/000): PatchCore whose memory bank is denoised patch by patch.

    ``fit`` extracts patch features, scores every patch with a noise discriminator against the same
    position in the other images, removes the top ``tau``, picks a coreset of the rest, and keeps each
    kept patch's outlier score as a soft weight. ``score`` returns, per test image, the maximum over its
    patches of ``W(m*) * ||p - m*||`` (eq. 8). Higher scores = more anomalous.
    """

    def __init__(self, config: SoftPatchConfig | None = None, *, extractor: FeatureExtractor | None = None) -> None:
        self.config = config if config is not None else SoftPatchConfig()
        self._extractor = extractor
        self._state: _TrainingState | None = None
        self._bank: MemoryBank | None = None
        self._bank_key: tuple | None = None
        self._neighbour_search: NeighbourSearch | None = None
        self.threshold_: float | None = None

    # ------------------------------------------------------------------ fitting
    def fit(
        self,
        images: Sequence[ImageInput],
        *,
        build_memory_bank: bool = True,
        progress: ProgressCallback | None = None,
        feature_directory: str | os.PathLike | None = None,
        feature_dtype: str = STORE_DTYPE,
        cluster: RayCluster | None = None,
    ) -> SoftPatch:
        """Learn from training images (paths, PIL images or ``ImageRecord``s). Returns self.

        Patch features stream from the backbone into an on-disk ``FeatureStore`` (``feature_dtype``) that every
        later stage, and re-tuning, reads by chunks: memory does not grow with the features. The store
        lives in ``feature_directory`` (created, kept: e.g. a session folder or a shared one), or in a
        private temporary directory removed with the model (``close``, or when it is collected).
        Refuses (``ResourceError``) before reading any image when the fit would not fit in memory or
        the store would not fit on disk. ``build_memory_bank=False`` stops after the noise scores.
        ``cluster`` (``softpatch.runtime.distributed.RayCluster``): extract the features and search the
        neighbours on that cluster, with the store in its store folder; the result equals the local fit's.
        None: this process only.
        """
        if len(images) == 0:
            raise SoftPatchError("no training images to fit on")
        self.device_ = resolve_device(self.config.device)
        extractor = self._get_extractor()
        grid = extractor.grid_shape(self.config.crop)
        n = len(images)
        _check_memory(estimate_fit_memory(self.config, n, grid, with_memory_bank=build_memory_bank))
        disk = estimate_fit_disk(self.config, n, grid, feature_dtype)
        if feature_directory is not None:
            directory = Path(feature_directory)
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            check_disk_space(directory, disk)
            cleanup = None
        else:
            # Private to this model (mode 0700); with a cluster, in its store folder, which every node sees.
            parent = cluster.store_dir if cluster is not None and cluster.store_dir else tempfile.gettempdir()
            check_disk_space(parent, disk)
            directory = cluster.new_store_dir() if cluster else Path(tempfile.mkdtemp(prefix="softpatch-features-"))
            cleanup = weakref.finalize(self, shutil.rmtree, directory, ignore_errors=True)
        search = None
        try:
            batches = self._feature_batches(images, progress)
            first, sizes = next(batches)
            # The first batch's mean as a float16 store's offset: it then rounds differences between images.
            offset = first.mean(0) if feature_dtype == "float16" else None  # float32 stays bit-exact
            store = FeatureStore.create(
                directory, n, grid[0] * grid[1], self.config.feature_dim, dtype=feature_dtype, offset=offset
            )
            store.write_images(0, first)
            if cluster is None:
                with WriteBehind(store.write_images, STORE_WRITES_PENDING) as write:
                    for features, batch_sizes in batches:
                        write(len(sizes), features)
                        sizes.extend(batch_sizes)
            else:  # the rest on the cluster, into the same store: rows identical to the local path's
                batches.close()
                batch_size = self.config.batch_size or default_batch_size(self.device_)
                sizes += cluster.extract_into(
                    self, store, images, start=len(first), batch_size=batch_size, progress=progress
                )
                search = cluster.neighbour_search(store)
            names = [_name_of(img, i) for i, img in enumerate(images)]
        except BaseException:
            if cleanup is not None:
                cleanup()
            raise
        embeddings = Embeddings(store, names, sizes, self.config.feature_key())
        self.fit_embeddings(embeddings, build_memory_bank=build_memory_bank, progress=progress, neighbour_search=search)
        if cleanup is not None:  # the directory now lives as long as the training state, shared by variants
            cleanup.detach()
            self._state.cleanup = weakref.finalize(self._state, shutil.rmtree, directory, ignore_errors=True)
        return self

    def close(self) -> None:
        """Remove this model's private feature store now (also done when it is collected); a no-op otherwise.

        Variants share the store: close only when none of them is used any more.
        """
        state = self._state
        if state is not None and state.cleanup is not None:
            state.cleanup()

    def fit_embeddings(
        self,
        embeddings: Embeddings,
        *,
        build_memory_bank: bool = True,
        progress: ProgressCallback | None = None,
        neighbour_search: NeighbourSearch | None = None,
    ) -> SoftPatch:
        """Fit on training features from ``embed`` (denoising, coreset, soft weights). Returns self.

        ``build_memory_bank=False`` stops after the noise scores (enough for vetting); the bank is then
        built on first use. ``neighbour_search``: what computes the per-position neighbours during this fit
        (default ``compute_neighbours``, here; a cluster's gives the same result elsewhere).
        """
        if len(embeddings) == 0:
            raise SoftPatchError("no training images to fit on")
        if embeddings.feature_key != self.config.feature_key():
            raise SoftPatchError("these embeddings were computed with other feature settings than this model's")
        self.device_ = resolve_device(self.config.device)
        self.grid_shape_ = self._get_extractor().grid_shape(self.config.crop)
        self._state = _TrainingState(features=embeddings.features, names=embeddings.names, sizes=embeddings.sizes)
        self._invalidate_bank()
        self.threshold_ = None
        self._neighbour_search = neighbour_search
        try:
            self._ensure_scores(progress)
        finally:
            self._neighbour_search = None  # later re-tunes search here: the same neighbours
        if build_memory_bank:
            self.build_memory_bank(progress)
        return self

    def retune(self, *, progress: ProgressCallback | None = None, **changes: object) -> SoftPatch:
        """Change denoising or memory-bank settings on a fitted model without re-reading images. Returns self.

        Changing ``tau`` only re-thresholds cached scores; ``lof_k`` re-scores from cached neighbours; the
        memory bank is rebuilt lazily, on the next ``score`` or ``build_memory_bank``.
        """
        state = self._check_fitted()
        bad = sorted(set(changes) - RETUNE_FIELDS)
        if bad:
            feature = [b for b in bad if b in FEATURE_FIELDS]
            if feature:
                raise SoftPatchError(f"changing {', '.join(feature)} changes the features: fit again instead")
            raise SoftPatchError(f"unknown settings: {', '.join(bad)}")
        new_config = self.config.replace(**changes)
        if state.features is None and self._bank_settings(new_config) != self._bank_settings(self.config):
            raise SoftPatchError(
                "this model was loaded from a bundle without its training features: fit again to change "
                "denoising or memory-bank settings"
            )
        device = resolve_device(new_config.device)  # may refuse; nothing has changed yet
        self.config = new_config
        self.device_ = device
        if state.features is not None:
            self._ensure_scores(progress)
        return self

    def variant(self, **changes: object) -> SoftPatch:
        """A re-tuned copy sharing this model's features and caches; this model is left unchanged."""
        state = self._check_fitted()
        clone = copy.copy(self)
        if state.features is not None:  # a loaded model keeps its one bank; retune refuses bank changes
            clone._bank = None
            clone._bank_key = None
        return clone.retune(**changes)

    # ------------------------------------------------------------------ serialising
    def to_state(self, *, training_features: bool = False) -> FittedState:
        """This fitted model as plain data (the memory bank is built first if it is not yet).

        ``training_features=True`` includes the ``(N, P, D)`` training features, so that the model rebuilt
        by ``from_state`` can be re-tuned; ``NotFittedError``/``SoftPatchError`` when it has none.
        """
        bank = self.build_memory_bank()
        n = len(self.train_names_)
        return FittedState(
            config=self.resolved_config_,  # "auto" as what it chose for this training set
            grid=tuple(self.grid_shape_),
            names=list(self.train_names_),
            sizes=list(self.train_sizes_),
            threshold=self.threshold_,
            backbone=self._get_extractor().backbone,
            bank_features=bank.features,
            bank_weights=bank.weights,
            bank_provenance=np.asarray(bank.provenance, dtype=np.int64),
            outlier_scores=torch.from_numpy(np.ascontiguousarray(self.outlier_scores_.reshape(n, -1))).float(),
            suspicion=np.ascontiguousarray(self.suspicion_, dtype=np.float32),
            training_features=self.train_features_ if training_features else None,
        )

    @classmethod
    def from_state(cls, state: FittedState, *, device: str) -> SoftPatch:
        """A scoring-ready model from ``to_state`` data (checked by the caller, e.g. ``load_bundle``)."""
        config = state.config.replace(device=device)
        model = cls(config)
        model.device_ = resolve_device(config.device)
        extractor = FeatureExtractor(state.backbone, config)
        model._extractor = extractor.to(model.device_).to(memory_format=torch.channels_last)
        model.grid_shape_ = tuple(state.grid)
        model._state = _TrainingState(
            features=state.training_features,
            names=list(state.names),
            sizes=list(state.sizes),
            suspicion=state.suspicion,
            suspicion_k=config.lof_k,
        )
        model._state.scores[model._score_key(config)] = state.outlier_scores
        model._bank = MemoryBank(state.bank_features, state.bank_weights, state.bank_provenance)
        model._bank.prepare_search(model.device_, config.search)  # loaded = ready to score at full speed
        model._bank_key = model._bank_settings()
        model.threshold_ = state.threshold
        return model

    # ------------------------------------------------------------------ features
    @property
    def extractor_(self) -> FeatureExtractor:
        """The backbone + patch feature module this model scores with (shared with variants: read, do not modify)."""
        return self._get_extractor()

    def _get_extractor(self) -> FeatureExtractor:
        if self._extractor is None:
            self._extractor = build_extractor(self.config, resolve_device(self.config.device))
        self._extractor.precision = self.config.precision
        return self._extractor

    def embed(self, images: Sequence[ImageInput], *, progress: ProgressCallback | None = None) -> Embeddings:
        """Patch features ``(n, P, D)`` of ``images``, in batches, on the configured device."""
        self.device_ = getattr(self, "device_", None) or resolve_device(self.config.device)
        extractor = self._get_extractor()
        transform = self.transform_
        grid = extractor.grid_shape(self.config.crop)
        n = len(images)
        _check_memory(estimate_embed_memory(self.config, n, grid))
        names = image_names(images)
        out = torch.empty(n, grid[0] * grid[1], self.config.feature_dim, dtype=torch.float32)
        sizes: list[tuple[int, int]] = []
        done = 0
        batch_size = self.config.batch_size or default_batch_size(self.device_)
        report(progress, 0.0, f"features: 0/{n} images")
        for batch, batch_sizes in _load_batches(images, transform, batch_size):
            sizes.extend(batch_sizes)
            out[done : done + len(batch)] = self._forward_with_fallback(extractor, batch)
            done += len(batch)
            report(progress, done / n, f"features: {done}/{n} images")
        return Embeddings(out, names, sizes, self.config.feature_key())

    def embed_into(
        self,
        store: FeatureStore,
        images: Sequence[ImageInput],
        *,
        start: int = 0,
        progress: ProgressCallback | None = None,
    ) -> tuple[list[str], list[tuple[int, int]]]:
        """Write the patch features of ``images`` into ``store`` as images ``start .. start + len(images)``.

        Batch by batch: nothing but one batch is held. Disjoint ranges of one store may be filled by several
        processes at once (each with its own model). Returns the images' names and original sizes.
        """
        self.device_ = getattr(self, "device_", None) or resolve_device(self.config.device)
        extractor = self._get_extractor()
        grid = extractor.grid_shape(self.config.crop)
        if store.shape[1:] != (grid[0] * grid[1], self.config.feature_dim):
            raise SoftPatchError("this feature store was made for other feature settings than this model's")
        n = len(images)
        if not 0 <= start <= store.shape[0] - n:
            raise SoftPatchError(f"images {start}..{start + n} do not fit a feature store of {store.shape[0]} images")
        names = [_name_of(img, start + i) for i, img in enumerate(images)]
        sizes: list[tuple[int, int]] = []
        done = 0
        with WriteBehind(store.write_images, STORE_WRITES_PENDING) as write:
            for features, batch_sizes in self._feature_batches(images, progress):
                write(start + done, features)
                sizes.extend(batch_sizes)
                done += len(features)
        return names, sizes

    def _feature_batches(
        self, images: Sequence[ImageInput], progress: ProgressCallback | None
    ) -> Iterator[tuple[torch.Tensor, list[tuple[int, int]]]]:
        """``(b, P, D)`` float32 features and original sizes of ``images``, batch by batch."""
        extractor = self._get_extractor()
        n = len(images)
        done = 0
        batch_size = self.config.batch_size or default_batch_size(self.device_)
        report(progress, 0.0, f"features: 0/{n} images")
        for batch, batch_sizes in _load_batches(images, self.transform_, batch_size):
            features = self._forward_with_fallback(extractor, batch)
            done += len(batch)
            report(progress, done / n, f"features: {done}/{n} images")
            yield features, list(batch_sizes)

    def _forward_with_fallback(self, extractor: FeatureExtractor, batch: torch.Tensor) -> torch.Tensor:
        """Run a batch; on a GPU out-of-memory, in smaller pieces, then on the CPU, keeping work already done."""
        pieces: list[torch.Tensor] = []

        def work(start: int, stop: int, device: torch.device) -> None:
            if device.type != self.device_.type:  # run_in_chunks gave up on the GPU: so does the model
                extractor.to(device)
                self.device_ = device
            weights_device = next(extractor.parameters()).device  # where the fallback has left the backbone
            pieces.append(extractor(batch[start:stop].to(weights_device, non_blocking=True)).cpu())

        run_in_chunks(batch.shape[0], batch.shape[0], self.device_, work)
        return torch.cat(pieces)

    # ------------------------------------------------------------------ denoising
    def _params(self, config: SoftPatchConfig | None = None) -> DiscriminatorParams:
        config = self._resolve(config)
        n = len(self._state.names) if self._state else 0
        return DiscriminatorParams(
            lof_k=max(1, effective_lof_k(config.lof_k, n)) if n >= 2 else config.lof_k,
            gaussian_reg=config.gaussian_reg,
            fusion=config.fusion,
        )

    def _resolve(self, config: SoftPatchConfig | None = None) -> SoftPatchConfig:
        """``config`` (default: the model's) with ``discriminator="auto"`` replaced by what it chose for this training set.

        The choice is a pure function of the training set's wide suspicion (``contamination.choose_settings``),
        made once per LOF-k and cached with the fit; every other config is returned as it is.
        """
        config = config or self.config
        if config.discriminator != AUTO:
            return config
        state = self._check_fitted()
        changes = state.auto_choices.get(config.lof_k)
        if changes is None:
            changes = choose_settings(self.wide_suspicion_, config.lof_k, len(state.names))
            state.auto_choices[config.lof_k] = changes
        return config.replace(**changes)

    @property
    def resolved_config_(self) -> SoftPatchConfig:
        """The settings in use: the config, with "auto" replaced by the choice made for this training set."""
        return self._resolve()

    def _discriminator(self) -> str:
        return self._resolve().discriminator

    def _score_key(self, config: SoftPatchConfig) -> tuple:
        config = self._resolve(config)
        name = config.discriminator
        members = config.fusion if name == "fusion" else (name,)
        key: tuple = (name,)
        if "lof" in members:
            key += ("k", clamp_lof_k(config.lof_k, len(self._state.names)))
        if "gaussian" in members:
            key += ("reg", config.gaussian_reg)
        if name == "fusion":
            key += ("members", config.fusion)
        reference = self._reference(config)
        if reference is not None and name != "none":
            key += ("reference", config.neighbour_reference, config.seed)
        return key

    def _reference(self, config: SoftPatchConfig | None = None) -> np.ndarray | None:
        """The reference images the neighbour search compares with (None: all of them, exact)."""
        config = config or self.config
        return reference_images(len(self._state.names), config.neighbour_reference, config.seed)

    def _denoising_key(self, config: SoftPatchConfig) -> tuple:
        return (self._score_key(config), config.tau, config.tau_scope)

    def _ensure_scores(self, progress: ProgressCallback | None) -> torch.Tensor:
        """The current discriminator's ``(N, P)`` scores, computed once per setting and cached."""
        state = self._check_fitted()
        if self.config.discriminator == AUTO:
            # "auto" chooses from the images' suspicion, which needs the neighbour search: run it here, where it
            # reports progress, not silently inside the choice (minutes at 10,000 images). A no-op once cached.
            self._neighbours(progress=progress)
        key = self._score_key(self.config)
        if key in state.scores:
            return state.scores[key]
        n, p = len(state.names), self.grid_shape_[0] * self.grid_shape_[1]
        name = self._discriminator()
        if not denoises(name, n):
            if DISCRIMINATORS[name].denoises:
                warnings.warn("denoising needs at least 2 training images: no patch is removed", stacklevel=2)
            state.scores[key] = torch.ones(n, p)
            return state.scores[key]
        params = self._params()
        features = state.features if needs_features(name, params) else None
        state.scores[key] = score_patches(
            name,
            params,
            self._neighbours(params.lof_k, progress),
            features,
            device=self.device_,
            budget_bytes=work_budget(self.device_),
            progress=progress,
        )
        return state.scores[key]

    def _removed_flat(self) -> np.ndarray:
        scores = self._ensure_scores(None).numpy()
        if not denoises(self._discriminator(), scores.shape[0]):
            return np.zeros(scores.shape, dtype=bool)
        return select_removed(scores, self.config.tau, self.config.tau_scope)

    # ------------------------------------------------------------------ memory bank
    def _invalidate_bank(self) -> None:
        self._bank = None
        self._bank_key = None

    def _bank_settings(self, config: SoftPatchConfig | None = None) -> tuple:
        c = config or self.config
        return (
            self._denoising_key(c),
            c.soft_weight,
            c.coreset,
            c.coreset_ratio,
            c.projection_dim,
            c.seed,
            c.coreset_exact_rows,
            c.coreset_block_rows,
            c.bank_budget_mb,
        )

    def build_memory_bank(self, progress: ProgressCallback | None = None) -> MemoryBank:
        """The memory bank for the current settings: denoised, coreset-sampled, soft-weighted. Cached."""
        state = self._check_fitted()
        key = self._bank_settings()
        if self._bank is not None and (self._bank_key == key or state.features is None):
            return self._bank
        scores = self._ensure_scores(progress).numpy()
        removed = self._removed_flat().reshape(-1)
        kept = np.flatnonzero(~removed)
        if kept.size == 0:
            raise SoftPatchError("every training patch was removed: lower tau")
        c = self.config
        plan = plan_coreset(
            kept.size,
            method=c.coreset,
            ratio=c.coreset_ratio,
            row_bytes=BANK_VALUE_BYTES * state.features.shape[-1],
            budget_bytes=c.bank_budget_mb * 1024**2,
            exact_rows=c.coreset_exact_rows,
            block_rows=c.coreset_block_rows,
        )
        if plan.capped:
            message = plan.capped_message(state.features.shape[-1], c.bank_budget_mb, c.coreset_ratio)
            warnings.warn(message, stacklevel=2)
            report(progress, 0.0, f"coreset: {message}")
        if plan.method == "blocked":
            report(
                progress,
                0.0,
                f"coreset: {plan.kept:,} kept patches, more than {c.coreset_exact_rows:,}: greedy k-centre on "
                f"{plan.blocks} random blocks",
            )
        # The plan, not the settings behind it: settings that lead to the same plan share one selection.
        selection_key = (hashlib.sha256(removed.tobytes()).hexdigest(), plan, c.projection_dim, c.seed)
        chosen = state.coresets.get(selection_key)
        if chosen is None:
            projected = None
            if plan.method in ("greedy", "blocked"):
                projected = state.projections.get((c.projection_dim, c.seed))
                if projected is None:
                    report(progress, 0.0, "coreset: projecting patches")
                    projected = _project(state.features, c.projection_dim, c.seed)
                    state.projections[(c.projection_dim, c.seed)] = projected
            chosen = select_rows(projected, kept, plan, seed=c.seed, progress=progress)
            state.coresets[selection_key] = chosen
        if c.soft_weight and denoises(self._discriminator(), len(state.names)):
            weights = torch.from_numpy(soft_weights(scores).reshape(-1)[chosen])
        else:
            weights = torch.ones(chosen.size)
        p = self.grid_shape_[0] * self.grid_shape_[1]
        positions = chosen % p
        provenance = np.stack([chosen // p, positions // self.grid_shape_[1], positions % self.grid_shape_[1]], axis=1)
        bank = MemoryBank(
            _gather(state.features, chosen), weights.float(), provenance.astype(np.int64), coreset_plan=plan
        )
        # Part of a ready bank, so the first score() is not slower. Kept patches that the coreset left
        # out are nominal patches like most test patches: the search tunes itself on a sample of them.
        left_out = np.setdiff1d(kept, chosen, assume_unique=True)
        sample = left_out[np.linspace(0, left_out.size - 1, min(left_out.size, _CALIBRATION_PATCHES)).astype(np.int64)]
        bank.prepare_search(self.device_, c.search, calibration=_gather(state.features, sample))
        self._bank, self._bank_key = bank, key
        report(progress, 1.0, f"coreset: memory bank of {chosen.size} patches ready")
        return self._bank

    @property
    def memory_bank_(self) -> MemoryBank:
        return self.build_memory_bank()

    # ------------------------------------------------------------------ scoring
    def score(
        self,
        images: Sequence[ImageInput] | Embeddings,
        *,
        with_maps: bool = True,
        progress: ProgressCallback | None = None,
    ) -> ScoreResult:
        """Score test images (or precomputed ``Embeddings``); higher = more anomalous."""
        self._check_fitted()
        if len(images) == 0:
            raise SoftPatchError("no images to score")
        embeddings = images if isinstance(images, Embeddings) else self.embed(images, progress=progress)
        if embeddings.feature_key != self.config.feature_key():
            raise SoftPatchError("these embeddings were computed with other feature settings than this model's")
        bank = self.build_memory_bank(progress)
        n, p, d = embeddings.features.shape
        patch_scores = torch.empty(n, p)
        # Small search calls, each followed by a message: progress never waits long on a slow or busy machine.
        step = max(1, _SCORING_PATCHES_PER_STEP // max(p, 1))
        report(progress, 0.0, f"scoring: nearest-neighbour search, 0/{n} images")
        recall = None
        for start in range(0, n, step):
            stop = min(n, start + step)
            match = bank.search(embeddings.features[start:stop].reshape(-1, d), self.device_, method=self.config.search)
            if match.recall is not None and recall is None:
                recall = match.recall
                report(progress, start / n, f"scoring: approximate search, measured recall@1 {recall:.3f}")
            weighted = bank.weights[match.index] * match.distance
            patch_scores[start:stop] = weighted.reshape(stop - start, p)
            report(progress, stop / n, f"scoring: nearest-neighbour search, {stop}/{n} images")
        grid_scores = patch_scores.reshape(n, *self.grid_shape_)
        maps = None
        if with_maps:
            maps = np.empty((n, self.config.crop, self.config.crop), dtype=np.float32)
            map_step = max(1, _MAP_PIXELS_PER_STEP // (self.config.crop**2))
            for start in range(0, n, map_step):
                stop = min(n, start + map_step)
                maps[start:stop] = anomaly_maps(grid_scores[start:stop], self.config.crop, self.config.blur_sigma)
                report(progress, stop / n, f"maps: {stop}/{n} anomaly maps")
        return ScoreResult(
            image_scores=grid_scores.reshape(n, -1).max(dim=1).values.numpy(),
            patch_scores=grid_scores.numpy(),
            anomaly_maps=maps,
            names=embeddings.names,
            sizes=embeddings.sizes,
            search_recall=recall,
        )

    # ------------------------------------------------------------------ what the app shows
    def _check_fitted(self) -> _TrainingState:
        if self._state is None:
            raise NotFittedError("this SoftPatch model is not fitted yet: call fit first")
        return self._state

    @property
    def transform_(self) -> ImageTransform:
        """The resize/crop/normalise geometry; also maps anomaly maps back onto the original images."""
        return ImageTransform(self.config.resize, self.config.crop)

    @property
    def train_names_(self) -> list[str]:
        return self._check_fitted().names

    @property
    def train_sizes_(self) -> list[tuple[int, int]]:
        return self._check_fitted().sizes

    @property
    def train_features_(self) -> torch.Tensor:
        """``(N, P, D)`` float32 training features as one tensor (read whole from the store of a fit from
        images: for large folders use ``feature_store_``, read by chunks)."""
        features = self._training_features()
        return features if isinstance(features, torch.Tensor) else features.to_tensor()

    def training_patches(self, flat_indices: np.ndarray) -> torch.Tensor:
        """``(n, D)`` float32 features of the training patches at ``flat_indices`` (image * P + position, the
        layout of ``removed_mask_.reshape(-1)``), read from the store without loading the other patches."""
        return _gather(self._training_features(), np.asarray(flat_indices, dtype=np.int64))

    def _training_features(self) -> FeatureSource:
        features = self._check_fitted().features
        if features is None:
            raise SoftPatchError("this model was loaded from a bundle and has no training features")
        return features

    @property
    def feature_store_(self) -> FeatureStore | None:
        """The on-disk store the training features live in (None when they are in memory or absent)."""
        features = self._check_fitted().features
        return features if isinstance(features, FeatureStore) else None

    @property
    def outlier_scores_(self) -> np.ndarray:
        """``(N, H, W)`` outlier score of every training patch under the current discriminator."""
        return self._ensure_scores(None).numpy().reshape(-1, *self.grid_shape_)

    @property
    def removed_mask_(self) -> np.ndarray:
        """``(N, H, W)`` True where the patch is removed as noise under the current tau."""
        self._check_fitted()
        return self._removed_flat().reshape(-1, *self.grid_shape_)

    @property
    def removed_fraction_(self) -> np.ndarray:
        return self.removed_mask_.reshape(len(self.train_names_), -1).mean(axis=1)

    @property
    def backbone_info_(self) -> BackboneInfo:
        return backbone_info(self._get_extractor().backbone, self.config)

    @property
    def neighbours_(self) -> NeighbourCache | None:
        """The per-position k-NN cache the discriminator reads, for the current settings (None below 2 images).

        ``dist`` and ``index`` ``(P, N, k)``: each patch's nearest patches of other images at its position,
        nearest first; ``reference`` the sorted reference images searched, None when the search is exact.
        Variants of one fit share it: reading it from a variant with other settings may replace it.
        """
        return self._neighbours()

    def _neighbours(self, lof_k: int | None = None, progress: ProgressCallback | None = None) -> NeighbourCache | None:
        """The per-position k-NN cache, enough for ``lof_k`` (default: the config's), computed on first need
        (None with fewer than 2 images)."""
        state = self._check_fitted()
        n = len(state.names)
        reference = self._reference()
        k = neighbour_cache_k(lof_k or self.config.lof_k, n if reference is None else len(reference))
        cached = state.neighbours
        stale = (
            cached is None
            or cached.k < k
            or (cached.reference is None) != (reference is None)
            or (reference is not None and not np.array_equal(cached.reference, reference))
        )
        if n >= 2 and state.features is not None and stale:
            store = state.features if isinstance(state.features, FeatureStore) else None
            search = self._neighbour_search or compute_neighbours
            state.neighbours = search(
                state.features,
                k,
                device=self.device_,
                budget_bytes=work_budget(self.device_),
                progress=progress,
                reference=reference,
                directory=store.directory if store is not None else None,
                seed=self.config.seed,
            )
        return state.neighbours

    @property
    def suspicion_(self) -> np.ndarray:
        """``(N,)`` image-level suspicion: mean relative distance to the k = lof_k most similar images."""
        return self._suspicion(self.config.lof_k)

    @property
    def wide_suspicion_(self) -> np.ndarray:
        """``(N,)`` suspicion over the ``NEIGHBOUR_CACHE_K`` most similar images (all cached neighbours).

        Unlike ``suspicion_`` (k = lof_k), a group of up to that many look-alike defective images cannot hide
        in it: their wide neighbourhoods reach the good images. What "auto" estimates contamination from.
        """
        neighbours = self._neighbours()
        if neighbours is None:
            return np.zeros(len(self._check_fitted().names), dtype=np.float32)
        return image_suspicion(neighbours.mean_distance(min(NEIGHBOUR_CACHE_K, neighbours.k)))

    def _suspicion(self, lof_k: int) -> np.ndarray:
        state = self._check_fitted()
        # The stored values hold for their own k; with the training features at hand, another k is computed.
        if state.suspicion is not None and (state.features is None or state.suspicion_k == self.config.lof_k):
            return state.suspicion
        neighbours = self._neighbours(lof_k)
        if neighbours is None:
            return np.zeros(len(state.names), dtype=np.float32)
        k = max(1, min(lof_k, neighbours.k))
        return image_suspicion(neighbours.mean_distance(k))

    def vetting_report(self) -> VettingReport:
        """Training images ranked by suspicion (image level), with their removed share (patch level)."""
        suspicion = self.suspicion_
        ranking = np.argsort(-suspicion, kind="stable")
        return VettingReport(list(self.train_names_), suspicion, self.removed_fraction_, ranking)


def _gather(features: FeatureSource, flat_indices: np.ndarray) -> torch.Tensor:
    """``(k, D)`` float32 patches by flat index (image * P + position), a fresh tensor."""
    if isinstance(features, FeatureStore):
        return features.gather(flat_indices)
    return features.reshape(-1, features.shape[-1])[torch.from_numpy(np.asarray(flat_indices, dtype=np.int64))].clone()


def _project(features: FeatureSource, dim: int, seed: int) -> np.ndarray | DiskArray:
    """The coreset's ``(N*P, dim)`` seeded random projection of every patch, rows by flat index.

    From a store, computed by blocks of images into a float32 ``DiskArray`` beside it (never whole in memory).
    """
    if isinstance(features, torch.Tensor):
        return random_projection(features.reshape(-1, features.shape[-1]), dim, seed)
    n, p, d = features.shape
    out_dim = min(dim, d)
    out = DiskArray.create(features.array_path(f"projection_{dim}_{seed}"), (n * p, out_dim), np.float32)
    matrix = projection_matrix(d, dim, seed) if dim < d else None
    step = max(1, _PROJECTION_ROWS_PER_STEP // p)
    with ReadAhead(features.read_images, n) as read:
        for start in range(0, n, step):
            stop = min(n, start + step)
            block = read(start, stop).reshape(-1, d)
            out.write(start * p, (block @ matrix if matrix is not None else block).numpy())
    return out


def _check_memory(estimate: MemoryEstimate) -> None:
    """``ResourceError`` before any work when ``estimate`` exceeds the host's free memory."""
    available = available_memory(torch.device("cpu"))
    if estimate.total_bytes > available:
        raise ResourceError(estimate.refusal_message(available))


def image_names(images: Sequence[ImageInput]) -> list[str]:
    """The names ``embed`` gives ``images``: an image's path or file name, else ``image_<index>``."""
    return [_name_of(image, i) for i, image in enumerate(images)]


def _name_of(image: object, index: int) -> str:
    path = getattr(image, "path", None)  # ImageRecord
    if path is not None:
        return str(path)
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    return getattr(image, "filename", "") or f"image_{index}"


def _load_one(image: object) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = getattr(image, "path", image)
    return load_image(Path(path) if not isinstance(path, (str, os.PathLike)) else path)


def _load_batches(
    images: Sequence[ImageInput], transform: object, batch_size: int
) -> Iterator[tuple[torch.Tensor, list[tuple[int, int]]]]:
    """Decoded, transformed batches, decoding the next batch in threads while the current one runs."""

    workers = decode_workers()  # read here: the prefetch thread does not see the caller's thread bound

    def prepare(chunk: Sequence[ImageInput]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        with decode_pool(workers) as pool:
            decoded = list(pool.map(_load_one, chunk))
        return torch.stack([transform(img) for img in decoded]), [img.size for img in decoded]

    chunks = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    with decode_pool(1) as prefetch:
        pending = prefetch.submit(prepare, chunks[0]) if chunks else None
        for i in range(len(chunks)):
            current = pending.result()
            pending = prefetch.submit(prepare, chunks[i + 1]) if i + 1 < len(chunks) else None
            yield current
