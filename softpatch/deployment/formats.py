"""The export formats, declared once; no heavy imports (the CLI parser offers them before torch loads)."""

from __future__ import annotations

# Export format -> the file suffix of the model file it writes (OpenVINO adds a .bin beside the .xml).
EXPORT_SUFFIXES: dict[str, str] = {"onnx": ".onnx", "openvino": ".xml"}
EXPORT_FORMATS: tuple[str, ...] = tuple(EXPORT_SUFFIXES)
DEFAULT_EXPORT_FORMAT = "onnx"
