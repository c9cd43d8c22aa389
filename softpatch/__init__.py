"""SoftPatch: anomaly detection that stays robust when the "good" training images are not all good.

The public names are imported on first use, so that ``softpatch.cli`` starts (and answers Ctrl-C) before
torch is imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the names, for type checkers and editors
    from softpatch.config import ConfigError, SoftPatchConfig  # noqa: F401
    from softpatch.deployment.bundle import load_bundle, save_bundle  # noqa: F401
    from softpatch.errors import SoftPatchError  # noqa: F401
    from softpatch.method.model import Embeddings, ScoreResult, SoftPatch, VettingReport  # noqa: F401

# Public name -> the module that defines it.
_PUBLIC = {
    "ConfigError": "softpatch.config",
    "Embeddings": "softpatch.method.model",
    "ScoreResult": "softpatch.method.model",
    "SoftPatch": "softpatch.method.model",
    "SoftPatchConfig": "softpatch.config",
    "SoftPatchError": "softpatch.errors",
    "VettingReport": "softpatch.method.model",
    "load_bundle": "softpatch.deployment.bundle",
    "save_bundle": "softpatch.deployment.bundle",
}
__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'softpatch' has no attribute {name!r}")
