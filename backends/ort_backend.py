"""``ort``: the UNet as an ONNX model on ONNX Runtime -- FP32, or INT8/INT16 QDQ from our encodings.

The QDQ model that runs on the CPU execution provider here is the model the QNN execution provider
runs on a Hexagon HTP (``--ep qnn``; on x86 the ``onnxruntime-qnn`` wheel emulates the HTP), so this
backend is the project's stand-in for the SNPE/QNN flow. Only the UNet (~all of SDXL's compute) moves
to ONNX Runtime; the text encoders and the VAE stay PyTorch modules, fake-quantized from the same
encodings where the encodings name them, so numerics agree with ``--backend torch`` everywhere.

Models are cached under ``<cache-dir>/onnx/<key>/``, the key covering the model fingerprint, the
encodings (and their weights delta), the exporter and ONNX Runtime versions. Beside ``unet.onnx`` the
cache holds ``unet.tensor_map.json`` (quantizer key -> ONNX tensor), the AIMET/QNN overrides file
``unet.aimet.unet.json`` and ``unet.fusion.json`` (which Q/DQ groups ONNX Runtime fused).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdxl.backend import BackendOptions
from sdxl.system_info import isa_summary

from .registry import BackendFlags, BackendOptionsError, register_backend
from .torch_backend import TorchBackend

log = logging.getLogger(__name__)
EXECUTION_PROVIDERS = ("cpu", "qnn")
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
INT8_KERNEL_MODES = ("auto", "on", "off")


class OrtBackend(TorchBackend):
    name = "ort"
    runs_elsewhere = ("unet",)

    def __init__(self, spec, options: BackendOptions):
        check_options(options.dtype, options.device, options.extra)
        self.ep = str(options.extra.get("ep", "cpu"))
        super().__init__(spec, options)
        import onnxruntime

        from .qdq import require_static
        from .qdq_model import build_unet_model, qdq_model_dir

        encodings = self.quantization.encodings if self.quantization else None
        entries = encodings.components.get("unet", {}) if encodings else {}
        require_static(entries)
        self.model_dir = qdq_model_dir(Path(options.extra.get("cache_dir", "build/cache")), spec, encodings,
                                       f"onnxruntime {onnxruntime.__version__}")
        self.model_path = build_unet_model(self.unet, entries, self.model_dir, encodings, options.show_progress)
        self.int8_kernels = int8_kernels(str(options.extra.get("ort_int8_kernels", "auto")),
                                         self.model_dir / "unet.tensor_map.json")
        self.optimization = str(options.extra.get("ort_optimization", "all"))
        fuse = self.int8_kernels["fused"]
        self.session = create_session(self.model_path, self.ep, _threads(options), self.optimization, qdq_fusion=fuse)
        self.fusion = _fusion(self.model_path, fuse) if self.optimization == "all" else None  # the report is of "all"
        self.unet = None  # the session holds the weights now; free the PyTorch copy
        self.components.unet = None

    def predict_noise(self, latent_input, timestep, prompt_embeds, text_embeds, time_ids):
        n = latent_input.shape[0]
        inputs = {"sample": latent_input, "timestep": torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(n),
                  "encoder_hidden_states": prompt_embeds, "text_embeds": text_embeds, "time_ids": time_ids}
        return run_bound(self.session, inputs, "noise_pred", latent_input.shape)

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update(ep=self.ep, onnx_model=str(self.model_path), isa=isa_summary(),
                   session_threads=self.session.get_session_options().intra_op_num_threads,
                   graph_optimization=self.optimization, int8_kernels=self.int8_kernels)
        tensor_map = self.model_dir / "unet.tensor_map.json"
        if tensor_map.is_file() and "quantization" in out:  # the UNet's quantizers live in the ONNX graph
            counts = json.loads(tensor_map.read_text())
            out["quantization"]["quantizers"]["unet"] = len(counts["tensor_map"])
            # Q/DQ pairs in the graph, and the quantizers that reuse one (one quantization per value)
            out["qdq"] = {k: counts.get(k, 0) for k in ("activations", "weights", "shared", "propagated")}
        if self.fusion:
            out["fusion"] = {k: self.fusion[k] for k in ("fused", "fused_total", "quantize_linear",
                                                         "dequantize_linear") if k in self.fusion}
            out["fusion"]["unfused"] = len(self.fusion.get("unfused", []))
        return out


def int8_kernels(mode: str, tensor_map_path: Path) -> dict[str, Any]:
    """Whether the session fuses Q/DQ groups into ONNX Runtime's integer kernels, and why.

    ``auto`` (default) fuses unless the kernels would not compute the encodings' numbers on this CPU
    (:func:`~backends.qdq_model.integer_kernels_exact`: u8s8 saturation without VNNI); then the Q/DQ graph
    runs unfused (DQ -> fp32 op -> Q), exactly as the encodings define it and slower. ``on`` fuses
    anyway (warning of the saturation), ``off`` never fuses.
    """
    import warnings

    from .qdq_model import integer_kernels_exact

    counts = json.loads(tensor_map_path.read_text()) if tensor_map_path.is_file() else {}
    widest = counts.get("max_abs_int8_weight", 0)
    exact = integer_kernels_exact(widest, counts.get("activations_8bit", 0))
    fused = mode == "on" or (mode == "auto" and exact)
    reason = None
    if not exact:
        reason = (f"this CPU ({isa_summary()}) has no VNNI: ONNX Runtime's u8s8 kernels saturate with int8 weights up "
                  f"to |{widest}| (exact up to |64|; calibrate with `weights: {{reduce_range: true}}` for 7-bit weights)")
        warnings.warn(f"{reason}; " + ("--ort-int8-kernels on: running them anyway, numbers differ from fake-quant"
                                       if fused else "running the Q/DQ graph unfused (DQ -> fp32 op -> Q): the "
                                       "encodings' numbers, slower; --ort-int8-kernels on to fuse anyway"), stacklevel=3)
    return {"mode": mode, "fused": fused, "exact": exact, "max_abs_int8_weight": widest, "reason": reason}


def check_options(dtype: str, device: str, extra: dict[str, Any]) -> None:
    """What ``--backend ort`` runs: fp32 graphs on the CPU, on one of :data:`EXECUTION_PROVIDERS`.

    The one place this is checked: in the parent before any model loads (:func:`parse_flags`) and
    again by the backend itself, for callers that build one without the command line.
    """
    if dtype != "fp32" or device != "cpu":
        raise BackendOptionsError("--backend ort runs fp32 ONNX graphs on the CPU (quantized ones with --encodings); "
                                  f"got --dtype {dtype} --device {device}")
    ep = extra.get("ep", "cpu")
    if ep not in EXECUTION_PROVIDERS:
        raise BackendOptionsError(f"--ep {ep}: choose one of {', '.join(EXECUTION_PROVIDERS)}")
    if extra.get("ort_int8_kernels", "auto") not in INT8_KERNEL_MODES:
        raise BackendOptionsError(f"--ort-int8-kernels {extra['ort_int8_kernels']}: choose one of "
                                  f"{', '.join(INT8_KERNEL_MODES)}")
    if extra.get("ort_threads") is not None and extra["ort_threads"] < 1:
        raise BackendOptionsError("--ort-threads must be >= 1")


def add_flags(group) -> None:
    group.add_argument("--ep", choices=EXECUTION_PROVIDERS,
                       help="ONNX Runtime execution provider (default cpu; qnn: the Hexagon HTP, emulated on x86, "
                            "needs the [qnn] extra)")
    group.add_argument("--ort-threads", type=int, help="intra-op threads per session (default: torch's threads, "
                                                       "shared out among --threads workers)")
    group.add_argument("--ort-optimization", choices=OPTIMIZATION_LEVELS,
                       help="graph optimisation level (default all; the fusion report needs all)")
    group.add_argument("--ort-int8-kernels", choices=INT8_KERNEL_MODES,
                       help="fuse Q/DQ into ONNX Runtime's integer kernels (default auto: unless they would "
                            "saturate on this CPU, u8s8 without VNNI; off: DQ -> fp32 op -> Q)")


def parse_flags(args) -> dict[str, Any]:
    extra = {k: getattr(args, k) for k in ("ep", "ort_threads", "ort_optimization", "ort_int8_kernels")
             if getattr(args, k) is not None}
    check_options(args.dtype, args.device, extra)
    return extra


def _threads(options: BackendOptions) -> int:
    """ONNX Runtime's intra-op threads: as many as torch was given for this worker (LoadGen child sets it)."""
    return int(options.extra.get("ort_threads") or torch.get_num_threads())


def _qnn_provider(options: Any) -> None:
    """Register the ``onnxruntime-qnn`` plugin EP and add its HTP device to ``options``."""
    import onnxruntime as ort

    try:
        import onnxruntime_qnn
    except ImportError:
        raise RuntimeError("--ep qnn needs the optional onnxruntime-qnn package: "
                           "`.venv/bin/pip install -e .[qnn]` (its wheel emulates the Hexagon HTP on x86)") from None
    name = onnxruntime_qnn.get_ep_name()
    if not any(d.ep_name == name for d in ort.get_ep_devices()):
        ort.register_execution_provider_library(name, onnxruntime_qnn.get_library_path())
    devices = [d for d in ort.get_ep_devices() if d.ep_name == name]
    if not devices:
        raise RuntimeError(f"{name} registered but offers no device on this machine")
    options.add_provider_for_devices(devices[:1], {"backend_path": onnxruntime_qnn.get_qnn_htp_path()})


def create_session(model_path: Path, ep: str = "cpu", threads: int = 1, optimization: str = "all",
                   matmul_nbits_accuracy_level: int = 1, qdq_fusion: bool = True):
    """An inference session; the CPU EP also writes its optimized graph once, for the fusion report.

    ``matmul_nbits_accuracy_level``: how the ``MatMulNBits`` that ORT makes of DQ(int8 weight) -> MatMul
    computes. ORT's default, 4, quantizes the *activations* to int8 on the fly: a quantizer the
    encodings do not name, which cost A16W8 33 dB of UNet-output SQNR against fake-quant on tiny
    (``bench/parity.py``). 1 computes in fp32; other values are for that benchmark.

    ORT's thread pool follows the harness's wait policy: with ``OMP_WAIT_POLICY=PASSIVE`` (the
    harness default, see :func:`harness.cli.quiet_openmp_waits`) its idle threads sleep instead of
    spinning, for the same reason. ORT's warnings (the optimized-model dump, the HTP emulator's
    notices) show at ``--log-level INFO``; errors always do.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.log_severity_level = 1 if log.isEnabledFor(logging.INFO) else 3
    if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(matmul_nbits_accuracy_level))
    if not qdq_fusion:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    options.graph_optimization_level = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                                        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[optimization]
    optimized = _report_path(model_path, qdq_fusion, "optimized.onnx")
    if ep == "cpu" and optimization == "all" and not optimized.is_file() and os.path.getsize(model_path) < (1 << 31):
        options.optimized_model_filepath = str(optimized)
    if ep == "qnn":
        _qnn_provider(options)
        return ort.InferenceSession(str(model_path), options)
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    fusion = _report_path(model_path, qdq_fusion, "fusion.json")
    if optimized.is_file() and not fusion.is_file():
        import onnx

        from .qdq import fusion_report

        report = fusion_report(onnx.load(str(optimized), load_external_data=False))
        fusion.write_text(json.dumps(report, indent=1) + "\n")
    return session


def _report_path(model_path: Path, qdq_fusion: bool, suffix: str) -> Path:
    """Beside the model: ``<stem>.<suffix>`` of a fused session, ``<stem>.unfused.<suffix>`` of an unfused one."""
    return Path(model_path).with_name(f"{Path(model_path).stem}.{'' if qdq_fusion else 'unfused.'}{suffix}")


def _fusion(model_path: Path, qdq_fusion: bool) -> dict[str, Any] | None:
    path = _report_path(model_path, qdq_fusion, "fusion.json")
    return json.loads(path.read_text()) if path.is_file() else None


def run_bound(session, inputs: dict[str, torch.Tensor], output: str, shape) -> torch.Tensor:
    """One ``run`` with I/O binding: inputs read and the output written in place, no numpy copies."""
    binding = session.io_binding()
    keep = []
    for name, tensor in inputs.items():
        tensor = tensor.detach().to(torch.float32).contiguous()
        keep.append(tensor)
        binding.bind_input(name, "cpu", 0, np.float32, list(tensor.shape), tensor.data_ptr())
    out = torch.empty(tuple(shape), dtype=torch.float32)
    binding.bind_output(output, "cpu", 0, np.float32, list(out.shape), out.data_ptr())
    session.run_with_iobinding(binding)
    return out


register_backend("ort", OrtBackend, aliases=("onnxruntime",), flags=BackendFlags(add_flags, parse_flags))
