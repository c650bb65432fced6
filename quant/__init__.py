"""Quantization numerics every backend needs, below the backends and below calibration.

Number formats, ONNX-exact quantizers, the encodings format (the one file every method writes and
every backend reads), applying encodings to PyTorch modules (fake quantization, weight deltas,
pre-scales), the attention matmul modules, the timestep context and the AIMET export. Calibration
proper -- observers, capture, methods, recipes, sensitivity -- sits above the backends, since it
drives a backend to capture data.
"""
