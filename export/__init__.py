"""ONNX / TensorRT export of the STARFlow reference model (not built yet)."""
