"""Memory: what a fit will need, what the device has, and how big a chunk of work may be."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import torch

from softpatch.config import SoftPatchConfig
from softpatch.errors import ResourceError
from softpatch.io.feature_store import store_bytes
from softpatch.io.limits import format_bytes
from softpatch.method.coreset import BANK_VALUE_BYTES, plan_coreset
from softpatch.method.discriminators import neighbour_cache_k, position_work_bytes, reference_images
from softpatch.method.memory_bank import search_memory_bytes
from softpatch.runtime.device import default_batch_size
from softpatch.runtime.write_behind import STORE_WRITES_PENDING

# Share of free memory one chunk of discriminator work may use.
_CHUNK_SHARE = 0.15
_MIN_CHUNK_BYTES = 64 * 1024**2
_MAX_CHUNK_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class MemoryEstimate:
    """Host memory a fit holds at its peak, by component (bytes)."""

    n_images: int
    features_bytes: int  # features held in memory: all (N, P, D) float32 in memory; one chunk when streamed
    neighbours_bytes: int  # the per-position k-NN cache (in memory), or one position's search when streamed
    coreset_bytes: int  # projection of the kept patches the coreset works on + the chosen bank and its search
    backbone_bytes: int  # model weights and activations of one batch

    @property
    def total_bytes(self) -> int:
        return self.features_bytes + self.neighbours_bytes + self.coreset_bytes + self.backbone_bytes

    def refusal_message(self, available: int) -> str:
        return (
            f"this needs about {format_bytes(self.total_bytes)} of memory ({self.n_images} images: features "
            f"{format_bytes(self.features_bytes)}, noise scores {format_bytes(self.neighbours_bytes)}, coreset "
            f"{format_bytes(self.coreset_bytes)}, backbone {format_bytes(self.backbone_bytes)}) but only {format_bytes(available)} is free; "
            "use fewer images, a smaller crop, or a smaller feature size"
        )


def estimate_fit_memory(
    config: SoftPatchConfig,
    n_images: int,
    grid: tuple[int, int],
    *,
    with_memory_bank: bool = True,
    streaming: bool = True,
) -> MemoryEstimate:
    """Peak host memory of a fit on ``n_images``; ``with_memory_bank=False`` for vetting only (no coreset).

    ``streaming`` (``SoftPatch.fit``): features and the neighbour cache live in an on-disk store, so memory
    holds one batch of features and one chunk of position-wise work (at least one position: ``n_images``
    patches against all images, or the reference sample above ``config.neighbour_reference``).
    ``streaming=False`` (``fit_embeddings`` on a tensor): all features and the cache are in memory.
    """
    p = grid[0] * grid[1]
    patches = n_images * p
    reference = reference_images(n_images, config.neighbour_reference, config.seed)
    compared = n_images if reference is None else len(reference)
    k = neighbour_cache_k(config.lof_k, compared)
    if streaming:
        batch = (config.batch_size or 32) * p * config.feature_dim * 4
        # The batch computed, those waiting for the store, and one position read back.
        features_bytes = batch * (1 + STORE_WRITES_PENDING) + n_images * config.feature_dim * 4
        neighbours_bytes = position_work_bytes(
            n_images, compared, config.feature_dim, with_features=True, read_ahead=True
        )
    else:
        features_bytes = patches * config.feature_dim * 4
        neighbours_bytes = patches * k * 8
    return MemoryEstimate(
        n_images=n_images,
        features_bytes=features_bytes,
        neighbours_bytes=neighbours_bytes,
        coreset_bytes=coreset_memory_bytes(config, patches, streaming=streaming) if with_memory_bank else 0,
        backbone_bytes=backbone_batch_bytes(config),
    )


# Per patch the greedy coreset works on: its float32 projection, squared norm, distance to the centres, index.
_GREEDY_ROW_EXTRA_BYTES = 16


def coreset_memory_bytes(config: SoftPatchConfig, patches: int, *, streaming: bool) -> int:
    """Peak memory of the coreset stage over ``patches`` (the kept patches: every patch is an upper bound).

    Follows ``plan_coreset``: the bank is what the memory budget leaves of the ratio's rows; the greedy
    works on all patches when exact, on one block when blocked. The projection of every patch is in
    memory only when the features are (``streaming=False``); a store keeps it on disk beside itself.
    """
    d = config.feature_dim
    plan = plan_coreset(
        patches,
        method=config.coreset,
        ratio=config.coreset_ratio,
        row_bytes=BANK_VALUE_BYTES * d,
        budget_bytes=config.bank_budget_mb * 1024**2,
        exact_rows=config.coreset_exact_rows,
        block_rows=config.coreset_block_rows,
    )
    row = min(config.projection_dim, d) * 4
    working = {"greedy": patches, "blocked": min(patches, config.coreset_block_rows)}.get(plan.method, 0)
    projection = 0 if streaming or plan.method not in ("greedy", "blocked") else patches * row
    bank = plan.rows * BANK_VALUE_BYTES * d
    return (
        projection + working * (row + _GREEDY_ROW_EXTRA_BYTES) + bank + search_memory_bytes(plan.rows, d, config.search)
    )


def estimate_fit_disk(config: SoftPatchConfig, n_images: int, grid: tuple[int, int], dtype: str = "float16") -> int:
    """Disk bytes of a streamed fit: the feature store, its neighbour cache and the coreset's projection."""
    p = grid[0] * grid[1]
    reference = reference_images(n_images, config.neighbour_reference, config.seed)
    k = neighbour_cache_k(config.lof_k, n_images if reference is None else len(reference))
    projection = n_images * p * min(config.projection_dim, config.feature_dim) * 4
    return store_bytes(n_images, p, config.feature_dim, dtype) + n_images * p * k * 8 + projection


def check_disk_space(directory: str | os.PathLike, needed: int) -> None:
    """``ResourceError`` when ``directory`` (or the nearest existing folder above it) has under ``needed`` bytes free."""
    path = os.path.abspath(directory)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    free = shutil.disk_usage(path).free
    if needed > free:
        raise ResourceError(
            f"the training features need about {format_bytes(needed)} of disk in {path} but only {format_bytes(free)} is free; "
            "free some space, choose another folder for them, or use fewer images"
        )


def backbone_batch_bytes(config: SoftPatchConfig) -> int:
    """Weights and the activations of one backbone batch (a generous rule of thumb: 40 floats per input value)."""
    batch = config.batch_size or default_batch_size(torch.device("cuda"))  # the larger default: an upper bound
    return 400 * 1024**2 + batch * 3 * config.crop**2 * 4 * 40


def estimate_embed_memory(config: SoftPatchConfig, n_images: int, grid: tuple[int, int]) -> MemoryEstimate:
    """Peak host memory of extracting the features of ``n_images`` (scoring, or the first stage of a fit)."""
    return MemoryEstimate(
        n_images=n_images,
        features_bytes=n_images * grid[0] * grid[1] * config.feature_dim * 4,
        neighbours_bytes=0,
        coreset_bytes=0,
        backbone_bytes=backbone_batch_bytes(config),
    )


def available_memory(device: torch.device) -> int:
    """Free memory on ``device`` in bytes (host: MemAvailable, also honouring a cgroup limit)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    available = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as fh:
                text = fh.read().strip()
            if text.isdigit():
                limit = int(text)
                with open(
                    path.replace("memory.max", "memory.current").replace("limit_in_bytes", "usage_in_bytes")
                ) as fh:
                    used = int(fh.read().strip())
                headroom = max(0, limit - used)
                available = headroom if available is None else min(available, headroom)
        except (OSError, ValueError):
            continue
    return available if available is not None else 8 * 1024**3


def work_budget(device: torch.device) -> int:
    """Bytes one chunk of position-wise work may take on ``device``."""
    budget = int(available_memory(device) * _CHUNK_SHARE)
    return max(_MIN_CHUNK_BYTES, min(_MAX_CHUNK_BYTES, budget))
