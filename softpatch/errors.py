"""Errors raised on purpose. Each message is one clear sentence a user can act on."""

from __future__ import annotations

from collections.abc import Sequence


class SoftPatchError(Exception):
    """Base of every error the core raises deliberately; ``str(err)`` is shown to users as is.

    Messages name settings by their config names (``weights``, ``pretrained``), never by how one front
    end spells them; ``settings`` lists the settings or parameters that would fix the problem, so that a
    front end can add its own spelling (the CLI its options, the app its widgets).
    """

    def __init__(self, message: str = "", *, settings: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.settings: tuple[str, ...] = tuple(settings)


class ImageLoadError(SoftPatchError):
    """An image file cannot be decoded (the message says why)."""


class DataError(SoftPatchError):
    """A folder, archive or dataset cannot be used (missing, empty, unsafe, too large)."""


class WeightsError(SoftPatchError):
    """Backbone weights cannot be had (no network and nothing cached, bad file, wrong model)."""


class BundleError(SoftPatchError):
    """A model bundle is damaged, tampered with, or of an unknown format version."""


class NotFittedError(SoftPatchError):
    """A model was used before ``fit``."""


class ResourceError(SoftPatchError):
    """A job needs more memory than the device has; the message says how much and what to change."""


class ExportError(SoftPatchError):
    """A model cannot be exported to ONNX or OpenVINO, or its export does not reproduce its scores."""


class ThresholdError(SoftPatchError):
    """A threshold cannot be set from these images (too few, bad target); the message says why."""


class MetricError(SoftPatchError, ValueError):
    """A metric is undefined for these labels, scores or masks (one class only, empty, NaN); says which."""
