"""Export a fitted model with its threshold to ONNX or OpenVINO: one graph from pixels to decision.

The graph takes the resized, centre-cropped RGB pixels as uint8 ``(N, crop, crop, 3)`` and returns

- ``image_score`` float32 ``(N,)``: the maximum soft-weighted nearest-neighbour distance (eq. 8),
- ``anomaly_map`` float32 ``(N, crop, crop)``: patch scores upsampled and blurred, as ``SoftPatch.score``,
- ``anomalous`` bool ``(N,)``: ``image_score >= threshold``,
- ``patch_scores`` float32 ``(N, H, W)``: the per-patch scores behind both (``ScoreResult.patch_scores``).

Inside: the ImageNet normalisation, the backbone as the Python scorer runs it (batch norms folded where
torch.fx can fold them), the patch aggregation (``FeatureExtractor.aggregate``, the same code), the
memory bank with its soft weights, the nearest-neighbour step and the map's upsampling and blur
(``anomaly_maps``, the same code). Why the resize stays outside: Pillow's bilinear resize (which the
package uses) antialiases when it shrinks, ONNX's Resize does not, so an in-graph resize could not
reproduce the package's pixels. The reference script ``deploy/softpatch_infer.py`` resizes with Pillow
exactly like ``ImageTransform``; the geometry and the threshold are recorded in the model's metadata.

Nearest neighbour in the graph, as the package's exhaustive search: squared distances to every bank
row in the expanded form ``|q|^2 - 2 q.b + |b|^2`` (one matrix product), the argmin, then the winner's
distance measured directly as ``|q - b|`` (the expanded form loses precision near zero). Working
memory: ``(H*W) x bank rows`` float32 per image.

ONNX is written by torch's TorchScript exporter (``dynamo=False``) at opset ``ONNX_OPSET``; OpenVINO
IR is converted from that ONNX file and saved uncompressed (fp32). Every export is checked before it
is kept: the written file is run on probe images and must reproduce the package's scores.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import math
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from softpatch.deployment.formats import DEFAULT_EXPORT_FORMAT, EXPORT_FORMATS, EXPORT_SUFFIXES
from softpatch.errors import ExportError
from softpatch.io.images import IMAGENET_MEAN, IMAGENET_STD
from softpatch.io.limits import format_bytes
from softpatch.method.anomaly_map import anomaly_maps, map_operators
from softpatch.method.features import FeatureExtractor
from softpatch.method.memory_bank import MemoryBank
from softpatch.method.model import Embeddings, ImageInput, SoftPatch

__all__ = [
    "EXPORT_FORMATS",
    "INPUT_NAME",
    "MAP_ATOL",
    "ONNX_OPSET",
    "OUTPUT_NAMES",
    "SCORE_RTOL",
    "TIE_RTOL",
    "Agreement",
    "ExportReport",
    "compare_with_scorer",
    "export_model",
    "read_export_metadata",
    "run_exported",
]

EXPORT_FORMAT_NAME = "softpatch-export"
EXPORT_FORMAT_VERSION = 1
# Opset 17: supported by onnxruntime >= 1.11 and OpenVINO >= 2022.3, so older line PCs can run the file.
ONNX_OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAMES = ("image_score", "anomaly_map", "anomalous", "patch_scores")
METADATA_PREFIX = "softpatch."
# How close an export must stay to the Python scorer: image scores relative, maps absolute.
SCORE_RTOL = 1e-4
MAP_ATOL = 1e-3
# Relative gap between a patch's two nearest bank rows under which the pick is rounding noise (see Agreement).
TIE_RTOL = 1e-4
# The graph's own buffers by name: the memory bank, and small constants that are neither bank nor backbone.
_BANK_BUFFERS = ("bank_t", "bank_sq", "weights")
_OTHER_BUFFERS = ("map_rows", "map_cols", "scale", "bias", "threshold")
# ONNX keeps a model in one protobuf, which cannot exceed 2 GiB.
_ONNX_LIMIT_BYTES = 2**31 - 2**24
# Probe images for the check of a written file: a smooth gradient and seeded noise.
_PROBE_SEED = 0


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote and what it holds; sizes in bytes."""

    format: str  # "onnx" or "openvino"
    files: tuple[Path, ...]  # the model file first (.onnx, or .xml then .bin)
    file_bytes: int  # all files together
    backbone_bytes: int  # backbone weights the graph uses, with the aggregation's channel-pooling matrices
    bank_bytes: int  # memory bank rows, their soft weights and squared norms
    bank_rows: int
    feature_dim: int
    resize: int
    crop: int
    threshold: float
    distance_bytes_per_image: int  # working memory of the nearest-neighbour step: (H*W) x bank_rows float32
    probe_agreement: Agreement  # the written file against the Python scorer on two probe images

    @property
    def model_file(self) -> Path:
        """The file to load (the ``.onnx``, or OpenVINO's ``.xml``; its ``.bin`` is ``files[1]``)."""
        return self.files[0]

    def summary(self) -> str:
        """Two lines for the CLI and the app."""
        return (
            f"exported {self.model_file} ({self.format}, {format_bytes(self.file_bytes)}: backbone "
            f"{format_bytes(self.backbone_bytes)} + memory bank {format_bytes(self.bank_bytes)}, {self.bank_rows} x "
            f"{self.feature_dim}); threshold {self.threshold:.6g}\n"
            f"input: uint8 RGB (N, {self.crop}, {self.crop}, 3) after a bilinear squash-resize to {self.resize} x "
            f"{self.resize} and a centre crop; {format_bytes(self.distance_bytes_per_image)} of distances per image; "
            f"checked against the Python scorer: scores within {self.probe_agreement.score_difference:.1e} relative, "
            f"maps within {self.probe_agreement.map_difference:.1e}"
        )


class _ScoringGraph(nn.Module):
    """Pixels uint8 ``(N, crop, crop, 3)`` -> the four outputs of ``OUTPUT_NAMES`` (see the module docstring)."""

    def __init__(
        self,
        extractor: FeatureExtractor,
        bank: MemoryBank,
        *,
        normalisation: tuple[np.ndarray, np.ndarray],
        grid: tuple[int, int],
        crop: int,
        blur_sigma: float,
        threshold: float,
        rows_layout: bool = False,
    ) -> None:
        super().__init__()
        self.extractor = extractor
        self.grid = grid
        self.crop = crop
        self.blur_sigma = blur_sigma
        rows, cols = map_operators(grid, crop, blur_sigma)
        self.register_buffer("map_rows", rows.clone())
        self.register_buffer("map_cols", cols.clone())
        scale, bias = normalisation
        self.register_buffer("scale", torch.from_numpy(scale).view(1, 1, 1, 3))
        self.register_buffer("bias", torch.from_numpy(bias).view(1, 1, 1, 3))
        features = bank.features.detach().float().cpu()
        # One copy of the bank in the file, in the layout the runtime multiplies fastest without a second,
        # transposed copy: onnxruntime takes (D, M) as a plain MatMul; OpenVINO stores MatMul constants
        # as (M, D) and would keep both layouts of a (D, M) bank. The winner's row is gathered from it.
        self.rows_layout = rows_layout
        self.register_buffer("bank_t", features.contiguous() if rows_layout else features.T.contiguous())
        self.register_buffer("bank_sq", features.square().sum(1))
        self.register_buffer("weights", bank.weights.detach().float().cpu().contiguous())
        self.register_buffer("threshold", torch.tensor(_float32_at_least(threshold), dtype=torch.float32))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # The same float32 multiply-add as ImageTransform, so the backbone sees identical inputs.
        x = (image.float() * self.scale + self.bias).permute(0, 3, 1, 2)
        features = self.extractor.aggregate(self.extractor.runner(x))  # (N, P, D)
        n = features.shape[0]
        queries = features.reshape(-1, features.shape[-1])  # (N*P, D)
        # Rank by the expanded form (one matrix product), as the package's exhaustive search does, then
        # measure the winner's distance directly: the expanded form loses precision near zero.
        if self.rows_layout:
            products, rows_of = F.linear(queries, self.bank_t), lambda idx: self.bank_t.index_select(0, idx)
        else:
            products, rows_of = queries @ self.bank_t, lambda idx: self.bank_t.index_select(1, idx).T
        squared = (queries.square().sum(1, keepdim=True) + self.bank_sq) - 2.0 * products  # (N*P, M)
        winner = squared.argmin(dim=1)  # (N*P,)
        nearest = rows_of(winner)  # (N*P, D)
        distance = (queries - nearest).square().sum(1).sqrt()  # plain L2, never squared (eq. 8)
        patch_scores = (self.weights.index_select(0, winner) * distance).reshape(n, self.grid[0], self.grid[1])
        image_score = patch_scores.reshape(n, -1).amax(dim=1)
        amap = anomaly_maps(patch_scores, self.crop, self.blur_sigma, operators=(self.map_rows, self.map_cols))
        return image_score, amap, image_score >= self.threshold, patch_scores


def _float32_at_least(value: float) -> float:
    """The smallest float32 >= ``value``: for a float32 score s, ``s >= value`` exactly when ``s >=`` this."""
    f = np.float32(value)
    if float(f) < value:
        f = np.nextafter(f, np.float32(np.inf))
    return float(f)


def _tensor_bytes(tensors: Iterator[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _as_model(model_or_bundle: SoftPatch | str | Path) -> SoftPatch:
    from softpatch.deployment.bundle import load_bundle

    if isinstance(model_or_bundle, SoftPatch):
        return model_or_bundle
    if isinstance(model_or_bundle, (str, Path)):
        return load_bundle(model_or_bundle, device="cpu")
    raise ExportError(f"export needs a fitted SoftPatch model or a bundle path, got {type(model_or_bundle).__name__}")


def _scorer_for_export(model: SoftPatch) -> SoftPatch:
    """``model``, or a shallow copy of it scoring in fp32 on a CPU: what the graph computes.

    The graph is traced on the CPU (no device copies in it) and always computes in fp32; the check
    compares it with the CPU fp32 scorer, the one a line PC would otherwise run. The caller's model,
    and the app's cached extractor, stay where and as they are.
    """

    on_cpu = next(model.extractor_.parameters()).device.type == "cpu"
    if on_cpu and model.config.precision == "fp32":
        return model
    state = model.to_state()  # the bank and the scores are shared as they are; only the backbone is copied
    backbone = state.backbone if on_cpu else copy.deepcopy(state.backbone).to("cpu")
    fp32 = dataclasses.replace(state, config=state.config.replace(precision="fp32"), backbone=backbone)
    return SoftPatch.from_state(fp32, device="cpu")


def _probe_images(resize: int) -> np.ndarray:
    """``(2, resize, resize, 3)`` uint8: a smooth colour gradient and seeded noise (an export's self-check)."""
    ramp = np.linspace(0, 255, resize, dtype=np.float32)
    across, down = np.meshgrid(ramp, ramp)
    gradient = np.stack([across, down, 255 - across], axis=-1)
    noise = np.random.default_rng(_PROBE_SEED).integers(0, 256, size=(resize, resize, 3))
    return np.stack([gradient.round(), noise]).astype(np.uint8)


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Keep the exporter's own output away from the user.

    It warns about its deprecation and traced shapes (Python warnings), and on a failure dumps the whole
    TorchScript graph to the process's stdout from C++ (its logging switch is always on during an
    export), which only an fd-level redirect silences. The failure itself becomes one ExportError.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            sys.stdout.flush()
            saved = os.dup(1)
        except (OSError, ValueError, AttributeError):  # no real fd 1 (embedded interpreters): nothing to silence
            yield
            return
        try:
            with open(os.devnull, "wb") as null:
                os.dup2(null.fileno(), 1)
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)


def _onnx_bytes(graph: _ScoringGraph, crop: int) -> bytes:
    example = torch.zeros(2, crop, crop, 3, dtype=torch.uint8)
    buffer = io.BytesIO()
    try:
        with _quiet_export(), torch.no_grad():
            torch.onnx.export(
                graph,
                (example,),
                buffer,
                dynamo=False,
                opset_version=ONNX_OPSET,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_axes={INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in OUTPUT_NAMES}},
                do_constant_folding=True,
            )
    except Exception as exc:  # noqa: BLE001 - tracing and symbolic conversion fail in many ways; all mean the same
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(
            f"this model cannot be exported to ONNX: its backbone does not trace to opset {ONNX_OPSET} ({text[:200]})"
        ) from None
    return buffer.getvalue()


def _metadata(model: SoftPatch, threshold: float, grid: tuple[int, int]) -> dict[str, str]:
    from softpatch import __version__

    config = model.config
    transform = model.transform_
    values = {
        "format": EXPORT_FORMAT_NAME,
        "format_version": str(EXPORT_FORMAT_VERSION),
        "input": f"{INPUT_NAME}: uint8 (N, {config.crop}, {config.crop}, 3) RGB, resized and centre-cropped",
        "outputs": json.dumps(list(OUTPUT_NAMES)),
        "resize": str(config.resize),
        "crop": str(config.crop),
        "crop_offset": str(transform.offset),
        "resample": "bilinear (Pillow Image.resize, squash to resize x resize)",
        "mean": json.dumps(list(IMAGENET_MEAN)),
        "std": json.dumps(list(IMAGENET_STD)),
        "normalisation": "in the graph: (pixel / 255 - mean) / std",
        "threshold": json.dumps(float(threshold)),
        "decision": "anomalous = image_score >= threshold",
        "grid": json.dumps(list(grid)),
        "blur_sigma": json.dumps(config.blur_sigma),
        "backbone": config.backbone,
        "bank_rows": str(len(model.memory_bank_)),
        "feature_dim": str(config.feature_dim),
        "opset": str(ONNX_OPSET),
        "precision": "fp32",  # always, whatever the fitted model's precision setting
        "config": json.dumps(config.to_dict()),
        "softpatch_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return {METADATA_PREFIX + k: v for k, v in values.items()}


def _write_onnx(data: bytes, metadata: dict[str, str], path: Path) -> None:
    import onnx

    proto = onnx.load_from_string(data)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save_model(proto, str(path))


def _write_openvino(onnx_path: Path, metadata: dict[str, str], xml_path: Path) -> None:
    try:
        import openvino as ov
    except ImportError:
        raise ExportError("OpenVINO export needs the openvino package: pip install openvino") from None
    try:
        converted = ov.convert_model(str(onnx_path))
        for key, value in metadata.items():
            converted.set_rt_info(value, ["softpatch", key.removeprefix(METADATA_PREFIX)])
        # compress_to_fp16 defaults to True and would round the weights and the bank: the scores must match.
        ov.save_model(converted, str(xml_path), compress_to_fp16=False)
    except Exception as exc:  # noqa: BLE001 - OpenVINO raises its own error types
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"OpenVINO cannot convert this model: {text[:200]}") from None


def read_export_metadata(path: str | Path) -> dict[str, str]:
    """The ``softpatch.*`` metadata of an exported ``.onnx`` or OpenVINO ``.xml`` file, keys without the prefix."""
    path = Path(path)
    if path.suffix == EXPORT_SUFFIXES["openvino"]:
        import openvino as ov

        model = ov.Core().read_model(str(path))
        info = model.get_rt_info()
        section = info["softpatch"] if "softpatch" in info else {}
        return {str(k): str(section[k].astype(str)) for k in section}
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {
        p.key.removeprefix(METADATA_PREFIX): p.value for p in proto.metadata_props if p.key.startswith(METADATA_PREFIX)
    }


def run_exported(path: str | Path, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Run an exported file on uint8 ``(N, crop, crop, 3)`` pixels with onnxruntime or OpenVINO (CPU, fp32).

    Returns the outputs by name (``OUTPUT_NAMES``). For checks and tests; the line uses ``deploy/softpatch_infer.py``.
    """
    path = Path(path)
    if path.suffix == EXPORT_SUFFIXES["openvino"]:
        import openvino as ov

        # fp32 on purpose: OpenVINO's CPU plugin would otherwise run bf16 on CPUs that support it.
        compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        result = compiled([pixels])
        return {name: np.asarray(result[compiled.output(name)]) for name in OUTPUT_NAMES}
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), {INPUT_NAME: pixels}), strict=True))


@dataclass(frozen=True)
class Agreement:
    """How an export's outputs compare with ``SoftPatch.score`` on the same images.

    A patch whose two nearest bank rows are equally far to float rounding (relative gap under
    ``TIE_RTOL``) is a tie: eq. 8 multiplies the distance by the *winner's* soft weight, so a rounding
    difference in the backbone (another runtime's convolutions) may pick the other row and change that
    patch's score by the ratio of the two weights. No two float implementations can agree there. Such
    patches are counted; the maps are compared after giving them the export's value. Any other patch
    that differs is a real disagreement (``untied_patches``).
    """

    images: int
    score_difference: float  # largest relative image-score difference, as the two scorers computed them
    map_difference: float  # largest absolute map difference, tied patches taking the export's value
    raw_map_difference: float  # the same without that adjustment
    tied_patches: int
    untied_patches: int
    decisions_differ: int  # images called differently at the threshold

    @property
    def ok(self) -> bool:
        """Whether the export reproduces the scorer: no untied patch differs, scores and maps within tolerance."""
        return self.untied_patches == 0 and self.score_difference <= SCORE_RTOL and self.map_difference <= MAP_ATOL


def compare_with_scorer(
    model: SoftPatch, images: Sequence[ImageInput] | Embeddings, outputs: dict[str, np.ndarray], threshold: float
) -> Agreement:
    """Score ``images`` (or their ``Embeddings``) with ``model``; compare with an export's ``outputs`` on them."""
    embeddings = images if isinstance(images, Embeddings) else model.embed(images)
    expected = model.score(embeddings, with_maps=True)
    got_patches = np.asarray(outputs["patch_scores"], dtype=np.float32)
    want_patches = expected.patch_scores
    # A patch counts as different when it moves by more than either tolerance (rounding of a distance
    # near zero is absolute, not relative).
    differs = np.abs(got_patches - want_patches) > np.maximum(SCORE_RTOL * np.abs(want_patches), MAP_ATOL)
    tied = np.zeros_like(differs)
    if differs.any():
        bank = model.build_memory_bank().features.double()
        flat = embeddings.features.reshape(-1, bank.shape[1])[torch.from_numpy(np.flatnonzero(differs))]
        two = torch.cdist(flat.double(), bank).topk(min(2, bank.shape[0]), dim=1, largest=False).values
        gap = (two[:, -1] - two[:, 0]) / two[:, 0].clamp_min(1e-12)
        tied.reshape(-1)[np.flatnonzero(differs)] = (gap < TIE_RTOL).numpy()
    adjusted = np.where(tied, got_patches, want_patches)
    adjusted_maps = anomaly_maps(torch.from_numpy(adjusted), model.config.crop, model.config.blur_sigma).numpy()
    want_scores = expected.image_scores
    got_scores = np.asarray(outputs["image_score"])
    relative = np.abs(got_scores - want_scores) / np.maximum(np.abs(want_scores), 1e-12)
    return Agreement(
        images=len(want_scores),
        score_difference=float(relative.max()),
        map_difference=float(np.abs(outputs["anomaly_map"] - adjusted_maps).max()),
        raw_map_difference=float(np.abs(outputs["anomaly_map"] - expected.anomaly_maps).max()),
        tied_patches=int(tied.sum()),
        untied_patches=int((differs & ~tied).sum()),
        decisions_differ=int((np.asarray(outputs["anomalous"]) != (want_scores >= threshold)).sum()),
    )


def _check(model: SoftPatch, path: Path, threshold: float) -> Agreement:
    """Run the written file on probe images and compare with the package's scorer; ExportError if it differs."""
    images = [Image.fromarray(p) for p in _probe_images(model.config.resize)]
    pixels = np.stack([model.transform_.crop_pixels(img) for img in images])
    agreement = compare_with_scorer(model, images, run_exported(path, pixels), threshold)
    if not agreement.ok:
        raise ExportError(
            f"the exported model does not reproduce this package's scores (image scores differ by "
            f"{agreement.score_difference:.1e} relative, maps by {agreement.map_difference:.1e}, "
            f"{agreement.untied_patches} patches differ); it was not kept"
        )
    return agreement


def _backbone_bytes(data: bytes, bank_shape: tuple[int, int]) -> int:
    """Bytes of the backbone weights a serialised graph holds: its initializers less the bank and small constants.

    Read from the graph rather than the backbone module, because a timm ``features_only`` backbone keeps
    stages beyond the last feature layer that the graph never uses. An initializer of the bank's shape in
    either layout is the bank (the OpenVINO staging file may hold a transposed copy that OpenVINO drops).
    """
    import onnx

    proto = onnx.load_from_string(data)
    bank_dims = {tuple(bank_shape), tuple(reversed(bank_shape))}
    tensors = [(init.name, init) for init in proto.graph.initializer]
    # Constants the exporter inlined as nodes: the channel pooling matrices of the aggregation, shapes.
    tensors += [(node.name, a.t) for node in proto.graph.node if node.op_type == "Constant" for a in node.attribute]
    total = 0
    for name, tensor in tensors:
        if name in _BANK_BUFFERS or name in _OTHER_BUFFERS or tuple(tensor.dims) in bank_dims:
            continue
        total += int(np.prod(tensor.dims)) * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return total


def export_model(
    model_or_bundle: SoftPatch | str | Path,
    out: str | Path,
    *,
    format: str = DEFAULT_EXPORT_FORMAT,
    threshold: float | None = None,
) -> ExportReport:
    """Export a fitted ``SoftPatch`` (or a bundle path) with its threshold; returns what was written.

    ``out``: the model file; ``.onnx`` for ONNX, ``.xml`` (plus ``.bin`` beside it) for OpenVINO; the
    suffix is added when missing. ``threshold`` defaults to the model's (the bundle's) threshold; one
    is required, since the decision is one of the outputs. The written file is checked on probe images
    against ``SoftPatch.score`` and removed again (``ExportError``) if it does not reproduce it.
    """
    if format not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    try:
        import onnx  # noqa: F401 - both are needed below; a clear sentence now beats an ImportError later
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ExportError("exporting needs the onnx and onnxruntime packages: pip install onnx onnxruntime") from None
    model = _as_model(model_or_bundle)
    bank = model.build_memory_bank()
    threshold = model.threshold_ if threshold is None else threshold
    if threshold is None or not math.isfinite(float(threshold)):
        raise ExportError(
            "this model has no threshold: choose one first (save it with the bundle) or give one to the export",
            settings=("threshold",),
        )
    threshold = float(threshold)
    model = _scorer_for_export(model)
    config = model.config
    extractor = model.extractor_
    graph = _ScoringGraph(
        extractor,
        bank,
        normalisation=model.transform_.normalisation,
        grid=model.grid_shape_,
        crop=config.crop,
        blur_sigma=config.blur_sigma,
        threshold=threshold,
        rows_layout=format == "openvino",
    ).eval()
    weights_bytes = _tensor_bytes(extractor.runner.state_dict().values())
    bank_bytes = _tensor_bytes(iter([graph.bank_t, graph.bank_sq, graph.weights]))
    if weights_bytes + bank_bytes > _ONNX_LIMIT_BYTES:
        raise ExportError(
            f"backbone ({format_bytes(weights_bytes)}) and memory bank ({format_bytes(bank_bytes)}) exceed ONNX's "
            "2 GB file limit: lower the coreset ratio or the feature dimension"
        )
    suffix = EXPORT_SUFFIXES[format]
    out = Path(out)
    path = out if out.suffix == suffix else out.with_name(out.name + suffix)
    metadata = _metadata(model, threshold, model.grid_shape_)
    data = _onnx_bytes(graph, config.crop)
    backbone_bytes = _backbone_bytes(data, tuple(bank.features.shape))
    files = (path,) if format == "onnx" else (path, path.with_suffix(".bin"))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if format == "onnx":
            _write_onnx(data, metadata, path)
        else:
            staging = path.with_name(path.name + ".onnx.partial")
            try:
                _write_onnx(data, metadata, staging)
                _write_openvino(staging, metadata, path)
            finally:
                staging.unlink(missing_ok=True)
        agreement = _check(model, path, threshold)
    except BaseException:
        for leftover in files:
            leftover.unlink(missing_ok=True)  # never leave a file that was not checked
        raise
    p = model.grid_shape_[0] * model.grid_shape_[1]
    return ExportReport(
        format=format,
        files=files,
        file_bytes=sum(f.stat().st_size for f in files),
        backbone_bytes=backbone_bytes,
        bank_bytes=bank_bytes,
        bank_rows=len(bank),
        feature_dim=int(bank.features.shape[1]),
        resize=config.resize,
        crop=config.crop,
        threshold=threshold,
        distance_bytes_per_image=p * len(bank) * 4,
        probe_agreement=agreement,
    )
