"""The ground floor: SDXL as MLPerf runs it, with no benchmark harness and no quantization in it.

Model profiles and checkpoints, tokenizers, the denoising pipeline and the backend interface it
calls, MLPerf's benchmark constants, captions and latents, the uint8 image conversion, progress bars,
system facts, the shared error base and small I/O helpers. Everything above (``quant``,
``backends``, ``calibration``, ``accuracy``, ``harness``) imports from here; this package imports
nothing of theirs (``tests/test_layers.py`` holds that).
"""
