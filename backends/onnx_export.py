"""Export a component to ONNX with *named marks* where the encodings put quantizers.

Mapping our quantizer keys (``down_blocks.1.attentions.0...to_q:input[0]``) to ONNX tensor names by
guessing from the exporter's node names breaks on every exporter change (Linear becomes ``Gemm`` or
``MatMul`` + ``Transpose`` + ``Add``, initializers get renamed by constant folding). Instead the export
runs with the quantized points *marked*: a forward hook wraps each marked activation, and a patched
``forward`` wraps each marked weight, in an identity op ``sdxlptq::Mark(key=...)``. After export, every
``Mark`` node names its key and its tensor exactly; :mod:`backends.qdq` turns it into Q/DQ (or
removes it). The FP32 export is the same call with no marks.

The TorchScript exporter is used (opset 20, the last it supports; :func:`upgrade_opset` lifts the
model to 21 for uint16/int16 Q/DQ): its graphs are plain and its custom-op hook is one ``symbolic``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F

MARK_DOMAIN = "sdxlptq"
MARK_OP = "Mark"
EXPORT_OPSET = 20
TARGET_OPSET = 21
#: ops whose semantics changed between opset 20 and 21 beyond accepting new types
_OPSET_21_BREAKING = {"GroupNormalization"}
#: protobuf's 2 GB limit: above it weights go to an external data file
EXTERNAL_DATA_BYTES = 1 << 31


class _Mark(torch.autograd.Function):
    """Identity in PyTorch; ``sdxlptq::Mark(key)`` in the exported graph."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, key: str) -> torch.Tensor:  # noqa: D401 - autograd signature
        # a view, not a copy: the tracer keeps every Mark's output alive until the export ends, so
        # ``clone`` held a second copy of every marked weight and activation (measured: +1x the model)
        return x.view_as(x)

    @staticmethod
    def symbolic(g, x, key: str):
        out = g.op(f"{MARK_DOMAIN}::{MARK_OP}", x, key_s=key)
        out.setType(x.type())
        return out


def mark(x: torch.Tensor, key: str) -> torch.Tensor:
    return _Mark.apply(x, key)


def _weight_forward(module: torch.nn.Module, key: str):
    """A ``forward`` for Conv/Linear that marks the weight where the op consumes it."""
    # the parameter keeps torch's name, ``input``: a caller may pass it by keyword
    if isinstance(module, torch.nn.Linear):
        return lambda input: F.linear(input, mark(module.weight, key), module.bias)
    if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d)):
        return lambda input: module._conv_forward(input, mark(module.weight, key), module.bias)
    raise ValueError(f"weight marks support Conv1d/Conv2d/Linear, not {type(module).__name__} ({key})")


def group_key(key: str, group: int) -> str:
    """The mark of one channel group of a grouped (split) entry: ``<key>@<group>``."""
    return f"{key}@{group}"


def _split_forward(module: torch.nn.Module, groups, input_key: str | None, weight_key: str | None,
                   grouped: set[str]):
    """A Conv2d ``forward`` computing one conv per input-channel group, summed (shortcut splitting).

    Exports as ``Slice`` -> per-group Q/DQ -> ``Conv`` per group -> ``Add``: each operand of the skip
    concatenation gets its own per-tensor quantizer, which TensorRT and QNN can run (neither has
    per-channel activation scales). A tensor whose entry is not grouped is marked whole, then sliced.
    The bias is added once, by group 0's conv.
    """
    def forward(input):
        x = mark(input, input_key) if input_key and input_key not in grouped else input
        w = mark(module.weight, weight_key) if weight_key and weight_key not in grouped else module.weight
        out = None
        for g, (lo, hi) in enumerate(groups):
            xg, wg = x[:, lo:hi], w[:, lo:hi]
            if input_key in grouped:
                xg = mark(xg, group_key(input_key, g))
            if weight_key in grouped:
                wg = mark(wg, group_key(weight_key, g))
            y = module._conv_forward(xg, wg, module.bias if g == 0 else None)
            out = y if out is None else out + y
        return out
    return forward


@contextlib.contextmanager
def marked(module: torch.nn.Module, keys: Iterable[str],
           channel_groups: Mapping[str, list] | None = None) -> Iterator[None]:
    """Within the block, ``module``'s forward emits a ``Mark`` at each key's tensor.

    ``channel_groups`` (key -> ``[[lo, hi], ...]``, a grouped entry's ranges) split that Conv2d's
    computation per input-channel group (:func:`_split_forward`), one ``Mark`` per group's slice.
    """
    from quant.slots import resolve_slots

    channel_groups = dict(channel_groups or {})
    handles, patched = [], []
    try:
        slots = resolve_slots(module, keys, "cannot mark")
        split = {s.name: channel_groups[s.key] for s in slots if s.key in channel_groups}
        for name, groups in split.items():
            target = module.get_submodule(name)
            mine = {s.kind: s.key for s in slots if s.name == name and s.kind in ("input", "weight")}
            target.forward = _split_forward(target, groups, mine.get("input"), mine.get("weight"), set(channel_groups))
            patched.append(target)
        for slot in slots:
            if slot.name in split and slot.kind in ("input", "weight"):
                continue
            if slot.kind == "weight":
                slot.module.forward = _weight_forward(slot.module, slot.key)
                patched.append(slot.module)
            elif slot.kind == "input":
                handles.append(slot.module.register_forward_pre_hook(_input_marker(slot.key, slot.index),
                                                                     with_kwargs=True))
            else:
                handles.append(slot.module.register_forward_hook(_output_marker(slot.key)))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for target in patched:
            del target.forward  # back to the class's forward


def _input_marker(key: str, index: int):
    from quant.slots import call_input, replace_call_input

    def hook(module, args, kwargs):
        x = call_input(module, args, kwargs, index)
        if x is None:
            raise ValueError(f"cannot mark {key}: input {index} of {type(module).__name__} is not a tensor in this call")
        return replace_call_input(module, args, kwargs, index, mark(x, key))
    return hook


def _output_marker(key: str):
    def hook(module, args, output):
        if not isinstance(output, torch.Tensor):
            raise ValueError(f"cannot mark {key}: the output of {type(module).__name__} is not a tensor")
        return mark(output, key)
    return hook


@dataclass(frozen=True)
class GraphSignature:
    """Names, example inputs and dynamic axes of one exported component."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    example_inputs: tuple[torch.Tensor, ...]
    dynamic_axes: dict[str, dict[int, str]]


class UNetForExport(torch.nn.Module):
    """The UNet with SDXL's ``added_cond_kwargs`` as plain inputs (ONNX graphs take tensors only)."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}, return_dict=False)[0]


def unet_signature(unet: torch.nn.Module, batch: int = 2) -> GraphSignature:
    """Inputs of one CFG UNet call; the batch axis is dynamic (partial batches, Server's any size)."""
    config = unet.config
    size = int(config.sample_size)
    text_embeds = int(config.projection_class_embeddings_input_dim) - 6 * int(config.addition_time_embed_dim)
    generator = torch.Generator().manual_seed(0)  # the same example every call: tests compare against it
    example = (torch.randn(batch, int(config.in_channels), size, size, generator=generator), torch.full((batch,), 951.0),
               torch.randn(batch, 77, int(config.cross_attention_dim), generator=generator),
               torch.randn(batch, text_embeds, generator=generator),
               torch.tensor([[size * 8.0, size * 8.0, 0.0, 0.0, size * 8.0, size * 8.0]] * batch))
    names = ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")
    return GraphSignature(names, ("noise_pred",), example, {n: {0: "batch"} for n in names + ("noise_pred",)})


class TextEncoderForExport(torch.nn.Module):
    """A CLIP text encoder returning what SDXL reads of it: the penultimate layer's hidden states and,
    with ``pooled``, the pooled projection (``text_encoder_2``'s ``text_embeds``)."""

    def __init__(self, encoder: torch.nn.Module, pooled: bool):
        super().__init__()
        self.encoder = encoder
        self.pooled = pooled

    def forward(self, input_ids):
        out = self.encoder(input_ids, output_hidden_states=True)
        return (out.hidden_states[-2], out[0]) if self.pooled else out.hidden_states[-2]


def text_encoder_signature(encoder: torch.nn.Module, pooled: bool, batch: int = 1) -> GraphSignature:
    """Token ids of ``batch`` prompts (77 tokens, end-padded as SDXL's tokenizers pad); batch axis dynamic."""
    ids = torch.full((batch, 77), int(encoder.config.eos_token_id))
    ids[:, 0] = int(encoder.config.bos_token_id)
    ids[:, 1:9] = torch.arange(1000, 1008)
    outputs = ("hidden_states", "pooled") if pooled else ("hidden_states",)
    return GraphSignature(("input_ids",), outputs, (ids,), {n: {0: "batch"} for n in ("input_ids",) + outputs})


class VaeDecoderForExport(torch.nn.Module):
    """The VAE's decode (``post_quant_conv`` and the decoder): unscaled latents in, images in [-1, 1] out."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent, return_dict=False)[0]


def vae_decoder_signature(vae: torch.nn.Module, batch: int = 1) -> GraphSignature:
    """Latents of ``batch`` images at the VAE's image size (its ``sample_size``, downsampled once per
    block but the last); batch axis dynamic."""
    config = vae.config
    size = int(config.sample_size) // 2 ** (len(config.block_out_channels) - 1)
    example = torch.randn(batch, int(config.latent_channels), size, size, generator=torch.Generator().manual_seed(0))
    return GraphSignature(("latent",), ("image",), (example,), {"latent": {0: "batch"}, "image": {0: "batch"}})


def component_graph(component: str, module: torch.nn.Module,
                    batch: int = 1) -> tuple[torch.nn.Module, GraphSignature, str]:
    """What :func:`export_onnx` exports of a pipeline component: the module to trace, its signature,
    and the prefix of the component's quantizer keys inside it."""
    if component == "unet":
        return UNetForExport(module), unet_signature(module, batch), "unet."
    if component in ("text_encoder", "text_encoder_2"):
        pooled = component == "text_encoder_2"  # SDXL's pooled text embedding is the second encoder's
        return TextEncoderForExport(module, pooled), text_encoder_signature(module, pooled, batch), "encoder."
    if component == "vae":
        return VaeDecoderForExport(module), vae_decoder_signature(module, batch), "vae."
    raise ValueError(f"no ONNX graph for component {component!r}")


def export_onnx(module: torch.nn.Module, signature: GraphSignature, path: Path,
                marks: Iterable[str] = (), prefix: str = "", stream_weights: bool | None = None,
                channel_groups: Mapping[str, list] | None = None) -> Path:
    """Export ``module`` (marked at ``marks``, keys relative to ``module``) to ``path``, opset 21.

    ``channel_groups``: the grouped marks' channel ranges (see :func:`marked`).

    ``prefix`` is the path of the keyed module inside ``module`` (``"unet."`` for :class:`UNetForExport`).
    The file is written to a temporary name and renamed, so an interrupted export never leaves a model
    that a later run would load.

    ``stream_weights`` (default: when the weights pass protobuf's 2 GB limit) exports the graph with
    the weights as inputs, then writes them one tensor at a time to ``<name>.data`` as external
    initializers (:func:`attach_external_weights`). The exporter's own path holds 3.5-4.5 copies of the
    model (36-46 GB for SDXL's 10.3 GB UNet); this one holds the module plus one tensor. Constant
    folding is off on that path (it would make unnamed copies of weights); ONNX Runtime folds at load.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keyed = module.get_submodule(prefix.rstrip(".")) if prefix else module
    marks = list(marks)
    if stream_weights is None:
        stream_weights = parameter_bytes(module) >= EXTERNAL_DATA_BYTES - (64 << 20)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
        raw = Path(tmp) / "raw.onnx"
        with marked(keyed, marks, channel_groups), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript tracer warnings on diffusers' shape checks
            torch.onnx.export(module, signature.example_inputs, str(raw), dynamo=False, opset_version=EXPORT_OPSET,
                              input_names=list(signature.input_names), output_names=list(signature.output_names),
                              dynamic_axes=signature.dynamic_axes, do_constant_folding=not stream_weights,
                              export_params=not stream_weights, custom_opsets={MARK_DOMAIN: 1} if marks else None)
        model = onnx.load(str(raw))  # streamed: the graph alone, its weights are inputs
        if stream_weights:
            attach_external_weights(model, module.state_dict(), set(signature.input_names), path)
        upgrade_opset(model)
        save_model(model, path)
    return path


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


_ONNX_DTYPES = {torch.float32: "FLOAT", torch.float16: "FLOAT16", torch.bfloat16: "BFLOAT16", torch.int64: "INT64",
                torch.int32: "INT32", torch.bool: "BOOL", torch.uint8: "UINT8", torch.int8: "INT8"}


def attach_external_weights(model, tensors: dict[str, torch.Tensor], graph_inputs: set[str], path: Path) -> None:
    """Turn the weight inputs of a graph exported without parameters into external initializers.

    Each weight's bytes go straight from the tensor's memory to ``<path name>.data`` (64-byte aligned),
    so the model is never copied. The data file is complete before the graph that names it is saved.
    """
    from onnx import TensorProto

    data_name = Path(path).name + ".data"
    data_tmp = Path(path).with_name(f".{data_name}.tmp")
    kept, offset = [], 0
    with open(data_tmp, "wb") as out:
        for value in list(model.graph.input):
            if value.name in graph_inputs:
                kept.append(value)
                continue
            if value.name not in tensors:
                raise ValueError(f"exported graph input {value.name!r} is neither a signature input nor a weight")
            tensor = tensors[value.name].detach().cpu().contiguous()
            raw = tensor.reshape(-1).view(torch.uint8).numpy()
            out.write(b"\0" * (-offset % 64))
            offset += -offset % 64
            proto = TensorProto(name=value.name, dims=list(tensor.shape),
                                data_type=getattr(TensorProto, _ONNX_DTYPES[tensor.dtype]))
            proto.data_location = TensorProto.EXTERNAL
            for key, entry in (("location", data_name), ("offset", offset), ("length", raw.nbytes)):
                proto.external_data.add(key=key, value=str(entry))
            out.write(raw.data)
            offset += raw.nbytes
            model.graph.initializer.append(proto)
    os.replace(data_tmp, Path(path).with_name(data_name))
    del model.graph.input[:]
    model.graph.input.extend(kept)


def upgrade_opset(model) -> None:
    """Declare opset 21 (uint16/int16 Q/DQ); refuses graphs holding ops whose meaning changed in 21."""
    breaking = sorted({n.op_type for n in model.graph.node if n.op_type in _OPSET_21_BREAKING and n.domain == ""})
    if breaking:
        raise ValueError(f"cannot lift the export to opset {TARGET_OPSET}: it uses {', '.join(breaking)}")
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, TARGET_OPSET)


def save_model(model, path: Path) -> Path:
    """Save atomically; weights go to ``<name>.data`` beside the model above protobuf's 2 GB limit.

    A model whose weights are already external (a streamed export) keeps them where they are.
    """
    import onnx

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if _has_external_data(model):
        onnx.save_model(model, str(tmp))  # only the graph: the data file is in place already
    elif initializer_bytes(model) >= EXTERNAL_DATA_BYTES - (64 << 20):
        # the data file is written under its final name; only the small graph file needs the rename
        onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(tmp))
    os.replace(tmp, path)
    return path


def _has_external_data(model) -> bool:
    from onnx import TensorProto

    return any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)


def remove_model(path: Path) -> None:
    """Delete an ONNX file and its external data file, if any."""
    Path(path).unlink(missing_ok=True)
    Path(path).with_name(Path(path).name + ".data").unlink(missing_ok=True)


def initializer_bytes(model) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def cache_key(*parts: Any) -> str:
    """A short, stable key over JSON-able parts (model fingerprint, export settings, encodings hash)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def initializer_array(tensor, base_dir: Path | str | None = None):
    """``tensor``'s values; external data is read through a read-only memory map of its file, so a
    full-size export's weights are paged in one at a time (``numpy_helper.to_array`` would load each
    into the TensorProto and keep it there)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    if tensor.data_location != TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    info = {entry.key: entry.value for entry in tensor.external_data}
    if base_dir is None:
        raise ValueError(f"initializer {tensor.name} is external ({info.get('location')}): its directory is needed")
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    data = np.memmap(Path(base_dir) / info["location"], dtype=np.uint8, mode="r",
                     offset=int(info.get("offset", 0)), shape=(int(info.get("length", count * dtype.itemsize)),))
    return data.view(dtype).reshape(tuple(tensor.dims))
