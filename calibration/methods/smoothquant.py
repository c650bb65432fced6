"""``smoothquant``: migrate activation outliers into the weights (Xiao et al.; seed 003, local).

For a layer ``y = W x`` and per input channel ``s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha)``
(mit-han-lab/smoothquant's ``smooth_ln_fcs``, ``max|X|`` over the calibration data, clamped at 1e-5),
``x_j / s_j`` and ``W_:,j * s_j`` give the same ``y``: the input's outlier channels shrink, the
weights' matching columns grow, and per-tensor activation quantization loses less. ``alpha`` is a
recipe setting (modelopt recommends 0.8 for SDXL, Brevitas 0.9, the paper 0.5 for LLMs).

The ``1/s`` is an explicit per-channel pre-scale of the layer's input (fake quant hooks it, the ONNX
QDQ export writes a ``Mul`` before the input's Q/DQ). Folding it into a preceding LayerNorm/GroupNorm
affine, as the reference does for LLMs, is exact only when that norm feeds nothing else; not done yet.

Which layers (``select``): ``all`` planned Conv/Linear layers, ``linear`` (modelopt's SmoothQuant
applies to Linear layers), or seed 003's choice of the most quantization-sensitive ones:
``top_k`` (the ``top_k`` layers whose *input* has the lowest quantization SQNR under the recipe's input
quantizer, per-tensor min-max over the calibration data) or ``sqnr_below`` (every layer below
``sqnr_below_db``). The input's SQNR is the sensitivity smoothing addresses; the ranking is recorded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from quant.encodings import PreScale, tensor_key
from quant.quantizers import fake_quantize, qparams_from_range
from quant.slots import call_input

from . import register_method
from .base import Method, MethodError, MethodResult, MethodTarget, run_data

SELECTIONS = ("all", "linear", "top_k", "sqnr_below")


def _channel_axis(layer: torch.nn.Module) -> int:
    return -1 if isinstance(layer, torch.nn.Linear) else 1


class _InputStats:
    """Per-input-channel absmax, and the running quantization error of the input under the recipe's quantizer."""

    def __init__(self, axis: int):
        self.axis = axis
        self.absmax: torch.Tensor | None = None
        self.lo = math.inf
        self.hi = -math.inf

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        per_channel = x.abs().movedim(self.axis, 0).reshape(x.shape[self.axis], -1).amax(dim=1)
        self.absmax = per_channel if self.absmax is None else torch.maximum(self.absmax, per_channel)
        self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))


@register_method
class SmoothQuant(Method):
    kind = "smoothquant"
    phase = "pre_ranges"

    @dataclass(frozen=True)
    class Settings:
        #: migration strength in [0, 1]: 0 leaves activations alone, 1 moves all of their range into the weights
        alpha: float = 0.8
        #: which layers: all, linear, top_k, sqnr_below (module docstring)
        select: str = "all"
        top_k: int = 10
        sqnr_below_db: float = 30.0

    @classmethod
    def check_settings(cls, settings: "SmoothQuant.Settings") -> str | None:
        if not 0.0 <= settings.alpha <= 1.0:
            return f"alpha {settings.alpha} is outside [0, 1]"
        if settings.select not in SELECTIONS:
            return f"select {settings.select!r} is not one of {', '.join(SELECTIONS)}"
        if settings.top_k < 1:
            return f"top_k {settings.top_k} must be >= 1"
        return None

    def run(self, target: MethodTarget) -> MethodResult:
        if target.forward_loop is None:
            raise MethodError("smoothquant needs calibration data (a forward loop) for the activation maxima")
        plans = [p for p in target.plans if isinstance(p.module, (torch.nn.Linear, torch.nn.Conv2d))
                 and getattr(p.module, "groups", 1) == 1 and p.inputs is not None]
        stats = {p.name: _InputStats(_channel_axis(p.module)) for p in plans}
        errors = self._observe(target, plans, stats)
        chosen = self._select(plans, errors)
        result = MethodResult()
        alpha = self.settings.alpha
        for plan in chosen:
            layer, observed = plan.module, stats[plan.name]
            weight = layer.weight.detach().float()
            w_absmax = weight.abs().movedim(1, 0).reshape(weight.shape[1], -1).amax(dim=1)
            x_absmax = observed.absmax.clamp(min=1e-5)
            scale = (x_absmax.pow(alpha) / w_absmax.clamp(min=1e-5).pow(1.0 - alpha)).clamp(min=1e-5)
            shape = [1, -1] + [1] * (weight.dim() - 2)
            result.weights[f"{plan.name}.weight"] = (weight * scale.reshape(shape)).to(layer.weight.dtype)
            result.pre_scales[tensor_key(plan.name, "input")] = PreScale(observed.axis, [float(1.0 / v) for v in scale])
        ranking = sorted(errors.items(), key=lambda item: item[1])
        result.stats = {"alpha": alpha, "select": self.settings.select, "layers": [p.name for p in chosen],
                        "input_sqnr_db_lowest": [[name, round(db, 2)] for name, db in ranking[:10]]}
        return result

    def _observe(self, target: MethodTarget, plans: list, stats: dict[str, _InputStats]) -> dict[str, float]:
        """Two passes over the data: the inputs' ranges, then their quantization error under the recipe's quantizer."""
        run_data(target.module, target.forward_loop, handles=[p.module.register_forward_pre_hook(
            lambda m, args, kwargs, s=stats[p.name]: s.observe(call_input(m, args, kwargs, 0)), with_kwargs=True)
            for p in plans])
        if self.settings.select not in ("top_k", "sqnr_below"):
            return {}
        power = {p.name: [0.0, 0.0] for p in plans}
        quantizers = {}
        for plan in plans:
            s, spec = stats[plan.name], plan.inputs
            quantizers[plan.name] = qparams_from_range(torch.tensor([s.lo]), torch.tensor([s.hi]), spec.grid,
                                                       spec.symmetric)

        def measure(name: str):
            def hook(m, args, kwargs):
                x = call_input(m, args, kwargs, 0).detach().float()
                power[name][0] += float((x ** 2).sum())
                power[name][1] += float(((x - fake_quantize(x, quantizers[name])) ** 2).sum())
            return hook

        run_data(target.module, target.forward_loop,
                 handles=[p.module.register_forward_pre_hook(measure(p.name), with_kwargs=True) for p in plans])
        return {name: (math.inf if err == 0 else 10.0 * math.log10(sig / err)) for name, (sig, err) in power.items()}

    def _select(self, plans: list, errors: dict[str, float]) -> list:
        select = self.settings.select
        if select == "all":
            return plans
        if select == "linear":
            return [p for p in plans if isinstance(p.module, torch.nn.Linear)]
        ranked = sorted(plans, key=lambda p: errors[p.name])
        if select == "top_k":
            return ranked[: self.settings.top_k]
        return [p for p in ranked if errors[p.name] < self.settings.sqnr_below_db]
