"""Decoding untrusted image files to RGB, masks, and the resize/crop/normalise transform.

Decompression bombs: the pixel count claimed by the header is checked against
``LoadLimits.max_image_pixels`` right after ``Image.open`` (which reads the header only) and before
any pixel is decoded. Pillow's own process-wide guard (``PIL.Image.MAX_IMAGE_PIXELS``) is left as it
is, so importing softpatch changes nothing for other code in the process. Pillow refuses images over
``2 * Image.MAX_IMAGE_PIXELS`` (about 179 million pixels) by itself, before we see the size; that
refusal is reported with the same message. Raising ``max_image_pixels`` above that hard limit
therefore also needs ``Image.MAX_IMAGE_PIXELS`` raised by the application.
"""

from __future__ import annotations

import io
import logging
import os
import re
import stat

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from softpatch.errors import ImageLoadError
from softpatch.io.limits import DEFAULT_LIMITS, LoadLimits, format_bytes

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "SUPPORTED_FORMATS",
    "ImageSource",
    "ImageTransform",
    "failure_reason",
    "image_size",
    "load_image",
    "load_mask",
    "load_mask_for_crop",
]

log = logging.getLogger(__name__)

ImageSource = str | os.PathLike | bytes

# Pillow plugin names we decode. Others (EPS runs Ghostscript, PSD, ICO, ...) are refused on purpose:
# a small, well-fuzzed set of decoders is the attack surface we accept for untrusted uploads.
SUPPORTED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP", "PPM")  # JPEG covers MPO
_SUPPORTED_NAMES = "PNG, JPEG, BMP, TIFF, GIF, WebP, PNM"
# Extensions a folder scan tries; content decides in the end (a PNG named .jpg loads).
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_ORIENTATION_TAG = 0x0112
_TRANSPOSE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
_PIL_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def _failure(reason: str, name: str | None) -> ImageLoadError:
    """An ImageLoadError whose message names the file; ``.reason`` holds the bare reason (for skip lists)."""
    message = f"cannot read image {name!r}: {reason}" if name else f"cannot read image: {reason}"
    error = ImageLoadError(message)
    error.reason = reason  # type: ignore[attr-defined]
    return error


def failure_reason(error: ImageLoadError) -> str:
    """The short reason of an ``ImageLoadError`` raised here (e.g. "empty file (0 bytes)")."""
    return getattr(error, "reason", str(error))


def _pixel_limit_reason(pixels: int, limit: int, size: tuple[int, int] | None) -> str:
    what = f"image is {size[0]}x{size[1]} = {pixels:,} pixels" if size else f"image claims {pixels:,} pixels"
    return f"{what}, over the limit of {limit:,} (LoadLimits.max_image_pixels)"


def _sniff_size(head: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG, GIF or BMP header; None for other formats or short heads.

    Lets the pixel limit refuse the commonest bomb carriers before Pillow parses anything (and before
    Pillow's own DecompressionBombWarning fires); Pillow's header parse re-checks every format.
    """
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" and len(head) >= 24:
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        return int.from_bytes(head[6:8], "little"), int.from_bytes(head[8:10], "little")
    if head[:2] == b"BM" and len(head) >= 26:
        header_size = int.from_bytes(head[14:18], "little")
        if header_size == 12:
            return int.from_bytes(head[18:20], "little"), int.from_bytes(head[20:22], "little")
        if header_size >= 40:
            width = int.from_bytes(head[18:22], "little", signed=True)
            height = int.from_bytes(head[22:26], "little", signed=True)
            return abs(width), abs(height)  # negative height = top-down rows
    return None


def _describe_non_image(head: bytes) -> str:
    """Why a file Pillow cannot identify is not an image, from its first bytes."""
    if head.startswith(b"PK\x03\x04"):
        return "not an image: looks like a zip archive"
    if head.startswith(b"%PDF"):
        return "not an image: looks like a PDF document"
    text = head.lstrip(b"\xef\xbb\xbf").lstrip()
    lowered = text[:1024].lower()
    if lowered.startswith((b"<!doctype html", b"<html")) or any(t in lowered for t in (b"<html", b"<head", b"<body")):
        return "not an image: looks like HTML (a web page saved under an image name?)"
    if b"<svg" in lowered:
        return "unsupported image format: SVG vector images are not supported"
    if head and b"\x00" not in head:
        # The head may end inside a multi-byte UTF-8 character: allow up to 3 bytes to be cut.
        for cut in range(4):
            try:
                head[: len(head) - cut].decode("utf-8")
            except UnicodeDecodeError:
                continue
            return "not an image: looks like text"
    return ""


def _identify_other_format(fh: io.BufferedIOBase) -> str | None:
    """The name of a format Pillow knows but we refuse (e.g. "PSD"), else None. Reads the header only."""
    try:
        fh.seek(0)
        with Image.open(fh) as other:
            return str(other.format)
    except Exception:  # noqa: BLE001 - any failure just means "format unknown"
        return None


def _scale_to_uint8(image: Image.Image) -> np.ndarray:
    """8-bit (h, w) array from a 16-bit, 32-bit integer or float grayscale image.

    16-bit data is mapped by its full range, value * 255 / 65535 rounded, so that images of a dataset
    stay comparable (no per-image stretching). Mode "I" values within 0..65535 are treated as 16-bit;
    "F" values within 0..1 are scaled by 255, within 0..255 kept. Anything else has no natural range and
    is stretched min-max per image.
    """
    if image.mode in _SIXTEEN_BIT_MODES:
        try:
            arr = np.asarray(image)
        except (TypeError, ValueError):
            arr = np.asarray(image.convert("I"))
        wide = arr.astype(np.uint32)
        return ((wide + 128) // 257).astype(np.uint8)
    arr = np.asarray(image).astype(np.float64)
    arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if image.mode == "I" and lo >= 0 and hi <= 65535:
        return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if image.mode == "F" and lo >= 0 and hi <= 1:
        return np.round(arr * 255).astype(np.uint8)
    if image.mode == "F" and lo >= 0 and hi <= 255:
        return np.round(arr).astype(np.uint8)
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _to_mode(image: Image.Image, mode: str) -> Image.Image:
    """A new, file-independent image in ``mode`` ("RGB" or "L").

    Transparent pixels are composited onto black: a fully transparent pixel's hidden colour (often
    arbitrary, e.g. a palette's magenta key) must not leak into features.
    """
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        gray = Image.fromarray(_scale_to_uint8(image))
        return gray if mode == "L" else gray.convert(mode)
    has_alpha = (
        image.mode in _ALPHA_MODES
        or (image.mode in ("P", "L", "RGB") and "transparency" in image.info)
        or (image.mode == "P" and image.palette is not None and image.palette.mode == "RGBA")
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        alpha = rgba.getchannel("A")
        if alpha.getextrema() != (255, 255):
            base = Image.new("RGB", rgba.size, (0, 0, 0))
            base.paste(rgba.convert("RGB"), mask=alpha)
            return base if mode == "RGB" else base.convert(mode)
        return rgba.convert(mode)
    if image.mode == mode:
        return image.copy()
    return image.convert(mode)


def _apply_orientation(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag; an unreadable EXIF block leaves the image as stored."""
    try:
        orientation = image.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - broken EXIF must not cost the image
        return image
    method = _TRANSPOSE_FOR_ORIENTATION.get(orientation) if isinstance(orientation, int) else None
    return image.transpose(method) if method is not None else image


def _decode(fh: io.BufferedIOBase, size: int, name: str | None, limits: LoadLimits, mode: str) -> Image.Image:
    if size == 0:
        raise _failure("empty file (0 bytes)", name)
    if size > limits.max_upload_bytes:
        reason = (
            f"file is {format_bytes(size)}, over the limit of {format_bytes(limits.max_upload_bytes)} "
            "(LoadLimits.max_upload_bytes)"
        )
        raise _failure(reason, name)
    head = fh.read(1024)
    fh.seek(0)
    sniffed = _sniff_size(head)
    if sniffed and sniffed[0] * sniffed[1] > limits.max_image_pixels:
        raise _failure(_pixel_limit_reason(sniffed[0] * sniffed[1], limits.max_image_pixels, sniffed), name)
    try:
        image = Image.open(fh, formats=SUPPORTED_FORMATS)
    except Image.DecompressionBombError as exc:
        match = _PIL_BOMB_PIXELS.search(str(exc))
        pixels = int(match.group(1)) if match else 0
        if 0 < pixels <= limits.max_image_pixels:
            # Our limit allows it but Pillow's process-wide guard does not (see the module docstring).
            reason = (
                f"image claims {pixels:,} pixels, over Pillow's own limit of {2 * (Image.MAX_IMAGE_PIXELS or 0):,} "
                "(raise PIL.Image.MAX_IMAGE_PIXELS together with LoadLimits.max_image_pixels)"
            )
        else:
            reason = _pixel_limit_reason(pixels, limits.max_image_pixels, _sniff_size(head))
        raise _failure(reason, name) from None
    except UnidentifiedImageError:
        reason = _describe_non_image(head)
        if not reason:
            other = _identify_other_format(fh)
            reason = (
                f"unsupported image format: {other} (supported: {_SUPPORTED_NAMES})"
                if other
                else f"unsupported image format or not an image (supported: {_SUPPORTED_NAMES})"
            )
        raise _failure(reason, name) from None
    except Exception as exc:
        log.debug("header of %s unreadable", name, exc_info=True)
        raise _failure("truncated or corrupt image data", name) from exc
    try:
        width, height = image.size
        if width < 1 or height < 1:
            raise _failure(f"image has an invalid size {width}x{height}", name)
        if width * height > limits.max_image_pixels:
            raise _failure(_pixel_limit_reason(width * height, limits.max_image_pixels, (width, height)), name)
        try:
            image.load()  # first frame only: Image.open starts at frame 0 and we never seek
        except MemoryError:
            raise _failure("not enough memory to decode the image", name) from None
        except Image.DecompressionBombError:
            raise _failure(
                _pixel_limit_reason(width * height, limits.max_image_pixels, (width, height)), name
            ) from None
        except Exception as exc:
            log.debug("pixel data of %s unreadable", name, exc_info=True)
            raise _failure("truncated or corrupt image data", name) from exc
        try:
            oriented = _apply_orientation(image)
            if oriented is not image and oriented.mode == mode:
                return oriented  # transpose already made a file-independent copy
            return _to_mode(oriented, mode)
        except MemoryError:
            raise _failure("not enough memory to decode the image", name) from None
        except Exception as exc:
            log.debug("mode %s of %s not convertible", image.mode, name, exc_info=True)
            raise _failure(f"unsupported colour mode {image.mode!r}", name) from exc
    finally:
        image.close()


def _load(source: ImageSource, limits: LoadLimits | None, mode: str) -> Image.Image:
    limits = limits or DEFAULT_LIMITS
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return _decode(io.BytesIO(data), len(data), None, limits, mode)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"image source must be a path or bytes, got {type(source).__name__}")
    name = os.fspath(source)
    name = name.decode(errors="replace") if isinstance(name, bytes) else name
    try:
        st = os.stat(source)
    except FileNotFoundError:
        raise _failure("file not found", name) from None
    except PermissionError:
        raise _failure("permission denied", name) from None
    except OSError as exc:
        raise _failure(f"cannot open file ({exc.strerror or exc})", name) from None
    if stat.S_ISDIR(st.st_mode):
        raise _failure("is a folder, not an image file", name)
    if not stat.S_ISREG(st.st_mode):
        # Opening a FIFO or device would block or read forever.
        raise _failure("not a regular file", name)
    try:
        fh = open(source, "rb")
    except PermissionError:
        raise _failure("permission denied", name) from None
    except OSError as exc:
        raise _failure(f"cannot open file ({exc.strerror or exc})", name) from None
    try:
        return _decode(fh, st.st_size, name, limits, mode)
    finally:
        fh.close()


def load_image(source: ImageSource, limits: LoadLimits | None = None) -> Image.Image:
    """Decode an untrusted image file to a new RGB ``PIL.Image`` (EXIF-rotated, first frame).

    ``source`` is a path or the file's bytes; the format is decided by content, never by extension.
    Any Pillow mode becomes RGB: 16-bit grayscale is scaled by its full range (not clipped),
    transparency is composited onto black. Raises ``ImageLoadError`` (with a ``reason`` attribute) for
    empty, non-image, truncated, unsupported or oversized files; no other exception escapes for bad data.
    """
    return _load(source, limits, "RGB")


def image_size(source: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` as ``load_image`` would return it, from the header only (no pixel decoding).

    EXIF orientations that swap the axes (5-8) are honoured when the EXIF block sits before the
    pixel data (JPEG, TIFF, WebP); a PNG whose eXIf chunk follows the pixels reports the stored size.
    Raises ``ImageLoadError`` when the header cannot be read.
    """
    name = os.fspath(source)
    try:
        with open(source, "rb") as fh, Image.open(fh, formats=SUPPORTED_FORMATS) as image:
            width, height = image.size
            try:
                orientation = image.getexif().get(_ORIENTATION_TAG, 1)
            except Exception:  # noqa: BLE001 - broken EXIF must not cost the image
                orientation = 1
    except FileNotFoundError:
        raise _failure("file not found", str(name)) from None
    except Exception as exc:
        log.debug("header of %s unreadable", name, exc_info=True)
        raise _failure("unreadable image header", str(name)) from exc
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def load_mask(source: ImageSource, limits: LoadLimits | None = None) -> np.ndarray:
    """A ground-truth mask as bool ``(h, w)``: grayscale value >= 128 is defect."""
    gray = _load(source, limits, "L")
    return np.asarray(gray) >= 128


def load_mask_for_crop(
    source: ImageSource | None, transform: ImageTransform, limits: LoadLimits | None = None
) -> np.ndarray:
    """A ground-truth mask in a model's geometry: bool ``(crop, crop)``, True = defect.

    The mask file is decoded as ``load_mask`` does (grayscale >= 128 is defect) and given the image
    geometry of ``transform`` (squash-resize, centre-crop, nearest-neighbour), so that it lines up
    with the model's ``(crop, crop)`` anomaly maps. ``source=None`` (an image without a mask, e.g. a
    good one) gives an all-False mask. Raises ``ImageLoadError`` when the file cannot be decoded.
    """
    if source is None:
        return np.zeros((transform.crop, transform.crop), dtype=bool)
    return transform.mask(load_mask(source, limits))


def _as_pil_rgb(image: Image.Image) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    return image if image.mode == "RGB" else _to_mode(image, "RGB")


class ImageTransform:
    """Squash-resize to ``resize x resize`` (bilinear), centre-crop ``crop x crop``, ImageNet-normalise.

    Squashing (not aspect-preserving) keeps every pixel of odd aspect ratios in view. The crop offset
    follows torchvision's ``CenterCrop`` so features match reference implementations.
    """

    def __init__(self, resize: int, crop: int) -> None:
        resize, crop = int(resize), int(crop)
        if crop < 1 or resize < crop:
            raise ValueError(f"need 1 <= crop <= resize, got resize={resize}, crop={crop}")
        self.resize = resize
        self.crop = crop
        self.offset = round((resize - crop) / 2.0)  # top and left margin of the crop
        std = np.asarray(IMAGENET_STD, dtype=np.float32)
        # x/255 then (x - mean)/std folded into one multiply-add.
        self._scale = (1.0 / (255.0 * std)).astype(np.float32)
        self._bias = (-np.asarray(IMAGENET_MEAN, dtype=np.float32) / std).astype(np.float32)

    def __repr__(self) -> str:
        return f"ImageTransform(resize={self.resize}, crop={self.crop})"

    @property
    def _box(self) -> tuple[int, int, int, int]:
        o, c = self.offset, self.crop
        return (o, o, o + c, o + c)

    @property
    def normalisation(self) -> tuple[np.ndarray, np.ndarray]:
        """``(scale, bias)``, float32 ``(3,)`` each: a normalised pixel is ``uint8_value * scale + bias``."""
        return self._scale.copy(), self._bias.copy()

    def crop_pixels(self, image: Image.Image) -> np.ndarray:
        """``(crop, crop, 3)`` uint8: the squash-resized, centre-cropped RGB pixels, before normalisation."""
        resized = _as_pil_rgb(image).resize((self.resize, self.resize), Image.Resampling.BILINEAR)
        return np.asarray(resized.crop(self._box), dtype=np.uint8)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """``(3, crop, crop)`` float32 tensor, ImageNet-normalised."""
        arr = self.crop_pixels(image).astype(np.float32) * self._scale + self._bias  # (crop, crop, 3)
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """The same geometry applied to a bool ``(h, w)`` mask, nearest-neighbour: bool ``(crop, crop)``."""
        arr = np.asarray(mask)
        if arr.ndim != 2:
            raise ValueError(f"mask must be 2-D (h, w), got shape {arr.shape}")
        pil = Image.fromarray((arr > 0).astype(np.uint8) * 255)
        resized = pil.resize((self.resize, self.resize), Image.Resampling.NEAREST)
        return np.asarray(resized.crop(self._box)) >= 128

    def map_to_original(self, amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """Map a ``(crop, crop)`` map back onto the original image: float32 ``(height, width)`` for ``size=(w, h)``.

        The crop is placed in the ``resize x resize`` canvas, the uncovered border filled by edge
        replication (the border was never scored), then resized bilinear to the original size.
        """
        arr = np.asarray(amap, dtype=np.float32)
        if arr.shape != (self.crop, self.crop):
            raise ValueError(f"map must have shape ({self.crop}, {self.crop}), got {arr.shape}")
        width, height = int(size[0]), int(size[1])
        if width < 1 or height < 1:
            raise ValueError(f"size must be positive (width, height), got {size}")
        before = self.offset
        after = self.resize - self.crop - before
        canvas = np.pad(arr, ((before, after), (before, after)), mode="edge")
        resized = Image.fromarray(np.ascontiguousarray(canvas)).resize((width, height), Image.Resampling.BILINEAR)
        return np.asarray(resized, dtype=np.float32).copy()
