"""Images the pages show, drawn from a fitted model's outputs (no computation of scores here)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from softpatch_app.cache import load_rgb
from softpatch_app.imaging import (
    Geometry,
    draw_outline,
    overlay_heatmap,
    overlay_mask,
    patch_crop,
    thumbnail,
    with_box,
)


def geometry(model) -> Geometry:
    return Geometry.of(model.transform_, model.grid_shape_)


def score_range(values: np.ndarray) -> tuple[float, float]:
    """A robust colour scale shared by a set of maps: 1st to 99.9th percentile."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = float(np.percentile(v, 1)), float(np.percentile(v, 99.9))
    return (lo, hi) if hi > lo else (lo, lo + 1e-6)


def removed_overlay(path: str, removed_grid: np.ndarray, geom: Geometry, px: int | None = None) -> Image.Image:
    """The training image with its removed patches tinted red (and outlined)."""
    image = load_rgb(path)
    if px:
        image = thumbnail(image, px)
    mask = geom.grid_mask_to_original(removed_grid, image.size)
    return overlay_mask(image, mask)


def outlier_heatmap(
    path: str, scores_grid: np.ndarray, geom: Geometry, vrange: tuple[float, float], px: int | None = None
) -> Image.Image:
    """The training image under its patch outlier scores (blocky: one colour per patch), on a shared scale."""
    image = load_rgb(path)
    if px:
        image = thumbnail(image, px)
    values = geom.grid_values_to_original(scores_grid, image.size)
    inside = geom.grid_mask_to_original(np.ones(geom.grid_shape, bool), image.size)
    values = np.where(inside, values, vrange[0])
    return overlay_heatmap(image, values, alpha=0.55, vmin=vrange[0], vmax=vrange[1])


def detection_overlay(
    path: str,
    amap_crop: np.ndarray,
    transform,
    *,
    alpha: float,
    vrange: tuple[float, float],
    threshold: float | None,
    image_score: float | None = None,
    px: int | None = None,
) -> Image.Image:
    """A test image under its anomaly map (mapped back by the core's transform), region over threshold outlined.

    With ``image_score``, the outline follows the image's verdict (``softpatch.io.heatmaps.outline_level``):
    every image called defective shows one, no image that passes does.
    """
    from softpatch.io.heatmaps import outline_level

    image = load_rgb(path)
    if px:
        image = thumbnail(image, px)
    amap = transform.map_to_original(amap_crop, image.size)
    out = overlay_heatmap(image, amap, alpha=alpha, vmin=vrange[0], vmax=vrange[1])
    if threshold is not None and np.isfinite(threshold):
        level = threshold
        if image_score is not None:
            level = outline_level(float(threshold), float(image_score), float(np.max(amap_crop)))
        region = amap >= level if level is not None else np.zeros(amap.shape, dtype=bool)
        if region.any():
            out = draw_outline(out, region)
    return out


def outlier_with_removed(
    path: str, scores_grid: np.ndarray, removed_grid: np.ndarray, geom: Geometry, vrange: tuple[float, float]
) -> Image.Image:
    """The outlier-score heatmap with the removed patches outlined on it (one picture, the scores first)."""
    heat = outlier_heatmap(path, scores_grid, geom, vrange)
    mask = geom.grid_mask_to_original(removed_grid, heat.size)
    return draw_outline(heat, mask) if mask.any() else heat


def patch_pictures(path: str, geom: Geometry, row: int, col: int, *, out: int = 96) -> tuple[Image.Image, Image.Image]:
    """The patch (row, col) of a training image cut out (with its 3x3 neighbourhood, ``out`` px), and the
    image with the patch boxed."""
    image = load_rgb(path)
    box = geom.cell_box(row, col, image.size, pad=1)
    return patch_crop(image, box, out=out), with_box(image, box)


def scored_overlay(
    detection,
    result,
    k: int,
    transform,
    *,
    alpha: float,
    vrange: tuple[float, float],
    threshold: float | None,
    px: int | None = None,
) -> Image.Image:
    """Scored image ``k`` of ``detection`` (``softpatch_app.services.Detection``) under one model's map
    (``result``: its SoftPatch or PatchCore ``ScoreResult``), outlined by that model's ``threshold``."""
    return detection_overlay(
        detection.paths[k],
        result.anomaly_maps[k],
        transform,
        alpha=alpha,
        vrange=vrange,
        threshold=threshold,
        image_score=float(result.image_scores[k]),
        px=px,
    )
