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

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdxl.backend import BackendOptions
from sdxl.system_info import cpu_flags, isa_summary

from .registry import register_backend
from .torch_backend import TorchBackend

log = logging.getLogger(__name__)
EXECUTION_PROVIDERS = ("cpu", "qnn")
#: bumped when the export or QDQ insertion changes, so stale cached models are never reused
EXPORT_VERSION = 1


class OrtBackend(TorchBackend):
    name = "ort"
    runs_elsewhere = ("unet",)

    def __init__(self, spec, options: BackendOptions):
        if options.dtype != "fp32" or options.device != "cpu":
            raise ValueError("--backend ort runs fp32 ONNX graphs on the CPU (quantized ones with --encodings); "
                             f"got --dtype {options.dtype} --device {options.device}")
        self.ep = str(options.extra.get("ep", "cpu"))
        if self.ep not in EXECUTION_PROVIDERS:
            raise ValueError(f"--ep {self.ep}: choose one of {', '.join(EXECUTION_PROVIDERS)}")
        super().__init__(spec, options)
        encodings = self.quantization.encodings if self.quantization else None
        entries = encodings.components.get("unet", {}) if encodings else {}
        from .qdq import require_static

        require_static(entries)
        self.model_dir = Path(options.extra.get("cache_dir", "build/cache")) / "onnx" / self._cache_key(entries)
        self.model_path = build_unet_model(self.unet, entries, self.model_dir, encodings, options.show_progress)
        warn_if_saturating(self.model_dir / "unet.tensor_map.json")
        self.optimization = str(options.extra.get("ort_optimization", "all"))
        self.session = create_session(self.model_path, self.ep, _threads(options), self.optimization)
        self.fusion = _fusion(self.model_dir) if self.optimization == "all" else None  # the report is of "all"
        self.unet = None  # the session holds the weights now; free the PyTorch copy
        self.components.unet = None

    def _cache_key(self, entries: dict) -> str:
        import onnxruntime

        content = {k: [e.to_json() for e in v] if isinstance(v, list) else v.to_json() for k, v in sorted(entries.items())}
        delta = None
        if self.quantization and self.quantization.encodings.weights_delta and self.options.encodings:
            from sdxl.dataset import file_sha256

            delta = file_sha256(Path(self.options.encodings).parent / self.quantization.encodings.weights_delta)
        parts = [EXPORT_VERSION, self.spec.fingerprint(), content, delta, torch.__version__, onnxruntime.__version__]
        digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
        return f"{self.spec.profile}-unet-{'qdq' if entries else 'fp32'}-{digest}"

    def predict_noise(self, latent_input, timestep, prompt_embeds, text_embeds, time_ids):
        n = latent_input.shape[0]
        inputs = {"sample": latent_input, "timestep": torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(n),
                  "encoder_hidden_states": prompt_embeds, "text_embeds": text_embeds, "time_ids": time_ids}
        return run_bound(self.session, inputs, "noise_pred", latent_input.shape)

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update(ep=self.ep, onnx_model=str(self.model_path), isa=isa_summary(),
                   session_threads=self.session.get_session_options().intra_op_num_threads,
                   graph_optimization=self.optimization)
        tensor_map = self.model_dir / "unet.tensor_map.json"
        if tensor_map.is_file() and "quantization" in out:  # the UNet's quantizers live in the ONNX graph
            counts = json.loads(tensor_map.read_text())
            out["quantization"]["quantizers"]["unet"] = counts["activations"] + counts["weights"]
        if self.fusion:
            out["fusion"] = {k: self.fusion[k] for k in ("fused", "fused_total", "quantize_linear",
                                                         "dequantize_linear") if k in self.fusion}
            out["fusion"]["unfused"] = len(self.fusion.get("unfused", []))
        return out


def _threads(options: BackendOptions) -> int:
    """ONNX Runtime's intra-op threads: as many as torch was given for this worker (LoadGen child sets it)."""
    return int(options.extra.get("ort_threads") or torch.get_num_threads())


def build_unet_model(unet: torch.nn.Module, entries: dict, directory: Path, encodings=None,
                     show_progress: bool = True) -> Path:
    """Export ``unet`` (marked at the encodings' keys), insert Q/DQ, write the sidecars; cached by ``directory``.

    Without encodings the export is the model: it is never loaded back, so a full-size UNet (streamed
    to external data by :func:`~backends.onnx_export.export_onnx`) never sits in memory as protobuf.
    """
    import onnx

    from quant.fake_quant import validate_encodings

    from .onnx_export import (
        EXTERNAL_DATA_BYTES,
        UNetForExport,
        export_onnx,
        initializer_bytes,
        remove_model,
        save_model,
        unet_signature,
    )
    from .qdq import QdqResult, apply_marks, check_no_marks

    path = directory / "unet.onnx"
    if path.is_file():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    if show_progress:
        print(f"exporting the UNet to ONNX ({len(entries)} quantizers) -> {directory}", flush=True)
    tensor_map = directory / "unet.tensor_map.json"
    if not entries:
        tensor_map.write_text(json.dumps(QdqResult().to_json(), indent=1) + "\n")
        return export_onnx(UNetForExport(unet), unet_signature(unet), path)  # atomic: the complete entry's mark
    validate_encodings(unet, entries, "unet")  # clear errors first; adds the attention matmuls keys may name
    marked = directory / ".unet.marked.onnx"
    export_onnx(UNetForExport(unet), unet_signature(unet), marked, marks=entries.keys(), prefix="unet.")
    model = onnx.load(str(marked))
    result = apply_marks(model, entries)
    check_no_marks(model)
    if initializer_bytes(model) < EXTERNAL_DATA_BYTES - (64 << 20):  # the checker needs one protobuf under 2 GB
        onnx.checker.check_model(model, full_check=False)
    tensor_map.write_text(json.dumps(result.to_json(), indent=1) + "\n")
    if encodings is not None:
        from quant.aimet_export import export_aimet
        from quant.encodings import Encodings

        unet_only = Encodings(components={"unet": entries}, recipe=encodings.recipe,
                              excluded={"unet": encodings.excluded.get("unet", [])})
        export_aimet(unet_only, path, name_map=result.tensor_map)
    save_model(model, path)  # last: its presence marks a complete cache entry
    remove_model(marked)
    return path


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
                   matmul_nbits_accuracy_level: int = 1):
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
    options.graph_optimization_level = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                                        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[optimization]
    optimized = Path(model_path).with_name(Path(model_path).stem + ".optimized.onnx")
    if ep == "cpu" and optimization == "all" and not optimized.is_file() and os.path.getsize(model_path) < (1 << 31):
        options.optimized_model_filepath = str(optimized)
    if ep == "qnn":
        _qnn_provider(options)
        return ort.InferenceSession(str(model_path), options)
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    fusion = Path(model_path).with_name(Path(model_path).stem + ".fusion.json")
    if optimized.is_file() and not fusion.is_file():
        import onnx

        from .qdq import fusion_report

        report = fusion_report(onnx.load(str(optimized), load_external_data=False))
        fusion.write_text(json.dumps(report, indent=1) + "\n")
    return session


def _fusion(directory: Path) -> dict[str, Any] | None:
    path = directory / "unet.fusion.json"
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


def warn_if_saturating(tensor_map_path: Path) -> None:
    """u8s8 GEMMs without VNNI use VPMADDUBSW, whose int16 sums of two products saturate above |w| = 64."""
    if cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"} or not tensor_map_path.is_file():
        return
    isa = isa_summary()
    widest = json.loads(tensor_map_path.read_text()).get("max_abs_int8_weight", 0)
    if widest > 64:
        warnings.warn(f"this CPU ({isa}) has no VNNI: ONNX Runtime's u8s8 kernels may saturate with int8 weights up "
                      f"to |{widest}|; calibrate with `weights: {{reduce_range: true}}` (7-bit weights)", stacklevel=3)


register_backend("ort", OrtBackend, aliases=("onnxruntime",))
