"""``weight_balance``: equalize each layer's weight columns, moving the factor into a pre-scale of its input.

For a Linear or Conv layer ``y = W x``, ``W[:, j] / s_j`` and ``x_j * s_j`` give the same ``y`` in exact
arithmetic (in FP32, to rounding), so the transform is free before quantization; it trades weight
range for activation range per input channel -- SmoothQuant's migration with the activation side
left out (``s_j = (max_i |W_ij| / mean_k max_i |W_ik|) ^ strength``; ``strength`` 0 changes nothing,
1 makes every column's absmax equal). It needs no data.

It ships as the slot's worked example: a ``pre_ranges`` method whose results -- changed weights and
per-input pre-scales -- every backend must apply to stay equivalent to FP32. It is not a quality
method, and nothing is claimed for it: balancing weights widens activation ranges by the same factor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quant.encodings import PreScale, tensor_key

from . import register_method
from .base import Method, MethodResult, MethodTarget


@register_method
class WeightBalance(Method):
    kind = "weight_balance"
    phase = "pre_ranges"

    @dataclass(frozen=True)
    class Settings:
        #: exponent of the balancing factor, in [0, 1]
        strength: float = 1.0

    @classmethod
    def check_settings(cls, settings: "WeightBalance.Settings") -> str | None:
        return None if 0.0 <= settings.strength <= 1.0 else f"strength {settings.strength} is outside [0, 1]"

    def run(self, target: MethodTarget) -> MethodResult:
        result = MethodResult()
        spreads = []
        for plan in target.plans:
            layer = plan.module
            if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) or getattr(layer, "groups", 1) != 1:
                continue
            weight = layer.weight.detach().float()
            column_absmax = weight.abs().movedim(1, 0).reshape(weight.shape[1], -1).amax(dim=1)
            if not bool((column_absmax > 0).all()):
                continue  # a dead input channel has no factor to balance with
            factor = (column_absmax / column_absmax.mean()).pow(self.settings.strength)
            shape = [1, -1] + [1] * (weight.dim() - 2)
            result.weights[f"{plan.name}.weight"] = (weight / factor.reshape(shape)).to(layer.weight.dtype)
            axis = -1 if isinstance(layer, torch.nn.Linear) else 1
            result.pre_scales[tensor_key(plan.name, "input")] = PreScale(axis, [float(v) for v in factor])
            spreads.append(float(column_absmax.max() / column_absmax.min()))
        result.stats = {"layers": len(spreads),
                        "largest_column_range_ratio_before": round(max(spreads), 3) if spreads else None}
        return result
