"""Fake quantization of PyTorch modules from encodings, and the torch backend's entry point.

Weights are q/dq'd once, in place (no second copy of a 10 GB UNet; the FP32 values come back from
the checkpoint or, for random profiles, from the seed). Activations get q/dq forward hooks -- module
names stay exactly the ones in the encodings, which is what lets the ONNX Runtime backend map keys to
graph tensors. Entries with ``timesteps`` ranges pick their encoding from the step that a pre-hook on
the component's root reads from the UNet's ``timestep`` argument.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from .attention import add_attention_matmuls, names_attention_matmuls
from .context import TimestepFromArgument, current_timestep
from .encodings import Encoding, Encodings, EncodingsError, parse_key
from .quantizers import QParams, fake_quantize

log = logging.getLogger(__name__)
Entries = Mapping[str, "Encoding | list[Encoding]"]


def _channel_axis_size(module: torch.nn.Module, kind: str, axis: int) -> int | None:
    """Expected channel count of an activation along ``axis``, where the module type tells it."""
    if isinstance(module, torch.nn.Linear) and axis == -1:
        return module.in_features if kind == "input" else module.out_features
    if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d)) and axis == 1:
        return module.in_channels if kind == "input" else module.out_channels
    return None


def validate_encodings(module: torch.nn.Module, entries: Entries, where: str = "encodings") -> None:
    """Check every key names a module of ``module`` and every per-channel shape fits; raise naming the key.

    Keys naming attention matmuls (``...attn1.bmm_qk:input[0]``) first give ``module`` those modules
    (:func:`quant.attention.add_attention_matmuls`): they are part of the model the keys describe.
    """
    if names_attention_matmuls(parse_key(key)[0] for key in entries):
        add_attention_matmuls(module)
    modules = dict(module.named_modules())
    for key, value in entries.items():
        name, kind, index = parse_key(key)
        here = f"{where}: {key}"
        target = modules.get(name)
        if target is None:
            close = difflib.get_close_matches(name, modules.keys(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise EncodingsError(f"{here}: no module {name!r} in this model{hint}")
        for enc in value if isinstance(value, list) else [value]:
            if kind == "weight":
                weight = getattr(target, "weight", None)
                if not isinstance(weight, torch.Tensor) or index != 0:
                    raise EncodingsError(f"{here}: module {name!r} ({type(target).__name__}) has no such weight")
                if enc.axis is not None and enc.channels > 1:
                    if not -weight.dim() <= enc.axis < weight.dim() or weight.shape[enc.axis] != enc.channels:
                        raise EncodingsError(f"{here}: {enc.channels} channels on axis {enc.axis} but the weight has "
                                             f"shape {tuple(weight.shape)}")
            elif enc.axis is not None and enc.channels > 1:
                expected = _channel_axis_size(target, kind, enc.axis)
                if expected is not None and expected != enc.channels:
                    raise EncodingsError(f"{here}: {enc.channels} channels on axis {enc.axis} but {name!r} has {expected}")


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


def _input_hook(quantizer: _Quantizer, index: int):
    def hook(module, args):
        if len(args) > index and isinstance(args[index], torch.Tensor):
            return args[:index] + (quantizer(args[index]),) + args[index + 1:]
        return None
    return hook


def _output_hook(quantizer: _Quantizer):
    def hook(module, args, output):
        return quantizer(output) if isinstance(output, torch.Tensor) else None
    return hook


def apply_encodings(module: torch.nn.Module, entries: Entries, component: str = "model",
                    where: str = "encodings") -> FakeQuantHandle:
    """Validate ``entries`` against ``module``, q/dq its weights in place and hook its activations."""
    validate_encodings(module, entries, where)
    modules = dict(module.named_modules())
    handle = FakeQuantHandle(component, sorted(entries))
    ranged = False
    for key, value in sorted(entries.items()):
        name, kind, index = parse_key(key)
        target = modules[name]
        quantizer = _Quantizer(value)
        ranged |= isinstance(value, list)
        if kind == "weight":
            with torch.no_grad():
                target.weight.copy_(quantizer(target.weight))
        elif kind == "input":
            handle.handles.append(target.register_forward_pre_hook(_input_hook(quantizer, index)))
        else:
            handle.handles.append(target.register_forward_hook(_output_hook(quantizer)))
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
                "quantizers": {c: len(h.keys) for c, h in self.handles.items()},
                "size": {**self.encodings.size, "total": total_size(self.encodings.size)} if self.encodings.size else {}}


def apply_to_components(components, encodings: Encodings, source: str,
                        skip: tuple[str, ...] = ()) -> AppliedQuantization:
    """Apply each component section of ``encodings`` to the matching module of ``components``.

    ``skip`` names components another runtime quantizes from the same encodings (the ONNX Runtime
    backend's UNet): they are checked here but left unhooked.
    """
    applied = AppliedQuantization(encodings, source)
    for name, entries in encodings.components.items():
        module = getattr(components, name, None)
        if module is None:
            raise EncodingsError(f"{source}: component {name!r} is not part of this model")
        if name in skip:
            validate_encodings(module, entries, f"{source}: {name}")
            continue
        applied.handles[name] = apply_encodings(module, entries, name, f"{source}: {name}")
    return applied


def _check_fingerprint(encodings: Encodings, spec, source: str, allow_mismatch: bool) -> None:
    expected = encodings.model.get("fingerprint")
    if not expected:
        return
    actual = spec.fingerprint()
    if expected != actual:
        message = (f"{source} was calibrated for model {expected} but this is {actual} "
                   f"(profile {spec.profile}); recalibrate, or pass allow_fingerprint_mismatch")
        if not allow_mismatch:
            raise EncodingsError(message)
        log.warning(message)


def load_weights_delta(components, encodings: Encodings, encodings_path: Path) -> None:
    """Overwrite weights changed by a method (SmoothQuant, CLE, AdaRound...) from the delta beside the file."""
    if not encodings.weights_delta:
        return
    from safetensors.torch import load_file

    path = encodings_path.parent / encodings.weights_delta
    if not path.is_file():
        raise EncodingsError(f"{encodings_path}: weights_delta {path} not found")
    for full_name, tensor in load_file(str(path)).items():
        component, _, param_name = full_name.partition(".")
        module = getattr(components, component, None)
        params = dict(module.named_parameters()) if module is not None else {}
        if param_name not in params or params[param_name].shape != tensor.shape:
            raise EncodingsError(f"{path}: {full_name} does not match a parameter of this model")
        with torch.no_grad():
            params[param_name].copy_(tensor)


def load_encodings_for(components, path: str | Path, allow_fingerprint_mismatch: bool = False) -> Encodings:
    """An encodings file for ``components``: checked against the model's fingerprint, its weights delta loaded.

    The one way a backend gets quantization: encodings are calibrated before (``calibrate``, or
    ``run --recipe`` in its own process) and only loaded here; no backend calibrates.
    """
    path = Path(path)
    encodings = Encodings.load(path)
    _check_fingerprint(encodings, components.spec, str(path), allow_fingerprint_mismatch)
    load_weights_delta(components, encodings, path)
    return encodings
