"""Patch features: a timm backbone, 3x3 neighbourhood aggregation and channel pooling (PatchCore, sec. 3.1)."""

from __future__ import annotations

import contextlib
import logging
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn

from softpatch.config import SoftPatchConfig
from softpatch.errors import ResourceError, WeightsError
from softpatch.io.fileformats import NotSafetensorsError, container_kind, read_safetensors_header
from softpatch.io.limits import format_bytes

log = logging.getLogger(__name__)

# A weights file must cover at least this share of the backbone's tensors, else it is for another model.
_MIN_WEIGHTS_COVERAGE = 0.95
# Largest backbone (parameters and buffers, float32) built at all; also at most a third of the free memory.
_MAX_BACKBONE_BYTES = 4 * 1024**3


@dataclass(frozen=True)
class BackboneInfo:
    """What the sidebar and the bundle say about a backbone."""

    name: str
    layers: tuple[int, ...]
    channels: tuple[int, ...]  # per stage, read from timm
    strides: tuple[int, ...]  # per stage, read from timm
    weights_source: str  # "pretrained", "file" or "random"
    weights_path: str | None


def _canonical(name: str) -> str:
    # timm's feature wrappers flatten "blocks.0" into "blocks_0"; compare names without separators.
    return re.sub(r"[._]", "", name)


def read_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors or a torch file, never unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        # Recognised by content, whatever the file is called: safetensors when its header parses (its first
        # bytes are a length and may look like anything), else a torch file by its zip or pickle signature.
        try:
            read_safetensors_header(path)
            kind: str | None = "safetensors"
        except NotSafetensorsError as exc:
            kind, problem = container_kind(path), str(exc)
        if kind == "safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif kind is not None:
            # torch.save's zip format, or its legacy pickle format: torch's weights-only unpickler accepts
            # tensors and plain containers only, so no pickled object is ever constructed or run.
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        else:
            raise ValueError(f"as safetensors, {problem}; and it has no torch file signature")
    except Exception as exc:  # noqa: BLE001 - any decoding failure means the same thing to a user
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        detail = f" ({detail[:200]})" if len(detail) > 12 else ""
        raise WeightsError(
            f"cannot read weights file {path.name}: it is not a safetensors file or a plain torch state dict "
            f"(pickled objects are refused for safety){detail}"
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path.name} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], backbone: str, path: Path) -> None:
    by_name = {_canonical(k): v for k, v in state.items()}
    target = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    matched: dict[str, torch.Tensor] = {}
    for key, tensor in target.items():
        source = by_name.get(_canonical(key))
        if source is not None and source.shape == tensor.shape:
            matched[key] = source
    coverage = len(matched) / max(1, len(target))
    if coverage < _MIN_WEIGHTS_COVERAGE:
        raise WeightsError(
            f"weights file {path.name} does not fit backbone {backbone!r}: only {len(matched)} of {len(target)} "
            "tensors match by name and shape; check the backbone name and its extra settings (backbone_kwargs)"
        )
    model.load_state_dict(matched, strict=False)


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the weights hub answers at all; without this check an offline machine waits ~1 min in retries."""
    try:
        from huggingface_hub import constants

        host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    except Exception:  # noqa: BLE001 - no hub library: assume the default host
        host = "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Load pretrained weights from the local cache only (no download attempts)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def backbone_bytes(config: SoftPatchConfig) -> int:
    """Bytes of the backbone's parameters and buffers, counted on the meta device (nothing is allocated).

    Raises ``WeightsError`` for a name timm does not know or settings the network cannot be built with.
    """
    import timm

    if not timm.is_model(config.backbone):
        raise WeightsError(f"unknown backbone {config.backbone!r}: not a timm model name")
    with _timm_errors(config), torch.device("meta"):
        skeleton = timm.create_model(config.backbone, pretrained=False, **_timm_kwargs(config))
    tensors = [*skeleton.parameters(), *skeleton.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _timm_kwargs(config: SoftPatchConfig) -> dict:
    # backbone_kwargs holds only allow-listed keys (SoftPatchConfig checks them): nothing here reaches files.
    return dict(features_only=True, out_indices=config.layers, **config.backbone_kwargs)


@contextlib.contextmanager
def _timm_errors(config: SoftPatchConfig) -> Iterator[None]:
    """timm raises many types; each becomes one clear ``WeightsError`` sentence."""
    try:
        yield
    except WeightsError:
        raise
    except Exception as exc:  # noqa: BLE001 - see the docstring
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "Unknown model" in text or "Invalid model" in text:
            raise WeightsError(f"unknown backbone {config.backbone!r}: not a timm model name") from None
        if isinstance(exc, (TypeError, ValueError, IndexError, AssertionError, NotImplementedError)):
            raise WeightsError(
                f"backbone {config.backbone!r} cannot be built with layers={list(config.layers)} "
                f"and backbone_kwargs={config.backbone_kwargs}: {text[:200]}"
            ) from None
        if config.weights_source == "pretrained":
            raise WeightsError(
                f"pretrained weights for {config.backbone!r} could not be downloaded (no network?) and are not in "
                "the local cache: set weights to a local weights file, or turn pretrained off (random weights) to "
                "try the workflow only",
                settings=("weights", "pretrained"),
            ) from None
        raise WeightsError(f"cannot build backbone {config.backbone!r}: {text[:200]}") from None


def check_backbone_size(config: SoftPatchConfig) -> int:
    """The backbone's size in bytes; ``ResourceError`` before anything is allocated when it is too large."""
    from softpatch.runtime.resources import available_memory

    size = backbone_bytes(config)
    limit = min(_MAX_BACKBONE_BYTES, available_memory(torch.device("cpu")) // 3)
    if size > limit:
        raise ResourceError(
            f"backbone {config.backbone!r} with these settings has {format_bytes(size)} of weights; this machine "
            f"allows at most {format_bytes(limit)}: choose a smaller backbone"
        )
    return size


def create_backbone(config: SoftPatchConfig) -> nn.Module:
    """Build the timm ``features_only`` backbone with the weights the config asks for; never a silent fallback.

    The size is checked on the meta device first. The network is reached only for timm's own pretrained
    download of a plain model name, and only when ``config.weights_source == "pretrained"``.
    """
    import timm

    check_backbone_size(config)
    with _timm_errors(config):
        if config.weights_source == "pretrained":
            offline = contextlib.nullcontext() if _hub_reachable() else _hub_offline()
            with offline:
                model = timm.create_model(config.backbone, pretrained=True, **_timm_kwargs(config))
        else:
            # Seed the random init so that a random-weights fit is reproducible too.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                model = timm.create_model(config.backbone, pretrained=False, **_timm_kwargs(config))
    if config.weights_source == "file":
        path = Path(config.weights or "")
        _load_into(model, read_weights_file(path), config.backbone, path)
    return model


def backbone_info(model: nn.Module, config: SoftPatchConfig) -> BackboneInfo:
    """Channels and strides of each stage of a timm ``features_only`` ``model`` built from ``config``."""
    info = model.feature_info
    return BackboneInfo(
        name=config.backbone,
        layers=config.layers,
        channels=tuple(info.channels()),
        strides=tuple(info.reduction()),
        weights_source=config.weights_source,
        weights_path=config.weights,
    )


def fold_batch_norm(backbone: nn.Module) -> nn.Module:
    """A copy of an eval-mode ``backbone`` with each BatchNorm folded into the convolution before it.

    Same outputs to float rounding (about 1e-6 relative), fewer passes over the activations:
    wide_resnet50_2 runs about 15% faster on a CPU. Models that torch.fx cannot trace, or that have
    nothing to fold, come back unchanged (the same object).
    """
    from torch.fx.experimental.optimization import fuse

    if backbone.training or not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules()):
        return backbone
    try:
        fused = fuse(backbone)
    except Exception as exc:  # noqa: BLE001 - tracing fails in many ways; the unfused model is always correct
        log.debug("batch-norm folding skipped for %s: %s", type(backbone).__name__, exc)
        return backbone
    if sum(isinstance(m, nn.BatchNorm2d) for m in fused.modules()) == sum(
        isinstance(m, nn.BatchNorm2d) for m in backbone.modules()
    ):
        return backbone  # nothing was folded: keep the original rather than a traced copy
    return fused


def _channel_pooling(in_channels: int, out_channels: int) -> torch.Tensor:
    # Adaptive average pooling over channels is linear: express it as one (C_in, C_out) matrix product.
    eye = torch.eye(in_channels).unsqueeze(1)  # (C_in, 1, C_in)
    return F.adaptive_avg_pool1d(eye, out_channels).squeeze(1)  # (C_in, C_out)


def pool_channels(features: torch.Tensor, pooling: torch.Tensor) -> torch.Tensor:
    """``(..., C_in)`` -> ``(..., C_out)`` adaptive average pooling over the last axis.

    ``pooling`` is ``_channel_pooling(C_in, C_out)``. The common cases skip the matrix product:
    equal sizes are the identity (wide_resnet50_2's layer 2) and whole multiples are means of
    neighbouring channels (its layer 3), which together saves about 3 ms per image on a CPU.
    """
    c_in, c_out = pooling.shape
    if c_in == c_out:
        return features
    if c_in % c_out == 0:
        return features.unflatten(-1, (c_out, c_in // c_out)).mean(dim=-1)
    return features @ pooling


def patch_grid(crop: int, stride: int) -> tuple[int, int]:
    """The ``(H, W)`` patch grid of a ``crop`` x ``crop`` image on a first stage of ``stride`` (``backbone_info``)."""
    side = -(-crop // stride)
    return side, side


class FeatureExtractor(nn.Module):
    """Backbone stages -> locally aggregated, channel-pooled patch embeddings.

    Each stage's map is averaged over a ``patch_size`` neighbourhood, pooled over channels to an equal
    share of ``feature_dim``, upsampled to the first stage's grid and concatenated.
    Input ``(B, 3, crop, crop)``; output ``(B, H*W, feature_dim)`` float32 with ``(H, W)`` the first stage's grid.
    """

    def __init__(self, backbone: nn.Module, config: SoftPatchConfig) -> None:
        super().__init__()
        self.backbone = backbone.eval()  # the weights as loaded: what bundles store
        # What the forward pass runs: the same function with batch norms folded (faster on a CPU). Held as a
        # second submodule only when folding made a copy, so that it moves with .to() and nothing is listed twice.
        folded = fold_batch_norm(self.backbone)
        self.inference_backbone = folded if folded is not self.backbone else None
        self.patch_size = config.patch_size
        self.precision = config.precision
        channels = list(backbone.feature_info.channels())
        shares = [config.feature_dim // len(channels)] * len(channels)
        shares[-1] += config.feature_dim - sum(shares)
        for i, (c, s) in enumerate(zip(channels, shares, strict=False)):
            self.register_buffer(f"pool{i}", _channel_pooling(c, s), persistent=False)
        self.num_stages = len(channels)
        self.feature_dim = config.feature_dim
        self.stride = backbone.feature_info.reduction()[0]

    @property
    def runner(self) -> nn.Module:
        """The network that computes the feature maps: the batch-norm-folded copy where there is one."""
        return self.backbone if self.inference_backbone is None else self.inference_backbone

    def grid_shape(self, crop: int) -> tuple[int, int]:
        """``(rows, cols)`` of the patch grid for a ``crop x crop`` input (the first stage's stride)."""
        return patch_grid(crop, self.stride)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images ``(B, 3, crop, crop)`` -> patch features ``(B, H*W, feature_dim)`` float32."""
        device_type = images.device.type
        images = images.contiguous(memory_format=torch.channels_last)
        if self.precision == "bf16":
            with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
                maps = self.runner(images)
        else:
            maps = self.runner(images)
        return self.aggregate(maps)

    def aggregate(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """Backbone stage maps ``[(B, C_i, h_i, w_i)]`` -> patch features ``(B, H*W, feature_dim)`` float32.

        Plain tensor operations without inference mode, so that ``softpatch.deployment.export`` traces the very same code.
        """
        pad = self.patch_size // 2
        grid = maps[0].shape[-2:]
        parts = []
        for i, fmap in enumerate(maps):
            # Channel pooling and the window mean are both linear and act on different axes, so
            # they commute: pooling channels first makes the window mean cheaper. Working in
            # (B, h, w, C) order, the layout the backbone left in memory, saves transposed copies.
            pooled = pool_channels(fmap.float().permute(0, 2, 3, 1), getattr(self, f"pool{i}"))  # (B, h, w, d)
            pooled = pooled.permute(0, 3, 1, 2)  # (B, d, h, w) view, channels-last in memory
            if self.patch_size > 1:
                pooled = F.avg_pool2d(pooled, self.patch_size, stride=1, padding=pad, count_include_pad=False)
            if pooled.shape[-2:] != grid:
                pooled = F.interpolate(pooled, size=grid, mode="bilinear", align_corners=False)
            parts.append(pooled.permute(0, 2, 3, 1))
        features = torch.cat(parts, dim=-1)  # (B, H, W, D)
        return features.reshape(features.shape[0], -1, self.feature_dim)  # (B, H*W, D)
