"""Patch scores to anomaly maps: shape, bilinear upsampling, blur that keeps the peak in place."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from softpatch.method.anomaly_map import anomaly_maps


def _bilinear_reference(grid: np.ndarray, size: int) -> np.ndarray:
    """Half-pixel-centre bilinear upsampling with edge clamping, written out in numpy."""
    h, w = grid.shape

    def coords(n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.clip((np.arange(size) + 0.5) * n_in / size - 0.5, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    y0, y1, fy = coords(h)
    x0, x1, fx = coords(w)
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x1] * fx
    bottom = grid[y1][:, x0] * (1 - fx) + grid[y1][:, x1] * fx
    return top * (1 - fy)[:, None] + bottom * fy[:, None]


def test_shape_and_dtype() -> None:
    maps = anomaly_maps(torch.rand(3, 8, 8, dtype=torch.float64), 64, 4.0)
    assert maps.shape == (3, 64, 64) and maps.dtype == torch.float32


def test_sigma_zero_is_plain_bilinear() -> None:
    grid = np.random.default_rng(0).uniform(size=(2, 7, 7)).astype(np.float32)
    maps = anomaly_maps(torch.from_numpy(grid), 56, 0.0).numpy()
    for i in range(2):
        np.testing.assert_allclose(maps[i], _bilinear_reference(grid[i], 56), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("row", "col"), [(2, 5), (0, 0), (7, 7), (4, 1)])
def test_blur_keeps_the_peak_on_its_patch(row: int, col: int) -> None:
    grid = torch.zeros(1, 8, 8)
    grid[0, row, col] = 1.0
    unblurred = anomaly_maps(grid, 64, 0.0)[0]
    blurred = anomaly_maps(grid, 64, 4.0)[0]
    y, x = np.unravel_index(int(torch.argmax(blurred)), (64, 64))
    assert row * 8 <= y < (row + 1) * 8 and col * 8 <= x < (col + 1) * 8
    assert blurred.max() < unblurred.max(), "a blur lowers a single peak"
    assert blurred.min() >= 0.0


def test_blur_keeps_a_constant_map_constant_up_to_the_border() -> None:
    maps = anomaly_maps(torch.full((1, 6, 6), 2.5), 48, 6.0)
    np.testing.assert_allclose(maps.numpy(), 2.5, rtol=1e-5)  # replicate padding: no fading edges


def test_blur_preserves_mass_of_an_interior_peak() -> None:
    grid = torch.zeros(1, 8, 8)
    grid[0, 4, 3] = 1.0
    unblurred = anomaly_maps(grid, 64, 0.0)
    blurred = anomaly_maps(grid, 64, 3.0)
    assert float(blurred.sum()) == pytest.approx(float(unblurred.sum()), rel=1e-3)


def test_maps_of_a_batch_are_independent() -> None:
    grids = torch.rand(4, 8, 8)
    together = anomaly_maps(grids, 32, 2.0)
    alone = anomaly_maps(grids[2:3], 32, 2.0)
    torch.testing.assert_close(together[2:3], alone)


def test_larger_sigma_smooths_more() -> None:
    grid = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(1))
    spreads = [float(anomaly_maps(grid, 64, s).std()) for s in (0.0, 2.0, 6.0)]
    assert spreads[0] > spreads[1] > spreads[2]


def _upsample_then_blur(grid: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """The 2-D way, in float64: upsample the image, then blur rows and columns with edge padding."""
    import math

    import torch.nn.functional as F

    maps = F.interpolate(grid.double().unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)
    radius = max(1, math.ceil(4 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel /= kernel.sum()
    maps = F.conv2d(F.pad(maps, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    maps = F.conv2d(F.pad(maps, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return maps.squeeze(1)


@pytest.mark.parametrize(("h", "w", "size", "sigma"), [(28, 28, 224, 4.0), (8, 5, 40, 2.5), (3, 9, 17, 0.7)])
def test_matrix_form_equals_upsampling_then_blurring(h: int, w: int, size: int, sigma: float) -> None:
    grid = torch.rand(3, h, w, generator=torch.Generator().manual_seed(h * w))
    maps = anomaly_maps(grid, size, sigma)
    torch.testing.assert_close(maps.double(), _upsample_then_blur(grid, size, sigma), rtol=1e-5, atol=1e-6)
