"""Choosing the torch device."""

from __future__ import annotations

import torch

from softpatch.errors import SoftPatchError


def resolve_device(name: str) -> torch.device:
    """Map "auto", "cpu" or "cuda" to a device; "auto" picks CUDA where available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SoftPatchError("device 'cuda' was requested but no CUDA GPU is available; choose the device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise SoftPatchError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)


def default_batch_size(device: torch.device) -> int:
    """Images per backbone pass when the config leaves it open.

    On a CPU, batches of 8 keep wide_resnet50_2's activations in cache: measured 0.050 s per image
    against 0.060 s at 16. A GPU needs larger batches to fill it; 32 fits a wide_resnet50_2 at 224 in
    under 4 GB, and an out-of-memory batch is halved anyway.
    """
    return 32 if device.type == "cuda" else 8


def describe_device(device: torch.device) -> str:
    """A human-readable name: "CPU" or the GPU's name."""
    if device.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)}"
    return "CPU"
