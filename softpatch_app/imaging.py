"""Drawing helpers (numpy + Pillow): heatmap overlays, mask overlays, outlines, patch crops.

Pure presentation: the maps and masks themselves come from the core.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from softpatch.io.heatmaps import colourize

REMOVED_COLOUR = (255, 40, 40)
OUTLINE_COLOUR = (255, 255, 0)


def overlay_heatmap(image: Image.Image, amap: np.ndarray, *, alpha: float, vmin: float, vmax: float) -> Image.Image:
    """Blend a heatmap (same size as ``image``, h x w) over the image; alpha 0 = image only, 1 = heatmap only."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    # The core's palette, so that the app, the CLI's heatmaps and the report show the same colours.
    heat = colourize(np.asarray(amap, dtype=np.float32), float(vmin), float(vmax)).astype(np.float32)
    if heat.shape[:2] != base.shape[:2]:
        heat = np.asarray(Image.fromarray(heat.astype(np.uint8)).resize(image.size, Image.BILINEAR), np.float32)
    out = base * (1 - alpha) + heat * alpha
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def edges(mask: np.ndarray, thickness: int = 2) -> np.ndarray:
    """Boundary pixels of a bool mask (pixels of the mask with a neighbour outside), ``thickness`` wide."""
    mask = np.asarray(mask, dtype=bool)
    inner = mask.copy()
    for _ in range(max(1, thickness)):
        shrunk = inner.copy()
        shrunk[1:, :] &= inner[:-1, :]
        shrunk[:-1, :] &= inner[1:, :]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    return mask & ~inner


def overlay_mask(
    image: Image.Image,
    mask: np.ndarray,
    *,
    colour: tuple[int, int, int] = REMOVED_COLOUR,
    alpha: float = 0.45,
    outline: bool = True,
) -> Image.Image:
    """Tint the pixels of ``mask`` (h x w bool, same size as the image) and draw its outline."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != base.shape[:2]:
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(image.size, Image.NEAREST)) > 127
    col = np.array(colour, dtype=np.float32)
    base[mask] = base[mask] * (1 - alpha) + col * alpha
    if outline:
        base[edges(mask, thickness=max(1, min(image.size) // 200))] = col
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def draw_outline(image: Image.Image, mask: np.ndarray, colour: tuple[int, int, int] = OUTLINE_COLOUR) -> Image.Image:
    """Draw only the boundary of ``mask`` on ``image`` (used for 'region over threshold')."""
    base = np.asarray(image.convert("RGB")).copy()
    thickness = max(2, min(image.size) // 150)
    base[edges(np.asarray(mask, dtype=bool), thickness)] = np.array(colour, dtype=np.uint8)
    return Image.fromarray(base)


def grid_to_crop(grid_values: np.ndarray, crop: int) -> np.ndarray:
    """Nearest-neighbour upsampling of a (H, W) patch grid to (crop, crop) (each patch a block)."""
    grid_values = np.asarray(grid_values, dtype=np.float32)
    h, w = grid_values.shape
    rows = np.minimum((np.arange(crop) * h) // crop, h - 1)
    cols = np.minimum((np.arange(crop) * w) // crop, w - 1)
    return grid_values[rows][:, cols]


@dataclass(frozen=True)
class Geometry:
    """The core transform's geometry: squash to resize x resize, centre-crop crop x crop at ``offset``."""

    resize: int
    crop: int
    offset: int
    grid_shape: tuple[int, int]

    @classmethod
    def of(cls, transform, grid_shape) -> Geometry:
        """From the core's ``ImageTransform`` and a model's ``grid_shape_``."""
        return cls(int(transform.resize), int(transform.crop), int(transform.offset), tuple(int(g) for g in grid_shape))

    def cell_box(self, row: int, col: int, size: tuple[int, int], pad: float = 0.0) -> tuple[int, int, int, int]:
        """Pixel box (x0, y0, x1, y1) in the original image (w, h) = ``size`` of grid cell (row, col).

        ``pad`` widens the box by that many cells on each side (a patch feature sees its 3x3 neighbourhood).
        """
        gh, gw = self.grid_shape
        w, h = size
        cell_y, cell_x = self.crop / gh, self.crop / gw
        y0 = (self.offset + (row - pad) * cell_y) * h / self.resize
        y1 = (self.offset + (row + 1 + pad) * cell_y) * h / self.resize
        x0 = (self.offset + (col - pad) * cell_x) * w / self.resize
        x1 = (self.offset + (col + 1 + pad) * cell_x) * w / self.resize
        x0, y0 = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
        x1, y1 = min(w, int(np.ceil(x1))), min(h, int(np.ceil(y1)))
        return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)

    def grid_mask_to_original(self, grid_mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """A (H, W) bool patch mask as a bool (h, w) mask over the original image (w, h) = ``size``."""
        w, h = size
        out = np.zeros((h, w), dtype=bool)
        for row, col in np.argwhere(np.asarray(grid_mask, dtype=bool)):
            x0, y0, x1, y1 = self.cell_box(int(row), int(col), size)
            out[y0:y1, x0:x1] = True
        return out

    def grid_values_to_original(self, grid_values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """A (H, W) float patch grid as a blocky float (h, w) map over the original image (0 outside the crop)."""
        w, h = size
        crop_map = grid_to_crop(grid_values, self.crop)
        canvas = np.zeros((self.resize, self.resize), dtype=np.float32)
        canvas[self.offset : self.offset + self.crop, self.offset : self.offset + self.crop] = crop_map
        return np.asarray(Image.fromarray(canvas).resize((w, h), Image.NEAREST), dtype=np.float32)


def patch_crop(image: Image.Image, box: tuple[int, int, int, int], *, out: int = 96) -> Image.Image:
    """The box cut from the image, scaled to ``out`` px on its long side (nearest, to keep pixels honest)."""
    piece = image.convert("RGB").crop(box)
    scale = out / max(piece.size)
    return piece.resize((max(1, round(piece.size[0] * scale)), max(1, round(piece.size[1] * scale))), Image.NEAREST)


def with_box(image: Image.Image, box: tuple[int, int, int, int], colour=OUTLINE_COLOUR) -> Image.Image:
    img = image.convert("RGB").copy()
    ImageDraw.Draw(img).rectangle(box, outline=colour, width=max(2, min(img.size) // 150))
    return img


def thumbnail(image: Image.Image, size: int) -> Image.Image:
    img = image.convert("RGB").copy()
    img.thumbnail((size, size), Image.BILINEAR)
    return img


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_uri(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    if fmt.upper() == "JPEG":
        image.convert("RGB").save(buf, format="JPEG", quality=88)
        mime = "image/jpeg"
    else:
        image.save(buf, format="PNG")
        mime = "image/png"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"
