"""Model bundles: one safetensors file holding the tensors, with the JSON config in its metadata. No pickle.

A bundle carries everything scoring needs, the backbone weights included, so it reproduces the fitted
model's scores exactly on a machine without network. It also keeps the training patches' outlier
scores and removed mask, so a loaded model can still show its vetting report.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from softpatch.config import ConfigError, SoftPatchConfig
from softpatch.device import resolve_device
from softpatch.errors import BundleError, SoftPatchError
from softpatch.memory_bank import MemoryBank

FORMAT_NAME = "softpatch-bundle"
FORMAT_VERSION = 1
_BACKBONE_PREFIX = "backbone."
_REQUIRED = {
    "bank.features": (2, torch.float32),
    "bank.weights": (1, torch.float32),
    "bank.provenance": (2, torch.int64),
    "train.outlier_scores": (2, torch.float32),
    "train.removed": (2, torch.uint8),
    "train.suspicion": (1, torch.float32),
}


def save_bundle(model: object, path: str | Path, *, threshold: float | None = None) -> Path:
    """Write a fitted ``SoftPatch`` to ``path`` (conventionally ``*.softpatch``); returns the path.

    ``threshold`` (image score at or above which an image is anomalous) defaults to ``model.threshold_``.
    """
    from safetensors.torch import save_file

    from softpatch.model import SoftPatch

    if not isinstance(model, SoftPatch):
        raise SoftPatchError("save_bundle needs a fitted SoftPatch model")
    bank = model.build_memory_bank()
    threshold = model.threshold_ if threshold is None else float(threshold)
    n = len(model.train_names_)
    tensors = {
        "bank.features": bank.features.contiguous().float(),
        "bank.weights": bank.weights.contiguous().float(),
        "bank.provenance": torch.from_numpy(np.ascontiguousarray(bank.provenance, dtype=np.int64)),
        "train.outlier_scores": torch.from_numpy(np.ascontiguousarray(model.outlier_scores_.reshape(n, -1))).float(),
        "train.removed": torch.from_numpy(model.removed_mask_.reshape(n, -1).astype(np.uint8)),
        "train.suspicion": torch.from_numpy(np.ascontiguousarray(model.suspicion_, dtype=np.float32)),
    }
    for key, value in model._get_extractor().backbone.state_dict().items():
        tensors[_BACKBONE_PREFIX + key] = value.detach().cpu().contiguous()
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(model.resolved_config_.to_dict()),  # "auto" saved as what it chose
        "grid": json.dumps(list(model.grid_shape_)),
        "train_names": json.dumps(model.train_names_),
        "train_sizes": json.dumps([list(s) for s in model.train_sizes_]),
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


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    if not path.is_file():
        raise BundleError(f"bundle not found: {path}")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise BundleError(f"{path.name} is a pickle/zip file, not a SoftPatch bundle; pickles are never loaded")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for damaged files
        raise BundleError(f"{path.name} is not a readable SoftPatch bundle (damaged or truncated): {exc}") from None
    return metadata, tensors


def load_bundle(path: str | Path, *, device: str = "auto") -> object:
    """Read a bundle written by ``save_bundle``; returns a scoring-ready ``SoftPatch``.

    Checks the format name and version, every tensor's shape and dtype, and that the parts agree,
    before anything is used. Raises ``BundleError`` with the reason otherwise.
    """
    from softpatch.features import FeatureExtractor, create_backbone
    from softpatch.model import SoftPatch, _TrainingState

    path = Path(path)
    metadata, tensors = _read(path)
    if metadata.get("format") != FORMAT_NAME:
        raise BundleError(f"{path.name} is a safetensors file but not a SoftPatch bundle")
    version = metadata.get("format_version", "")
    if version != str(FORMAT_VERSION):
        raise BundleError(
            f"{path.name} has bundle format version {version or '(none)'}; this softpatch reads version "
            f"{FORMAT_VERSION}: refit, or use the softpatch version that wrote it"
        )
    try:
        config = SoftPatchConfig.from_dict(json.loads(metadata["config"])).replace(device=device)
        grid = tuple(int(v) for v in json.loads(metadata["grid"]))
        names = [str(n) for n in json.loads(metadata["train_names"])]
        sizes = [(int(w), int(h)) for w, h in json.loads(metadata["train_sizes"])]
        threshold = json.loads(metadata.get("threshold", "null"))
    except (KeyError, ValueError, TypeError, ConfigError) as exc:
        raise BundleError(f"{path.name} has damaged metadata: {exc}") from None
    if len(grid) != 2 or min(grid) < 1 or len(sizes) != len(names):
        raise BundleError(
            f"{path.name} has inconsistent metadata (grid {grid}, {len(names)} names, {len(sizes)} sizes)"
        )
    for key, (ndim, dtype) in _REQUIRED.items():
        tensor = tensors.get(key)
        if tensor is None or tensor.ndim != ndim or tensor.dtype != dtype:
            raise BundleError(f"{path.name} is damaged: tensor {key!r} is missing or has the wrong shape/dtype")
    bank_features, weights, provenance = tensors["bank.features"], tensors["bank.weights"], tensors["bank.provenance"]
    m, n, p = bank_features.shape[0], len(names), grid[0] * grid[1]
    checks = [
        bank_features.shape[1] == config.feature_dim,
        weights.shape == (m,) and provenance.shape == (m, 3),
        tensors["train.outlier_scores"].shape == (n, p) and tensors["train.removed"].shape == (n, p),
        tensors["train.suspicion"].shape == (n,),
        bool(torch.isfinite(bank_features).all()) and bool(torch.isfinite(weights).all()),
        m == 0 or (int(provenance[:, 0].min()) >= 0 and int(provenance[:, 0].max()) < n),
        threshold is None or isinstance(threshold, (int, float)),
    ]
    if not all(checks):
        raise BundleError(f"{path.name} is damaged or tampered with: its tensors do not agree with each other")
    backbone_state = {k[len(_BACKBONE_PREFIX) :]: v for k, v in tensors.items() if k.startswith(_BACKBONE_PREFIX)}
    try:
        backbone = create_backbone(config.replace(pretrained=False, weights=None))
        backbone.load_state_dict(backbone_state, strict=True)
    except SoftPatchError:
        raise
    except Exception as exc:  # noqa: BLE001 - any mismatch means the stored backbone is unusable
        raise BundleError(f"{path.name}: the stored backbone weights do not fit {config.backbone!r}: {exc}") from None
    model = SoftPatch(config)
    model.device_ = resolve_device(config.device)
    model._extractor = FeatureExtractor(backbone, config).to(model.device_).to(memory_format=torch.channels_last)
    model.grid_shape_ = grid
    state = _TrainingState(features=None, names=names, sizes=sizes, suspicion=tensors["train.suspicion"].numpy())
    model._state = state  # _score_key reads the number of training images from the state
    state.scores[model._score_key(config)] = tensors["train.outlier_scores"]
    model._bank = MemoryBank(bank_features, weights, provenance.numpy())
    model._bank.prepare_search(model.device_, config.search)  # loaded = ready to score at full speed
    model._bank_key = model._bank_settings()
    model.threshold_ = None if threshold is None else float(threshold)
    return model
