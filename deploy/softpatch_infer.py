#!/usr/bin/env python3
"""Score images on the line with a SoftPatch model exported by ``softpatch export``.

Needs only numpy, Pillow and onnxruntime (for ``.onnx``) or openvino (for ``.xml``, or ``.onnx`` with
``--runtime openvino``); no torch and no softpatch. Writes one CSV row per image (path, score,
anomalous) and optionally one heatmap PNG per image.

    python softpatch_infer.py model.onnx IMAGES_OR_FOLDERS... --csv scores.csv [--heatmaps DIR]

The model takes uint8 RGB pixels ``(N, crop, crop, 3)``: each image is decoded to RGB (EXIF rotation
applied, 16-bit grayscale scaled by its full range, transparency composited onto black), squash-resized
to ``resize x resize`` with Pillow's bilinear filter and centre-cropped, exactly as the softpatch
package does before scoring. ``resize``, ``crop`` and the threshold are read from the model's
metadata. Normalisation, features, the memory bank search, the map and the decision run in the model.

Library use: ``Scorer(path).score_images([PIL images])`` or ``.score_pixels(uint8 array)``.
Bad input (an unreadable model, an image that cannot be decoded, pixels of the wrong shape or type)
raises ``InputError`` with one sentence; the command prints it as one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

FORMAT_NAME = "softpatch-export"
FORMAT_VERSION = "1"
INPUT_NAME = "image"
OUTPUT_NAMES = ("image_score", "anomaly_map", "anomalous", "patch_scores")
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".ppm", ".pgm", ".pnm"}
# Refuse images over this many pixels before decoding them (decompression bombs).
MAX_PIXELS = 100_000_000

_ORIENTATION_TAG = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
# The heatmap colour ramp (blue-yellow-red), as the softpatch package draws it.
_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_COLOURS = np.array([[48, 18, 59], [40, 120, 220], [60, 200, 120], [250, 190, 40], [200, 20, 20]], dtype=np.float32)


class InputError(Exception):
    """A model, image or array that cannot be used; the message is one sentence for the user."""


# ----------------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Geometry:
    """What the model's metadata says about its input."""

    resize: int
    crop: int
    offset: int  # top and left margin of the centre crop in the resized image
    threshold: float


def crop_pixels(image: Image.Image, geometry: Geometry) -> np.ndarray:
    """``(crop, crop, 3)`` uint8: squash-resize (Pillow bilinear) and centre crop, as the package does."""
    g = geometry
    resized = image.convert("RGB").resize((g.resize, g.resize), Image.Resampling.BILINEAR)
    box = (g.offset, g.offset, g.offset + g.crop, g.offset + g.crop)
    return np.asarray(resized.crop(box), dtype=np.uint8)


def _onnx_metadata(session: object) -> dict[str, str]:
    meta = session.get_modelmeta().custom_metadata_map
    return {k.removeprefix("softpatch."): v for k, v in meta.items() if k.startswith("softpatch.")}


class Scorer:
    """An exported SoftPatch model, ready to score; ``runtime`` "auto", "onnxruntime" or "openvino"."""

    def __init__(self, model_path: str | Path, *, runtime: str = "auto", threads: int | None = None) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise InputError(f"model file not found: {path}")
        if path.suffix not in (".onnx", ".xml"):
            raise InputError(f"{path.name} is not an exported model: expected a .onnx or OpenVINO .xml file")
        if runtime == "auto":
            runtime = "openvino" if path.suffix == ".xml" else "onnxruntime"
        if path.suffix == ".xml" and runtime != "openvino":
            raise InputError("an OpenVINO .xml model needs --runtime openvino")
        self.path, self.runtime = path, runtime
        try:
            metadata = self._load(path, runtime, threads)
        except ImportError as exc:
            raise InputError(f"the {runtime} package is not installed ({exc}): pip install {runtime}") from None
        except Exception as exc:  # noqa: BLE001 - each runtime raises its own types for unreadable files
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise InputError(f"{path.name} cannot be loaded by {runtime}: {first}") from None
        if metadata.get("format") != FORMAT_NAME or metadata.get("format_version") != FORMAT_VERSION:
            raise InputError(
                f"{path.name} is not a SoftPatch export of format version {FORMAT_VERSION} (re-export it with "
                "softpatch export)"
            )
        try:
            self.geometry = Geometry(
                resize=int(metadata["resize"]),
                crop=int(metadata["crop"]),
                offset=int(metadata["crop_offset"]),
                threshold=float(json.loads(metadata["threshold"])),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise InputError(f"{path.name} has damaged SoftPatch metadata ({exc})") from None
        self.metadata = metadata

    def _load(self, path: Path, runtime: str, threads: int | None) -> dict[str, str]:
        if runtime == "onnxruntime":
            import onnxruntime as ort

            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            self._run = lambda pixels: dict(
                zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), {INPUT_NAME: pixels}), strict=True)
            )
            return _onnx_metadata(session)
        if runtime != "openvino":
            raise InputError(f"unknown runtime {runtime!r}: choose onnxruntime or openvino")
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(path))
        # fp32 on purpose: on CPUs with bf16 support OpenVINO would otherwise round the features.
        config: dict[str, object] = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        compiled = core.compile_model(model, "CPU", config)
        outputs = {name: compiled.output(name) for name in OUTPUT_NAMES}
        request = compiled.create_infer_request()

        def run(pixels: np.ndarray) -> dict[str, np.ndarray]:
            result = request.infer([pixels])
            return {name: np.array(result[port]) for name, port in outputs.items()}

        self._run = run
        info = model.get_rt_info()
        if "softpatch" in info:  # an .xml written by softpatch export
            section = info["softpatch"]
            return {str(k): str(section[k].astype(str)) for k in section}
        if "framework" in info:  # an .onnx read by OpenVINO: its metadata, keys with their prefix
            section = info["framework"]
            return {str(k).removeprefix("softpatch."): str(section[k].astype(str)) for k in section}
        return {}

    def crop_pixels(self, image: Image.Image) -> np.ndarray:
        """``(crop, crop, 3)`` uint8 model input for one decoded image (see ``crop_pixels``)."""
        return crop_pixels(image, self.geometry)

    def score_pixels(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """Run the model on uint8 ``(N, crop, crop, 3)`` RGB pixels; outputs by name (see ``OUTPUT_NAMES``)."""
        crop = self.geometry.crop
        if not isinstance(pixels, np.ndarray):
            raise InputError(f"pixels must be a numpy array, got {type(pixels).__name__}")
        if pixels.dtype != np.uint8:
            raise InputError(
                f"pixels must be uint8 (0-255), got {pixels.dtype}: convert images with Scorer.crop_pixels, or a "
                "0-1 float array with (x * 255).round().astype(np.uint8)"
            )
        if pixels.ndim != 4 or pixels.shape[1:] != (crop, crop, 3) or pixels.shape[0] < 1:
            raise InputError(
                f"pixels must have shape (N, {crop}, {crop}, 3), RGB resized to {self.geometry.resize} and "
                f"centre-cropped, got {pixels.shape}: use Scorer.crop_pixels or Scorer.score_images"
            )
        return self._run(np.ascontiguousarray(pixels))

    def score_images(self, images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
        """Score decoded images of any size (see ``load_image``); outputs by name."""
        if not images:
            raise InputError("no images to score")
        return self.score_pixels(np.stack([self.crop_pixels(image) for image in images]))

    def map_to_original(self, amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """``(crop, crop)`` map -> float32 ``(h, w)`` for ``size=(w, h)``: edge-padded to the resize, bilinear."""
        g = self.geometry
        after = g.resize - g.crop - g.offset
        canvas = np.pad(np.asarray(amap, dtype=np.float32), ((g.offset, after), (g.offset, after)), mode="edge")
        return np.asarray(Image.fromarray(canvas).resize(size, Image.Resampling.BILINEAR), dtype=np.float32)


# ----------------------------------------------------------------------------------------------- images


def _to_uint8_gray(image: Image.Image) -> np.ndarray:
    """8-bit (h, w) from 16-bit, 32-bit integer or float grayscale, scaled as the softpatch package scales it."""
    if image.mode in _SIXTEEN_BIT_MODES:
        try:
            arr = np.asarray(image)
        except (TypeError, ValueError):
            arr = np.asarray(image.convert("I"))
        return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
    arr = np.nan_to_num(np.asarray(image).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if image.mode == "I" and lo >= 0 and hi <= 65535:
        return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if image.mode == "F" and lo >= 0 and hi <= 1:
        return np.round(arr * 255).astype(np.uint8)
    if image.mode == "F" and lo >= 0 and hi <= 255:
        return np.round(arr).astype(np.uint8)
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        return Image.fromarray(_to_uint8_gray(image)).convert("RGB")
    has_alpha = (
        image.mode in _ALPHA_MODES
        or (image.mode in ("P", "L", "RGB") and "transparency" in image.info)
        or (image.mode == "P" and image.palette is not None and image.palette.mode == "RGBA")
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        alpha = rgba.getchannel("A")
        if alpha.getextrema() != (255, 255):  # transparent pixels' hidden colour must not reach the model
            base = Image.new("RGB", rgba.size, (0, 0, 0))
            base.paste(rgba.convert("RGB"), mask=alpha)
            return base
        return rgba.convert("RGB")
    return image.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Decode an image file to RGB as the softpatch package does; ``InputError`` with the reason otherwise."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width < 1 or height < 1:
                raise InputError(f"cannot read image {path}: it has an invalid size {width}x{height}")
            if width * height > MAX_PIXELS:
                raise InputError(
                    f"cannot read image {path}: {width}x{height} is over the limit of {MAX_PIXELS:,} pixels"
                )
            image.load()
            try:
                orientation = image.getexif().get(_ORIENTATION_TAG, 1)
            except Exception:  # noqa: BLE001 - broken EXIF must not cost the image
                orientation = 1
            method = _TRANSPOSE.get(orientation) if isinstance(orientation, int) else None
            oriented = image.transpose(method) if method is not None else image
            return _to_rgb(oriented)
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"cannot read image {path}: file not found") from None
    except (UnidentifiedImageError, Image.DecompressionBombError):
        raise InputError(f"cannot read image {path}: not an image Pillow can decode, or too large") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"cannot read image {path}: truncated or corrupt ({exc})") from None


def find_images(paths: Sequence[str]) -> list[Path]:
    """Image files among ``paths`` and inside folders among them (recursive, sorted)."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS))
        elif path.is_file():
            found.append(path)
        else:
            raise InputError(f"no such file or folder: {raw}")
    return found


def heatmap(image: Image.Image, amap: np.ndarray, low: float, high: float, opacity: float = 0.5) -> Image.Image:
    """Blend the colourised ``amap`` (at the image's size) over ``image``."""
    t = np.clip((amap - low) / max(high - low, 1e-12), 0.0, 1.0)
    rgb = np.stack([np.interp(t, _STOPS, _COLOURS[:, c]) for c in range(3)], axis=-1).astype(np.uint8)
    return Image.blend(image.convert("RGB"), Image.fromarray(rgb), opacity)


# ----------------------------------------------------------------------------------------------- command


def _batches(items: Sequence[Path], size: int) -> Iterator[Sequence[Path]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _safe_stem(path: Path, index: int) -> str:
    stem = re.sub(r"[^\w.-]+", "_", path.stem)[:80] or "image"
    return f"{index:04d}_{stem}"


def run(args: argparse.Namespace) -> int:
    scorer = Scorer(args.model, runtime=args.runtime, threads=args.threads)
    threshold = scorer.geometry.threshold
    files = find_images(args.paths)
    if not files:
        raise InputError("no image files found among the given paths")
    low, high = args.heat_range if args.heat_range else (0.5 * threshold, 1.25 * threshold)
    heat_dir = Path(args.heatmaps) if args.heatmaps else None
    if heat_dir:
        heat_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, object]] = []
    index = 0
    for batch in _batches(files, args.batch_size):
        images, paths = [], []
        for path in batch:
            try:
                images.append(load_image(path))
                paths.append(path)
            except InputError as exc:
                print(f"skipped: {exc}", file=sys.stderr)
        if not images:
            continue
        out = scorer.score_images(images)
        for i, (path, image) in enumerate(zip(paths, images, strict=True)):
            score, anomalous = float(out["image_score"][i]), bool(out["anomalous"][i])
            rows.append({"path": str(path), "score": score, "anomalous": anomalous})
            print(f"{score:10.4f}  {path}{'  ANOMALOUS' if anomalous else '  ok'}")
            if heat_dir:
                full = scorer.map_to_original(out["anomaly_map"][i], image.size)
                heatmap(image, full, low, high).save(heat_dir / f"{_safe_stem(path, index)}.png")
            index += 1
    if not rows:
        raise InputError("none of the given images can be read")
    if args.csv:
        with open(args.csv, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=["path", "score", "anomalous"])
            writer.writeheader()
            writer.writerows(rows)
    flagged = sum(bool(r["anomalous"]) for r in rows)
    print(f"{len(rows)} images scored, {flagged} anomalous at threshold {threshold:.6g}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Score images with an exported SoftPatch model (no torch needed).")
    parser.add_argument("model", help="the exported .onnx, or OpenVINO .xml (with its .bin beside it)")
    parser.add_argument("paths", nargs="+", help="image files or folders (searched recursively)")
    parser.add_argument("--csv", default=None, help="write path,score,anomalous to this file")
    parser.add_argument("--heatmaps", default=None, help="folder to write one heatmap overlay PNG per image into")
    parser.add_argument(
        "--heat-range",
        nargs=2,
        type=float,
        metavar=("LOW", "HIGH"),
        default=None,
        help="map values drawn blue..red (default: half to 1.25 times the threshold, the same for every image)",
    )
    parser.add_argument("--runtime", choices=["auto", "onnxruntime", "openvino"], default="auto")
    parser.add_argument("--batch-size", type=int, default=8, help="images per model call (default 8)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: the runtime's choice)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        print("softpatch_infer: error: --batch-size must be at least 1", file=sys.stderr)
        return 2
    try:
        return run(args)
    except InputError as exc:
        print(f"softpatch_infer: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"softpatch_infer: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
