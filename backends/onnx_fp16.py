"""An exported FP32 UNet graph (QDQ or not) made FP16 where torch's FP16 UNet is FP16, FP32 where it is FP32.

NVIDIA's SDXL engines are built from an FP16 UNet graph ("FP8-FP16 mixed precision": what the FP8
recipe leaves unquantized runs in FP16, and the Q/DQ scales are FP16, modelopt's
``trt_high_precision_dtype "Half"``). Exporting the model in ``.half()`` would need an FP16 forward on
the exporting machine, which on a CPU is hundreds of times slower than FP32 (one 640-channel 3x3 conv at
64x64: 114 s vs 0.39 s, timed once ad hoc on an AVX2 EPYC): a full-size export would take days. So the graph is exported
in FP32, as for every other runtime, and converted here.

Where torch's FP16 UNet computes in FP32, so does the converted graph: diffusers' sinusoidal
embeddings (``get_timestep_embedding``) always run in FP32 -- ``timesteps[:, None].float() * freqs``
for the timestep and for the size conditioning ``time_ids`` alike -- because ``sin(999 x f)`` in FP16
(one ulp at 999 is 0.5) is noise. That region is found by data flow, not by names: every node whose
floating-point inputs come from ``timestep`` or ``time_ids`` (and constants) only, up to the first
learned op (Gemm/MatMul/Conv) or Q/DQ. Its exit casts (diffusers' ``t_emb.to(sample.dtype)``) become
casts to FP16; anything else leaving it gets one. Everything else is FP16: float initializers,
``Constant``/``ConstantOfShape`` values, ``Cast(to=FLOAT)`` nodes, the Q/DQ scales (an FP8/INT8 Q/DQ
takes the type of the tensor it quantizes), the graph's inputs but ``timestep``, and its output.
``Resize``'s ``scales`` stays FP32 (ONNX fixes its type).

Weights still in the external data file of a streamed full-size export are read one at a time through
a memory map, so the FP32 weights never sit in memory beside the FP16 ones.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quant.encodings import EncodingsError

#: graph inputs diffusers embeds sinusoidally in FP32 whatever the model's dtype
FP32_INPUTS = ("timestep", "time_ids")
#: graph inputs that stay FP32 in the converted graph (``time_ids`` arrives as FP16, as in diffusers' pipeline)
FP32_GRAPH_INPUTS = ("timestep",)
#: where the FP32 region ends: learned ops and quantizers
_REGION_STOPS = frozenset({"Gemm", "MatMul", "Conv", "ConvTranspose", "QuantizeLinear", "DequantizeLinear"})
#: (op, input index) whose float type ONNX fixes to FP32
_FP32_SLOTS = frozenset({("Resize", 2)})
_BOOL_OPS = frozenset({"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not", "And", "Or", "Xor",
                       "IsNaN", "IsInf"})
_INT64_OPS = frozenset({"Shape", "Size", "NonZero", "ArgMax", "ArgMin"})
#: the smallest normal FP16 value: a scale below it loses relative precision (subnormal) or becomes 0
FP16_MIN_NORMAL = 2.0 ** -14
FP16_MAX = 65504.0


class Fp16Error(EncodingsError):
    """A value the FP16 graph cannot hold: a Q/DQ scale that rounds to 0 or overflows (a user error, one line)."""


@dataclass
class Fp16Report:
    """What the conversion did, and how far FP16 moved the encodings' scales."""

    fp32_nodes: int = 0
    casts_to_fp16: int = 0
    initializers: int = 0
    #: Q/DQ scale values converted (one per tensor, or per channel)
    scales: int = 0
    #: scales below FP16's smallest normal (kept, with fewer significant bits)
    subnormal_scales: int = 0
    #: largest |fp16(s) - s| / s over the Q/DQ scales
    max_scale_rel_error: float = 0.0
    #: weight values beyond FP16's range (saturate to inf, as ``.half()`` does)
    overflowed_values: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def element_types(model) -> dict[str, int]:
    """The element type of every value of ``model``'s graph, from its inputs, constants and op rules.

    Enough for the exported UNet (the test checks it against ONNX's own inference); ONNX's shape
    inference is not used because it serialises the model, which fails above 2 GB.
    """
    from onnx import TensorProto

    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in graph.input}
    types.update({t.name: t.data_type for t in graph.initializer})
    for node in graph.node:
        op = node.op_type
        if op in _BOOL_OPS:
            out = TensorProto.BOOL
        elif op in _INT64_OPS:
            out = TensorProto.INT64
        elif op == "Cast":
            out = _attribute(node, "to").i
        elif op in ("Constant", "ConstantOfShape"):
            value = _attribute(node, "value")
            out = value.t.data_type if value is not None else TensorProto.FLOAT
        elif op == "QuantizeLinear":
            out = types.get(node.input[2], TensorProto.UINT8) if len(node.input) > 2 and node.input[2] else TensorProto.UINT8
        elif op == "DequantizeLinear":
            out = types[node.input[1]]
        elif op == "Where":
            out = types[node.input[1]]
        else:
            out = types[node.input[0]]
        for name in node.output:
            types[name] = out
    return types


def convert_to_fp16(model, base_dir: Path | str | None = None) -> Fp16Report:
    """Make ``model`` (in place) the FP16 graph of the module docstring; ``base_dir`` holds external data."""
    from onnx import TensorProto, helper

    FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
    graph = model.graph
    types = element_types(model)
    report = Fp16Report()
    nodes = list(graph.node)  # held, so each node's Python wrapper (its id() below) lives until the end
    constants = {t.name for t in graph.initializer} | {o for n in nodes if n.op_type == "Constant" for o in n.output}
    constant_nodes = {n.output[0]: n for n in nodes if n.op_type == "Constant"}
    consumers: dict[str, list] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}

    # 1. the FP32 region: float data flowing from the sinusoidal-embedding inputs only
    fp32_values = {name for name in FP32_INPUTS if types.get(name) == FLOAT}
    region: set[int] = set()
    for node in nodes:
        if node.op_type in _REGION_STOPS or node.op_type == "Constant":
            continue
        floats = [i for i in node.input if i and types.get(i) == FLOAT and i not in constants]
        if floats and all(i in fp32_values for i in floats):
            region.add(id(node))
            fp32_values.update(o for o in node.output if types.get(o) == FLOAT)
    for node in nodes:  # exit casts (``.to(sample.dtype)``) cast to FP16 instead
        if (id(node) in region and node.op_type == "Cast" and node.output[0] not in graph_outputs
                and all(id(c) not in region for c in consumers.get(node.output[0], []))):
            region.discard(id(node))
            fp32_values.discard(node.output[0])
            _set_attribute(node, "to", HALF)
    report.fp32_nodes = len(region)

    # 2. constants: FP16 where an FP16 node reads them, FP32 (a copy, if both) where the region does
    readers: dict[str, set[str]] = {}
    for node in nodes:
        in_region = id(node) in region
        for index, name in enumerate(node.input):
            if name in constants:
                keep = in_region or (node.op_type, index) in _FP32_SLOTS
                readers.setdefault(name, set()).add("fp32" if keep else "fp16")
    scale_names = {node.input[1] for node in nodes if node.op_type in ("QuantizeLinear", "DequantizeLinear")}
    renamed: dict[str, str] = {}  # an FP32 constant also read as FP16 -> its FP16 copy's name
    new_initializers = []
    for tensor in list(graph.initializer):
        if tensor.data_type != FLOAT or "fp16" not in readers.get(tensor.name, set()):
            continue
        half = _to_half(tensor, base_dir, report, is_scale=tensor.name in scale_names)
        if "fp32" in readers[tensor.name]:
            half.name = renamed[tensor.name] = f"{tensor.name}.fp16"
            new_initializers.append(half)
        else:
            tensor.CopyFrom(half)
        report.initializers += 1
    graph.initializer.extend(new_initializers)
    for name, node in constant_nodes.items():
        value = _attribute(node, "value")
        if value.t.data_type != FLOAT or "fp16" not in readers.get(name, set()):
            continue
        half = _to_half(value.t, base_dir, report, is_scale=name in scale_names)
        if "fp32" in readers[name]:
            renamed[name] = f"{name}.fp16"
            nodes.append(helper.make_node("Constant", [], [renamed[name]], name=f"{node.name}.fp16", value=half))
        else:
            value.t.CopyFrom(half)

    # 3. nodes: FP16 ops read FP16 (casting out of the region once per value), region ops read FP32
    casts: dict[tuple[str, int], str] = {}
    new_nodes = []

    def cast(name: str, to: int) -> str:
        if (name, to) not in casts:
            casts[(name, to)] = f"{name}.to_{'fp16' if to == HALF else 'fp32'}"
            new_nodes.append(helper.make_node("Cast", [name], [casts[(name, to)]], to=to,
                                              name=f"{casts[(name, to)]}/Cast"))
            report.casts_to_fp16 += to == HALF
        return casts[(name, to)]

    fp16_inputs = {v.name for v in graph.input if types[v.name] == FLOAT and v.name not in FP32_GRAPH_INPUTS}
    ordered = sorted(nodes, key=lambda n: n.op_type != "Constant")  # the FP16 copies of constants first
    for node in ordered:
        in_region = id(node) in region
        for index, name in enumerate(node.input):
            if not name:
                continue
            if in_region:
                if name in fp16_inputs:
                    node.input[index] = cast(name, FLOAT)
            elif name in renamed and (node.op_type, index) not in _FP32_SLOTS:
                node.input[index] = renamed[name]
            elif name in fp32_values and name not in fp16_inputs and node.op_type != "Cast":
                node.input[index] = cast(name, HALF)
        if not in_region:
            if node.op_type == "Cast" and _attribute(node, "to").i == FLOAT:
                _set_attribute(node, "to", HALF)
            elif node.op_type == "ConstantOfShape":
                value = _attribute(node, "value")
                if value is not None and value.t.data_type == FLOAT:
                    value.t.CopyFrom(_to_half(value.t, base_dir, report, is_scale=False))
        new_nodes.append(node)
    del graph.node[:]  # still topological: each cast sits just before its first reader
    graph.node.extend(new_nodes)

    # 4. the interface: FP16 in (but the timestep) and out; intermediate annotations are stale now
    for value in list(graph.input) + list(graph.output):
        if value.name in fp16_inputs or (value.name in graph_outputs and value.type.tensor_type.elem_type == FLOAT):
            value.type.tensor_type.elem_type = HALF
    del graph.value_info[:]
    return report


def _to_half(tensor, base_dir, report: Fp16Report, is_scale: bool):
    """An FP16 copy of FP32 ``tensor`` (external data read through a memory map); scales checked and measured."""
    from onnx import numpy_helper

    from .onnx_export import initializer_array

    values = initializer_array(tensor, base_dir)
    with np.errstate(over="ignore"):
        half = values.astype(np.float16)
    if is_scale:
        report.scales += values.size
        if not (np.isfinite(half).all() and (half > 0).all()):
            raise Fp16Error(f"Q/DQ scale {tensor.name} ({values.min():.3g}..{values.max():.3g}) is 0 or inf in FP16 "
                            f"(FP16 holds {2.0 ** -24:.3g}..{FP16_MAX}); this encoding needs an FP32 graph (--dtype fp32)")
        report.subnormal_scales += int((half < FP16_MIN_NORMAL).sum())
        error = np.abs(half.astype(np.float64) - values) / values
        report.max_scale_rel_error = max(report.max_scale_rel_error, float(error.max(initial=0.0)))
    else:
        report.overflowed_values += int((np.isinf(half) & np.isfinite(values)).sum())
    return numpy_helper.from_array(half, tensor.name)


def _attribute(node, name: str):
    return next((a for a in node.attribute if a.name == name), None)


def _set_attribute(node, name: str, value: int) -> None:
    _attribute(node, name).i = value
