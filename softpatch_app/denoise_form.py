"""The Denoise page's settings form: its widgets' remembered values, and the settings they ask for.

The widgets are keyed by ``softpatch_app.keys.DENOISE_SETTING_KEYS``; their values go through
``softpatch_app.settings.settings_from_widgets``, the one parser of what a browser sends.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from softpatch_app.keys import DENOISE, DENOISE_SETTING_KEYS
from softpatch_app.settings import AppSettings, settings_from_widgets
from softpatch_app.state import restore_widget_value, set_widget_value, widget_value

DISCRIMINATOR_NAMES = {
    "lof": "LOF (the paper's)",
    "nearest": "Nearest neighbour",
    "gaussian": "Gaussian",
    "fusion": "Fusion (SoftPatch+)",
    "none": "None: plain PatchCore",
    "auto": "Auto (default): LOF, k raised when many images look defective",
}


def widget_defaults(settings: AppSettings) -> dict[str, Any]:
    """The value of each Denoise widget (by key) that shows ``settings``."""
    values = {
        "backbone": settings.backbone,
        "weights_mode": settings.weights_mode,
        "weights_path": settings.weights_path,
        "backbone_kwargs": json.dumps(settings.backbone_kwargs) if settings.backbone_kwargs else "",
        "size": f"{settings.resize}/{settings.crop}",
        "device": settings.device,
        "discriminator": settings.discriminator,
        "tau": float(settings.tau),
        "lof_k": int(settings.lof_k),
        "coreset_ratio": float(settings.coreset_ratio),
        "soft_weight": bool(settings.soft_weight),
    }
    return {DENOISE_SETTING_KEYS[name]: value for name, value in values.items()}


def restore_denoise_widgets(settings: AppSettings) -> None:
    """Give every Denoise widget the session's setting when the widget has no value (e.g. after a page change)."""
    for key, value in widget_defaults(settings).items():
        restore_widget_value(key, value)


def wanted_settings(
    current: AppSettings, *, server_file: Callable[[str], Path] | None
) -> tuple[AppSettings, list[str]]:
    """The settings the Denoise widgets ask for, and one warning per refused value (which keeps ``current``'s)."""
    defaults = widget_defaults(current)
    raw = {name: widget_value(key, defaults[key]) for name, key in DENOISE_SETTING_KEYS.items()}
    raw["backbone"] = raw["backbone"] or current.backbone
    return settings_from_widgets(current, raw, server_file=server_file)


def use_random_weights() -> None:
    """Button callback: switch the weights widget to random weights."""
    set_widget_value(DENOISE.weights_mode, "random")


def apply_advice(changes: dict[str, Any]) -> None:
    """Button callback: put the advised settings (by setting name) into their widgets."""
    for name, value in changes.items():
        set_widget_value(DENOISE_SETTING_KEYS[name], value)
