"""``bias_correction``: remove the mean shift quantization adds to each layer's output (AIMET, empirical mode).

Nagel et al. 2019 (AIMET's ``bias_correction.correct_bias``, empirical variant): quantization error
of the weights (and inputs) is biased, ``E[W_q x] != E[W x]``, and the shift adds up through the
network. For each quantized Conv/Linear in execution order, feed the calibration data through the
*quantized* model with the corrections made so far, and at that layer compare its quantized output
with the FP32 layer's output on the same incoming activations; subtract the mean difference (over
everything but the output-channel axis) from the layer's bias. Layers without a bias get one, as
AIMET adds zero biases first. The corrected biases are the method's result (written to the weights
delta), so every backend runs them.

It runs after the ranges (``post_ranges``): it needs the activation encodings, and leaves them and the
weight encodings as they are. AIMET advises against combining it with AdaRound on one component.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from quant.fake_quant import apply_encodings, set_parameters
from quant.slots import call_input

from . import register_method
from .base import Method, MethodError, MethodResult, MethodTarget, execution_order, run_data


def _channel_axis(layer: torch.nn.Module) -> int:
    return -1 if isinstance(layer, torch.nn.Linear) else 1


@register_method
class BiasCorrection(Method):
    kind = "bias_correction"
    phase = "post_ranges"

    @dataclass(frozen=True)
    class Settings:
        #: calls of the component per layer's measurement (the forward loop is cut after this many)
        samples: int = 8

    @classmethod
    def check_settings(cls, settings: "BiasCorrection.Settings") -> str | None:
        return None if settings.samples >= 1 else f"samples {settings.samples} must be >= 1"

    def run(self, target: MethodTarget) -> MethodResult:
        if target.forward_loop is None:
            raise MethodError("bias_correction needs calibration data (a forward loop)")
        module = target.module
        plans = [p for p in target.plans if isinstance(p.module, (torch.nn.Linear, torch.nn.Conv2d))]
        order = execution_order(module, [p.name for p in plans], target.forward_loop, self.settings.samples)
        quantized = copy.deepcopy(module)
        apply_encodings(quantized, target.entries, target.component, where="bias_correction")
        q_layers, fp_layers = dict(quantized.named_modules()), dict(module.named_modules())
        result = MethodResult()
        shifts = []
        for name in order:
            shift = self._mean_shift(quantized, q_layers[name], fp_layers[name], target.forward_loop)
            if shift is None:
                continue
            layer = fp_layers[name]
            bias = layer.bias.detach().float() if layer.bias is not None else torch.zeros_like(shift)
            corrected = (bias - shift).to(layer.weight.dtype)
            set_parameters(quantized, {f"{name}.bias": corrected}, "bias_correction")  # later layers see it
            result.weights[f"{name}.bias"] = corrected
            shifts.append((name, float(shift.abs().mean())))
        shifts.sort(key=lambda item: -item[1])
        result.stats = {"layers": len(shifts), "largest_mean_abs_shift": [[n, round(v, 6)] for n, v in shifts[:5]]}
        return result

    def _mean_shift(self, quantized: torch.nn.Module, q_layer: torch.nn.Module, fp_layer: torch.nn.Module,
                    loop) -> torch.Tensor | None:
        """Mean over the data of (quantized layer output - FP32 layer output), per output channel."""
        axis = _channel_axis(q_layer)
        total: list[torch.Tensor] = []
        count = [0]

        def raw_input(m, args, kwargs):  # before the quantizer's own pre-hooks: the activation that arrives
            x = call_input(m, args, kwargs, 0)
            raw_input.x = x.detach().clone() if x is not None else None

        def compare(m, args, kwargs, output):
            if raw_input.x is None or not isinstance(output, torch.Tensor):
                return
            reference = fp_layer(raw_input.x)
            diff = (output.detach().float() - reference.detach().float()).movedim(axis, 0)
            total.append(diff.reshape(diff.shape[0], -1).sum(dim=1))
            count[0] += diff[0].numel()

        raw_input.x = None
        run_data(quantized, loop, self.settings.samples,
                 [q_layer.register_forward_pre_hook(raw_input, with_kwargs=True, prepend=True),
                  q_layer.register_forward_hook(compare, with_kwargs=True)])
        if not total:
            return None
        return torch.stack(total).sum(dim=0) / count[0]
