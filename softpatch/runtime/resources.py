"""Memory: what a fit will need, what the device has, and how big a chunk of work may be."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from softpatch.config import SoftPatchConfig
from softpatch.io.limits import format_bytes
from softpatch.method.discriminators import neighbour_cache_k
from softpatch.runtime.device import default_batch_size

# Share of free memory one chunk of discriminator work may use.
_CHUNK_SHARE = 0.15
_MIN_CHUNK_BYTES = 64 * 1024**2
_MAX_CHUNK_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class MemoryEstimate:
    """Host memory a fit holds at its peak, by component (bytes)."""

    n_images: int
    features_bytes: int  # (N, P, D) float32 training features, kept for re-tuning
    neighbours_bytes: int  # the per-position k-NN cache
    coreset_bytes: int  # projection of all patches + the chosen bank
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
    config: SoftPatchConfig, n_images: int, grid: tuple[int, int], *, with_memory_bank: bool = True
) -> MemoryEstimate:
    """Peak host memory of a fit on ``n_images``; ``with_memory_bank=False`` for vetting only (no coreset)."""
    patches = n_images * grid[0] * grid[1]
    k = neighbour_cache_k(config.lof_k, n_images)
    return MemoryEstimate(
        n_images=n_images,
        features_bytes=patches * config.feature_dim * 4,
        neighbours_bytes=patches * k * 8,
        coreset_bytes=patches * (config.projection_dim * 4 + 16)
        + int(patches * config.coreset_ratio) * config.feature_dim * 4
        if with_memory_bank
        else 0,
        backbone_bytes=backbone_batch_bytes(config),
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
