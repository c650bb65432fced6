"""``trt`` (alias ``tensorrt``): the UNet as a strongly typed TensorRT engine built from our encodings' QDQ ONNX.

What NVIDIA's MLPerf SDXL submissions run (``docs/tensorrt.md``): the QDQ graph is the ONNX Runtime
backend's (:mod:`backends.qdq_model`: the fake-quant numbers, not a second calibration), FP8 or INT8
(``w8a8-sym``: TensorRT needs zero points of 0), checked against TensorRT's explicit-quantization rules
(:mod:`backends.trt_graph`) before anything is built; the engine is built and cached by
:mod:`backends.trt_engine` with NVIDIA's settings. The text encoders, the VAE, the scheduler step and
CFG stay in torch on the GPU (the pipeline, written once); the engine reads and writes torch CUDA
tensors on the current stream. With ``--dtype fp16`` (NVIDIA's) the graph is FP16 where the encodings
leave it unquantized, scales included (:mod:`backends.onnx_fp16`); with ``--dtype fp32``, FP32.

Needs TensorRT (the ``[trt]`` extra, from NVIDIA's index) and a CUDA GPU: neither is on the machines
this project is developed on, so the engine build and run are tested only on a lent GPU (``gpu`` tests).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sdxl.backend import BackendOptions

from .registry import BackendFlags, BackendOptionsError, register_backend
from .torch_backend import TorchBackend
from .trt_engine import MAX_OPTIMIZATION_LEVEL, require_tensorrt

DEFAULT_OPTIMIZATION_LEVEL = 3  # TensorRT's own default; NVIDIA's harness goes up to 4


class TrtGraphError(BackendOptionsError):
    """The encodings' QDQ graph breaks a TensorRT rule (per-axis activations, a non-zero zero point, ...)."""


class TrtBackend(TorchBackend):
    name = "trt"
    runs_elsewhere = ("unet",)

    def __init__(self, spec, options: BackendOptions):
        check_options(options.dtype, options.device, options.extra)
        trt = require_tensorrt()
        from sdxl.models import load_components

        # the exporter reads the FP32 UNet on the CPU (the graph is the same wherever it is exported);
        # the text encoders and VAE are cast to --dtype and placed on the GPU as the torch backend's
        super().__init__(spec, options, load_components(spec, torch.float32, options.show_progress))
        import onnx

        from .qdq import require_static
        from .qdq_model import build_unet_model, qdq_model_dir
        from .trt_engine import cached_engine, unet_profile
        from .trt_graph import check_trt_qdq

        encodings = self.quantization.encodings if self.quantization else None
        entries = encodings.components.get("unet", {}) if encodings else {}
        require_static(entries)
        cache_dir = Path(options.extra.get("cache_dir", "build/cache"))
        precision = graph_precision(options.dtype)
        model_dir = qdq_model_dir(cache_dir, spec, encodings, f"tensorrt {trt.__version__}", precision)
        onnx_path = build_unet_model(self.unet, entries, model_dir, encodings, options.show_progress, precision)
        tensor_map = json.loads((model_dir / "unet.tensor_map.json").read_text())["tensor_map"]
        graph = onnx.load(str(onnx_path), load_external_data=False)
        report = check_trt_qdq(graph, tensor_map, mha=any(".bmm_" in key for key in entries), base_dir=model_dir)
        if report.violations:
            raise TrtGraphError(f"{options.encodings}: its QDQ graph breaks {len(report.violations)} TensorRT rule(s), "
                                f"first: {report.violations[0]} (FP8 recipes and w8a8-sym build; docs/tensorrt.md)")
        self.graph_report = report
        self.io_dtypes = graph_io_dtypes(graph)
        level = int(options.extra.get("trt_optimization_level", DEFAULT_OPTIMIZATION_LEVEL))
        profile = unet_profile(self.unet, int(options.extra.get("trt_max_batch", 1)))
        self.engine_path, self.engine_info = cached_engine(trt, onnx_path, cache_dir, profile, level,
                                                           torch.cuda.get_device_capability(self.device))
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        self.context = self.engine.create_execution_context()
        self.unet = None  # the engine holds the weights now
        self.components.unet = None

    def predict_noise(self, latent_input, timestep, prompt_embeds, text_embeds, time_ids):
        n = latent_input.shape[0]
        inputs = {"sample": latent_input, "timestep": torch.as_tensor(timestep, device=self.device).reshape(-1).expand(n),
                  "encoder_hidden_states": prompt_embeds, "text_embeds": text_embeds, "time_ids": time_ids}
        keep = {}  # contiguous copies in the graph's input types live until the engine has run
        for name, tensor in inputs.items():
            keep[name] = tensor.to(self.device, self.io_dtypes[name]).contiguous()
            self.context.set_input_shape(name, tuple(keep[name].shape))
            self.context.set_tensor_address(name, keep[name].data_ptr())
        out = torch.empty(tuple(latent_input.shape), device=self.device, dtype=self.io_dtypes["noise_pred"])
        self.context.set_tensor_address("noise_pred", out.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError("TensorRT's execute_async_v3 failed (see its log)")
        return out.to(latent_input.dtype)

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update(engine=str(self.engine_path), engine_info=self.engine_info, trt_graph=self.graph_report.to_json())
        return out


def check_options(dtype: str, device: str, extra: dict[str, Any]) -> None:
    """What ``--backend trt`` runs: a CUDA device; checked in the parent before any model loads."""
    if not device.startswith("cuda"):
        raise BackendOptionsError(f"--backend trt runs TensorRT engines on a CUDA GPU; got --device {device}")
    graph_precision(dtype)
    level = extra.get("trt_optimization_level")
    if level is not None and not 0 <= level <= MAX_OPTIMIZATION_LEVEL:
        raise BackendOptionsError(f"--trt-optimization-level must be 0..{MAX_OPTIMIZATION_LEVEL} (NVIDIA's harness "
                                  f"stays at or below {MAX_OPTIMIZATION_LEVEL}: level 5 builds too long), got {level}")


def graph_precision(dtype: str) -> str:
    """The UNet graph's float type for ``--dtype``: fp16 (NVIDIA's FP8-FP16) or fp32."""
    if dtype not in ("fp16", "fp32"):
        raise BackendOptionsError(f"--backend trt builds fp16 (NVIDIA's) or fp32 UNet graphs; got --dtype {dtype}")
    return dtype


def graph_io_dtypes(model) -> dict[str, torch.dtype]:
    """The torch dtype of each input and output of the UNet graph (FP16 ones but the timestep, in an FP16 graph)."""
    from onnx import TensorProto

    types = {TensorProto.FLOAT: torch.float32, TensorProto.FLOAT16: torch.float16}
    return {v.name: types[v.type.tensor_type.elem_type] for v in list(model.graph.input) + list(model.graph.output)}


def add_flags(group) -> None:
    group.add_argument("--trt-optimization-level", type=int,
                       help=f"TensorRT builder optimisation level (default {DEFAULT_OPTIMIZATION_LEVEL}, at most "
                            f"{MAX_OPTIMIZATION_LEVEL})")


def parse_flags(args) -> dict[str, Any]:
    require_tensorrt()  # first: one line naming the extra, before any model loads
    extra: dict[str, Any] = {"trt_max_batch": getattr(args, "max_batchsize", None) or 1}
    if args.trt_optimization_level is not None:
        extra["trt_optimization_level"] = args.trt_optimization_level
    check_options(args.dtype, args.device, extra)
    return extra


register_backend("trt", TrtBackend, aliases=("tensorrt",), flags=BackendFlags(add_flags, parse_flags))
