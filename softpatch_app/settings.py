"""App settings: defaults from environment variables, overridable per session in the UI.

Environment variables (all optional; documented in the README):

- ``SOFTPATCH_BACKBONE``         timm model name (default ``wide_resnet50_2``, the paper's)
- ``SOFTPATCH_BACKBONE_KWARGS``  JSON object of extra ``timm.create_model`` arguments
- ``SOFTPATCH_WEIGHTS``          path to a local weights file (safetensors or torch state dict); used instead of
                                 downloading pretrained weights
- ``SOFTPATCH_DEVICE``           ``auto`` (GPU when present), ``cpu`` or ``cuda``
- ``SOFTPATCH_RESIZE`` / ``SOFTPATCH_CROP``  image geometry (default 256 / 224)
- ``SOFTPATCH_WORK_DIR``         where per-session working folders live (default: ``<tmp>/softpatch-sessions``)
- ``SOFTPATCH_SESSION_MAX_AGE_H`` working folders older than this many hours are removed (default 12)
- ``SOFTPATCH_MAX_UPLOAD_MB``, ``SOFTPATCH_MAX_FILES``, ``SOFTPATCH_MAX_IMAGE_MPIX``, ``SOFTPATCH_MAX_ZIP_MB``
                                 input limits (see ``softpatch.limits.LoadLimits``)
- ``SOFTPATCH_SERVER_ROOTS``     if set (paths separated by ``os.pathsep``), server-side folder paths must lie
                                 under one of these folders; unset: see ``softpatch_app.server_paths`` (default
                                 folders on localhost, none on a network address)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from softpatch.config import SoftPatchConfig
from softpatch.limits import LoadLimits
from softpatch.workspace import ENV_WORK_DIR, default_base

APP_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BACKBONE = "wide_resnet50_2"
# Backbones offered in the picker; any other timm name can be typed.
BACKBONE_CHOICES = ("wide_resnet50_2", "resnet18", "resnet50", "mobilenetv1_100", "efficientnet_b0")
WEIGHT_MODES = ("pretrained", "file", "random")
WEIGHT_MODE_LABELS = {
    "pretrained": "Pretrained (ImageNet, downloaded once and cached)",
    "file": "Local weights file",
    "random": "Random weights (only to try the workflow; results are not meaningful)",
}


@dataclass(frozen=True)
class AppSettings:
    """Every setting a session can change; the defaults come from the environment."""

    backbone: str = DEFAULT_BACKBONE
    backbone_kwargs: dict = field(default_factory=dict)
    weights_mode: str = "pretrained"
    weights_path: str = ""
    device: str = "auto"
    resize: int = 256
    crop: int = 224
    # denoising
    discriminator: str = "lof"
    tau: float = 0.15
    lof_k: int = 6
    coreset_ratio: float = 0.1
    soft_weight: bool = True

    def fit_config(self) -> SoftPatchConfig:
        """The core config for these settings (raises ConfigError with a clear message when invalid)."""
        weights = self.weights_path.strip() if self.weights_mode == "file" else None
        return SoftPatchConfig(
            resize=self.resize,
            crop=self.crop,
            backbone=self.backbone,
            backbone_kwargs=dict(self.backbone_kwargs),
            pretrained=self.weights_mode == "pretrained",
            weights=weights or None,
            discriminator=self.discriminator,
            tau=self.tau,
            lof_k=self.lof_k,
            coreset_ratio=self.coreset_ratio,
            soft_weight=self.soft_weight,
            device=self.device,
        )

    def feature_key(self) -> tuple:
        """What decides the patch features: a change here needs a new fit (feature extraction)."""
        return (
            self.backbone,
            json.dumps(self.backbone_kwargs, sort_keys=True),
            self.weights_mode,
            self.weights_path.strip() if self.weights_mode == "file" else "",
            self.device,
            self.resize,
            self.crop,
        )

    def with_changes(self, **changes) -> AppSettings:
        return replace(self, **changes)


@dataclass(frozen=True)
class Environment:
    settings: AppSettings
    limits: LoadLimits
    workdir: Path
    max_age_s: float
    server_roots: tuple[Path, ...]
    warnings: tuple[str, ...]


def _int(env: Mapping[str, str], name: str, default: int, warnings: list[str], minimum: int = 1) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(float(raw))
        if value < minimum:
            raise ValueError
        return value
    except ValueError:
        warnings.append(f"{name}={raw!r} is not a whole number >= {minimum}; using {default}.")
        return default


def read_environment(env: Mapping[str, str] | None = None) -> Environment:
    """Settings from environment variables; a bad value becomes a warning and its default, never a crash."""
    env = os.environ if env is None else env
    warnings: list[str] = []
    backbone = env.get("SOFTPATCH_BACKBONE", "").strip() or DEFAULT_BACKBONE
    kwargs: dict = {}
    raw_kwargs = env.get("SOFTPATCH_BACKBONE_KWARGS", "").strip()
    if raw_kwargs:
        try:
            parsed = json.loads(raw_kwargs)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            kwargs = parsed
        else:
            warnings.append(f"SOFTPATCH_BACKBONE_KWARGS is not a JSON object ({raw_kwargs[:80]!r}); ignored.")
    weights_path = env.get("SOFTPATCH_WEIGHTS", "").strip()
    if weights_path and not Path(weights_path).expanduser().is_file():
        warnings.append(f"SOFTPATCH_WEIGHTS points to {weights_path!r}, which is not a file.")
    device = env.get("SOFTPATCH_DEVICE", "").strip().lower() or "auto"
    if device not in ("auto", "cpu", "cuda"):
        warnings.append(f"SOFTPATCH_DEVICE={device!r} is not auto, cpu or cuda; using auto.")
        device = "auto"
    resize = _int(env, "SOFTPATCH_RESIZE", 256, warnings, minimum=32)
    crop = _int(env, "SOFTPATCH_CROP", min(224, resize), warnings, minimum=16)
    if crop > resize:
        warnings.append(f"SOFTPATCH_CROP={crop} is larger than SOFTPATCH_RESIZE={resize}; using crop={resize}.")
        crop = resize
    settings = AppSettings(
        backbone=backbone,
        backbone_kwargs=kwargs,
        weights_mode="file" if weights_path else "pretrained",
        weights_path=str(Path(weights_path).expanduser()) if weights_path else "",
        device=device,
        resize=resize,
        crop=crop,
    )
    base = LoadLimits()
    limits = LoadLimits(
        max_upload_bytes=_int(env, "SOFTPATCH_MAX_UPLOAD_MB", base.max_upload_bytes // 2**20, warnings) * 2**20,
        max_files=_int(env, "SOFTPATCH_MAX_FILES", base.max_files, warnings),
        max_image_pixels=_int(env, "SOFTPATCH_MAX_IMAGE_MPIX", base.max_image_pixels // 10**6, warnings) * 10**6,
        max_zip_uncompressed_bytes=_int(env, "SOFTPATCH_MAX_ZIP_MB", base.max_zip_uncompressed_bytes // 2**20, warnings)
        * 2**20,
    )
    workdir = default_base(env.get(ENV_WORK_DIR, "").strip() or None)
    max_age_h = _int(env, "SOFTPATCH_SESSION_MAX_AGE_H", 12, warnings)
    roots_raw = env.get("SOFTPATCH_SERVER_ROOTS", "").strip()
    roots = tuple(Path(p).expanduser().resolve() for p in roots_raw.split(os.pathsep) if p.strip())
    return Environment(settings, limits, workdir, max_age_h * 3600.0, roots, tuple(warnings))
