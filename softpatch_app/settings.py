"""App settings: defaults from environment variables, overridable per session in the UI.

Every config setting declared with ``env=True`` in ``softpatch.config`` (backbone, backbone kwargs,
weights, device, image size, discriminator, tau, LOF-k, coreset ratio, soft weights) is read from
``SOFTPATCH_<NAME>`` (e.g. ``SOFTPATCH_TAU``, ``SOFTPATCH_WEIGHTS``) and checked by that declaration.
The app's own environment settings (input limits, work folder, cleanup age, server roots) are declared
in ``ENVIRONMENT`` below, the same way. ``SOFTPATCH_SERVER_ROOTS`` (folders separated by ``os.pathsep``)
limits server-side paths; unset, see ``softpatch_app.server_paths`` (default folders on localhost, none on
a network address). A bad value becomes a warning and its default, never a crash.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from softpatch.config import (
    DEFAULTS,
    SETTINGS,
    ConfigError,
    Setting,
    SoftPatchConfig,
    check_setting,
    parse_setting,
    parse_value,
)
from softpatch.errors import SoftPatchError
from softpatch.io.limits import LoadLimits
from softpatch_app.workspace import ENV_WORK_DIR, default_base

APP_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BACKBONE = DEFAULTS["backbone"]
# Backbones offered in the picker; any other timm name can be typed.
BACKBONE_CHOICES = ("wide_resnet50_2", "resnet18", "resnet50", "mobilenetv1_100", "efficientnet_b0")
WEIGHT_MODES = ("pretrained", "file", "random")
WEIGHT_MODE_LABELS = {
    "pretrained": "Pretrained (ImageNet, downloaded once and cached)",
    "file": "Local weights file",
    "random": "Random weights (only to try the workflow; results are not meaningful)",
}


# Config settings a session changes in the app (and reads from SOFTPATCH_<NAME>); "weights" is shown as
# weights_mode + weights_path.
APP_CONFIG_SETTINGS = tuple(name for name, setting in SETTINGS.items() if setting.env)


def env_name(setting: str) -> str:
    """The environment variable of a config setting: ``SOFTPATCH_<NAME>``."""
    return f"SOFTPATCH_{setting.upper()}"


@dataclass(frozen=True)
class AppSettings:
    """Every setting a session can change; defaults are the config's, overridden by the environment.

    Each value is checked by the config's declaration when the object is made.
    """

    backbone: str = DEFAULTS["backbone"]
    backbone_kwargs: dict = field(default_factory=dict)
    weights_mode: str = "pretrained"  # one of WEIGHT_MODES
    weights_path: str = ""  # used when weights_mode == "file"
    device: str = DEFAULTS["device"]
    resize: int = DEFAULTS["resize"]
    crop: int = DEFAULTS["crop"]
    # denoising
    discriminator: str = DEFAULTS["discriminator"]
    tau: float = DEFAULTS["tau"]
    lof_k: int = DEFAULTS["lof_k"]
    coreset_ratio: float = DEFAULTS["coreset_ratio"]
    soft_weight: bool = DEFAULTS["soft_weight"]

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name in SETTINGS:
                object.__setattr__(self, f.name, check_setting(f.name, getattr(self, f.name)))
        if self.weights_mode not in WEIGHT_MODES:
            raise ConfigError(f"weights_mode must be one of {', '.join(WEIGHT_MODES)}; got {self.weights_mode!r}")
        object.__setattr__(self, "weights_path", check_setting("weights", self.weights_path))
        if self.crop > self.resize:
            raise ConfigError(f"crop must be at most resize={self.resize}, got {self.crop}")

    def fit_config(self) -> SoftPatchConfig:
        """The core config for these settings (raises ConfigError with a clear message when invalid)."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name in SETTINGS}
        weights = self.weights_path.strip() if self.weights_mode == "file" else None
        return SoftPatchConfig(**values, pretrained=self.weights_mode == "pretrained", weights=weights or None)

    def feature_key(self) -> tuple:
        """What decides the fitted features here: the config's feature key, and the device the app's cached
        extractor lives on (the app refits rather than moving a shared extractor)."""
        return (self.fit_config().feature_key(), self.device)

    def with_changes(self, **changes) -> AppSettings:
        return replace(self, **changes)


# Image sizes offered on the Denoise page ("resize/crop"); any other pair can be typed.
SIZE_CHOICES = ("128/112", "160/144", "224/192", "256/224", "320/288")


def settings_from_widgets(
    current: AppSettings,
    widgets: Mapping[str, Any],
    *,
    server_file: Callable[[str], Path] | None = None,
) -> tuple[AppSettings, list[str]]:
    """The settings the Denoise page's widgets ask for, and a warning for each value kept from ``current``.

    ``widgets`` holds raw widget values by setting name (``size`` as "resize/crop" text, ``backbone_kwargs``
    as JSON text). Every value is checked by the config's declaration; a refused one keeps its current value.
    A weights path typed in the browser is a server file path: it must pass ``server_file`` (the server-path
    policy, which raises ``SoftPatchError``) unless it is the one already in force (e.g. SOFTPATCH_WEIGHTS);
    without ``server_file`` no new path is accepted.
    """
    warnings: list[str] = []
    changes: dict[str, Any] = {}
    for name, raw in widgets.items():
        try:
            if name == "weights_path" and str(raw).strip() and str(raw).strip() != current.weights_path:
                if server_file is None:
                    raise ConfigError("a weights file path cannot be typed here")
                changes[name] = str(server_file(str(raw)))
            elif name == "size":
                resize, crop = str(raw).split("/")
                changes["resize"] = parse_setting("resize", resize)
                changes["crop"] = parse_setting("crop", crop)
            elif name == "backbone_kwargs":
                changes[name] = parse_setting(name, str(raw))
            elif name in SETTINGS:
                changes[name] = check_setting(name, raw.strip() if isinstance(raw, str) else raw)
            else:
                changes[name] = raw.strip() if isinstance(raw, str) else raw
        except SoftPatchError as exc:  # ConfigError, or the server-path policy's refusal
            warnings.append(f"{exc}; keeping the previous value.")
        except ValueError:  # a size without one "/"
            warnings.append("image size must look like 256/224 (resize/crop); keeping the previous value.")
    try:
        return current.with_changes(**changes), warnings
    except ConfigError as exc:
        return current, [*warnings, f"{exc}; keeping the previous settings."]


@dataclass(frozen=True)
class Environment:
    settings: AppSettings
    limits: LoadLimits
    workdir: Path
    max_age_s: float
    server_roots: tuple[Path, ...]
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class EnvSetting:
    """One of the app's own environment settings: its declaration and where it goes."""

    setting: Setting
    default: Any


# The app's own environment settings (the config's come from softpatch.config.SETTINGS).
_BASE_LIMITS = LoadLimits()
ENVIRONMENT: dict[str, EnvSetting] = {
    "SOFTPATCH_MAX_UPLOAD_MB": EnvSetting(
        Setting("largest uploaded file or archive, MB", "int", low=1, high=1024**2),
        _BASE_LIMITS.max_upload_bytes // 2**20,
    ),
    "SOFTPATCH_MAX_FILES": EnvSetting(
        Setting("most image files in one folder or archive", "int", low=1, high=10**7), _BASE_LIMITS.max_files
    ),
    "SOFTPATCH_MAX_IMAGE_MPIX": EnvSetting(
        Setting("largest image, megapixels", "int", low=1, high=10**4), _BASE_LIMITS.max_image_pixels // 10**6
    ),
    "SOFTPATCH_MAX_ZIP_MB": EnvSetting(
        Setting("largest uncompressed zip, MB", "int", low=1, high=1024**3),
        _BASE_LIMITS.max_zip_uncompressed_bytes // 2**20,
    ),
    "SOFTPATCH_SESSION_MAX_AGE_H": EnvSetting(
        Setting("working folders older than this many hours are removed", "int", low=1, high=24 * 365), 12
    ),
}


def _env_value(env: Mapping[str, str], var: str, setting: Setting, default: Any, warnings: list[str]) -> Any:
    raw = env.get(var, "").strip()
    if not raw:
        return default
    try:
        return parse_value(var, setting, raw)
    except ConfigError as exc:
        detail = str(exc).removeprefix(f"{var} ")
        warnings.append(f"{var}={raw[:80]!r} is not valid ({detail}); using {default!r}.")
        return default


def read_environment(env: Mapping[str, str] | None = None) -> Environment:
    """Settings from environment variables; a bad value becomes a warning and its default, never a crash."""
    env = os.environ if env is None else env
    warnings: list[str] = []
    values = {
        name: _env_value(env, env_name(name), SETTINGS[name], DEFAULTS[name], warnings) for name in APP_CONFIG_SETTINGS
    }
    weights_path = values.pop("weights") or ""
    if weights_path and not Path(weights_path).is_file():
        warnings.append(f"SOFTPATCH_WEIGHTS points to {weights_path!r}, which is not a file.")
    if not env.get(env_name("crop"), "").strip():
        values["crop"] = min(values["crop"], values["resize"])
    if values["crop"] > values["resize"]:
        warnings.append(
            f"SOFTPATCH_CROP={values['crop']} is larger than SOFTPATCH_RESIZE={values['resize']}; using "
            f"crop={values['resize']}."
        )
        values["crop"] = values["resize"]
    settings = AppSettings(weights_mode="file" if weights_path else "pretrained", weights_path=weights_path, **values)
    own = {var: _env_value(env, var, item.setting, item.default, warnings) for var, item in ENVIRONMENT.items()}
    limits = replace(
        _BASE_LIMITS,
        max_upload_bytes=own["SOFTPATCH_MAX_UPLOAD_MB"] * 2**20,
        max_files=own["SOFTPATCH_MAX_FILES"],
        max_image_pixels=own["SOFTPATCH_MAX_IMAGE_MPIX"] * 10**6,
        max_zip_uncompressed_bytes=own["SOFTPATCH_MAX_ZIP_MB"] * 2**20,
    )
    workdir = default_base(env.get(ENV_WORK_DIR, "").strip() or None)
    roots_raw = env.get("SOFTPATCH_SERVER_ROOTS", "").strip()
    roots = tuple(Path(p).expanduser().resolve() for p in roots_raw.split(os.pathsep) if p.strip())
    max_age_s = own["SOFTPATCH_SESSION_MAX_AGE_H"] * 3600.0
    return Environment(settings, limits, workdir, max_age_s, roots, tuple(warnings))
