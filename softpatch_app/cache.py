"""Streamlit caches: backbones (``st.cache_resource``, shared by sessions, read-only) and decoded images /
embeddings (``st.cache_data``), keyed so that a new folder, file or setting is never served stale results.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import streamlit as st
from PIL import Image

from softpatch.config import SoftPatchConfig
from softpatch.io.images import image_size, load_image
from softpatch.io.limits import LoadLimits
from softpatch.runtime.device import resolve_device
from softpatch_app.imaging import png_bytes, thumbnail


def file_token(path: str | os.PathLike | None) -> tuple:
    """(path, mtime_ns, size): part of every cache key that depends on a file's content."""
    if not path:
        return ("", 0, 0)
    try:
        st_ = os.stat(path)
        return (str(Path(path).resolve()), st_.st_mtime_ns, st_.st_size)
    except OSError:
        return (str(path), 0, 0)


def feature_token(config: SoftPatchConfig) -> tuple:
    """The settings that decide patch features (``SoftPatchConfig.feature_key``) and the weights file's content
    token: equal tokens, equal features."""
    return (config.feature_key(), file_token(config.weights) if config.weights else ("", 0, 0))


def extractor_key(config: SoftPatchConfig) -> tuple:
    """What decides a backbone + feature module: the feature token, the precision and the device."""
    return (*feature_token(config), config.precision, str(resolve_device(config.device)))


@st.cache_resource(max_entries=3, show_spinner=False)
def _extractor(key: tuple, _config: SoftPatchConfig):
    from softpatch.method.model import build_extractor

    return build_extractor(_config, resolve_device(_config.device))


def get_extractor(config: SoftPatchConfig):
    """The feature extractor for ``config``, built once per process and shared (read-only) by all sessions.

    Raises ``WeightsError`` (not cached) when the weights cannot be had, so a fixed setting is retried.
    """
    return _extractor(extractor_key(config), config)


@st.cache_data(max_entries=4000, show_spinner=False)
def _thumbnail_png(token: tuple, px: int, max_pixels: int) -> bytes:
    image = load_image(token[0], LoadLimits(max_image_pixels=max_pixels))
    return png_bytes(thumbnail(image, px))


def thumbnail_png(path: str | os.PathLike, px: int = 160, limits: LoadLimits | None = None) -> bytes:
    limits = limits or LoadLimits()
    return _thumbnail_png(file_token(path), px, limits.max_image_pixels)


@st.cache_data(max_entries=64, show_spinner=False)
def _image(token: tuple, max_pixels: int) -> Image.Image:
    return load_image(token[0], LoadLimits(max_image_pixels=max_pixels))


def load_rgb(path: str | os.PathLike, limits: LoadLimits | None = None) -> Image.Image:
    """A decoded RGB image, cached by (path, mtime, size)."""
    limits = limits or LoadLimits()
    return _image(file_token(path), limits.max_image_pixels)


def _header_size(token: tuple) -> tuple[int, int]:
    try:
        return image_size(token[0])  # the header only, through the core's format allow-list
    except Exception:  # noqa: BLE001 - a file that vanished or changed after loading: size unknown
        return (0, 0)


@st.cache_data(max_entries=16, show_spinner=False)
def _image_sizes(tokens: tuple[tuple, ...]) -> list[tuple[int, int]]:
    return [_header_size(token) for token in tokens]


def image_sizes(paths: Sequence[str | os.PathLike]) -> list[tuple[int, int]]:
    """(width, height) of each image, read from the file headers; (0, 0) where a file cannot be read.

    One cache entry per list of files (not one per file): a page showing a 10,000-image folder's sizes pays
    one lookup per rerun, and a changed file (its token) reads the headers again.
    """
    return _image_sizes(tuple(file_token(p) for p in paths))


def mask_for(path: str | os.PathLike | None, size: tuple[int, int]) -> np.ndarray:
    """A ground-truth mask (bool, h x w) resized to ``size`` (w, h) when needed; all False without a mask."""
    w, h = size
    if not path:
        return np.zeros((h, w), dtype=bool)
    from softpatch.io.images import load_mask

    mask = load_mask(path)
    if mask.shape != (h, w):
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 127
    return mask
