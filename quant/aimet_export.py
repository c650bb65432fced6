"""Export our encodings to AIMET's 1.0.0 JSON, which QNN's and SNPE's converters read as overrides.

AIMET 1.0.0 (``Docs/techniques/encoding_spec.rst`` of qualcomm/aimet): top-level ``version``,
``activation_encodings`` and ``param_encodings`` (lists of ``{name, enc_type, dtype, bw, is_sym,
scale[], offset[]}``), ``quantizer_args`` and ``excluded_layers``. Two conventions differ from ours:

* AIMET's ``offset`` is ``qmin - zero_point`` on its ``[qmin, qmax]`` grid: ``-zero_point`` for
  unsigned types and ``-zero_point - 2**(bits-1)`` for signed ones (aimet_onnx ``qc_quantize_op.py``
  converts 2.0.0 ``y_zero_point`` back exactly so); int8 symmetric is therefore offset -128.
* FLOAT encodings carry only ``dtype`` and ``bw`` -- AIMET 1.0.0 has no FP8 scale, so our FP8 scales
  do not survive this export (the native file keeps them); :func:`export_aimet` lists them in ``lost``.

One AIMET file describes one graph, so we write one per component. Tensor names: parameters are
``<module>.weight`` (the initializer names ``torch.onnx.export`` gives); activations keep our key unless
``name_map`` (the ONNX Runtime backend's key -> ONNX tensor map) says otherwise. Timestep-ranged keys
export the entry of the earliest (noisiest) step, since AIMET has no timestep field. A split (grouped)
entry is one encoding per channel group, each named ``<tensor>@<g>`` unless ``name_map`` names its slice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .encodings import Encoding, Encodings, parse_key
from .formats import get_format

AIMET_VERSION = "1.0.0"
_QUANT_SCHEMES = {"minmax": "post_training_tf", "ema": "post_training_tf", "mse": "post_training_tf_enhanced",
                  "percentile": "post_training_percentile", "entropy": "post_training_tf_enhanced"}


def aimet_offset(enc: Encoding) -> list[int]:
    """Our ONNX zero points -> AIMET offsets (``qmin - zero_point``)."""
    fmt = get_format(enc.dtype)
    return [int(fmt.qmin - zp) for zp in enc.offset]


def _entry(name: str, enc: Encoding) -> dict[str, Any]:
    fmt = get_format(enc.dtype)
    if fmt.is_float:
        return {"name": name, "enc_type": "PER_TENSOR", "dtype": "FLOAT", "bw": fmt.bits}
    return {"name": name, "enc_type": "PER_CHANNEL" if enc.axis is not None and enc.channels > 1 else "PER_TENSOR",
            "dtype": "INT", "bw": fmt.bits, "is_sym": enc.symmetric, "scale": list(enc.scale),
            "offset": aimet_offset(enc)}


def _quantizer_args(recipe: dict[str, Any]) -> dict[str, Any]:
    weights, inputs = recipe.get("weights") or {}, recipe.get("inputs") or {}
    wfmt = get_format(weights.get("dtype", "int8"))
    afmt = get_format(inputs.get("dtype", "uint8"))
    observer = inputs.get("observer", "minmax")
    kind = observer.get("kind", "minmax") if isinstance(observer, dict) else observer
    return {"activation_bitwidth": afmt.bits, "dtype": "float" if afmt.is_float else "int",
            "is_symmetric": bool(weights.get("symmetric", True)), "param_bitwidth": wfmt.bits,
            "per_channel_quantization": weights.get("axis") is not None,
            "quant_scheme": _QUANT_SCHEMES.get(kind, "post_training_tf")}


def to_aimet(encodings: Encodings, component: str, name_map: dict[str, str] | None = None) -> tuple[dict[str, Any], list[str]]:
    """One component's encodings as an AIMET 1.0.0 dict, plus the keys whose information was lost."""
    name_map = name_map or {}
    activations, params, lost = [], [], []
    for key, value in sorted(encodings.components.get(component, {}).items()):
        module, kind, _ = parse_key(key)
        enc = value if isinstance(value, Encoding) else min(value, key=lambda e: -e.timesteps[1])
        if isinstance(value, list) or get_format(enc.dtype).is_float:
            lost.append(key)
        default = f"{module}.weight" if kind == "weight" else key
        # a split (grouped) tensor is one ONNX tensor per group: ``<key>@<g>``, as the QDQ export names them
        names = [name_map.get(key, default)] if not enc.channel_groups else \
            [name_map.get(f"{key}@{g}", f"{default}@{g}") for g in range(len(enc.channel_groups))]
        for name, part in zip(names, enc.groups()):
            (params if kind == "weight" else activations).append(_entry(name, part))
    doc = {"version": AIMET_VERSION, "activation_encodings": activations, "param_encodings": params,
           "quantizer_args": _quantizer_args(encodings.recipe),
           "excluded_layers": sorted(encodings.excluded.get(component, []))}
    return doc, lost


def export_aimet(encodings: Encodings, path: str | Path, name_map: dict[str, str] | None = None) -> dict[str, Path]:
    """Write ``<stem>.aimet.<component>.json`` beside ``path`` for every component; return the paths."""
    path = Path(path)
    written: dict[str, Path] = {}
    for component in encodings.components:
        doc, _ = to_aimet(encodings, component, name_map)
        out = path.with_name(f"{path.stem}.aimet.{component}.json")
        out.write_text(json.dumps(doc, indent=1) + "\n")
        written[component] = out
    return written
