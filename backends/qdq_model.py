"""A component (the UNet above all) as a QDQ ONNX model from our encodings: export, Q/DQ, sidecars, cache key.

Shared by every backend that runs a component from an ONNX graph (ONNX Runtime: the UNet; TensorRT:
the UNet, and as options the text encoders and the VAE decoder):
the graph is built once per model, encodings and toolchain, under ``<cache-dir>/onnx/<key>/``, and a
backend only adds its runtime's own files beside it. The scales and integers come from the encodings
file alone (:mod:`backends.qdq`), so every runtime runs the numbers fake-quant simulates.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from sdxl.system_info import cpu_flags

#: bumped when the export or QDQ insertion changes, so stale cached models are never reused
EXPORT_VERSION = 3
#: the batch of the example the exporter traces: the batch axis is dynamic, and the trace's memory grows
#: with it (a full-size FP8 export traced at CFG batch 2 passed 24 GB here)
TRACE_BATCH = 1


def qdq_model_dir(cache_dir: Path, spec, encodings, runtime: str, precision: str = "fp32",
                  component: str = "unet") -> Path:
    """``<cache_dir>/onnx/<profile>-<component>-<fp32|qdq>[-fp16]-<key>``: the key covers the model
    fingerprint, the component's encodings and the weights delta, the exporter, ``runtime`` (whose own
    files share the directory) and the graph's ``precision`` (``fp16``: :mod:`backends.onnx_fp16`)."""
    entries = encodings.components.get(component, {}) if encodings else {}
    content = {k: [e.to_json() for e in v] if isinstance(v, list) else v.to_json() for k, v in sorted(entries.items())}
    delta = encodings.weights_delta_sha256 if encodings else None
    parts = [EXPORT_VERSION, spec.fingerprint(), content, delta, torch.__version__, runtime]
    pre_scales = encodings.pre_scales.get(component) if encodings else None
    if pre_scales:
        parts.append({k: v.to_json() for k, v in sorted(pre_scales.items())})
    # FP32 UNet keys unchanged: caches built before FP16 graphs and other components existed stay valid
    if precision != "fp32":
        parts.append(precision)
    if component != "unet":
        parts.append(component)
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    kind = "qdq" if entries else "fp32"
    suffix = "" if precision == "fp32" else f"-{precision}"
    return Path(cache_dir) / "onnx" / f"{spec.profile}-{component}-{kind}{suffix}-{digest}"


def build_unet_model(unet: torch.nn.Module, entries: dict, directory: Path, encodings=None,
                     show_progress: bool = True, precision: str = "fp32") -> Path:
    """:func:`build_model` of the UNet (what every ONNX backend runs)."""
    return build_model("unet", unet, entries, directory, encodings, show_progress, precision)


def build_model(component: str, module: torch.nn.Module, entries: dict, directory: Path, encodings=None,
                show_progress: bool = True, precision: str = "fp32") -> Path:
    """Export ``component`` (marked at the encodings' keys), insert Q/DQ, write the sidecars; cached by ``directory``.

    ``module`` is the FP32 component (on the CPU): the graph is the same wherever it is exported; what
    is exported of it is :func:`~backends.onnx_export.component_graph`'s (the VAE: its decoder).
    ``precision="fp16"`` converts the graph to NVIDIA's FP8-FP16 form (:mod:`backends.onnx_fp16`).
    Without encodings in FP32 the export is the model: it is never loaded back, so a full-size UNet
    (streamed to external data by :func:`~backends.onnx_export.export_onnx`) never sits in memory as
    protobuf. Otherwise the exported graph is loaded without its weights, each read from the file as
    it is quantized or converted. The encodings' pre-scales (a method's per-channel input factors) are
    hooked during the export, so each becomes a ``Mul`` before its input's ``QuantizeLinear``, as fake
    quantization runs it. Files: ``<component>.onnx``, ``<component>.tensor_map.json`` (quantizer key
    -> ONNX tensor, and the FP16 report) and, with encodings, the AIMET encodings beside them.
    """
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    from quant.encodings import Encoding
    from quant.fake_quant import pre_scaled, validate_encodings

    from .onnx_export import (
        EXTERNAL_DATA_BYTES,
        component_graph,
        export_onnx,
        initializer_bytes,
        remove_model,
        save_model,
    )
    from .onnx_fp16 import convert_to_fp16
    from .qdq import QdqResult, apply_marks, check_no_marks

    if precision not in ("fp32", "fp16"):
        raise ValueError(f"ONNX graphs are exported in fp32 or fp16, not {precision}")
    path = directory / f"{component}.onnx"
    if path.is_file():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    if show_progress:
        print(f"exporting the {component} to ONNX ({len(entries)} quantizers, {precision}) -> {directory}", flush=True)
    tensor_map = directory / f"{component}.tensor_map.json"
    pre_scales = encodings.pre_scales.get(component, {}) if encodings is not None else {}
    traced, signature, prefix = component_graph(component, module, batch=TRACE_BATCH)
    if not entries and precision == "fp32":
        tensor_map.write_text(json.dumps(QdqResult().to_json(), indent=1) + "\n")
        with pre_scaled(module, pre_scales):  # atomic export: the file is the complete entry's mark
            return export_onnx(traced, signature, path)
    if entries:
        validate_encodings(module, entries, component)  # clear errors first; adds the attention matmuls keys name
    marked = directory / f".{component}.marked.onnx"
    with pre_scaled(module, pre_scales):
        export_onnx(traced, signature, marked, marks=entries.keys(), prefix=prefix,
                    channel_groups={k: v.channel_groups for k, v in entries.items()
                                    if isinstance(v, Encoding) and v.channel_groups})
    model = onnx.load(str(marked), load_external_data=False)
    result = apply_marks(model, entries, base_dir=directory)
    check_no_marks(model)
    sidecar = result.to_json()
    if precision == "fp16":
        sidecar["fp16"] = convert_to_fp16(model, base_dir=directory).to_json()
    load_external_data_for_model(model, str(directory))  # the float weights neither step replaced
    if initializer_bytes(model) < EXTERNAL_DATA_BYTES - (64 << 20):  # the checker needs one protobuf under 2 GB
        onnx.checker.check_model(model, full_check=False)
    tensor_map.write_text(json.dumps(sidecar, indent=1) + "\n")
    if encodings is not None and entries:
        from quant.aimet_export import export_aimet
        from quant.encodings import Encodings

        this_only = Encodings(components={component: entries}, recipe=encodings.recipe,
                              excluded={component: encodings.excluded.get(component, [])})
        export_aimet(this_only, path, name_map=result.tensor_map)
    save_model(model, path)  # last: its presence marks a complete cache entry
    remove_model(marked)
    return path


def integer_kernels_exact(max_abs_int8_weight: int, activations_8bit: int) -> bool:
    """Whether ONNX Runtime's fused 8-bit integer kernels compute what the Q/DQ graph says on this CPU.

    Without VNNI (AVX2 only) they multiply u8 activations by s8 weights with ``VPMADDUBSW``, whose int16
    sums of two products saturate once weights exceed |64|; with VNNI/AMX (32-bit sums), 7-bit weights or
    no 8-bit activation quantizers (A16: no integer GEMM to fuse) they are exact.
    """
    return (bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"}) or max_abs_int8_weight <= 64
            or activations_8bit == 0)
