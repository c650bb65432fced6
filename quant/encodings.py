"""The one encodings format every method writes: JSON modelled on AIMET 2.0.0 / ONNX ``QuantizeLinear``.

Layout (``format: sdxl-ptq-bench/encodings``, documented with an example in ``docs/calibration.md``)::

    {"format": "sdxl-ptq-bench/encodings", "version": "1.1.0", "scheme_table_version": 1,
     "recipe": {...}, "model": {"profile": ..., "fingerprint": ...}, "calibration": {...},
     "methods": [{"kind", "component", "phase", "settings", "seconds", "stats"}, ...],
     "weights_delta": null | "<file>.safetensors", "weights_delta_sha256": null | "<hex>",
     "size": {<component>: {...}}, "excluded": {<component>: [...]},
     "pre_scales": {<component>: {"<module>:input[i]": {"axis": a, "scale": [...]}}},
     "components": {"unet": {"<module>:<input|weight|output>[i]": Entry | [Entry, ...]}}}

An ``Entry`` is ``{dtype, bits, symmetric, axis, scale[], offset[], min[], max[]}`` plus optional
``timesteps: [lo, hi]`` (inclusive; a key may hold a list of entries with disjoint ranges),
``channel_groups`` + ``group_axis`` (a tensor quantized as several, see below) and ``observer`` (provenance). ``dtype`` is the ONNX/AIMET-2.0.0 ``output_dtype``
name, ``scale`` the ``y_scale`` and ``offset`` the ONNX ``y_zero_point`` (``q = round(x/scale) + offset``);
arrays have one element per channel along ``axis`` (``axis: null`` = per-tensor, length 1). Sections
are per component because the two text encoders share module names.

Version 1.1 holds what calibration methods produce, as data every backend applies the same way:
``weights_delta`` names a safetensors file beside this one with the parameters methods changed
(``<component>.<parameter>``; a ``bias`` a layer lacked is added), checked against its sha256 on
load; ``pre_scales`` multiply a layer's input per channel before its quantizer (a ``Mul`` in the ONNX
export: SmoothQuant where ``1/s`` cannot fold into the previous op); ``methods`` records which
methods ran, with their settings and cost. Files of version 1.0 still load.

A *grouped* entry (Q-Diffusion's shortcut splitting: a layer reading ``cat([h, skip])`` quantizes each
operand with its own encoding) has ``channel_groups: [[lo, hi], ...]``, contiguous half-open channel
ranges along ``group_axis`` that cover it; ``scale``/``offset``/``min``/``max`` hold group 0's values,
then group 1's, each group as a plain entry would (one value per-tensor, one per channel along
``axis`` otherwise). :meth:`Encoding.groups` gives each group's own entry; :meth:`Encoding.qparams`
the equivalent elementwise quantizer, which is what fake quantization runs -- exactly the per-group
q/dq, since groups do not overlap.

Keys name real module paths inside the component (``down_blocks.1.attentions.0...to_q:weight[0]``);
attention matmuls use the modules ``<attention>.bmm_qk`` (inputs Q, K^T) and ``<attention>.bmm_pv``
(inputs softmax, V). :func:`quant.fake_quant.validate_encodings` checks names, kinds and shapes
against the model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdxl.errors import UserError

from .formats import SCHEME_TABLE_VERSION, get_format
from .quantizers import QParams

FORMAT_NAME = "sdxl-ptq-bench/encodings"
FORMAT_VERSION = "1.1.0"
#: versions this code reads (1.0 files have no pre-scales, no methods and no delta checksum)
READABLE_VERSIONS = ("1.0.0", "1.1.0")
KEY_RE = re.compile(r"^(?P<module>[A-Za-z0-9_.]+):(?P<kind>input|weight|output)\[(?P<index>\d+)\]$")


class EncodingsError(UserError, ValueError):
    """A bad encodings file or recipe; the message names the file and the offending key."""


def tensor_key(module: str, kind: str, index: int = 0) -> str:
    """``tensor_key("conv1", "weight") -> "conv1:weight[0]"`` -- the one spelling of a quantizer's name."""
    return f"{module}:{kind}[{index}]"


def parse_key(key: str) -> tuple[str, str, int]:
    match = KEY_RE.match(key)
    if not match:
        raise EncodingsError(f"bad encodings key {key!r}: expected '<module>:<input|weight|output>[i]'")
    return match["module"], match["kind"], int(match["index"])


@dataclass
class Encoding:
    """One quantizer's parameters (see the module docstring for the JSON spelling)."""

    dtype: str
    bits: int
    symmetric: bool
    axis: int | None
    scale: list[float]
    offset: list[int]
    min: list[float]
    max: list[float]
    timesteps: tuple[int, int] | None = None
    channel_groups: list[list[int]] | None = None
    observer: dict[str, Any] | None = None
    group_axis: int | None = None

    def __post_init__(self) -> None:
        if not self.min or not self.max:  # derived, so hand-written entries may leave them out
            lo, hi = self.qparams().range()
            self.min, self.max = [float(v) for v in lo], [float(v) for v in hi]

    @classmethod
    def from_qparams(cls, qp: QParams, observer: dict[str, Any] | None = None,
                     timesteps: tuple[int, int] | None = None) -> "Encoding":
        lo, hi = qp.range()
        return cls(qp.fmt.name, qp.fmt.bits, bool(qp.symmetric), qp.axis,
                   [float(v) for v in qp.scale.float()], [int(v) for v in qp.offset],
                   [float(v) for v in lo.float()], [float(v) for v in hi.float()], timesteps, None, observer)

    @classmethod
    def grouped(cls, parts: list["Encoding"], ranges: list[tuple[int, int]], group_axis: int) -> "Encoding":
        """One entry quantizing channel range ``ranges[g]`` along ``group_axis`` with ``parts[g]``."""
        first = parts[0]
        if len(parts) != len(ranges) or any((p.dtype, p.symmetric, p.axis, p.channels, p.channel_groups)
                                            != (first.dtype, first.symmetric, first.axis, first.channels, None)
                                            for p in parts):
            raise EncodingsError("grouped encodings need one plain part per range, all of one format and shape")
        observers = [p.observer for p in parts]
        return cls(first.dtype, first.bits, first.symmetric, first.axis, [v for p in parts for v in p.scale],
                   [v for p in parts for v in p.offset], [v for p in parts for v in p.min],
                   [v for p in parts for v in p.max], first.timesteps, [list(r) for r in ranges],
                   {"groups": observers} if any(observers) else None, group_axis)

    def groups(self) -> list["Encoding"]:
        """Each channel group's own (plain) entry, in order; ``[self]`` for an ungrouped one."""
        if not self.channel_groups:
            return [self]
        n = len(self.scale) // len(self.channel_groups)
        observers = (self.observer or {}).get("groups") or [None] * len(self.channel_groups)
        return [Encoding(self.dtype, self.bits, self.symmetric, self.axis, self.scale[g * n:(g + 1) * n],
                         self.offset[g * n:(g + 1) * n], self.min[g * n:(g + 1) * n], self.max[g * n:(g + 1) * n],
                         self.timesteps, None, observers[g])
                for g in range(len(self.channel_groups))]

    def qparams(self) -> QParams:
        """The quantizer; a grouped entry's is elementwise along ``group_axis`` (and ``axis``), each
        channel carrying its group's scale and offset."""
        scale = torch.tensor(self.scale, dtype=torch.float32)
        offset = torch.tensor(self.offset, dtype=torch.float32)
        if not self.channel_groups:
            return QParams(get_format(self.dtype), scale, offset, self.axis, self.symmetric)
        widths = torch.tensor([hi - lo for lo, hi in self.channel_groups])
        n = len(self.scale) // len(self.channel_groups)
        # (groups, n) -> per channel of group_axis, then (n, C) when there is a per-channel axis too
        scale = scale.reshape(-1, n).repeat_interleave(widths, dim=0)
        offset = offset.reshape(-1, n).repeat_interleave(widths, dim=0)
        if self.axis is None:
            return QParams(get_format(self.dtype), scale.reshape(-1), offset.reshape(-1), self.group_axis,
                           self.symmetric)
        axes = (self.axis, self.group_axis)
        if self.axis > self.group_axis:
            return QParams(get_format(self.dtype), scale, offset, axes[::-1], self.symmetric)
        return QParams(get_format(self.dtype), scale.T.contiguous(), offset.T.contiguous(), axes, self.symmetric)

    @property
    def channels(self) -> int:
        """Scales this entry holds (channels along ``axis``, times the groups of a grouped entry)."""
        return len(self.scale)

    @property
    def group_channels(self) -> int:
        """Channels along ``axis`` in each group (1 per-tensor): ``channels`` of a plain entry."""
        return len(self.scale) // max(1, len(self.channel_groups or ()))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dtype": self.dtype, "bits": self.bits, "symmetric": self.symmetric, "axis": self.axis,
                               "scale": self.scale, "offset": self.offset, "min": self.min, "max": self.max}
        if self.timesteps is not None:
            out["timesteps"] = list(self.timesteps)
        if self.channel_groups is not None:
            out["channel_groups"], out["group_axis"] = self.channel_groups, self.group_axis
        if self.observer is not None:
            out["observer"] = self.observer
        return out

    @classmethod
    def from_json(cls, data: Any, where: str) -> "Encoding":
        """Parse and check one entry; ``where`` (file and key) prefixes every error."""
        if not isinstance(data, dict):
            raise EncodingsError(f"{where}: an encoding must be an object, got {type(data).__name__}")
        missing = [k for k in ("dtype", "scale") if k not in data]
        if missing:
            raise EncodingsError(f"{where}: missing field(s) {', '.join(missing)}")
        try:
            fmt = get_format(str(data["dtype"]))
        except ValueError as exc:
            raise EncodingsError(f"{where}: {exc}") from None
        scale = [float(v) for v in _as_list(data["scale"])]
        offset = [int(v) for v in _as_list(data.get("offset", [0] * len(scale)))]
        if not scale or len(offset) != len(scale):
            raise EncodingsError(f"{where}: scale and offset must be non-empty and of equal length "
                                 f"(got {len(scale)} and {len(offset)})")
        if any(not s > 0 or s != s or s == float("inf") for s in scale):
            raise EncodingsError(f"{where}: every scale must be a finite positive number")
        if not fmt.is_float and any(not fmt.qmin <= o <= fmt.qmax for o in offset):
            raise EncodingsError(f"{where}: offset outside [{fmt.qmin}, {fmt.qmax}] of {fmt.name}")
        axis = data.get("axis")
        if axis is None and len(scale) != 1 and data.get("channel_groups") is None:
            raise EncodingsError(f"{where}: {len(scale)} scales but no axis (per-tensor needs exactly one)")
        bits = int(data.get("bits", fmt.bits))
        if bits != fmt.bits:
            raise EncodingsError(f"{where}: bits {bits} does not match dtype {fmt.name}")
        groups, group_axis = _channel_groups(data, len(scale), axis, where)
        return cls(fmt.name, bits, bool(data.get("symmetric", True)), None if axis is None else int(axis), scale, offset,
                   [float(v) for v in _as_list(data.get("min", []))], [float(v) for v in _as_list(data.get("max", []))],
                   tuple(data["timesteps"]) if data.get("timesteps") is not None else None,
                   groups, data.get("observer"), group_axis)


def _channel_groups(data: dict[str, Any], scales: int, axis: Any, where: str) -> tuple[list[list[int]] | None, int | None]:
    """``channel_groups`` (contiguous ``[lo, hi)`` ranges from 0) and ``group_axis`` of an entry, checked."""
    groups = data.get("channel_groups")
    if groups is None:
        return None, None
    group_axis = data.get("group_axis")
    ok = isinstance(groups, list) and len(groups) >= 2 and all(
        isinstance(g, list) and len(g) == 2 and all(isinstance(v, int) for v in g) for g in groups)
    if not ok or not isinstance(group_axis, int) or group_axis == axis:
        raise EncodingsError(f"{where}: channel_groups is a list of two or more [lo, hi] ranges with an integer "
                             "group_axis other than axis")
    if groups[0][0] != 0 or any(a[1] != b[0] for a, b in zip(groups, groups[1:])) or any(lo >= hi for lo, hi in groups):
        raise EncodingsError(f"{where}: channel_groups {groups} are not contiguous non-empty ranges from 0")
    if scales % len(groups):
        raise EncodingsError(f"{where}: {scales} scales do not split into {len(groups)} channel groups")
    if (axis is None) != (scales == len(groups)):
        raise EncodingsError(f"{where}: {scales} scales for {len(groups)} groups do not match axis {axis}")
    return groups, group_axis


@dataclass
class PreScale:
    """A per-channel factor applied to a layer's input before its quantizer: ``x * scale`` along ``axis``."""

    axis: int
    scale: list[float]

    def tensor(self, x: torch.Tensor) -> torch.Tensor:
        """``scale`` shaped to broadcast along ``axis`` of ``x``, in ``x``'s dtype and device."""
        shape = [1] * x.dim()
        shape[self.axis] = -1
        return torch.tensor(self.scale, dtype=x.dtype, device=x.device).reshape(shape)

    def to_json(self) -> dict[str, Any]:
        return {"axis": self.axis, "scale": self.scale}

    @classmethod
    def from_json(cls, data: Any, where: str) -> "PreScale":
        if not isinstance(data, dict) or "scale" not in data or not isinstance(data.get("axis"), int):
            raise EncodingsError(f"{where}: a pre-scale is {{axis: int, scale: [...]}}")
        scale = [float(v) for v in _as_list(data["scale"])]
        if not scale or any(not (v == v and 0 < abs(v) < float("inf")) for v in scale):
            raise EncodingsError(f"{where}: pre-scale factors must be finite and non-zero")
        return cls(int(data["axis"]), scale)


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


@dataclass
class Encodings:
    """Encodings of one component (what :func:`calibration.quantize` returns) or of several."""

    components: dict[str, dict[str, Encoding | list[Encoding]]] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    size: dict[str, Any] = field(default_factory=dict)
    weights_delta: str | None = None
    #: per component, the Conv2d/Linear modules a recipe kept in high precision (AIMET's ``excluded_layers``)
    excluded: dict[str, list[str]] = field(default_factory=dict)
    weights_delta_sha256: str | None = None
    pre_scales: dict[str, dict[str, PreScale]] = field(default_factory=dict)
    #: provenance: one record per method run on a component, in the order they ran
    methods: list[dict[str, Any]] = field(default_factory=list)
    #: parameters methods changed, ``<component>.<parameter>`` -> value; written by :meth:`save` as the delta file
    delta: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    #: what a method changed in the sampling loop, for the pipeline: ``{"noise_correction": {"kind": "qncd", ...}}``
    runtime: dict[str, Any] = field(default_factory=dict)
    #: in memory only, never saved: the FP32 values of the parameters in :attr:`delta` that are not an
    #: equivalence transform (rounded weights, corrected biases; a bias a method added: zeros), the reference
    #: a report compares the quantized model with. Same keys as :attr:`delta`.
    fp32_values: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def component(self, name: str) -> dict[str, Encoding | list[Encoding]]:
        return self.components.setdefault(name, {})

    def merge(self, other: "Encodings") -> "Encodings":
        """Add ``other``'s components (a later ``quantize`` of another component) to this file."""
        for name, entries in other.components.items():
            self.component(name).update(entries)
        for name, scales in other.pre_scales.items():
            self.pre_scales.setdefault(name, {}).update(scales)
        self.size.update(other.size)
        self.excluded.update(other.excluded)
        self.methods.extend(other.methods)
        self.delta.update(other.delta)
        self.fp32_values.update(other.fp32_values)
        self.runtime.update(other.runtime)
        return self

    def num_quantizers(self) -> int:
        return sum(len(v) for v in self.components.values())

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "scheme_table_version": SCHEME_TABLE_VERSION,
                "recipe": self.recipe, "model": self.model, "calibration": self.calibration,
                "methods": self.methods, "weights_delta": self.weights_delta,
                "weights_delta_sha256": self.weights_delta_sha256, "size": self.size, "excluded": self.excluded,
                **({"runtime": self.runtime} if self.runtime else {}),
                "pre_scales": {c: {k: v.to_json() for k, v in sorted(scales.items())}
                               for c, scales in self.pre_scales.items() if scales},
                "components": {c: {k: ([e.to_json() for e in v] if isinstance(v, list) else v.to_json())
                                   for k, v in sorted(entries.items())}
                               for c, entries in self.components.items()}}

    def save(self, path: str | Path) -> Path:
        """Write atomically (a killed run never leaves half a file that would load).

        With a :attr:`delta`, its tensors go first to ``<stem>.delta.safetensors`` beside ``path``, and
        the file records that name and its sha256; the JSON, written last, is what makes the pair whole.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.delta:
            from safetensors.torch import save_file

            from sdxl.dataset import file_sha256

            delta_path = path.with_name(f"{path.stem}.delta.safetensors")
            delta_tmp = delta_path.with_name(delta_path.name + ".tmp")
            save_file({k: v.detach().contiguous().cpu() for k, v in sorted(self.delta.items())}, str(delta_tmp))
            delta_tmp.replace(delta_path)
            self.weights_delta, self.weights_delta_sha256 = delta_path.name, file_sha256(delta_path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Encodings":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise EncodingsError(f"encodings file {path} not found") from None
        except IsADirectoryError:
            raise EncodingsError(f"encodings file {path} is a directory") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise EncodingsError(f"{path} is not valid JSON (truncated or not an encodings file): {exc}") from None
        return cls.from_json(data, str(path))

    @classmethod
    def from_json(cls, data: Any, where: str = "<encodings>") -> "Encodings":
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise EncodingsError(f"{where} is not an sdxl-ptq-bench encodings file (format != {FORMAT_NAME!r}); "
                                 "AIMET files are an export target, not an input")
        if str(data.get("version", "1.0.0")) not in READABLE_VERSIONS:
            raise EncodingsError(f"{where} is encodings version {data.get('version')}; this code reads "
                                 f"{', '.join(READABLE_VERSIONS)}")
        if int(data.get("scheme_table_version", 0)) > SCHEME_TABLE_VERSION:
            raise EncodingsError(f"{where} uses scheme table v{data['scheme_table_version']}, newer than this code's "
                                 f"v{SCHEME_TABLE_VERSION}")
        components: dict[str, dict[str, Encoding | list[Encoding]]] = {}
        for comp, entries in (data.get("components") or {}).items():
            parsed: dict[str, Encoding | list[Encoding]] = {}
            for key, value in entries.items():
                here = f"{where}: {comp}/{key}"
                if not KEY_RE.match(key):
                    raise EncodingsError(f"{here}: bad key, expected '<module>:<input|weight|output>[i]'")
                if isinstance(value, list):
                    parsed[key] = [Encoding.from_json(v, here) for v in value]
                    if any(e.timesteps is None for e in parsed[key]):
                        raise EncodingsError(f"{here}: a list of encodings needs a 'timesteps' range on each")
                else:
                    parsed[key] = Encoding.from_json(value, here)
            components[comp] = parsed
        pre_scales: dict[str, dict[str, PreScale]] = {}
        for comp, scales in (data.get("pre_scales") or {}).items():
            for key, value in scales.items():
                here = f"{where}: pre_scales/{comp}/{key}"
                if not KEY_RE.match(key) or parse_key(key)[1] != "input":
                    raise EncodingsError(f"{here}: a pre-scale applies to an input, '<module>:input[i]'")
                pre_scales.setdefault(comp, {})[key] = PreScale.from_json(value, here)
        return cls(components, data.get("recipe") or {}, data.get("model") or {}, data.get("calibration") or {},
                   data.get("size") or {}, data.get("weights_delta"), data.get("excluded") or {},
                   data.get("weights_delta_sha256"), pre_scales, list(data.get("methods") or []),
                   runtime=dict(data.get("runtime") or {}))
