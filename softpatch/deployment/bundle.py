"""Model bundles: one safetensors file holding the tensors, with the JSON config in its metadata. No pickle.

A bundle carries everything scoring needs, the backbone weights included, so it reproduces the fitted
model's scores exactly on a machine without network. It also keeps the training patches' outlier
scores and removed mask, so a loaded model can still show its vetting report. Optionally
(``training_features=True``) it also keeps the training patch features, so a loaded model can be
re-tuned (tau, LOF-k, coreset) like the fitted one; such a bundle is N * P * D * 4 bytes larger.

Bundles come from elsewhere and are treated as hostile: loading reads that one file and nothing else,
and checks it in an order where nothing large is allocated before it is known to be right. The header
is parsed here (``softpatch.io.fileformats``): its length against the file, every tensor's byte range, the
tensors filling the file exactly. Then the metadata (format, version, config through
``SoftPatchConfig.from_dict``, grid, names, sizes, threshold), every tensor's dtype and shape against the
config, the grid and the backbone built from the config, and only then the tensors and their values.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from softpatch.config import DEFAULTS, ConfigError, SoftPatchConfig
from softpatch.errors import BundleError, SoftPatchError
from softpatch.io.fileformats import (
    NotSafetensorsError,
    SafetensorsHeader,
    container_kind,
    loads_json,
    read_safetensors_header,
)

if TYPE_CHECKING:
    from softpatch.method.model import SoftPatch

FORMAT_NAME = "softpatch-bundle"
FORMAT_VERSION = 1
_BACKBONE_PREFIX = "backbone."
_FEATURES = "train.features"  # optional: (N, P, D) float32
# Largest image side a decoded training image can have had (Pillow's sides are 32-bit); beyond it is damage.
# Sizes are only shown, never allocated, so the bound only has to be true, not tight.
_MAX_IMAGE_SIDE = 2**31 - 1
# safetensors names of the torch dtypes a bundle's tensors have (the backbone's included).
_DTYPE_NAMES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def save_bundle(
    model: SoftPatch, path: str | Path, *, threshold: float | None = None, training_features: bool = False
) -> Path:
    """Write a fitted ``SoftPatch`` to ``path`` (conventionally ``*.softpatch``); returns the path.

    ``threshold`` (image score at or above which an image is anomalous) defaults to ``model.threshold_``.
    ``training_features`` also stores the training features ``(N, P, D)`` (the model must have them).
    """
    from safetensors.torch import save_file

    from softpatch.method.model import SoftPatch

    if not isinstance(model, SoftPatch):
        raise SoftPatchError("save_bundle needs a fitted SoftPatch model")
    state = model.to_state(training_features=training_features)  # SoftPatchError for a model without features
    threshold = state.threshold if threshold is None else float(threshold)
    if not _valid_threshold(threshold):
        raise BundleError(
            f"the threshold must be a finite number >= 0 (image scores never go below 0), got {threshold}"
        )
    tensors = {
        "bank.features": state.bank_features.contiguous().float(),
        "bank.weights": state.bank_weights.contiguous().float(),
        "bank.provenance": torch.from_numpy(np.ascontiguousarray(state.bank_provenance, dtype=np.int64)),
        "train.outlier_scores": state.outlier_scores.contiguous().float(),
        # Derivable from the scores and the config; stored so that a load can check the two agree.
        "train.removed": torch.from_numpy(state.removed_mask.astype(np.uint8)),
        "train.suspicion": torch.from_numpy(state.suspicion),
    }
    if state.training_features is not None:
        tensors[_FEATURES] = state.training_features.contiguous().float()
    for key, value in state.backbone.state_dict().items():
        tensors[_BACKBONE_PREFIX + key] = value.detach().cpu().contiguous()
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(state.config.to_dict()),
        "grid": json.dumps(list(state.grid)),
        "train_names": json.dumps(state.names),
        "train_sizes": json.dumps([list(s) for s in state.sizes]),
        "threshold": json.dumps(threshold),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.replace(path)  # never leave a half-written bundle under the real name
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for I/O failures
        tmp.unlink(missing_ok=True)
        raise BundleError(f"cannot write the bundle to {path}: {exc}") from None
    return path


@dataclass(frozen=True)
class _Contents:
    """A bundle's metadata, parsed and checked."""

    config: SoftPatchConfig
    grid: tuple[int, int]
    names: list[str]
    sizes: list[tuple[int, int]]
    threshold: float | None


def _valid_threshold(value: object) -> bool:
    """None (no threshold) or a finite number >= 0: image scores are soft weights (>= 0) times distances."""
    if value is None:
        return True
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _header(path: Path) -> SafetensorsHeader:
    """The bundle's checked safetensors header; a pickle, a zip or anything else is refused unopened."""
    if not path.is_file():
        raise BundleError(f"bundle not found: {path}")
    try:
        return read_safetensors_header(path)
    except NotSafetensorsError as exc:
        # Only now compare signatures: a safetensors header length may begin with 0x80 or "PK".
        kind = container_kind(path)
        if kind is not None:
            raise BundleError(
                f"{path.name} is a {kind} file, not a SoftPatch bundle; pickles and torch checkpoints are never loaded"
            ) from None
        raise BundleError(f"{path.name} is not a readable SoftPatch bundle (damaged or truncated): {exc}") from None
    except OSError as exc:
        raise BundleError(f"cannot read the bundle {path.name}: {exc.strerror or exc}") from None


def _is_int(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _contents(name: str, metadata: dict[str, str]) -> _Contents:
    """Parse and check every metadata field; raises ``BundleError`` naming the first bad one."""
    if metadata.get("format") != FORMAT_NAME:
        raise BundleError(f"{name} is a safetensors file but not a SoftPatch bundle")
    version = metadata.get("format_version", "")
    if version != str(FORMAT_VERSION):
        raise BundleError(
            f"{name} has bundle format version {version[:20] or '(none)'}; this softpatch reads version "
            f"{FORMAT_VERSION}: refit, or use the softpatch version that wrote it"
        )
    fields = {}
    for key in ("config", "grid", "train_names", "train_sizes", "threshold"):
        if key not in metadata and key != "threshold":  # a bundle without a threshold has none
            raise BundleError(f"{name} has damaged metadata: the {key!r} field is missing")
        try:
            fields[key] = loads_json(metadata.get(key, "null"))
        except ValueError as exc:
            raise BundleError(f"{name} has damaged metadata: its {key!r} field is {exc}") from None
    if not isinstance(fields["config"], dict):
        raise BundleError(f"{name} has damaged metadata: its config is not a JSON object")
    try:
        config = SoftPatchConfig.from_dict(fields["config"])
    except (ConfigError, TypeError, ValueError) as exc:
        raise BundleError(f"{name} holds settings this softpatch refuses: {str(exc)[:300]}") from None
    grid, names, sizes, threshold = fields["grid"], fields["train_names"], fields["train_sizes"], fields["threshold"]
    if not (isinstance(grid, list) and len(grid) == 2 and all(_is_int(g, 1, config.crop) for g in grid)):
        raise BundleError(f"{name} has damaged metadata: its patch grid is not two sides in [1, crop={config.crop}]")
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise BundleError(f"{name} has damaged metadata: its training image names are not a non-empty list of text")
    if not (
        isinstance(sizes, list)
        and len(sizes) == len(names)
        and all(isinstance(s, list) and len(s) == 2 and all(_is_int(v, 1, _MAX_IMAGE_SIDE) for v in s) for s in sizes)
    ):
        raise BundleError(
            f"{name} has damaged metadata: it needs one (width, height) in [1, {_MAX_IMAGE_SIDE}] per training image"
        )
    if not _valid_threshold(threshold):
        raise BundleError(f"{name} has damaged metadata: its threshold must be a finite number >= 0 or null")
    return _Contents(
        config=config,
        grid=(grid[0], grid[1]),
        names=names,
        sizes=[(w, h) for w, h in sizes],
        threshold=None if threshold is None else float(threshold),
    )


def _check_layout(name: str, header: SafetensorsHeader, contents: _Contents) -> None:
    """Every tensor but the backbone's: present, of its dtype, of the shape the metadata implies; nothing else."""
    entries = header.tensors
    features = entries.get("bank.features")
    if features is None or features.dtype != "F32" or len(features.shape) != 2:
        raise BundleError(f"{name} is damaged: tensor 'bank.features' is missing or not a float32 matrix")
    n, p = len(contents.names), contents.grid[0] * contents.grid[1]
    m = features.shape[0]
    if m == 0:
        raise BundleError(f"{name} has an empty memory bank: there is nothing to compare test patches with")
    if m > n * p:
        raise BundleError(f"{name} is damaged: its memory bank has {m} patches, more than the {n * p} training patches")
    expected = {
        "bank.features": ("F32", (m, contents.config.feature_dim)),
        "bank.weights": ("F32", (m,)),
        "bank.provenance": ("I64", (m, 3)),
        "train.outlier_scores": ("F32", (n, p)),
        "train.removed": ("U8", (n, p)),
        "train.suspicion": ("F32", (n,)),
    }
    optional = {_FEATURES: ("F32", (n, p, contents.config.feature_dim))}
    for key, (dtype, shape) in {**expected, **optional}.items():
        entry = entries.get(key)
        if entry is None and key in optional:
            continue
        if entry is None:
            raise BundleError(f"{name} is damaged: tensor {key!r} is missing")
        if entry.dtype != dtype or entry.shape != shape:
            raise BundleError(
                f"{name} is damaged or tampered with: tensor {key!r} is {entry.dtype} {list(entry.shape)}, but its "
                f"config and metadata need {dtype} {list(shape)}"
            )
    unexpected = sorted(
        k for k in entries if k not in expected and k not in optional and not k.startswith(_BACKBONE_PREFIX)
    )
    if unexpected:
        raise BundleError(f"{name} is damaged or tampered with: unexpected tensor {unexpected[0][:80]!r}")


def _check_backbone_layout(name: str, header: SafetensorsHeader, backbone: torch.nn.Module, backbone_name: str) -> None:
    """The stored backbone tensors are exactly the built backbone's: same names, dtypes and shapes."""
    target = backbone.state_dict()
    stored = {k[len(_BACKBONE_PREFIX) :]: e for k, e in header.tensors.items() if k.startswith(_BACKBONE_PREFIX)}
    problems = [f"{k!r} is missing" for k in target if k not in stored]
    problems += [f"{k[:80]!r} is not part of it" for k in stored if k not in target]
    problems += [
        f"{k!r} is {stored[k].dtype} {list(stored[k].shape)}, not {_DTYPE_NAMES.get(v.dtype)} {list(v.shape)}"
        for k, v in target.items()
        if k in stored and (stored[k].shape != tuple(v.shape) or stored[k].dtype != _DTYPE_NAMES.get(v.dtype))
    ]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise BundleError(
            f"{name}: the stored backbone weights do not fit {backbone_name!r}: tensor {problems[0]}{more}"
        )


def _read_tensors(path: Path, header: SafetensorsHeader) -> dict[str, torch.Tensor]:
    """Every tensor of a checked header; each is at most the file's size, so nothing unbounded is allocated."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            if set(fh.keys()) != set(header.tensors):
                raise BundleError(f"{path.name} is damaged: its header reads differently the second time")
            tensors = {key: fh.get_tensor(key) for key in header.tensors}
    except BundleError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for damaged files
        raise BundleError(f"{path.name} is not a readable SoftPatch bundle (damaged or truncated): {exc}") from None
    for key, tensor in tensors.items():
        entry = header.tensors[key]
        if tuple(tensor.shape) != entry.shape or _DTYPE_NAMES.get(tensor.dtype) != entry.dtype:
            raise BundleError(f"{path.name} is damaged: tensor {key!r} reads differently from its header")
    return tensors


def _check_values(name: str, tensors: dict[str, torch.Tensor], contents: _Contents) -> None:
    """Every value in range: what ``fit`` produces is finite, soft weights and outlier scores are >= 0."""
    provenance = tensors["bank.provenance"]
    removed = tensors["train.removed"]
    upper = torch.tensor([len(contents.names), *contents.grid])
    # Soft weights are outlier scores over their median (softpatch.method.denoise.soft_weights): >= 0, and exactly 0
    # for a patch with an identical twin under the nearest discriminator, so 0 is a real value, not damage.
    checks = [
        (bool(torch.isfinite(tensors["bank.features"]).all()), "its memory bank features are not all finite"),
        (
            _FEATURES not in tensors or bool(torch.isfinite(tensors[_FEATURES]).all()),
            "its training features are not all finite",
        ),
        (_finite_non_negative(tensors["bank.weights"]), "its soft weights are not all finite and >= 0"),
        (
            bool(((provenance >= 0) & (provenance < upper)).all()),
            "its memory bank names patches outside the training set",
        ),
        (_finite_non_negative(tensors["train.outlier_scores"]), "its outlier scores are not all finite and >= 0"),
        (_finite_non_negative(tensors["train.suspicion"]), "its image suspicions are not all finite and >= 0"),
        (bool((removed <= 1).all()), "its removed-patch mask holds values other than 0 and 1"),
        (
            all(
                bool(torch.isfinite(t).all())
                for k, t in tensors.items()
                if k.startswith(_BACKBONE_PREFIX) and t.is_floating_point()
            ),
            "its backbone weights are not all finite",
        ),
    ]
    for ok, reason in checks:
        if not ok:
            raise BundleError(f"{name} is damaged or tampered with: {reason}")


def _finite_non_negative(tensor: torch.Tensor) -> bool:
    return bool((torch.isfinite(tensor) & (tensor >= 0)).all())


def load_bundle(path: str | Path, *, device: str = DEFAULTS["device"]) -> SoftPatch:
    """Read a bundle written by ``save_bundle``; returns a scoring-ready ``SoftPatch``.

    Reads the bundle file and nothing else (no network, no other file: the backbone is built without
    pretrained weights and gets the stored ones). Everything is checked before anything large is
    allocated: the header (its length against the file, every tensor's byte range), the metadata
    (format, version, config, grid, names, sizes, threshold), every tensor's dtype and shape against
    the config and the grid, then the values themselves. Raises ``BundleError`` with the reason otherwise.
    """
    from softpatch.method.features import create_backbone, patch_grid
    from softpatch.method.model import FittedState, SoftPatch

    path = Path(path)
    header = _header(path)
    contents = _contents(path.name, header.metadata)
    config = contents.config.replace(device=device)  # a bad device is the caller's error, not the bundle's
    _check_layout(path.name, header, contents)
    try:
        backbone = create_backbone(config.replace(pretrained=False, weights=None))
    except SoftPatchError as exc:
        raise BundleError(f"{path.name}: its backbone cannot be built: {exc}") from None
    _check_backbone_layout(path.name, header, backbone, config.backbone)
    stride = int(backbone.feature_info.reduction()[0])
    if contents.grid != patch_grid(config.crop, stride):
        raise BundleError(
            f"{path.name} is damaged or tampered with: its patch grid {list(contents.grid)} is not the "
            f"{list(patch_grid(config.crop, stride))} of crop {config.crop} on {config.backbone!r}"
        )
    tensors = _read_tensors(path, header)
    _check_values(path.name, tensors, contents)
    backbone_state = {k[len(_BACKBONE_PREFIX) :]: v for k, v in tensors.items() if k.startswith(_BACKBONE_PREFIX)}
    try:
        backbone.load_state_dict(backbone_state, strict=True)
    except Exception as exc:  # noqa: BLE001 - any mismatch means the stored backbone is unusable
        raise BundleError(f"{path.name}: the stored backbone weights do not fit {config.backbone!r}: {exc}") from None
    state = FittedState(
        config=config,
        grid=contents.grid,
        names=contents.names,
        sizes=contents.sizes,
        threshold=contents.threshold,
        backbone=backbone,
        bank_features=tensors["bank.features"],
        bank_weights=tensors["bank.weights"],
        bank_provenance=tensors["bank.provenance"].numpy(),
        outlier_scores=tensors["train.outlier_scores"],
        suspicion=tensors["train.suspicion"].numpy(),
        training_features=tensors.get(_FEATURES),
    )
    if not np.array_equal(state.removed_mask, tensors["train.removed"].numpy().astype(bool)):
        raise BundleError(
            f"{path.name} is damaged or tampered with: its removed-patch mask is not the one its outlier scores "
            "and settings give"
        )
    return SoftPatch.from_state(state, device=device)
