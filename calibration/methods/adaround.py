"""``adaround``: learn whether each weight rounds up or down (Nagel et al. 2020; AIMET's ``Adaround``).

Round-to-nearest minimises each weight's own error, not the layer's output error. AdaRound learns, per
weight, a continuous variable ``V`` whose rectified sigmoid ``h(V) = clip(sigmoid(V) (zeta - gamma) +
gamma, 0, 1)`` (zeta 1.1, gamma -0.1) is the rounding: ``W_soft = s (floor(W / s) + h(V) - z)``
clipped to the grid. Per Conv/Linear in execution order it minimises

    ||layer_soft(x_q) - y_fp||^2 + reg * sum(1 - |2 h(V) - 1| ** beta)

with ``x_q`` the layer's input in the model whose earlier layers are already rounded (weights only,
as AIMET's default), ``y_fp`` the FP32 model's output of that layer, the regulariser off for the
first 20% of the iterations, then ``beta`` annealed from 20 to 2 (``schedule``: AIMET's cosine or
Q-Diffusion's linear), reg 0.01, Adam lr 1e-3, ``V`` initialised so that ``h(V)`` is the fractional
part (the soft weight starts at the FP32 weight). At the end ``h`` is hardened (``V >= 0`` rounds up).
The reconstruction term is AIMET's ``AdaroundLoss.compute_recon_loss`` (and BRECQ's ``lp_loss``): the
squared error summed over dim 1 (a Conv's channels; a 2-D Linear output's features), averaged over the
rest -- not a plain mean, which would weigh the regulariser ``C_out`` times more than AIMET does
(``tests/test_aimet_oracle.py`` checks the roundings against ``aimet_torch``'s).

It runs after the weight encodings (``post_weight_ranges``), which stay frozen: the result is weights
exactly on the recipe's grid, written to the weights delta, so every backend runs them. Integer
grids only (FP8 has no rounding grid of this form). AIMET's default is 10,000 iterations (15,000
below 8 bits); a recipe sets fewer to fit a CPU, and the stats record the count and the loss.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from quant.encodings import tensor_key
from quant.quantizers import _broadcast
from quant.slots import call_input

from . import register_method
from .base import Method, MethodError, MethodResult, MethodTarget, execution_order, run_data

ZETA, GAMMA = 1.1, -0.1


def _rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


@register_method
class AdaRound(Method):
    kind = "adaround"
    phase = "post_weight_ranges"

    @dataclass(frozen=True)
    class Settings:
        iterations: int = 10000
        #: calls of the component whose inputs are cached per layer (AIMET caches 32 batches)
        samples: int = 32
        reg: float = 0.01
        beta_start: float = 20.0
        beta_end: float = 2.0
        warm_start: float = 0.2
        lr: float = 1e-3
        #: beta annealing: cosine (AIMET) or linear (Q-Diffusion's LinearTempDecay)
        schedule: str = "cosine"
        seed: int = 0

    @classmethod
    def check_settings(cls, settings: "AdaRound.Settings") -> str | None:
        if settings.iterations < 1 or settings.samples < 1:
            return "iterations and samples must be >= 1"
        if settings.schedule not in ("cosine", "linear"):
            return f"schedule {settings.schedule!r} is not cosine or linear"
        if not 0.0 <= settings.warm_start < 1.0:
            return f"warm_start {settings.warm_start} is outside [0, 1)"
        return None

    def run(self, target: MethodTarget) -> MethodResult:
        if target.forward_loop is None:
            raise MethodError("adaround needs calibration data (a forward loop)")
        layers = [p for p in target.plans if isinstance(p.module, (torch.nn.Linear, torch.nn.Conv2d))
                  and tensor_key(p.name, "weight") in target.entries]
        for plan in layers:
            if target.entries[tensor_key(plan.name, "weight")].qparams().fmt.is_float:
                raise MethodError(f"adaround: {plan.name}'s weights are {plan.weights.dtype}, a float format with "
                                  "no rounding grid; use it with integer weights")
        module = target.module
        order = execution_order(module, {p.name for p in layers}, target.forward_loop, self.settings.samples)
        by_name = {p.name: p for p in layers}
        rounded = copy.deepcopy(module)  # earlier layers rounded: where each layer's inputs come from
        q_modules, fp_modules = dict(rounded.named_modules()), dict(module.named_modules())
        result = MethodResult()
        losses = {}
        torch.manual_seed(self.settings.seed)
        for name in order:
            inputs, targets = self._cache(rounded, q_modules[name], module, fp_modules[name], target.forward_loop)
            qp = target.entries[tensor_key(name, "weight")].qparams()
            weight, loss = self._optimise(fp_modules[name], qp, inputs, targets)
            with torch.no_grad():
                q_modules[name].weight.copy_(weight)
            result.weights[f"{name}.weight"] = weight.to(by_name[name].module.weight.dtype)
            losses[name] = loss
        result.stats = {"layers": len(losses), "iterations": self.settings.iterations, "samples": self.settings.samples,
                        "reconstruction_mse": {n: [round(a, 8), round(b, 8)] for n, (a, b) in list(losses.items())[:20]}}
        return result

    def _cache(self, rounded, q_layer, module, fp_layer, loop) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The layer's inputs in the rounded model, and its FP32 outputs in the FP32 model, per call."""
        inputs: list[torch.Tensor] = []
        targets: list[torch.Tensor] = []

        def keep_input(m, args, kwargs):
            x = call_input(m, args, kwargs, 0)
            if x is not None:
                inputs.append(x.detach().clone())

        def keep_output(m, args, output):
            targets.append(output.detach().clone())

        run_data(rounded, loop, self.settings.samples,
                 [q_layer.register_forward_pre_hook(keep_input, with_kwargs=True, prepend=True)])
        run_data(module, loop, self.settings.samples, [fp_layer.register_forward_hook(keep_output)])
        return inputs, targets

    def _optimise(self, layer, qp, inputs, targets) -> tuple[torch.Tensor, tuple[float, float]]:
        """The rounded weight of ``layer`` and (round-to-nearest MSE, AdaRound MSE) on the cached data."""
        settings = self.settings
        rounding = SoftRounding(layer.weight, qp)
        optimiser = torch.optim.Adam([rounding.v], lr=settings.lr)

        def mse(w: torch.Tensor) -> float:
            with torch.no_grad():
                return float(sum(((layer_output(layer, w, x) - y) ** 2).mean() for x, y in zip(inputs, targets))
                             / len(inputs))

        nearest = mse(rounding.nearest())
        for step in range(settings.iterations):
            index = step % len(inputs)
            loss = lp_loss(layer_output(layer, rounding.soft(), inputs[index]), targets[index], 2.0)
            beta = annealed_beta(step, settings)
            if beta is not None:
                loss = loss + settings.reg * rounding.regulariser(beta)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        hard = rounding.hard()
        return hard, (nearest, mse(hard))


def lp_loss(pred: torch.Tensor, target: torch.Tensor, p: float) -> torch.Tensor:
    """``|pred - target|^p`` summed over dim 1, averaged over the rest: BRECQ's ``lp_loss`` (AIMET's
    AdaRound loss at p = 2)."""
    diff = (pred - target).abs().pow(p)
    return (diff.sum(1) if diff.dim() > 1 else diff).mean()


def layer_output(layer: torch.nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``layer`` (Linear or Conv2d) applied to ``x`` with ``weight`` in place of its own."""
    if isinstance(layer, torch.nn.Linear):
        return torch.nn.functional.linear(x, weight, layer.bias)
    return layer._conv_forward(x, weight, layer.bias)


def annealed_beta(step: int, settings) -> float | None:
    """The regulariser's exponent at ``step``: None during the warm start, then ``beta_start`` -> ``beta_end``."""
    warm = int(settings.warm_start * settings.iterations)
    if step < warm:
        return None
    progress = (step - warm) / max(1, settings.iterations - warm)
    if settings.schedule == "cosine":
        return settings.beta_end + 0.5 * (settings.beta_start - settings.beta_end) * (1 + math.cos(math.pi * progress))
    return settings.beta_start + (settings.beta_end - settings.beta_start) * progress


class SoftRounding:
    """One weight's learnable rounding on its frozen grid: ``V``, the soft weight, its regulariser, the hard one."""

    def __init__(self, weight: torch.Tensor, qp):
        weight = weight.detach().float()
        self.qp = qp
        self.scale = _broadcast(qp.scale, weight, qp.axis)
        self.offset = _broadcast(qp.offset, weight, qp.axis)
        self.floor = torch.floor(weight / self.scale)
        self.rest = weight / self.scale - self.floor
        rest = self.rest.clamp(1e-4, 1 - 1e-4)
        self.v = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)).requires_grad_(True)

    def _weight(self, h: torch.Tensor) -> torch.Tensor:
        q = (self.floor + h + self.offset).clamp(self.qp.fmt.qmin, self.qp.fmt.qmax)
        return (q - self.offset) * self.scale

    def soft(self) -> torch.Tensor:
        return self._weight(_rectified_sigmoid(self.v))

    def regulariser(self, beta: float) -> torch.Tensor:
        return (1 - (2 * _rectified_sigmoid(self.v) - 1).abs().pow(beta)).sum()

    def nearest(self) -> torch.Tensor:
        return self._weight((self.rest >= 0.5).float())

    def hard(self) -> torch.Tensor:
        return self._weight((self.v.detach() >= 0).float())
