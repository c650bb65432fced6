"""``quantize(module, recipe, forward_loop) -> Encodings``: the one entry point every PTQ method builds on.

Shaped like modelopt's ``mtq.quantize(model, config, forward_loop)`` and AIMET's
``sim.compute_encodings(callback)``: the algorithm sees a module and a callable that runs
representative data through it -- never prompts or the pipeline -- so the same code calibrates the
UNet, the text encoders or the VAE, and a unit test can drive it with three random tensors.

Observers watch FP32 activations (quantizers pass data through while calibrating, as in modelopt's
and AIMET's calibration mode); weights need no data. With ``apply=True`` (modelopt's behaviour) the
module leaves fake-quantized: weights q/dq'd in place, activation q/dq hooks installed.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from quant.attention import add_attention_matmuls
from quant.encodings import Encoding, Encodings, tensor_key
from quant.quantizers import qparams_from_range
from quant.sizes import model_size
from quant.slots import call_input

from .observers import Observer, Range, TimestepKeyedObserver, make_observer
from .recipes import LayerPlan, QuantizerSpec, Recipe, RecipeError, load_recipe

log = logging.getLogger(__name__)

ForwardLoop = Callable[[torch.nn.Module], None]
TIMESTEP_KEYS = ("per_timestep", "timestep_groups")  # observer options that weights (data-free) ignore


def _encoding(observer: Observer, spec: QuantizerSpec, axis: int | None, rng: Range | None = None,
              timesteps: tuple[int, int] | None = None) -> Encoding:
    lo, hi = rng if rng is not None else observer.compute_range(spec.grid, spec.symmetric)
    qp = qparams_from_range(lo, hi, spec.grid, spec.symmetric, axis=axis if lo.numel() > 1 else None)
    # the calibrated (pre-nudging) range is kept so later methods can re-derive other bit widths
    provenance = {**observer.describe(), "range_min": [float(v) for v in lo], "range_max": [float(v) for v in hi]}
    return Encoding.from_qparams(qp, observer=provenance, timesteps=timesteps)


def activation_encoding(observer: Observer, spec: QuantizerSpec, axis: int | None) -> Encoding | list[Encoding]:
    """One encoding, or with ``per_timestep: ranged`` a list of timestep-ranged ones (noisiest first)."""
    if isinstance(observer, TimestepKeyedObserver) and observer.combine == "ranged":
        return [_encoding(observer, spec, axis, rng, steps)
                for steps, rng in observer.grouped_ranges(spec.grid, spec.symmetric)]
    return _encoding(observer, spec, axis)


def weight_encoding(plan: LayerPlan) -> Encoding:
    """The weight quantizer of one layer, straight from the weight tensor."""
    spec = plan.weights
    axis = spec.resolved_axis(plan.module, "weights")
    observer = make_observer({k: v for k, v in spec.observer.items() if k not in TIMESTEP_KEYS}, axis)
    observer.update(plan.module.weight)
    return _encoding(observer, spec, axis)


class ActivationObservers:
    """Observer hooks on the inputs/outputs of planned layers; removed by :meth:`remove`."""

    def __init__(self, plans: list[LayerPlan]):
        self.observers: dict[str, tuple[Observer, QuantizerSpec, int | None]] = {}
        self._handles = []
        for plan in plans:
            if plan.inputs is not None:
                axis = plan.inputs.resolved_axis(plan.module, "inputs")
                for index in range(getattr(plan.module, "quantized_inputs", 1)):  # MatMul: both operands
                    obs = make_observer(plan.inputs.observer, axis)
                    self.observers[tensor_key(plan.name, "input", index)] = (obs, plan.inputs, axis)
                    self._handles.append(plan.module.register_forward_pre_hook(self._pre_hook(obs, index),
                                                                               with_kwargs=True))
            if plan.outputs is not None:
                axis = plan.outputs.resolved_axis(plan.module, "outputs")
                obs = make_observer(plan.outputs.observer, axis)
                self.observers[tensor_key(plan.name, "output")] = (obs, plan.outputs, axis)
                self._handles.append(plan.module.register_forward_hook(self._post_hook(obs)))

    @staticmethod
    def _pre_hook(obs: Observer, index: int):
        def hook(module, args, kwargs):
            x = call_input(module, args, kwargs, index)
            if x is not None:
                obs.update(x)
        return hook

    @staticmethod
    def _post_hook(obs: Observer):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor):
                obs.update(output)
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def encodings(self) -> dict[str, Encoding | list[Encoding]]:
        out = {}
        for key, (obs, spec, axis) in self.observers.items():
            if obs.count == 0:
                log.warning("%s never ran during calibration; left in high precision", key)
                continue
            out[key] = activation_encoding(obs, spec, axis)
        return out


def quantize(module: torch.nn.Module, recipe: Recipe | str | dict, forward_loop: ForwardLoop | None = None, *,
             component: str = "model", apply: bool = True) -> Encodings:
    """Calibrate ``module`` with ``recipe`` over ``forward_loop(module)``; return (and by default apply) encodings."""
    recipe = load_recipe(recipe)
    if "MatMul" in recipe.types:
        add_attention_matmuls(module)
    plans, excluded = recipe.plan(module)
    if not plans:
        raise RecipeError(f"{recipe.source}: matches no {'/'.join(recipe.types)} module of {component}")
    entries: dict[str, Encoding | list[Encoding]] = {}
    for plan in plans:
        if plan.weights is not None and getattr(plan.module, "weight", None) is not None:
            entries[tensor_key(plan.name, "weight")] = weight_encoding(plan)
    hooks = ActivationObservers(plans)
    if hooks.observers:
        if forward_loop is None:
            raise ValueError(f"recipe {recipe.name} quantizes activations: quantize() needs a forward_loop")
        try:
            with torch.inference_mode():
                forward_loop(module)
        finally:
            hooks.remove()
        entries.update(hooks.encodings())
    encodings = Encodings(components={component: entries}, recipe=recipe.to_json(), excluded={component: excluded})
    encodings.size[component] = model_size(module, entries)
    if apply:
        from quant.fake_quant import apply_encodings

        apply_encodings(module, entries, component)
    return encodings
