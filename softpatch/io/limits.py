"""Limits on untrusted input. Every limit is a setting with a safe default."""

from __future__ import annotations

from dataclasses import dataclass

from softpatch.config import ConfigError


@dataclass(frozen=True)
class LoadLimits:
    """Caps applied when reading folders, images and uploads."""

    max_image_pixels: int = 50_000_000  # width*height; larger claims are refused (decompression bombs)
    max_files: int = 20_000  # image files considered in one folder or archive
    max_upload_bytes: int = 2 * 1024**3  # one uploaded file or archive
    max_zip_uncompressed_bytes: int = 4 * 1024**3  # sum of the declared sizes of a zip's members
    max_zip_ratio: float = 200.0  # uncompressed/compressed size of a zip member (zip bombs)
    max_zip_members: int = 50_000  # entries in one archive

    def __post_init__(self) -> None:
        for name in (
            "max_image_pixels",
            "max_files",
            "max_upload_bytes",
            "max_zip_uncompressed_bytes",
            "max_zip_members",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_zip_ratio <= 1:
            raise ConfigError(f"max_zip_ratio must be over 1, got {self.max_zip_ratio}")


DEFAULT_LIMITS = LoadLimits()


def format_bytes(n: int) -> str:
    """A size for messages: "3.2 GB", "512.0 KB", "17 bytes"."""
    for unit, size in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"
