"""TensorRT engines from the QDQ ONNX graphs: build settings as NVIDIA's MLPerf SDXL harness, and the cache.

NVIDIA's harness (``docs/tensorrt.md``) builds the FP8 UNet as a *strongly typed* network (the Q/DQ
types decide every precision; no fp16/int8/fp8 builder flags), one optimisation profile with batch
min 2 (one CFG pair) and opt = max = the UNet batch, builder optimisation level at most 4 (5 builds
too long), and a timing cache. The same settings here, for the text encoders' and the VAE's engines
too (strongly typed: their graphs carry their precision), whose batch runs from 1 (the pipeline
encodes MLPerf's negative prompt alone, once) to the SUT's. Engines are cached under
``<cache-dir>/trt/<component>-<key>.engine``, the key covering the ONNX file's bytes, the TensorRT
version, the GPU's compute capability, the profile and the optimisation level, so any change rebuilds.

``trt`` is always passed in (the ``tensorrt`` module, or a fake in tests): nothing here imports
TensorRT, so the argument plumbing and the keys are tested on machines without it.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .registry import BackendOptionsError

#: what a user installs: the PyPI packages are stubs that download the libraries from NVIDIA's index
INSTALL_HINT = "pip install -e '.[trt]' --extra-index-url https://pypi.nvidia.com"
#: the highest optimisation level NVIDIA's harness uses (level 5 "takes too long")
MAX_OPTIMIZATION_LEVEL = 4


def require_tensorrt():
    """The ``tensorrt`` module, or one line saying how to install it (before any model loads)."""
    try:
        import tensorrt
    except ImportError as exc:  # also a broken install (missing libnvinfer: ImportError too)
        raise BackendOptionsError(f"--backend trt needs NVIDIA TensorRT >= 10.2 (FP8) and a CUDA GPU; it is not "
                                  f"importable here ({exc}): {INSTALL_HINT}") from None
    return tensorrt


@dataclass(frozen=True)
class Profile:
    """One optimisation profile: every input's shape without its batch axis, and the batch range: min
    ``min_batch`` (one CFG pair) to ``max_batch`` (CFG doubles the SUT's batch), opt = max as NVIDIA's."""

    inputs: tuple[tuple[str, tuple[int, ...]], ...]
    max_batch: int
    min_batch: int = 2

    @property
    def opt_batch(self) -> int:
        return self.max_batch

    def shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        return {name: (batch, *shape) for name, shape in self.inputs}


def component_profile(component: str, module, sut_batch: int) -> Profile:
    """The profile of ``component``'s exported graph (:func:`~backends.onnx_export.component_graph`) for SUT
    batches of up to ``sut_batch`` images: the UNet runs CFG pairs (batch 2 to 2 x ``sut_batch``), the
    text encoders and the VAE one row per prompt or image (1, MLPerf's negative prompt, to ``sut_batch``)."""
    from .onnx_export import component_graph

    _, signature, _ = component_graph(component, module, batch=1)
    inputs = tuple((name, tuple(int(d) for d in t.shape[1:]))
                   for name, t in zip(signature.input_names, signature.example_inputs))
    if component == "unet":
        return Profile(inputs, max_batch=max(2, 2 * sut_batch))
    return Profile(inputs, max_batch=max(1, sut_batch), min_batch=1)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    data = Path(str(path) + ".data")  # external weights beside a > 2 GB model
    if data.is_file():
        digest.update(file_sha256(data).encode())
    return digest.hexdigest()


def engine_key(onnx_sha256: str, trt_version: str, compute_capability: tuple[int, int], profile: Profile,
               optimization_level: int) -> str:
    """The cache key of an engine: any input that changes what TensorRT builds changes it."""
    parts = {"onnx": onnx_sha256, "tensorrt": trt_version, "sm": list(compute_capability), "profile": asdict(profile),
             "optimization_level": optimization_level, "strongly_typed": True}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def build_engine(trt, onnx_path: Path, profile: Profile, optimization_level: int,
                 timing_cache: Path | None = None) -> bytes:
    """A serialized strongly typed engine of ``onnx_path`` with one optimisation profile (NVIDIA's settings)."""
    if not 0 <= optimization_level <= MAX_OPTIMIZATION_LEVEL:
        raise BackendOptionsError(f"--trt-optimization-level must be 0..{MAX_OPTIMIZATION_LEVEL}, got "
                                  f"{optimization_level}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.builder_optimization_level = optimization_level  # no precision flags: the network is strongly typed
    shapes = profile.shapes(profile.min_batch), profile.shapes(profile.opt_batch), profile.shapes(profile.max_batch)
    optimization_profile = builder.create_optimization_profile()
    for name in shapes[0]:
        optimization_profile.set_shape(name, shapes[0][name], shapes[1][name], shapes[2][name])
    config.add_optimization_profile(optimization_profile)
    cache = None
    if timing_cache is not None:
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT could not build an engine from {onnx_path} (see its log above)")
    if cache is not None:
        timing_cache.write_bytes(bytes(cache.serialize()))
    return bytes(serialized)


def cached_engine(trt, onnx_path: Path, cache_dir: Path, profile: Profile, optimization_level: int,
                  compute_capability: tuple[int, int], component: str = "unet") -> tuple[Path, dict[str, Any]]:
    """The engine file for these inputs, built once (atomically) as ``<cache_dir>/trt/<component>-<key>.engine``;
    and its key's parts."""
    from sdxl.io import atomic_path

    onnx_sha = file_sha256(onnx_path)
    key = engine_key(onnx_sha, trt.__version__, compute_capability, profile, optimization_level)
    directory = Path(cache_dir) / "trt"
    path = directory / f"{component}-{key}.engine"
    info = {"key": key, "onnx": str(onnx_path), "onnx_sha256": onnx_sha, "tensorrt": trt.__version__,
            "compute_capability": list(compute_capability), "profile": asdict(profile),
            "optimization_level": optimization_level, "built": False}
    if not path.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        engine = build_engine(trt, onnx_path, profile, optimization_level, directory / "timing.cache")
        with atomic_path(path) as tmp:
            Path(tmp).write_bytes(engine)
        info.update(built=True, build_s=round(time.perf_counter() - start, 1))
    info["engine_bytes"] = path.stat().st_size
    return path, info
