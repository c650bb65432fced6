"""Encodings applied to PyTorch modules: fake quantization, methods' weight changes and pre-scales.

What a calibration method changed is applied first (:func:`load_weights_delta` writes the delta's
parameters, adding a bias a layer lacked; :func:`install_pre_scales` multiplies inputs per channel);
then weights are q/dq'd once, in place (no second copy of a 10 GB UNet; the FP32 values come back from
the checkpoint or, for random profiles, from the seed). Activations get q/dq forward hooks -- module
names stay exactly the ones in the encodings, which is what lets the ONNX Runtime backend map keys to
graph tensors. Entries with ``timesteps`` ranges pick their encoding from the step that a pre-hook on
the component's root reads from the UNet's ``timestep`` argument. Backends only load encodings
(:func:`load_encodings_for`); calibrating them is ``calibration``'s work, done before.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from .attention import add_attention_matmuls, names_attention_matmuls
from .context import TimestepFromArgument, current_timestep
from .encodings import Encoding, Encodings, EncodingsError, PreScale, parse_key
from .quantizers import QParams, fake_quantize
from .slots import Slot, input_pre_hook, resolve_slots

log = logging.getLogger(__name__)
Entries = Mapping[str, "Encoding | list[Encoding]"]


def _channel_axis_size(module: torch.nn.Module, kind: str, axis: int) -> int | None:
    """Expected channel count of an activation along ``axis``, where the module type tells it."""
    if isinstance(module, torch.nn.Linear) and axis == -1:
        return module.in_features if kind == "input" else module.out_features
    if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d)) and axis == 1:
        return module.in_channels if kind == "input" else module.out_channels
    return None


def validate_encodings(module: torch.nn.Module, entries: Entries, where: str = "encodings") -> list[Slot]:
    """Check every key names a module of ``module`` and every per-channel shape fits; raise naming the key.

    Keys naming attention matmuls (``...attn1.bmm_qk:input[0]``) first give ``module`` those modules
    (:func:`quant.attention.add_attention_matmuls`): they are part of the model the keys describe.
    Returns the resolved slots, in key order.
    """
    if names_attention_matmuls(parse_key(key)[0] for key in entries):
        add_attention_matmuls(module)
    slots = resolve_slots(module, entries, where)
    for slot in slots:
        here = f"{where}: {slot.key}"
        value = entries[slot.key]
        for enc in value if isinstance(value, list) else [value]:
            if enc.channel_groups:
                _check_groups(slot, enc, here)
            if slot.kind == "weight":
                weight = getattr(slot.module, "weight", None)
                if not isinstance(weight, torch.Tensor) or slot.index != 0:
                    raise EncodingsError(f"{here}: module {slot.name!r} ({type(slot.module).__name__}) has no such weight")
                if enc.axis is not None and enc.group_channels > 1:
                    if not -weight.dim() <= enc.axis < weight.dim() or weight.shape[enc.axis] != enc.group_channels:
                        raise EncodingsError(f"{here}: {enc.group_channels} channels on axis {enc.axis} but the weight "
                                             f"has shape {tuple(weight.shape)}")
            elif enc.axis is not None and enc.group_channels > 1:
                expected = _channel_axis_size(slot.module, slot.kind, enc.axis)
                if expected is not None and expected != enc.group_channels:
                    raise EncodingsError(f"{here}: {enc.group_channels} channels on axis {enc.axis} but {slot.name!r} "
                                         f"has {expected}")
    return slots


def _check_groups(slot: Slot, enc: Encoding, here: str) -> None:
    """A grouped entry must name a Conv2d's input or weight, split along its input channels, all of them."""
    module = slot.module
    if not isinstance(module, torch.nn.Conv2d) or slot.kind == "output" or enc.group_axis != 1:
        raise EncodingsError(f"{here}: channel groups split a Conv2d's input or weight along axis 1 (input "
                             f"channels), not {slot.kind} axis {enc.group_axis} of {type(module).__name__}")
    if enc.channel_groups[-1][1] != module.in_channels:
        raise EncodingsError(f"{here}: channel groups {enc.channel_groups} do not cover the "
                             f"{module.in_channels} input channels of {slot.name!r}")


def install_pre_scales(module: torch.nn.Module, pre_scales: Mapping[str, PreScale],
                       where: str = "pre_scales") -> list:
    """Multiply each named input by its per-channel pre-scale; returns the hook handles.

    Installed before any quantizer hook of the same module, so the quantizer (and an observer) sees
    the scaled input, as the ``Mul`` before the ``QuantizeLinear`` in the ONNX export does.
    """
    handles = []
    for slot in resolve_slots(module, pre_scales, where):
        pre = pre_scales[slot.key]
        expected = _channel_axis_size(slot.module, "input", pre.axis)
        if slot.kind != "input" or (expected is not None and expected != len(pre.scale)):
            raise EncodingsError(f"{where}: {slot.key}: {len(pre.scale)} factors on axis {pre.axis} do not fit "
                                 f"{slot.name!r} ({type(slot.module).__name__})")
        hook = input_pre_hook(slot.index, lambda m, x, pre=pre: x * pre.tensor(x))
        handles.append(slot.module.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


@contextlib.contextmanager
def pre_scaled(module: torch.nn.Module, pre_scales: Mapping[str, PreScale]) -> Iterator[None]:
    """Within the block, ``module`` multiplies its inputs by ``pre_scales`` (the ONNX export traces them as ``Mul``)."""
    handles = install_pre_scales(module, pre_scales)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def set_parameters(module: torch.nn.Module, values: Mapping[str, torch.Tensor], where: str) -> None:
    """Write parameter values a method produced (or a delta file holds) into ``module``, in place.

    A ``<layer>.bias`` that the layer lacks is added (bias correction on ``to_q``/``to_k``/``to_v``,
    which have none; AIMET adds zero biases first); any other name must be a parameter of that shape.
    """
    params = dict(module.named_parameters())
    layers = dict(module.named_modules())
    for name, tensor in values.items():
        owner, _, leaf = name.rpartition(".")
        layer = layers.get(owner)
        if name not in params and leaf == "bias" and isinstance(layer, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)) \
                and layer.bias is None and tuple(tensor.shape) == (layer.weight.shape[0],):
            layer.bias = torch.nn.Parameter(tensor.to(layer.weight), requires_grad=False)
            continue
        if name not in params or params[name].shape != tensor.shape:
            raise EncodingsError(f"{where}: {name} {tuple(tensor.shape)} does not match a parameter of this model")
        with torch.no_grad():
            params[name].copy_(tensor)


class _Quantizer:
    """The q/dq of one key: a single QParams, or a list picked by the current timestep."""

    def __init__(self, value: Encoding | list[Encoding]):
        if isinstance(value, list):
            self.ranged = [(e.timesteps[0], e.timesteps[1], e.qparams()) for e in value]
            self.ranged.sort(key=lambda r: -r[1])
            self.fixed: QParams | None = None
        else:
            self.ranged, self.fixed = [], value.qparams()

    def qparams(self) -> QParams:
        if self.fixed is not None:
            return self.fixed
        t = current_timestep()
        if t is not None:
            for lo, hi, qp in self.ranged:
                if lo <= t <= hi:
                    return qp
        return self.ranged[0][2]  # no step known / outside every range: the noisiest step's encoding

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize(x, self.qparams())


@dataclass
class FakeQuantHandle:
    """What :func:`apply_encodings` installed on one module; ``remove()`` takes the hooks off."""

    component: str
    keys: list[str]
    handles: list = field(default_factory=list)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _output_hook(quantizer: _Quantizer):
    def hook(module, args, output):
        return quantizer(output) if isinstance(output, torch.Tensor) else None
    return hook


def apply_encodings(module: torch.nn.Module, entries: Entries, component: str = "model",
                    where: str = "encodings", pre_scales: Mapping[str, PreScale] | None = None) -> FakeQuantHandle:
    """Validate ``entries`` against ``module``, q/dq its weights in place and hook its activations.

    ``pre_scales`` (a method's per-channel input factors) are hooked first, so each input quantizer
    sees the scaled input; pass them only to a model that does not carry them yet.
    """
    slots = validate_encodings(module, entries, where)
    handle = FakeQuantHandle(component, sorted(entries))
    handle.handles.extend(install_pre_scales(module, pre_scales or {}, f"{where}: pre_scales"))
    ranged = False
    for slot in slots:
        value = entries[slot.key]
        quantizer = _Quantizer(value)
        ranged |= isinstance(value, list)
        if slot.kind == "weight":
            with torch.no_grad():
                slot.module.weight.copy_(quantizer(slot.module.weight))
        elif slot.kind == "input":
            hook = input_pre_hook(slot.index, lambda m, x, q=quantizer: q(x))
            handle.handles.append(slot.module.register_forward_pre_hook(hook, with_kwargs=True))
        else:
            handle.handles.append(slot.module.register_forward_hook(_output_hook(quantizer)))
    if ranged:
        handle.handles.extend(TimestepFromArgument().register(module))
    return handle


@dataclass
class AppliedQuantization:
    """What the torch backend records in ``run.json``: source, recipe, quantizer counts, sizes."""

    encodings: Encodings
    source: str
    handles: dict[str, FakeQuantHandle] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        from .sizes import total_size

        return {"source": self.source, "recipe": self.encodings.recipe.get("name"),
                "model_fingerprint": self.encodings.model.get("fingerprint"),
                "methods": [{k: m.get(k) for k in ("kind", "component", "phase", "settings")} for m in self.encodings.methods],
                "quantizers": {c: len(h.keys) for c, h in self.handles.items()},
                "size": {**self.encodings.size, "total": total_size(self.encodings.size)} if self.encodings.size else {}}


def apply_to_components(components, encodings: Encodings, source: str,
                        skip: tuple[str, ...] = ()) -> AppliedQuantization:
    """Apply each component section of ``encodings`` to the matching module of ``components``.

    ``skip`` names components another runtime quantizes from the same encodings (the ONNX Runtime
    backend's UNet): they are checked here but left unhooked (that runtime's graph carries their
    pre-scales and quantizers).
    """
    applied = AppliedQuantization(encodings, source)
    for name, entries in encodings.components.items():
        module = getattr(components, name, None)
        if module is None:
            raise EncodingsError(f"{source}: component {name!r} is not part of this model")
        if name in skip:
            validate_encodings(module, entries, f"{source}: {name}")
            continue
        applied.handles[name] = apply_encodings(module, entries, name, f"{source}: {name}",
                                                encodings.pre_scales.get(name))
    return applied


def check_fingerprint(encodings: Encodings, spec, source: str, allow_mismatch: bool) -> None:
    expected = encodings.model.get("fingerprint")
    if not expected:
        return
    actual = spec.fingerprint()
    if expected != actual:
        message = (f"{source} was calibrated for model {expected} but this is {actual} "
                   f"(profile {spec.profile}): calibrate this model (./run.sh calibrate --profile {spec.profile} ...)")
        if not allow_mismatch:
            raise EncodingsError(message)
        log.warning(message)


def load_weights_delta(components, encodings: Encodings, encodings_path: Path) -> None:
    """Write the parameters methods changed (SmoothQuant, CLE, AdaRound, bias correction...) into ``components``.

    The delta file beside the encodings is checked against its recorded sha256 (a 1.0 file records
    none: the hash is taken now, so caches keyed on it still see a changed delta).
    """
    if not encodings.weights_delta:
        return
    from safetensors.torch import load_file

    from sdxl.dataset import file_sha256

    path = encodings_path.parent / encodings.weights_delta
    if not path.is_file():
        raise EncodingsError(f"{encodings_path}: weights_delta {path} not found")
    digest = file_sha256(path)
    if encodings.weights_delta_sha256 not in (None, digest):
        raise EncodingsError(f"{path}: sha256 {digest} is not the {encodings.weights_delta_sha256} that "
                             f"{encodings_path} was written with (a delta from another calibration?)")
    encodings.weights_delta_sha256 = digest
    by_component: dict[str, dict[str, torch.Tensor]] = {}
    for full_name, tensor in load_file(str(path)).items():
        component, _, param_name = full_name.partition(".")
        by_component.setdefault(component, {})[param_name] = tensor
    for component, values in by_component.items():
        module = getattr(components, component, None)
        if module is None:
            raise EncodingsError(f"{path}: component {component!r} is not part of this model")
        set_parameters(module, values, str(path))


def load_encodings_for(components, path: str | Path, allow_fingerprint_mismatch: bool = False) -> Encodings:
    """An encodings file for ``components``: checked against the model's fingerprint, its weights delta loaded.

    The one way a backend gets quantization: encodings are calibrated before (``calibrate``, or
    ``run --recipe`` in its own process) and only loaded here; no backend calibrates.
    """
    path = Path(path)
    encodings = Encodings.load(path)
    check_fingerprint(encodings, components.spec, str(path), allow_fingerprint_mismatch)
    load_weights_delta(components, encodings, path)
    return encodings
