"""sdxl-ptq-bench: an MLPerf-style LoadGen harness for post-training-quantized Stable Diffusion XL."""

__version__ = "0.1.0"
