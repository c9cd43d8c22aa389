"""Taking a fitted model to the line: bundles and ONNX/OpenVINO exports."""
