"""``trt`` (alias ``tensorrt``): SDXL's UNet, text encoders and VAE decoder as strongly typed TensorRT engines.

What NVIDIA's MLPerf SDXL submissions run (``docs/tensorrt.md``). Each engine is built from the
component's QDQ ONNX graph from our encodings (:mod:`backends.qdq_model`, the ONNX Runtime backend's:
the fake-quant numbers, not a second calibration), FP8 or INT8 (``w8a8-sym``: TensorRT needs zero points
of 0), or unquantized where the encodings leave a component so, checked against TensorRT's
explicit-quantization rules (:mod:`backends.trt_graph`) before anything is built, then built and cached
by :mod:`backends.trt_engine` with NVIDIA's settings. ``--trt-engines`` picks the components (default
all, NVIDIA's); the others, the scheduler step and CFG stay in torch on the GPU (the pipeline, written
once); engines read and write torch CUDA tensors on the current stream. With ``--dtype fp16``
(NVIDIA's) the graphs are FP16 where the encodings leave them unquantized, scales included
(:mod:`backends.onnx_fp16`), but SDXL's VAE, FP32 as the torch backend runs it (its FP16 decode
overflows); with ``--dtype fp32``, FP32.

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
#: what ``--trt-engines`` names -> the pipeline components each engine runs
ENGINE_COMPONENTS = {"unet": ("unet",), "clip": ("text_encoder", "text_encoder_2"), "vae": ("vae",)}
#: NVIDIA's harness: every component an engine
DEFAULT_ENGINES = ("unet", "clip", "vae")


class TrtGraphError(BackendOptionsError):
    """The encodings' QDQ graph breaks a TensorRT rule (per-axis activations, a non-zero zero point, ...)."""


class TrtBackend(TorchBackend):
    name = "trt"
    runs_elsewhere = tuple(c for engine in DEFAULT_ENGINES for c in ENGINE_COMPONENTS[engine])

    def __init__(self, spec, options: BackendOptions):
        check_options(options.dtype, options.device, options.extra)
        trt = require_tensorrt()
        from sdxl.models import load_components

        engines = options.extra.get("trt_engines", DEFAULT_ENGINES)
        self.runs_elsewhere = tuple(c for engine in engines for c in ENGINE_COMPONENTS[engine])
        # the exporter reads each engine's FP32 module on the CPU (the graph is the same wherever it is
        # exported); components left to torch are cast to --dtype and placed on the GPU as the torch backend's
        super().__init__(spec, options, load_components(spec, torch.float32, options.show_progress))
        self._vae_scaling_factor = float(self.components.vae.config.scaling_factor)
        level = int(options.extra.get("trt_optimization_level", DEFAULT_OPTIMIZATION_LEVEL))
        sut_batch = int(options.extra.get("trt_max_batch", 1))
        self.engines: dict[str, TrtEngine] = {}
        self.engine_info: dict[str, dict[str, Any]] = {}
        self.graph_reports: dict[str, Any] = {}
        for component in self.runs_elsewhere:
            self.engines[component] = self._engine(trt, component, level, sut_batch)
            setattr(self, component, None)  # the engine holds the weights now
            setattr(self.components, component, None)

    def _engine(self, trt, component: str, level: int, sut_batch: int) -> "TrtEngine":
        """``component``'s engine: its QDQ graph from the encodings, checked against TensorRT's rules, built once."""
        import onnx

        from .qdq import require_static
        from .qdq_model import build_model, qdq_model_dir
        from .trt_engine import cached_engine, component_profile
        from .trt_graph import check_trt_qdq

        module = getattr(self.components, component)
        encodings = self.quantization.encodings if self.quantization else None
        entries = encodings.components.get(component, {}) if encodings else {}
        require_static(entries)
        cache_dir = Path(self.options.extra.get("cache_dir", "build/cache"))
        precision = "fp16" if self.component_dtype(component) == torch.float16 else "fp32"
        model_dir = qdq_model_dir(cache_dir, self.spec, encodings, f"tensorrt {trt.__version__}", precision, component)
        onnx_path = build_model(component, module, entries, model_dir, encodings, self.options.show_progress, precision)
        tensor_map = json.loads((model_dir / f"{component}.tensor_map.json").read_text())["tensor_map"]
        graph = onnx.load(str(onnx_path), load_external_data=False)
        report = check_trt_qdq(graph, tensor_map, mha=any(".bmm_" in key for key in entries), base_dir=model_dir)
        if report.violations:
            raise TrtGraphError(f"{self.options.encodings}: its {component} QDQ graph breaks {len(report.violations)} "
                                f"TensorRT rule(s), first: {report.violations[0]} (FP8 recipes and w8a8-sym build; "
                                "docs/tensorrt.md)")
        self.graph_reports[component] = report
        path, self.engine_info[component] = cached_engine(
            trt, onnx_path, cache_dir, component_profile(component, module, sut_batch), level,
            torch.cuda.get_device_capability(self.device), component)
        return TrtEngine(trt, path, graph, self.device)

    @property
    def vae_scaling_factor(self) -> float:
        return self._vae_scaling_factor

    def encode_prompts(self, ids_1, ids_2):
        if "text_encoder" not in self.engines:
            return super().encode_prompts(ids_1, ids_2)
        (hidden_1,) = self.engines["text_encoder"](input_ids=ids_1)
        hidden_2, pooled = self.engines["text_encoder_2"](input_ids=ids_2)
        return torch.cat([hidden_1, hidden_2], dim=-1).to(self.dtype), pooled.to(self.dtype)

    def predict_noise(self, latent_input, timestep, prompt_embeds, text_embeds, time_ids):
        if "unet" not in self.engines:
            return super().predict_noise(latent_input, timestep, prompt_embeds, text_embeds, time_ids)
        n = latent_input.shape[0]
        (noise,) = self.engines["unet"](
            sample=latent_input, timestep=torch.as_tensor(timestep, device=self.device).reshape(-1).expand(n),
            encoder_hidden_states=prompt_embeds, text_embeds=text_embeds, time_ids=time_ids)
        return noise.to(latent_input.dtype)

    def decode(self, latents):
        if "vae" not in self.engines:
            return super().decode(latents)
        return self.engines["vae"](latent=latents)[0]

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update(engines={c: {"engine": str(e.path), "engine_info": self.engine_info[c],
                                "trt_graph": self.graph_reports[c].to_json()} for c, e in self.engines.items()})
        return out


class TrtEngine:
    """One deserialized engine: torch CUDA tensors in (cast to the graph's input types) and out, run with
    ``execute_async_v3`` on torch's current stream."""

    def __init__(self, trt, path: Path, graph, device: torch.device):
        self.path = path
        self.device = device
        self.io_dtypes = graph_io_dtypes(graph)
        self.output_names = [v.name for v in graph.output]
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        self.context = self.engine.create_execution_context()

    def __call__(self, **inputs: torch.Tensor) -> list[torch.Tensor]:
        keep = {}  # contiguous copies in the graph's input types live until the engine has run
        for name, tensor in inputs.items():
            keep[name] = tensor.to(self.device, self.io_dtypes[name]).contiguous()
            self.context.set_input_shape(name, tuple(keep[name].shape))
            self.context.set_tensor_address(name, keep[name].data_ptr())
        outputs = []
        for name in self.output_names:  # shapes resolved from the inputs' (the batch axis)
            out = torch.empty(tuple(self.context.get_tensor_shape(name)), device=self.device, dtype=self.io_dtypes[name])
            self.context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError(f"TensorRT's execute_async_v3 failed on {self.path.name} (see its log)")
        return outputs


def check_options(dtype: str, device: str, extra: dict[str, Any]) -> None:
    """What ``--backend trt`` runs: a CUDA device, fp16 or fp32 graphs, known engines; checked in the parent
    before any model loads."""
    if not device.startswith("cuda"):
        raise BackendOptionsError(f"--backend trt runs TensorRT engines on a CUDA GPU; got --device {device}")
    if dtype not in ("fp16", "fp32"):
        raise BackendOptionsError(f"--backend trt builds fp16 (NVIDIA's) or fp32 graphs; got --dtype {dtype}")
    level = extra.get("trt_optimization_level")
    if level is not None and not 0 <= level <= MAX_OPTIMIZATION_LEVEL:
        raise BackendOptionsError(f"--trt-optimization-level must be 0..{MAX_OPTIMIZATION_LEVEL} (NVIDIA's harness "
                                  f"stays at or below {MAX_OPTIMIZATION_LEVEL}: level 5 builds too long), got {level}")
    engines = extra.get("trt_engines", DEFAULT_ENGINES)
    unknown = [e for e in engines if e not in ENGINE_COMPONENTS]
    if unknown or not engines:
        raise BackendOptionsError(f"--trt-engines takes a comma list of {', '.join(ENGINE_COMPONENTS)}; got "
                                  f"{','.join(engines) or 'nothing'}")


def graph_io_dtypes(model) -> dict[str, torch.dtype]:
    """The torch dtype of each input and output of a graph (in an FP16 UNet graph, FP16 but the timestep)."""
    from onnx import TensorProto

    types = {TensorProto.FLOAT: torch.float32, TensorProto.FLOAT16: torch.float16, TensorProto.INT64: torch.int64}
    return {v.name: types[v.type.tensor_type.elem_type] for v in list(model.graph.input) + list(model.graph.output)}


def add_flags(group) -> None:
    group.add_argument("--trt-optimization-level", type=int,
                       help=f"TensorRT builder optimisation level (default {DEFAULT_OPTIMIZATION_LEVEL}, at most "
                            f"{MAX_OPTIMIZATION_LEVEL})")
    group.add_argument("--trt-engines",
                       help="the components run as TensorRT engines, the rest in torch on the GPU (default "
                            f"{','.join(DEFAULT_ENGINES)}: NVIDIA's; clip = both text encoders)")


def parse_flags(args) -> dict[str, Any]:
    require_tensorrt()  # first: one line naming the extra, before any model loads
    extra: dict[str, Any] = {"trt_max_batch": getattr(args, "max_batchsize", None) or 1,
                             "trt_engines": DEFAULT_ENGINES}
    if args.trt_engines is not None:
        extra["trt_engines"] = tuple(e.strip() for e in args.trt_engines.split(",") if e.strip())
    if args.trt_optimization_level is not None:
        extra["trt_optimization_level"] = args.trt_optimization_level
    check_options(args.dtype, args.device, extra)
    return extra


register_backend("trt", TrtBackend, aliases=("tensorrt",), flags=BackendFlags(add_flags, parse_flags))
