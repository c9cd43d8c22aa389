"""Patch scores to pixel anomaly maps: bilinear upsampling to the crop, then a Gaussian blur."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(4 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


@functools.lru_cache(maxsize=16)
def axis_operator(n_in: int, size: int, sigma: float) -> torch.Tensor:
    """``(size, n_in)`` matrix of one axis: linear upsampling (half-pixel centres), then the blur.

    Bilinear upsampling and a separable blur with edge padding are both linear and act on each axis
    independently, so the whole map is ``A_rows @ scores @ A_cols.T``: two small matrix products
    instead of an upsampled image and a 33-tap convolution (several times faster on a CPU).
    """
    signals = torch.eye(n_in, dtype=torch.float64).unsqueeze(1)  # (n_in, 1, n_in): one unit impulse per row
    up = F.interpolate(signals, size=size, mode="linear", align_corners=False)  # (n_in, 1, size)
    if sigma > 0:
        kernel = _gaussian_kernel(sigma)
        pad = kernel.numel() // 2
        # Edge padding keeps the border from fading towards zero.
        up = F.conv1d(F.pad(up, (pad, pad), mode="replicate"), kernel.view(1, 1, -1))
    return up.squeeze(1).T.float().contiguous()


def map_operators(grid: tuple[int, int], size: int, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(size, H)`` row and ``(size, W)`` column operators of a ``(H, W)`` patch grid (see ``axis_operator``)."""
    return axis_operator(int(grid[0]), int(size), float(sigma)), axis_operator(int(grid[1]), int(size), float(sigma))


def anomaly_maps(
    patch_scores: torch.Tensor, size: int, sigma: float, *, operators: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """``(n, H, W)`` patch scores -> ``(n, size, size)`` maps, blurred with ``sigma`` pixels (0 = no blur).

    ``operators``: ``map_operators(...)`` computed beforehand; the ONNX export passes them because a traced
    grid shape is not a plain int and would trace the operators' construction into the graph.
    """
    scores = patch_scores.float()
    rows, cols = operators if operators is not None else map_operators(scores.shape[1:], size, sigma)
    return rows.to(scores.device) @ scores @ cols.to(scores.device).T
