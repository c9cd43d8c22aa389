"""Rendering anomaly maps as coloured overlays on the original images (CLI ``--heatmaps``, app, report)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from softpatch.io.images import ImageSource, ImageTransform, load_image

if TYPE_CHECKING:
    from softpatch.io.datasets import ImageRecord
    from softpatch.method.model import ScoreResult

# A perceptual blue-yellow-red ramp; (position, RGB) stops.
_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_COLOURS = np.array([[48, 18, 59], [40, 120, 220], [60, 200, 120], [250, 190, 40], [200, 20, 20]], dtype=np.float32)


def colourize(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map ``values`` (h, w) to RGB uint8 (h, w, 3); ``low``/``high`` fix the colour scale across images."""
    span = max(high - low, 1e-12)
    t = np.clip((values - low) / span, 0.0, 1.0)
    rgb = np.stack([np.interp(t, _STOPS, _COLOURS[:, c]) for c in range(3)], axis=-1)
    return rgb.astype(np.uint8)


def overlay(image: Image.Image, amap: np.ndarray, *, low: float, high: float, opacity: float = 0.5) -> Image.Image:
    """Blend the colourised ``amap`` (already at the image's size, (h, w)) over ``image``."""
    heat = Image.fromarray(colourize(amap, low, high))
    return Image.blend(image.convert("RGB"), heat, float(np.clip(opacity, 0.0, 1.0)))


def _safe_stem(name: str, index: int) -> str:
    stem = re.sub(r"[^\w.-]+", "_", Path(name).stem)[:80] or "image"
    return f"{index:04d}_{stem}"


def save_heatmaps(
    result: ScoreResult, transform: ImageTransform, sources: Sequence[ImageSource | ImageRecord], folder: Path
) -> list[Path]:
    """Write one overlay PNG per scored image into ``folder``; returns the files written, in ``sources`` order.

    ``result`` must hold ``(n, crop, crop)`` anomaly maps of the ``n`` ``sources`` (higher = more anomalous);
    each map is taken back to its image's own size (``transform.map_to_original``), and one colour scale spans
    the whole set, so colours compare across images.
    """
    if result.anomaly_maps is None:
        raise ValueError("the result has no anomaly maps (score with with_maps=True)")
    folder.mkdir(parents=True, exist_ok=True)
    low = float(np.min(result.anomaly_maps))
    high = float(np.max(result.anomaly_maps))
    written = []
    for i, (source, amap) in enumerate(zip(sources, result.anomaly_maps, strict=False)):
        image = load_image(getattr(source, "path", source))
        full = transform.map_to_original(amap, image.size)
        path = folder / f"{_safe_stem(result.names[i], i)}.png"
        overlay(image, full, low=low, high=high).save(path)
        written.append(path)
    return written


def outline_level(threshold: float, image_score: float, map_peak: float) -> float | None:
    """The anomaly-map level to outline on one image so that the outline agrees with its verdict.

    An image is defective when its score (the maximum patch score) is at or above ``threshold``; its anomaly
    map is those patch scores blurred, so its peak ``map_peak`` can stay below the threshold and a defective
    image would show no outline. Then the level is the threshold scaled like the peak (``threshold *
    map_peak / image_score``), which outlines the region around the peak. None for a good image: nothing
    is outlined on an image that passes.
    """
    if not np.isfinite(threshold) or image_score < threshold:
        return None
    if map_peak >= threshold or image_score <= 0:
        return float(threshold)
    return float(threshold * map_peak / image_score)
