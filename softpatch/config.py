"""The one configuration object of a SoftPatch model, and the one declaration of every setting.

Each field of ``SoftPatchConfig`` carries a ``Setting`` in its metadata: its kind, bounds or choices, a
line of help and its role. Everything that takes settings from outside is derived from that declaration
and checked by it: the CLI's options (``softpatch.cli``), the app's environment variables and widgets
(``softpatch_app.settings``) and bundles (``softpatch.deployment.bundle``, through ``SoftPatchConfig.from_dict``).
A value is therefore validated the same way wherever it enters, and a new setting is one new field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from softpatch.errors import SoftPatchError

TAU_SCOPES = ("global", "position")
CORESET_METHODS = ("greedy", "random", "all")
PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
SEARCH_METHODS = ("bounded", "exhaustive", "ivf")
ROLES = ("feature", "retune", "runtime")
# Keys of earlier versions that no longer mean anything; accepted on load and dropped.
_RETIRED_KEYS = frozenset({"search_candidates"})  # approximate search, replaced by the exact bounded one
# A plain timm model name with an optional pretrained tag ("resnet50.a1_in1k"). Every name timm registers
# has this form; "hf-hub:..." and "local-dir:..." names, which make timm reach the network or read server
# folders, do not.
_TIMM_NAME = re.compile(r"^[a-z0-9]+(?:_[a-z0-9]+)*(?:\.[a-z0-9_]+)?$")
_MAX_TEXT = 4096  # longest path or name accepted


class ConfigError(SoftPatchError, ValueError):
    """A configuration value is out of range, of the wrong type or unknown (the message names the setting)."""


@dataclass(frozen=True)
class Setting:
    """How one setting may be given: the single declaration that every entry point checks against."""

    help: str  # one line for the CLI's --help and the app's tooltips
    kind: str  # a key of PARSERS and CHECKS: "int", "float", "bool", "choice", "timm_name", "path", "ints", "names", "kwargs"
    role: str = "runtime"  # "feature": changing it needs a new fit; "retune": cached features suffice; "runtime"
    low: float | None = None  # smallest allowed number (or count, for "ints" and "names")
    high: float | None = None  # largest allowed number
    low_open: bool = False  # low itself is not allowed
    high_open: bool = False  # high itself is not allowed
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None  # allowed values (a callable: a registry)
    optional: bool = False  # None is a valid value
    env: bool = False  # the app reads it from SOFTPATCH_<NAME>

    def allowed(self) -> tuple[str, ...] | None:
        """The allowed values of a "choice" or "names" setting (a registry's keys now), else None."""
        return self.choices() if callable(self.choices) else self.choices

    def bounds_text(self) -> str:
        """The allowed range for messages, e.g. "(0, 1]" (round bracket = that end is excluded)."""
        left = "(" if self.low_open else "["
        right = ")" if self.high_open else "]"
        return f"{left}{_number(self.low)}, {_number(self.high)}{right}"


def _number(value: float | None) -> str:
    if value is None:
        return "-inf"
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _discriminator_names() -> tuple[str, ...]:
    from softpatch.method.contamination import AUTO
    from softpatch.method.discriminators import DISCRIMINATORS  # late: discriminators imports torch

    return (
        *DISCRIMINATORS,
        AUTO,
    )  # "auto": chosen per training set from its suspicion (softpatch.method.contamination)


def _fusion_members() -> tuple[str, ...]:
    return tuple(n for n in _discriminator_names() if n not in ("fusion", "none", "auto"))


def _setting(default: Any, **declaration: Any) -> Any:
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"setting": Setting(**declaration)})
    return field(default=default, metadata={"setting": Setting(**declaration)})


# Backbone keyword arguments a user may pass to timm: only ones known to be harmless and useful (converted
# weights). Everything else timm accepts (pretrained_cfg_overlay, checkpoint_path, cache_dir, widths, ...)
# can reach the network or the file system, or allocate without bound, and is refused.
BACKBONE_KWARGS: dict[str, Setting] = {
    "bn_eps": Setting(
        "batch-norm epsilon of converted weights (0.001 for Keras ports)", "float", low=0.0, high=0.1, low_open=True
    ),
    "pad_type": Setting("convolution padding ('same' for TensorFlow ports)", "choice", choices=("", "same", "valid")),
}


_KWARGS_HELP = f"extra timm arguments as a JSON object; allowed keys: {', '.join(BACKBONE_KWARGS)}"


@dataclass(frozen=True)
class SoftPatchConfig:
    """Every setting of a SoftPatch fit. Checked once, in ``__post_init__``, against each field's ``Setting``.

    Defaults follow the paper (seeds/000): wide_resnet50_2 stages 2+3, resize 256 / crop 224, tau=0.15,
    greedy coreset of 10%, soft re-weighting on; but the discriminator is "auto" (LOF with k >= 6 raised to
    the estimated number of defective images, see softpatch.method.contamination and the README's noise sweep).
    """

    # --- images
    resize: int = _setting(
        256,
        help="images are squashed to resize x resize pixels",
        kind="int",
        role="feature",
        low=32,
        high=1024,
        env=True,
    )
    crop: int = _setting(
        224,
        help="then centre-cropped to crop x crop pixels (at most resize)",
        kind="int",
        role="feature",
        low=16,
        high=1024,
        env=True,
    )
    # --- backbone
    backbone: str = _setting(
        "wide_resnet50_2",
        help="timm model name (features_only), e.g. wide_resnet50_2",
        kind="timm_name",
        role="feature",
        env=True,
    )
    layers: tuple[int, ...] = _setting(
        (2, 3),
        help="backbone stages, comma-separated; the first sets the patch grid",
        kind="ints",
        role="feature",
        low=0,
        high=6,
    )
    backbone_kwargs: dict[str, Any] = _setting(  # noqa: RUF009 - _setting returns a field() with a factory
        {},
        help=_KWARGS_HELP,
        kind="kwargs",
        role="feature",
        env=True,
    )
    pretrained: bool = _setting(
        True,
        help="timm's pretrained weights (downloaded once, cached); off = random init, only to try the workflow",
        kind="bool",
        role="feature",
    )
    weights: str | None = _setting(
        None,
        help="local weights file (safetensors or plain torch state dict); wins over pretrained",
        kind="path",
        role="feature",
        optional=True,
        env=True,
    )
    feature_dim: int = _setting(
        1024,
        help="patch embedding size, split equally between the stages",
        kind="int",
        role="feature",
        low=1,
        high=4096,
    )
    patch_size: int = _setting(
        3, help="neighbourhood aggregation window (odd)", kind="int", role="feature", low=1, high=15
    )
    precision: str = _setting(
        "fp32", help="backbone precision; bf16 is faster but moves scores slightly", kind="choice", choices=PRECISIONS
    )
    batch_size: int | None = _setting(
        None,
        help="images per backbone pass (default: 8 on a CPU, 32 on a GPU)",
        kind="int",
        low=1,
        high=512,
        optional=True,
    )
    # --- denoising
    discriminator: str = _setting(
        "auto",
        help="noise discriminator; auto (default): LOF with k raised when many images look defective",
        kind="choice",
        role="retune",
        choices=_discriminator_names,
        env=True,
    )
    lof_k: int = _setting(
        6, help="LOF neighbours; clamped to N-1 with a warning", kind="int", role="retune", low=1, high=256, env=True
    )
    gaussian_reg: float = _setting(
        0.01,
        help="covariance ridge of the gaussian discriminator, relative to the mean variance",
        kind="float",
        role="retune",
        low=0.0,
        high=1000.0,
        low_open=True,
    )
    fusion: tuple[str, ...] = _setting(
        ("nearest", "gaussian", "lof"),
        help="members of the fusion discriminator, comma-separated",
        kind="names",
        role="retune",
        low=1,
        choices=_fusion_members,
    )
    neighbour_reference: int = _setting(
        1024,
        help="images each patch is compared with at its position: all of them up to this many, else the "
        "this many that look most like its image (groups of look-alike images; cost linear in the images)",
        kind="int",
        role="retune",
        low=2,
        high=1_000_000,
    )
    tau: float = _setting(
        0.15,
        help="share of patches removed as noise (highest outlier scores)",
        kind="float",
        role="retune",
        low=0.0,
        high=1.0,
        high_open=True,
        env=True,
    )
    tau_scope: str = _setting(
        "global",
        help="global: one cut over all patches; position: tau at every position",
        kind="choice",
        role="retune",
        choices=TAU_SCOPES,
    )
    soft_weight: bool = _setting(
        True,
        help="scale test distances by the matched patch's outlier score (eq. 8); off = plain distances",
        kind="bool",
        role="retune",
        env=True,
    )
    # --- memory bank
    coreset: str = _setting(
        "greedy",
        help="memory bank selection: greedy k-centre, random, or all kept patches",
        kind="choice",
        role="retune",
        choices=CORESET_METHODS,
    )
    coreset_ratio: float = _setting(
        0.1,
        help="memory bank size as a share of the kept patches",
        kind="float",
        role="retune",
        low=0.0,
        high=1.0,
        low_open=True,
        env=True,
    )
    projection_dim: int = _setting(
        128, help="random projection used by the greedy coreset", kind="int", role="retune", low=1, high=2048
    )
    coreset_exact_rows: int = _setting(
        262_144,
        help="the greedy coreset is exact up to this many kept patches; beyond, it runs on seeded random blocks "
        "(cost linear in the patches)",
        kind="int",
        role="retune",
        low=1,
        high=2**40,
    )
    coreset_block_rows: int = _setting(
        65_536,
        help="patches per block of the blocked greedy coreset (more: closer to the exact one, slower)",
        kind="int",
        role="retune",
        low=256,
        high=2**24,
    )
    bank_budget_mb: int = _setting(
        2048,
        help="largest memory bank in MB (rows x feature_dim x 4 bytes); a larger coreset is cut to it, with a warning",
        kind="int",
        role="retune",
        low=1,
        high=2**20,
    )
    # --- anomaly maps
    blur_sigma: float = _setting(
        4.0, help="Gaussian blur of the anomaly maps, in crop pixels", kind="float", role="retune", low=0.0, high=64.0
    )
    # --- runtime
    device: str = _setting(
        "auto", help="auto: CUDA when present, else the CPU", kind="choice", choices=DEVICES, env=True
    )
    search: str = _setting(
        "bounded",
        help="CPU nearest-neighbour search: bounded and exhaustive are exact (exhaustive is the slower baseline); "
        "ivf is approximate on banks of a million rows or more, its measured recall reported",
        kind="choice",
        choices=SEARCH_METHODS,
    )
    threads: int | None = _setting(
        None,
        help="CPU threads of this job: torch, faiss and image decoding (default: auto, every core this "
        "process may use, shared among the fits running at once in the app)",
        kind="int",
        low=1,
        high=256,
        optional=True,
    )
    seed: int = _setting(
        0,
        help="seeds the coreset and a random init: a fit is reproducible",
        kind="int",
        role="retune",
        low=0,
        high=2**32 - 1,
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, check_setting(f.name, getattr(self, f.name)))
        checks = [
            (self.crop <= self.resize, f"crop must be at most resize={self.resize}, got {self.crop}"),
            (list(self.layers) == sorted(set(self.layers)), f"layers must be increasing, got {list(self.layers)}"),
            (self.patch_size % 2 == 1, f"patch_size must be odd, got {self.patch_size}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def weights_source(self) -> str:
        """Where the backbone weights come from: "file", "pretrained" or "random"."""
        if self.weights:
            return "file"
        return "pretrained" if self.pretrained else "random"

    def feature_key(self) -> str:
        """A short hash of the settings that decide the patch features (equal key = reusable features)."""
        relevant = {k: v for k, v in self.to_dict().items() if k in FEATURE_FIELDS}
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]

    def replace(self, **changes: Any) -> SoftPatchConfig:
        """A copy with ``changes`` applied (and checked)."""
        unknown = sorted(set(changes) - set(SETTINGS))
        if unknown:
            raise ConfigError(f"unknown settings: {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Every setting by name as plain JSON values (tuples become lists); ``from_dict`` reads it back."""
        data = dataclasses.asdict(self)
        data["layers"] = list(self.layers)
        data["fusion"] = list(self.fusion)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SoftPatchConfig:
        """Build from ``to_dict`` output; unknown keys are an error, not silently dropped."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a config must be a mapping of settings, got {type(data).__name__}")
        data = {k: v for k, v in data.items() if k not in _RETIRED_KEYS}
        unknown = sorted(str(k) for k in set(data) - set(SETTINGS))
        if unknown:
            raise ConfigError(f"unknown config keys: {unknown}")
        return cls(**data)


# ---------------------------------------------------------------------------------------------- checking
def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _in_bounds(setting: Setting, value: float) -> bool:
    if setting.low is not None and (value < setting.low or (setting.low_open and value == setting.low)):
        return False
    return not (setting.high is not None and (value > setting.high or (setting.high_open and value == setting.high)))


def _check_int(name: str, setting: Setting, value: Any) -> int:
    if not _is_int(value):
        raise ConfigError(f"{name} must be a whole number, got {value!r}")
    if not _in_bounds(setting, value):
        raise ConfigError(f"{name} must be in {setting.bounds_text()}, got {value}")
    return value


def _check_float(name: str, setting: Setting, value: Any) -> float:
    if not (_is_int(value) or isinstance(value, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if not _in_bounds(setting, value):
        raise ConfigError(f"{name} must be in {setting.bounds_text()}, got {value}")
    return float(value)


def _check_bool(name: str, setting: Setting, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return value


def _check_choice(name: str, setting: Setting, value: Any) -> str:
    allowed = setting.allowed() or ()
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def _check_timm_name(name: str, setting: Setting, value: Any) -> str:
    if not isinstance(value, str) or not _TIMM_NAME.match(value):
        raise ConfigError(
            f"{name} must be a plain timm model name such as 'wide_resnet50_2' (lower-case letters, digits, '_' "
            f"and an optional '.tag'); got {str(value)[:80]!r}. Hub and local-folder names are refused: they make timm "
            "reach the network or the server's folders"
        )
    return value


def _check_path(name: str, setting: Setting, value: Any) -> str:
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"{name} must be a file path, got {value!r}")
    text = os.fspath(value)
    if not isinstance(text, str) or "\x00" in text or len(text) > _MAX_TEXT:
        raise ConfigError(f"{name} must be a file path, got {str(value)[:80]!r}")
    return text


def _check_ints(name: str, setting: Setting, value: Any) -> tuple[int, ...]:
    if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__iter__"):
        raise ConfigError(f"{name} must be a sequence of whole numbers, got {value!r}")
    items = tuple(value)
    if not 1 <= len(items) <= 8 or not all(_is_int(i) for i in items):
        raise ConfigError(f"{name} must be 1 to 8 whole numbers, got {list(items)!r}"[:200])
    if not all(_in_bounds(setting, i) for i in items):
        raise ConfigError(f"{name} must each be in {setting.bounds_text()}, got {list(items)}")
    return items


def _check_names(name: str, setting: Setting, value: Any) -> tuple[str, ...]:
    if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__iter__"):
        raise ConfigError(f"{name} must be a sequence of names, got {value!r}")
    items = tuple(value)
    allowed = setting.allowed() or ()
    if not 1 <= len(items) <= 8 or not all(isinstance(n, str) and n in allowed for n in items):
        raise ConfigError(f"{name} must name 1 to 8 of {', '.join(allowed)}; got {list(items)!r}"[:300])
    return items


def _check_kwargs(name: str, setting: Setting, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name} must be a JSON object (a dict), got {value!r}"[:200])
    refused = sorted(str(k) for k in value if k not in BACKBONE_KWARGS)
    if refused:
        raise ConfigError(
            f"{name} may only set {', '.join(BACKBONE_KWARGS)}; refused: {', '.join(refused)[:200]} (other timm "
            "arguments can reach the network or the file system, or build networks too large for this machine)"
        )
    return {key: check_value(f"{name}.{key}", BACKBONE_KWARGS[key], item) for key, item in value.items()}


# Pure checks by kind: each returns the value normalised (tuples for sequences, floats for numbers).
CHECKS: dict[str, Callable[[str, Setting, Any], Any]] = {
    "int": _check_int,
    "float": _check_float,
    "bool": _check_bool,
    "choice": _check_choice,
    "timm_name": _check_timm_name,
    "path": _check_path,
    "ints": _check_ints,
    "names": _check_names,
    "kwargs": _check_kwargs,
}


def check_value(name: str, setting: Setting, value: Any) -> Any:
    """``value`` checked against ``setting`` and normalised; ``ConfigError`` naming ``name`` otherwise."""
    if value is None and setting.optional:
        return None
    return CHECKS[setting.kind](name, setting, value)


def check_setting(name: str, value: Any) -> Any:
    """``value`` for the config field ``name``, checked and normalised (the one check every entry point uses)."""
    if name not in SETTINGS:
        raise ConfigError(f"unknown setting {name!r}")
    return check_value(name, SETTINGS[name], value)


# ---------------------------------------------------------------------------------------------- parsing text
def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _parse_int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"must be a whole number, not {text.strip()[:40]!r}") from None


def _parse_float(text: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise ValueError(f"must be a number, not {text.strip()[:40]!r}") from None


def _parse_json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text) if text.strip() else {}
    except (ValueError, RecursionError):
        raise ValueError('must be a JSON object such as {"bn_eps": 0.001}') from None
    if not isinstance(value, dict):
        raise ValueError('must be a JSON object such as {"bn_eps": 0.001}')
    return value


def _parse_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


# How a text (a CLI argument, an environment variable) becomes a value of each kind, before checking.
PARSERS: dict[str, Callable[[str], Any]] = {
    "int": _parse_int,
    "float": _parse_float,
    "bool": _parse_bool,
    "choice": lambda text: text.strip(),
    "timm_name": lambda text: text.strip(),
    "path": lambda text: os.path.expanduser(text.strip()),
    "ints": lambda text: [_parse_int(part) for part in _parse_list(text)],
    "names": _parse_list,
    "kwargs": _parse_json_object,
}


def parse_value(label: str, setting: Setting, text: str) -> Any:
    """``text`` parsed by ``setting``'s kind and checked; ``ConfigError`` naming ``label`` otherwise."""
    if setting.optional and setting.kind != "path" and text.strip().lower() in ("", "none", "auto"):
        return None
    try:
        value = PARSERS[setting.kind](text)
    except ValueError as exc:
        raise ConfigError(f"{label} {exc}") from None
    return check_value(label, setting, value)


def parse_setting(name: str, text: str) -> Any:
    """The value of config setting ``name`` written as ``text`` (a CLI argument, a widget, an environment value)."""
    return parse_value(name, SETTINGS[name], text)


SETTINGS: dict[str, Setting] = {f.name: f.metadata["setting"] for f in dataclasses.fields(SoftPatchConfig)}
DEFAULTS: dict[str, Any] = {
    f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    for f in dataclasses.fields(SoftPatchConfig)
}
# Settings that change the features themselves: changing one needs a new fit, not a re-tune.
FEATURE_FIELDS = frozenset(name for name, s in SETTINGS.items() if s.role == "feature")
# Settings a re-tune may change without touching the images again.
RETUNE_FIELDS = frozenset(name for name, s in SETTINGS.items() if s.role != "feature")
