"""TensorRT's explicit-quantization rules, checked on a QDQ ONNX model without TensorRT (or a GPU).

The UNet's QDQ graph (:mod:`backends.qdq_model`, from our encodings) is what a TensorRT engine would be
built from; TensorRT's ONNX parser refuses, or silently builds slower, graphs that break its rules, and
the building happens on a GPU this machine does not have. So the rules are checked here, on CPU:

* opset >= 19 (FP8 ``QuantizeLinear``/``DequantizeLinear``);
* every ``QuantizeLinear``/``DequantizeLinear`` has its scale and zero point as constants (initializers
  or ``Constant`` outputs), every scale positive, every zero point zero (the parser: "Scale coefficients
  must all be positive", "y_zero_point must be 0"); the zero point present, since its type selects the
  quantized type (INT8 or FLOAT8E4M3FN);
* activations per tensor (the parser: "Activations-quantization does not support per-axis
  quantization"): every ``QuantizeLinear`` has a scalar scale;
* weights per tensor or per output channel of the layer that reads them: axis 0 of a Conv's KCRS
  weight or of a ``Gemm(transB=1)``'s, the last axis of a ``MatMul``'s ``[K, N]`` (a Linear's weight
  after the export folded its transpose);
* every quantizer of the encodings (the model's ``tensor_map``) is quantized exactly once: an
  activation's tensor is read by exactly one ``QuantizeLinear`` (consumers with identical encodings
  share it), a weight's quantized initializer by exactly one ``DequantizeLinear``;
* where the recipe quantizes the attention matmuls, the FP8 MHA pattern TensorRT fuses:
  ``DQ -> MatMul (Q·Kᵀ) -> [Mul/Div/Add/Cast] -> Softmax -> [Cast] -> Q -> DQ -> MatMul (·V)`` with the
  second MatMul's other input dequantized too (modelopt's ``cast_fp8_mha_io`` pattern).

What cannot be checked here is whether TensorRT then picks FP8 kernels (``docs/tensorrt.md``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import numpy as np

from .qdq import quantized_name

#: ops allowed between the first attention MatMul and the Softmax, and between Softmax and its Q
_SCORE_OPS = frozenset({"Mul", "Div", "Add", "Cast"})
_PROBABILITY_OPS = frozenset({"Cast"})


@dataclass
class TrtGraphReport:
    """What the checks found: counts, and every rule broken (empty: TensorRT's parser accepts it)."""

    opset: int = 0
    quantize: int = 0
    dequantize: int = 0
    weights_per_channel: int = 0
    weights_per_tensor: int = 0
    zero_point_types: dict[str, int] = field(default_factory=dict)
    mha_patterns: int = 0
    violations: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _Graph:
    """Producers, consumers and constant values of one ONNX graph."""

    def __init__(self, model, base_dir=None):
        self.base_dir = base_dir
        self.nodes = list(model.graph.node)
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list] = {}
        for node in self.nodes:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.initializers = {t.name: t for t in model.graph.initializer}

    def constant(self, name: str):
        """The TensorProto behind ``name`` if it is a constant (initializer or ``Constant`` output), else None."""
        if name in self.initializers:
            return self.initializers[name]
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            value = next((a for a in node.attribute if a.name == "value"), None)
            return value.t if value is not None else None
        return None

    def values(self, tensor) -> np.ndarray | None:
        """A constant's values as float64 where numpy can hold them (FP8 zero points are compared by bytes)."""
        from onnx import TensorProto

        from .onnx_export import initializer_array

        if tensor.data_type in (TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2):
            return None
        return np.asarray(initializer_array(tensor, self.base_dir), dtype=np.float64)


def _attribute(node, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return a.i if a.type == a.INT else a
    return default


def _zero_point_is_zero(graph: _Graph, tensor) -> bool:
    from onnx import TensorProto

    from .onnx_export import initializer_array

    if tensor.data_type in (TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2):  # +0.0 is the byte 0x00
        return not np.ascontiguousarray(initializer_array(tensor, graph.base_dir)).view(np.uint8).any()
    return bool((graph.values(tensor) == 0).all())


def check_trt_qdq(model, tensor_map: Mapping[str, str] | None = None, mha: bool = False,
                  base_dir=None) -> TrtGraphReport:
    """Every rule of the module docstring on ``model`` (an ``onnx.ModelProto``; weights may be external
    and unloaded: only scales, zero points and shapes are read, external ones from ``base_dir``, the
    model's directory, through a memory map). ``tensor_map``: quantizer key -> the
    ONNX tensor it quantizes (``unet.tensor_map.json``'s). ``mha``: the recipe quantizes the attention
    matmuls (``bmm_qk``/``bmm_pv`` keys), so every attention must show the FP8 MHA pattern."""
    from onnx import TensorProto

    report = TrtGraphReport()
    graph = _Graph(model, base_dir)
    report.opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if report.opset < 19:
        report.violations.append(f"opset {report.opset}: FP8 QuantizeLinear/DequantizeLinear need opset >= 19")
    zero_types: Counter = Counter()
    read_by: dict[str, list[str]] = {}
    for node in graph.nodes:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        is_q = node.op_type == "QuantizeLinear"
        report.quantize += is_q
        report.dequantize += not is_q
        read_by.setdefault(node.input[0], []).append(node.op_type)
        where = f"{node.op_type} {node.name or node.output[0]}"
        scale = graph.constant(node.input[1])
        if scale is None:
            report.violations.append(f"{where}: scale {node.input[1]} is not a constant")
            continue
        scale_values = graph.values(scale)
        if scale_values is not None and not (scale_values > 0).all():
            report.violations.append(f"{where}: scale has values <= 0 (TensorRT needs positive scales)")
        if len(node.input) < 3 or not node.input[2]:
            report.violations.append(f"{where}: no zero point (its type selects INT8 or FP8 in TensorRT)")
        else:
            zero = graph.constant(node.input[2])
            if zero is None:
                report.violations.append(f"{where}: zero point {node.input[2]} is not a constant")
            else:
                zero_types[TensorProto.DataType.Name(zero.data_type)] += 1
                if not _zero_point_is_zero(graph, zero):
                    report.violations.append(f"{where}: zero point is not 0 (TensorRT quantizes symmetrically)")
        per_axis = int(np.prod(scale.dims)) > 1
        if is_q:
            if per_axis:
                report.violations.append(f"{where}: per-axis activation scale ({list(scale.dims)}); TensorRT "
                                         "quantizes activations per tensor")
            continue
        weight = graph.constant(node.input[0])
        if weight is None:
            continue  # an activation's DQ: its Q carries the scale checks above
        if not per_axis:
            report.weights_per_tensor += 1
            continue
        report.weights_per_channel += 1
        axis = _attribute(node, "axis", 1)
        axis = axis % len(weight.dims) if weight.dims else axis
        for consumer in graph.consumers.get(node.output[0], []):
            expected = _output_channel_axis(consumer, node.output[0], len(weight.dims))
            if expected is not None and axis != expected:
                report.violations.append(f"{where}: per-channel axis {axis} of a weight {consumer.op_type} reads "
                                         f"(its output channels are axis {expected})")
    report.zero_point_types = dict(zero_types)
    if tensor_map is not None:
        for key, tensor in sorted(tensor_map.items()):
            weight = ":weight[" in key
            if weight:
                tensor = quantized_name(key)  # the float weight was replaced by its integers
            readers = read_by.get(tensor, [])
            expected = "DequantizeLinear" if weight else "QuantizeLinear"
            if readers.count(expected) != 1:
                report.violations.append(f"{key}: {tensor} is read by {readers.count(expected)} {expected} "
                                         "nodes (expected exactly one)")
    report.mha_patterns = _count_mha(graph)
    if mha:
        attention = sum(1 for key in (tensor_map or {}) if key.endswith(".bmm_pv:input[0]"))
        if report.mha_patterns != attention:
            report.violations.append(f"FP8 MHA pattern found {report.mha_patterns} times for {attention} quantized "
                                     "attentions")
    return report


def _output_channel_axis(consumer, weight_name: str, rank: int) -> int | None:
    """The axis of the weight ``consumer`` reads that indexes its output channels (None: not a weight op)."""
    if consumer.op_type in ("Conv", "ConvTranspose") and consumer.input[1] == weight_name:
        return 0 if consumer.op_type == "Conv" else 1
    if consumer.op_type == "Gemm" and consumer.input[1] == weight_name:
        return 0 if _attribute(consumer, "transB", 0) else 1
    if consumer.op_type == "MatMul" and consumer.input[1] == weight_name:
        return rank - 1
    return None


def _count_mha(graph: _Graph) -> int:
    """Attention blocks in the FP8 MHA form: ``DQ, DQ -> MatMul -> ... -> Softmax -> ... -> Q -> DQ -> MatMul <- DQ``."""

    def dequantized(name: str) -> bool:
        node = graph.producer.get(name)
        return node is not None and node.op_type == "DequantizeLinear"

    def only_consumer(name: str):
        consumers = graph.consumers.get(name, [])
        return consumers[0] if len(consumers) == 1 else None

    count = 0
    for first in graph.nodes:
        if first.op_type != "MatMul" or not all(dequantized(i) for i in first.input):
            continue
        node = only_consumer(first.output[0])
        while node is not None and node.op_type in _SCORE_OPS:
            node = only_consumer(node.output[0])
        if node is None or node.op_type != "Softmax":
            continue
        node = only_consumer(node.output[0])
        while node is not None and node.op_type in _PROBABILITY_OPS:
            node = only_consumer(node.output[0])
        if node is None or node.op_type != "QuantizeLinear":
            continue
        dq = only_consumer(node.output[0])
        second = only_consumer(dq.output[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if second is not None and second.op_type == "MatMul" and all(dequantized(i) for i in second.input):
            count += 1
    return count
