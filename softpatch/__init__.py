"""SoftPatch: anomaly detection that stays robust when the "good" training images are not all good."""

from softpatch.config import ConfigError, SoftPatchConfig
from softpatch.errors import SoftPatchError
from softpatch.model import Embeddings, ScoreResult, SoftPatch, VettingReport

__all__ = [
    "ConfigError",
    "Embeddings",
    "ScoreResult",
    "SoftPatch",
    "SoftPatchConfig",
    "SoftPatchError",
    "VettingReport",
    "load_bundle",
    "save_bundle",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Bundles pull in safetensors; import on first use.
    if name in ("load_bundle", "save_bundle"):
        from softpatch import bundle

        return getattr(bundle, name)
    raise AttributeError(name)
