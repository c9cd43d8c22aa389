"""Patch scores to pixel anomaly maps: bilinear upsampling to the crop, then a Gaussian blur."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _gaussian_kernel(sigma: float, device: torch.device) -> torch.Tensor:
    radius = max(1, math.ceil(4 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def anomaly_maps(patch_scores: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """``(n, H, W)`` patch scores -> ``(n, size, size)`` maps, blurred with ``sigma`` pixels (0 = no blur)."""
    maps = F.interpolate(patch_scores.unsqueeze(1).float(), size=(size, size), mode="bilinear", align_corners=False)
    if sigma > 0:
        kernel = _gaussian_kernel(sigma, maps.device)
        pad = kernel.numel() // 2
        # Separable blur; edge padding keeps the border from fading towards zero.
        maps = F.conv2d(F.pad(maps, (pad, pad, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
        maps = F.conv2d(F.pad(maps, (0, 0, pad, pad), mode="replicate"), kernel.view(1, 1, -1, 1))
    return maps.squeeze(1)
