"""The one configuration object of a SoftPatch model."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

TAU_SCOPES = ("global", "position")
CORESET_METHODS = ("greedy", "random", "all")
PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
SEARCH_METHODS = ("bounded", "exhaustive")
# Keys of earlier versions that no longer mean anything; accepted on load and dropped.
_RETIRED_KEYS = frozenset({"search_candidates"})  # approximate search, replaced by the exact bounded one


class ConfigError(ValueError):
    """A configuration value is out of range or unknown."""


@dataclass(frozen=True)
class SoftPatchConfig:
    """Every setting of a SoftPatch fit. Checked once, in ``__post_init__``.

    Defaults follow the paper (seeds/000): wide_resnet50_2 stages 2+3, resize 256 /
    crop 224, LOF with k=6, tau=0.15, greedy coreset of 10%, soft re-weighting on.
    """

    # --- images
    resize: int = 256  # images are squashed to resize x resize (keeps every pixel of odd aspect ratios)
    crop: int = 224  # then centre-cropped to crop x crop
    # --- backbone
    backbone: str = "wide_resnet50_2"  # any timm model that supports features_only
    layers: tuple[int, ...] = (2, 3)  # timm feature stages (out_indices); the first sets the patch grid
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs
    pretrained: bool = True  # timm pretrained weights (downloaded once, cached); False = random init
    weights: str | None = None  # local weights file (safetensors or torch state dict); wins over pretrained
    feature_dim: int = 1024  # patch embedding size; each stage is average-pooled over channels to an equal share
    patch_size: int = 3  # neighbourhood aggregation window
    precision: str = "fp32"  # "bf16" runs the backbone under bf16 autocast (faster on CPU and GPU)
    batch_size: int | None = None  # images per backbone pass; None: 8 on a CPU (stays in cache), 32 on a GPU
    # --- denoising
    discriminator: str = "lof"  # a name in softpatch.discriminators.DISCRIMINATORS
    lof_k: int = 6  # LOF neighbours; clamped to N-1 with a warning
    gaussian_reg: float = 0.01  # covariance ridge, relative to the mean feature variance
    fusion: tuple[str, ...] = ("nearest", "gaussian", "lof")  # members of the "fusion" discriminator
    tau: float = 0.15  # fraction of patches removed as noise (highest outlier scores)
    tau_scope: str = "global"  # "global": one cut over all patches; "position": tau at every position
    soft_weight: bool = True  # scale test distances by the matched patch's outlier score (eq. 8)
    # --- memory bank
    coreset: str = "greedy"  # "greedy" k-centre, "random", or "all" kept patches
    coreset_ratio: float = 0.1  # memory bank size as a fraction of kept patches
    projection_dim: int = 128  # random projection used by the greedy coreset
    # --- anomaly maps
    blur_sigma: float = 4.0  # Gaussian blur of the upsampled map, in crop pixels
    # --- runtime
    device: str = "auto"  # "auto" (CUDA when present), "cpu" or "cuda"
    search: str = "bounded"  # CPU nearest-neighbour search, exact either way: "bounded" (faster) or "exhaustive"
    seed: int = 0  # seeds the coreset start and projection: a fit is reproducible

    def __post_init__(self) -> None:
        self._check_types()
        # Normalise containers so that configs built from JSON or the CLI compare equal.
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "fusion", tuple(self.fusion))
        object.__setattr__(self, "backbone_kwargs", dict(self.backbone_kwargs))
        if self.weights is not None:
            object.__setattr__(self, "weights", os.fspath(self.weights))
        from softpatch.discriminators import DISCRIMINATORS  # late: avoids an import cycle

        checks = [
            (self.resize >= 32, f"resize must be >= 32, got {self.resize}"),
            (16 <= self.crop <= self.resize, f"crop must be in [16, resize={self.resize}], got {self.crop}"),
            (len(self.layers) >= 1, "layers must name at least one backbone stage"),
            (all(i >= 0 for i in self.layers), f"layers must be >= 0, got {self.layers}"),
            (list(self.layers) == sorted(set(self.layers)), f"layers must be increasing, got {self.layers}"),
            (self.feature_dim >= 1, f"feature_dim must be >= 1, got {self.feature_dim}"),
            (self.patch_size >= 1 and self.patch_size % 2 == 1, f"patch_size must be odd, got {self.patch_size}"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}"),
            (self.batch_size is None or self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (
                self.discriminator in DISCRIMINATORS,
                f"unknown discriminator {self.discriminator!r}; choose from {sorted(DISCRIMINATORS)}",
            ),
            (self.lof_k >= 1, f"lof_k must be >= 1, got {self.lof_k}"),
            (self.gaussian_reg > 0, f"gaussian_reg must be > 0, got {self.gaussian_reg}"),
            (
                len(self.fusion) >= 1 and all(n in DISCRIMINATORS and n not in ("fusion", "none") for n in self.fusion),
                f"fusion members must be base discriminators, got {self.fusion}",
            ),
            (0.0 <= self.tau < 1.0, f"tau must be in [0, 1), got {self.tau}"),
            (self.tau_scope in TAU_SCOPES, f"tau_scope must be one of {TAU_SCOPES}, got {self.tau_scope!r}"),
            (self.coreset in CORESET_METHODS, f"coreset must be one of {CORESET_METHODS}, got {self.coreset!r}"),
            (0.0 < self.coreset_ratio <= 1.0, f"coreset_ratio must be in (0, 1], got {self.coreset_ratio}"),
            (self.projection_dim >= 1, f"projection_dim must be >= 1, got {self.projection_dim}"),
            (self.blur_sigma >= 0, f"blur_sigma must be >= 0, got {self.blur_sigma}"),
            (self.device in DEVICES, f"device must be one of {DEVICES}, got {self.device!r}"),
            (self.search in SEARCH_METHODS, f"search must be one of {SEARCH_METHODS}, got {self.search!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        try:
            json.dumps(self.backbone_kwargs)
        except TypeError as exc:
            raise ConfigError(f"backbone_kwargs must be JSON-serialisable: {exc}") from None

    def _check_types(self) -> None:
        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        for name in (
            "resize",
            "crop",
            "feature_dim",
            "patch_size",
            "lof_k",
            "projection_dim",
            "seed",
        ):
            if not is_int(getattr(self, name)):
                raise ConfigError(f"{name} must be an integer, got {getattr(self, name)!r}")
        if self.batch_size is not None and not is_int(self.batch_size):
            raise ConfigError(f"batch_size must be an integer or None, got {self.batch_size!r}")
        for name in ("gaussian_reg", "tau", "coreset_ratio", "blur_sigma"):
            value = getattr(self, name)
            if not (is_int(value) or isinstance(value, float)) or not math.isfinite(value):
                raise ConfigError(f"{name} must be a number, got {value!r}")
            object.__setattr__(self, name, float(value))
        for name in ("pretrained", "soft_weight"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("backbone", "precision", "discriminator", "tau_scope", "coreset", "device"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a string, got {getattr(self, name)!r}")
        if self.weights is not None and not isinstance(self.weights, (str, os.PathLike)):
            raise ConfigError(f"weights must be a file path or None, got {self.weights!r}")
        if isinstance(self.layers, (str, bytes)) or not all(is_int(i) for i in self.layers):
            raise ConfigError(f"layers must be a sequence of integers, got {self.layers!r}")
        if isinstance(self.fusion, (str, bytes)) or not all(isinstance(n, str) for n in self.fusion):
            raise ConfigError(f"fusion must be a sequence of discriminator names, got {self.fusion!r}")
        if not isinstance(self.backbone_kwargs, dict):
            raise ConfigError(f"backbone_kwargs must be a dict, got {self.backbone_kwargs!r}")

    @property
    def weights_source(self) -> str:
        """Where the backbone weights come from: "file", "pretrained" or "random"."""
        if self.weights:
            return "file"
        return "pretrained" if self.pretrained else "random"

    def replace(self, **changes: Any) -> SoftPatchConfig:
        """A copy with ``changes`` applied (and checked)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["layers"] = list(self.layers)
        data["fusion"] = list(self.fusion)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SoftPatchConfig:
        """Build from ``to_dict`` output; unknown keys are an error, not silently dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k not in _RETIRED_KEYS}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config keys: {unknown}")
        return cls(**data)
