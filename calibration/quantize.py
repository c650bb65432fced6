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
import time
from dataclasses import asdict
from typing import Any, Callable

import torch

from quant.attention import add_attention_matmuls
from quant.encodings import Encoding, Encodings, PreScale, parse_key, tensor_key
from quant.fake_quant import apply_encodings, install_pre_scales, set_parameters
from quant.quantizers import qparams_from_range
from quant.sizes import model_size
from quant.slots import call_input

from .methods import MethodError, MethodResult, MethodTarget, method_class
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
    """The weight quantizer of one layer, straight from the weight tensor (per input-channel group when split)."""
    spec = plan.weights
    axis = spec.resolved_axis(plan.module, "weights")
    parts = []
    for lo, hi in plan.channel_groups or [(0, None)]:
        observer = make_observer({k: v for k, v in spec.observer.items() if k not in TIMESTEP_KEYS}, axis)
        weight = plan.module.weight
        observer.update(weight if hi is None else weight[:, lo:hi])
        parts.append(_encoding(observer, spec, axis))
    return Encoding.grouped(parts, list(plan.channel_groups), 1) if plan.channel_groups else parts[0]


def _grouped(per_group: list[Encoding | list[Encoding]], groups, axis: int) -> Encoding | list[Encoding]:
    """Per-group encodings (each plain, or timestep-ranged lists of equal ranges) as grouped ones."""
    if isinstance(per_group[0], list):
        return [Encoding.grouped(list(parts), list(groups), axis) for parts in zip(*per_group)]
    return Encoding.grouped(per_group, list(groups), axis)


class ActivationObservers:
    """Observer hooks on the inputs/outputs of planned layers; removed by :meth:`remove`."""

    def __init__(self, plans: list[LayerPlan]):
        self.observers: dict[str, tuple[Observer, QuantizerSpec, int | None]] = {}
        #: a split input's groups: key -> (channel ranges, one observer per range)
        self.grouped: dict[str, tuple[tuple[tuple[int, int], ...], list[Observer]]] = {}
        self._handles = []
        for plan in plans:
            for index in range(getattr(plan.module, "quantized_inputs", 1)):  # MatMul: both operands
                spec = plan.input_spec(index)
                if spec is None:
                    continue
                axis = spec.resolved_axis(plan.module, "inputs")
                key = tensor_key(plan.name, "input", index)
                if plan.channel_groups:
                    if axis is not None:
                        raise RecipeError(f"{plan.name}: a split input is quantized per tensor in each group "
                                          "(TensorRT has no per-channel activation scales); use axis: null")
                    observers = [make_observer(spec.observer, None) for _ in plan.channel_groups]
                    self.grouped[key] = (plan.channel_groups, observers)
                else:
                    observers = [make_observer(spec.observer, axis)]
                self.observers[key] = (observers[0], spec, axis)
                self._handles.append(plan.module.register_forward_pre_hook(
                    self._pre_hook(observers, index, plan.channel_groups), with_kwargs=True))
            if plan.outputs is not None:
                axis = plan.outputs.resolved_axis(plan.module, "outputs")
                obs = make_observer(plan.outputs.observer, axis)
                self.observers[tensor_key(plan.name, "output")] = (obs, plan.outputs, axis)
                self._handles.append(plan.module.register_forward_hook(self._post_hook(obs)))

    @staticmethod
    def _pre_hook(observers: list[Observer], index: int, groups=()):
        def hook(module, args, kwargs):
            x = call_input(module, args, kwargs, index)
            if x is None:
                return
            if not groups:
                observers[0].update(x)
            for obs, (lo, hi) in zip(observers, groups):
                obs.update(x[:, lo:hi])
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
        out, idle = {}, []
        for key, (obs, spec, axis) in self.observers.items():
            if obs.count == 0:
                idle.append(key)
                continue
            if key in self.grouped:
                groups, observers = self.grouped[key]
                out[key] = _grouped([activation_encoding(o, spec, None) for o in observers], groups, 1)
            else:
                out[key] = activation_encoding(obs, spec, axis)
        if idle:  # one line, not one per layer (the VAE's encoder never runs in text-to-image)
            log.warning("%d quantized input(s) never ran during calibration, left in high precision: %s%s", len(idle),
                        ", ".join(idle[:3]), f" ... ({len(idle) - 3} more)" if len(idle) > 3 else "")
        return out


def _run_method(config, target: MethodTarget) -> tuple[MethodResult, dict[str, Any]]:
    """Run one configured method; its result and its provenance record."""
    cls = method_class(config.kind)
    started = time.perf_counter()
    result = cls(config.settings).run(target)
    record = {"kind": cls.kind, "component": target.component, "phase": cls.phase,
              "settings": asdict(config.settings), "changes_sampler": cls.changes_sampler,
              "seconds": round(time.perf_counter() - started, 3), "stats": result.stats}
    return result, record


class _Calibration:
    """One component's calibration: the encodings so far, and what methods changed, applied as they go."""

    def __init__(self, module: torch.nn.Module, recipe: Recipe, component: str, forward_loop: ForwardLoop | None,
                 work_dir=None):
        self.module, self.recipe, self.component, self.forward_loop = module, recipe, component, forward_loop
        self.work_dir = work_dir
        #: values of the parameters methods after the weight encodings changed, before they did (the FP32
        #: reference; ``pre_ranges`` changes are equivalence transforms, so they stay in it); an added bias: zeros
        self.fp_weights: dict[str, torch.Tensor] = {}
        self.plans, self.excluded = recipe.plan(module)
        if not self.plans:
            raise RecipeError(f"{recipe.source}: matches no {'/'.join(recipe.types)} module of {component}")
        self.entries: dict[str, Encoding | list[Encoding]] = {}
        self.pre_scales: dict[str, PreScale] = {}
        self.changed: set[str] = set()  # parameter names methods wrote
        self.records: list[dict[str, Any]] = []
        self.runtime: dict[str, Any] = {}

    def run_methods(self, phase: str) -> None:
        for config in self.recipe.methods:
            if method_class(config.kind).phase != phase:
                continue
            target = MethodTarget(self.module, self.component, self.plans, self.forward_loop, dict(self.entries),
                                  dict(self.pre_scales), self.work_dir, dict(self.fp_weights))
            result, record = _run_method(config, target)
            if phase != "pre_ranges":
                params = dict(self.module.named_parameters())
                for name, value in result.weights.items():
                    if name not in self.fp_weights:
                        self.fp_weights[name] = (params[name].detach().clone() if name in params
                                                 else torch.zeros_like(value))
            self._apply(result, phase, f"{self.recipe.source}: {config.kind} on {self.component}")
            if result.runtime and not method_class(config.kind).changes_sampler:
                raise MethodError(f"{self.recipe.source}: {config.kind} returned runtime settings but does not "
                                  "declare changes_sampler")
            self.runtime.update(result.runtime)
            self.records.append(record)

    def _apply(self, result: MethodResult, phase: str, where: str) -> None:
        """Check ``result`` against what ``phase`` may change, then apply it to the module at once."""
        if result.pre_scales and phase != "pre_ranges":
            raise MethodError(f"{where}: pre-scales can only be added before any range is observed (pre_ranges)")
        if result.encodings and phase != "post_ranges":
            raise MethodError(f"{where}: encodings can only be changed after the ranges (post_ranges)")
        frozen = [k for k in result.encodings if parse_key(k)[1] == "weight"]
        if frozen:
            raise MethodError(f"{where}: weight encodings are frozen once computed ({frozen[0]}); change the "
                              "weights instead")
        set_parameters(self.module, result.weights, where)
        self.changed.update(result.weights)
        for key, pre in result.pre_scales.items():
            install_pre_scales(self.module, {key: pre}, where)  # hooks compose: factors of two methods multiply
            if key in self.pre_scales:
                pre = PreScale(pre.axis, [a * b for a, b in zip(self.pre_scales[key].scale, pre.scale)])
            self.pre_scales[key] = pre
        self.entries.update(result.encodings)

    def compute_weight_encodings(self) -> None:
        for plan in self.plans:
            if plan.weights is not None and getattr(plan.module, "weight", None) is not None:
                self.entries[tensor_key(plan.name, "weight")] = weight_encoding(plan)

    def observe_activations(self) -> None:
        hooks = ActivationObservers(self.plans)
        if not hooks.observers:
            return
        if self.forward_loop is None:
            raise ValueError(f"recipe {self.recipe.name} quantizes activations: quantize() needs a forward_loop")
        try:
            with torch.inference_mode():
                self.forward_loop(self.module)
        finally:
            hooks.remove()
        self.entries.update(hooks.encodings())

    def encodings(self) -> Encodings:
        params = dict(self.module.named_parameters())
        component = self.component
        encodings = Encodings(components={component: self.entries}, recipe=self.recipe.to_json(),
                              excluded={component: self.excluded}, methods=self.records,
                              pre_scales={component: dict(self.pre_scales)} if self.pre_scales else {},
                              delta={f"{component}.{name}": params[name].detach().clone() for name in sorted(self.changed)},
                              fp32_values={f"{component}.{name}": v for name, v in sorted(self.fp_weights.items())},
                              runtime=dict(self.runtime))
        encodings.size[component] = model_size(self.module, self.entries)
        return encodings


def quantize(module: torch.nn.Module, recipe: Recipe | str | dict, forward_loop: ForwardLoop | None = None, *,
             component: str = "model", apply: bool = True, work_dir=None) -> Encodings:
    """Calibrate ``module`` with ``recipe`` over ``forward_loop(module)``; return (and by default apply) encodings.

    The recipe's methods for ``component`` run in their phases: ``pre_ranges`` ones, then the weight
    encodings (frozen from here on), ``post_weight_ranges`` ones, the activation ranges, ``post_ranges``
    ones. What methods change stays in ``module`` (changed weights, pre-scale hooks): it is the FP32
    model the encodings describe. With ``apply=True`` it also leaves fake-quantized. ``work_dir``: where
    long methods (block reconstruction) keep resumable state.
    """
    recipe = load_recipe(recipe).for_component(component)
    if "MatMul" in recipe.types:
        add_attention_matmuls(module)
    calibration = _Calibration(module, recipe, component, forward_loop, work_dir)
    calibration.run_methods("pre_ranges")
    calibration.compute_weight_encodings()
    calibration.run_methods("post_weight_ranges")
    calibration.observe_activations()
    calibration.run_methods("post_ranges")
    encodings = calibration.encodings()
    if apply:
        apply_encodings(module, calibration.entries, component)  # its pre-scales are installed already
    return encodings
