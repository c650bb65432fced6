"""Turn the ``Mark`` nodes of a marked export into QuantizeLinear/DequantizeLinear from our encodings.

Not a second calibration: every scale and zero point comes from the encodings file, and weights are
quantized with :func:`quant.quantizers.quantize_tensor` -- the function the fake-quant backend uses --
so the integers in the ONNX model are the ones PyTorch simulated. Activations become ``Q -> DQ``
pairs; weights become a quantized initializer feeding ``DQ`` (the form ONNX Runtime's and QNN's QDQ
fusions look for), with a Linear's ``Transpose`` folded into the initializer so nothing sits between
``DQ`` and ``MatMul``.

One quantization per value (AIMET's encoding propagation, for our consumer-input quantizers): where
several consumers quantize the same tensor with identical encodings (a block's ``to_q``/``to_k``/``to_v``
reading ``norm1``'s output; every ``attn2.to_k``/``to_v`` reading the text states), one ``Q -> DQ``
feeds them all; and where a quantizer's input is an already dequantized tensor seen through
math-invariant ops (:data:`MATH_INVARIANT_OPS`: they move values, never change them) with an identical
per-tensor encoding, the second pair is dropped -- ``Q(DQ(q)) = q`` on the same grid. Both are exact:
the graph computes what the fake-quant backend computes with one quantizer per consumer.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import numpy as np
import torch

from quant.encodings import Encoding, EncodingsError, parse_key
from quant.quantizers import quantize_tensor

from .onnx_export import MARK_DOMAIN, MARK_OP

#: our dtype names -> ONNX TensorProto element types (opset 21 Q/DQ)
_ONNX_TYPES = {"int8": "INT8", "uint8": "UINT8", "int16": "INT16", "uint16": "UINT16", "int4": "INT4",
               "uint4": "UINT4", "float8e4m3fn": "FLOAT8E4M3FN", "float8e5m2": "FLOAT8E5M2"}
_NUMPY_INTS = {"int8": np.int8, "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16}
_ML_DTYPES = {"int4": "int4", "uint4": "uint4", "float8e4m3fn": "float8_e4m3fn", "float8e5m2": "float8_e5m2"}


def quantized_name(key: str) -> str:
    """The ONNX tensor holding quantizer ``key``'s integers: a weight's initializer, an activation's Q output."""
    return f"{key}.quantized"


#: ops whose output elements are copies of input[0]'s (AIMET's ``op_outputs_to_ignore`` / math-invariant ops):
#: a dequantized tensor stays on its grid through them
MATH_INVARIANT_OPS = frozenset({"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Expand",
                                "Tile", "Slice", "Gather", "Split"})


@dataclass
class QdqResult:
    """What :func:`apply_marks` did: key -> float tensor it quantized, and counts."""

    tensor_map: dict[str, str] = field(default_factory=dict)
    activations: int = 0
    weights: int = 0
    removed_marks: int = 0
    #: activation quantizers that reuse another consumer's Q/DQ of the same tensor (identical encoding)
    shared: int = 0
    #: activation quantizers dropped: their input is already on their grid (a DQ seen through math-invariant ops)
    propagated: int = 0
    #: largest |q| over int8 weights: above 64, u8s8 GEMMs without VNNI (VPMADDUBSW) can saturate
    max_abs_int8_weight: int = 0
    #: activation Q/DQ pairs on an 8-bit grid: only these feed ORT's u8s8/s8s8 integer kernels
    activations_8bit: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"activations": self.activations, "weights": self.weights, "removed_marks": self.removed_marks,
                "shared": self.shared, "propagated": self.propagated,
                "max_abs_int8_weight": self.max_abs_int8_weight, "activations_8bit": self.activations_8bit,
                "tensor_map": dict(sorted(self.tensor_map.items()))}


def _tensor_type(dtype: str, key: str) -> int:
    from onnx import TensorProto

    if dtype not in _ONNX_TYPES:
        raise EncodingsError(f"{key}: {dtype} has no ONNX Q/DQ type at opset 21; "
                             f"the ort backend supports {', '.join(_ONNX_TYPES)}")
    return getattr(TensorProto, _ONNX_TYPES[dtype])


def _make_tensor(name: str, dtype: str, values: np.ndarray, key: str):
    """An initializer of quantized ``values`` (integers, or FP8-representable floats) in ``dtype``.

    int4/uint4/FP8 go through ml_dtypes' numpy types (exact for values already on their grid):
    ``helper.make_tensor`` would take a Python list, 2.5 billion floats for SDXL's UNet.
    """
    import ml_dtypes
    from onnx import numpy_helper

    _tensor_type(dtype, key)  # a clear error for a type ONNX Q/DQ lacks
    numpy_type = _NUMPY_INTS.get(dtype) or getattr(ml_dtypes, _ML_DTYPES[dtype])
    return numpy_helper.from_array(np.asarray(values).astype(numpy_type), name)


def _qparams_tensors(enc: Encoding, key: str, prefix: str) -> tuple[list, list[str], dict[str, Any]]:
    """Scale and zero-point initializers plus the ``axis`` attribute of one encoding."""
    from onnx import numpy_helper

    per_channel = enc.axis is not None and enc.channels > 1
    shape = (enc.channels,) if per_channel else ()
    scale = numpy_helper.from_array(np.asarray(enc.scale, dtype=np.float32).reshape(shape), f"{prefix}.scale")
    offsets = np.asarray(enc.offset, dtype=np.float32).reshape(shape)
    zero_point = _make_tensor(f"{prefix}.zero_point", enc.dtype, offsets, key)
    attrs = {"axis": int(enc.axis)} if per_channel else {}
    return [scale, zero_point], [scale.name, zero_point.name], attrs


def _single(value: Encoding | list[Encoding], key: str) -> Encoding:
    if isinstance(value, list):
        raise EncodingsError(f"{key}: timestep-ranged encodings switch quantizers per step, which one static "
                             "ONNX graph cannot; calibrate without per-timestep ranges for --backend ort")
    return value


def require_static(entries: Mapping[str, Encoding | list[Encoding]]) -> None:
    """Refuse timestep-ranged entries before an export is spent on them."""
    for key, value in entries.items():
        _single(value, key)


def apply_marks(model, entries: Mapping[str, Encoding | list[Encoding]] | None,
                base_dir=None) -> QdqResult:
    """Replace each ``Mark`` of ``model`` (in place): Q/DQ where ``entries`` has its key, nothing otherwise.

    ``base_dir``: where a model loaded without its external data keeps it; each weight is read from
    there as it is quantized, and the float weights it replaces are never loaded.
    """
    from onnx import helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    consumers: dict[str, list] = {}
    producers = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}
    result = QdqResult()
    renames: dict[str, str] = {}
    dropped: set[int] = set()
    shared_dq: dict[tuple, tuple[str, str]] = {}  # (tensor, encoding) -> (its DQ output, how it is reused)
    dequantized: dict[str, tuple] = {}  # a per-tensor DQ output -> its encoding
    passthrough: set[str] = set()  # outputs of marks with no entry (identities)
    new_nodes = []
    for node in graph.node:
        if not (node.domain == MARK_DOMAIN and node.op_type == MARK_OP):
            new_nodes.append(node)
            continue
        key = _attribute(node, "key").decode()
        source, target = node.input[0], node.output[0]
        value = _entry(entries, key)
        if value is None:
            result.removed_marks += 1
            passthrough.add(target)
            if target in graph_outputs:
                new_nodes.append(helper.make_node("Identity", [source], [target], name=f"{key}/Identity"))
            else:
                renames[target] = source
            continue
        enc = _single(value, key)
        _, kind, _ = parse_key(key.partition("@")[0])
        if kind == "weight":
            array = _constant(source, initializers, producers, base_dir)
            if array is None:
                raise EncodingsError(f"{key}: the exported weight {source!r} is not a constant initializer")
            weight = torch.from_numpy(array.copy())
            q = quantize_tensor(weight, enc.qparams()).numpy()
            if enc.dtype == "int8":
                result.max_abs_int8_weight = max(result.max_abs_int8_weight, int(np.abs(q).max()))
            axis = enc.axis
            users = consumers.get(target, [])
            if len(users) == 1 and users[0].op_type == "Transpose" and axis is not None:
                # Linear: fold the transpose into the initializer so DQ feeds MatMul directly
                transpose = users[0]
                perm = list(_attribute(transpose, "perm"))
                q = np.transpose(q, perm)
                axis = perm.index(axis % weight.dim())
                dropped.add(id(transpose))
                target = transpose.output[0]
            tensors, names, attrs = _qparams_tensors(replace(enc, axis=axis), key, key)
            quantized = _make_tensor(quantized_name(key), enc.dtype, np.ascontiguousarray(q), key)
            graph.initializer.extend(tensors + [quantized])
            new_nodes.append(helper.make_node("DequantizeLinear", [quantized.name] + names, [target],
                                              name=f"{key}/DequantizeLinear", **attrs))
            result.weights += 1
        else:
            signature = _signature(enc)
            earlier = shared_dq.get((source, signature)) or _on_grid(source, signature, dequantized, passthrough, producers)
            if earlier is not None:
                if earlier[1] == "shared":
                    result.shared += 1
                else:
                    result.propagated += 1
                if target in graph_outputs:
                    new_nodes.append(helper.make_node("Identity", [earlier[0]], [target], name=f"{key}/Identity"))
                else:
                    renames[target] = earlier[0]
                if signature[3] is None:
                    dequantized[target] = signature
                result.tensor_map[key] = source
                continue
            shared_dq[(source, signature)] = (target, "shared")
            if signature[3] is None:
                dequantized[target] = signature
            tensors, names, attrs = _qparams_tensors(enc, key, key)
            graph.initializer.extend(tensors)
            q_name = quantized_name(key)
            new_nodes.append(helper.make_node("QuantizeLinear", [source] + names, [q_name],
                                              name=f"{key}/QuantizeLinear", **attrs))
            new_nodes.append(helper.make_node("DequantizeLinear", [q_name] + names, [target],
                                              name=f"{key}/DequantizeLinear", **attrs))
            result.activations += 1
            result.activations_8bit += enc.dtype in ("int8", "uint8")
        result.tensor_map[key] = source
    new_nodes = [n for n in new_nodes if id(n) not in dropped]
    for node in new_nodes:
        for i, name in enumerate(node.input):
            while name in renames:
                name = renames[name]
            node.input[i] = name
    del graph.node[:]
    graph.node.extend(_live(new_nodes, {o.name for o in graph.output}))
    _drop_unused_initializers(graph)
    return result


def _signature(enc: Encoding) -> tuple:
    """What makes two encodings the same quantizer: format, scales, zero points, and the axis if per channel."""
    per_channel = enc.axis is not None and enc.channels > 1
    return (enc.dtype, tuple(enc.scale), tuple(enc.offset), int(enc.axis) if per_channel else None)


def _on_grid(name: str, signature: tuple, dequantized: dict[str, tuple], passthrough: set[str],
             producers) -> tuple[str, str] | None:
    """``(name, "propagated")`` when ``name`` is a per-tensor DQ output of ``signature`` seen through
    math-invariant ops (and unquantized marks) only, so quantizing it again with that encoding changes nothing."""
    if signature[3] is not None:
        return None
    start = name
    while True:
        if dequantized.get(name) == signature:
            return start, "propagated"
        node = producers.get(name)
        if node is None or not (node.op_type in MATH_INVARIANT_OPS or name in passthrough):
            return None
        name = node.input[0]


def _live(nodes: list, outputs: set[str]) -> list:
    """``nodes`` less those no graph output depends on (a split weight's float ``Slice`` once its part
    became a quantized initializer), so the float weight they read is dropped too."""
    needed, live = set(outputs), []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(node.input)
    return live[::-1]


def _entry(entries, mark_key: str) -> Encoding | list[Encoding] | None:
    """The entry of a mark: its key's, or for ``<key>@<g>`` (a channel group's slice) group ``g``'s."""
    key, _, group = mark_key.partition("@")
    value = entries.get(key) if entries else None
    if value is None or not group:
        return value
    return _single(value, key).groups()[int(group)]


def _constant(name: str, initializers, producers, base_dir=None) -> np.ndarray | None:
    """The value of ``name`` when it is constant: an initializer, or ``Slice``/``Unsqueeze``/``Concat`` of
    constants (a split weight's part when the export ran without constant folding, as the streamed
    full-size export does); None otherwise."""
    from onnx import numpy_helper

    from .onnx_export import initializer_array

    if name in initializers:
        return initializer_array(initializers[name], base_dir)
    node = producers.get(name)
    if node is None:
        return None
    if node.op_type == "Constant":
        return numpy_helper.to_array(_attribute(node, "value"))
    if node.op_type not in ("Slice", "Unsqueeze", "Concat"):
        return None
    operands = [_constant(i, initializers, producers, base_dir) if i else None for i in node.input]
    if any(v is None for i, v in zip(node.input, operands) if i):
        return None
    if node.op_type == "Unsqueeze":
        return np.expand_dims(operands[0], tuple(int(a) for a in operands[1]))
    if node.op_type == "Concat":
        return np.concatenate(operands, axis=int(_attribute(node, "axis")))
    data, starts, ends = operands[:3]
    axes = operands[3] if len(operands) > 3 and operands[3] is not None else range(len(starts))
    steps = operands[4] if len(operands) > 4 and operands[4] is not None else [1] * len(starts)
    index = [slice(None)] * data.ndim
    for axis, start, end, step in zip(axes, starts, ends, steps):
        index[int(axis)] = slice(int(start), int(min(end, data.shape[int(axis)])), int(step))
    return data[tuple(index)]


def _attribute(node, name: str) -> Any:
    from onnx import helper

    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    raise ValueError(f"node {node.name} ({node.op_type}) has no attribute {name!r}")


def _drop_unused_initializers(graph) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def check_no_marks(model) -> None:
    """A model handed to a session must hold no ``Mark`` (ORT has no kernel for it)."""
    left = [n.name for n in model.graph.node if n.domain == MARK_DOMAIN]
    if left:
        raise RuntimeError(f"{len(left)} Mark node(s) left in the graph, e.g. {left[0]}")
    keep = [o for o in model.opset_import if o.domain != MARK_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def fusion_report(optimized_model) -> dict[str, Any]:
    """Which quantized ops ONNX Runtime fused into integer kernels and which run as DQ -> fp32 -> Q.

    Reads the session's optimized graph: integer kernels (``QLinearConv``, ``QLinearMatMul``,
    ``MatMulIntegerToFloat``, ``QGemm``, ...) count as fused; a float Conv/MatMul/Gemm that still reads a
    ``DequantizeLinear`` output ran in fp32 between the Q/DQ pairs.
    """
    graph = optimized_model.graph
    producers = {out: node for node in graph.node for out in node.output}
    counts: dict[str, int] = {}
    unfused: list[str] = []
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
        if node.op_type in ("Conv", "MatMul", "Gemm", "FusedConv", "FusedMatMul") and any(
                producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in node.input):
            unfused.append(node.name)
    integer_ops = {k: v for k, v in counts.items() if k.startswith(("QLinear", "QGemm", "MatMulInteger", "ConvInteger",
                                                                      "DynamicQuantize"))}
    return {"fused": integer_ops, "fused_total": sum(integer_ops.values()), "unfused": sorted(unfused),
            "quantize_linear": counts.get("QuantizeLinear", 0), "dequantize_linear": counts.get("DequantizeLinear", 0),
            "op_counts": dict(sorted(counts.items()))}
