"""``smoothquant``: migrate activation outliers into the weights (Xiao et al.; seed 003, local).

For a layer ``y = W x`` and per input channel ``s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha)``
(mit-han-lab/smoothquant's ``smooth_ln_fcs``, ``max|X|`` over the calibration data, clamped at 1e-5),
``x_j / s_j`` and ``W_:,j * s_j`` give the same ``y``: the input's outlier channels shrink, the
weights' matching columns grow, and per-tensor activation quantization loses less. ``alpha`` is a
recipe setting (modelopt recommends 0.8 for SDXL, Brevitas 0.9, the paper 0.5 for LLMs).

Where the input is a LayerNorm's output read only by smoothed Linear layers (a transformer block's
``norm1`` -> ``to_q``/``to_k``/``to_v``, ``norm2`` -> ``attn2.to_q``, ``norm3`` -> ``ff.net.0.proj``),
``1/s`` is folded into the norm's affine (``gamma / s``, ``beta / s``), as the reference's
``smooth_ln_fcs`` does, with one ``s`` for the whole group (``max|W_:,j|`` over its layers): no extra op
at run time. Which layers read a norm's output is found on the data (tensor identity), and the fold is
kept only if the component's FP32 output is unchanged by it (checked on one calibration call). Every
other input gets ``1/s`` as an explicit per-channel pre-scale (fake quant hooks it, the ONNX QDQ export
writes a ``Mul`` before the input's Q/DQ). ``fold: false`` keeps every ``1/s`` explicit, one ``s`` per layer.

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


def _column_absmax(layer: torch.nn.Module) -> torch.Tensor:
    weight = layer.weight.detach().float()
    return weight.abs().movedim(1, 0).reshape(weight.shape[1], -1).amax(dim=1)


def _scaled_weight(layer: torch.nn.Module, scale: torch.Tensor) -> torch.Tensor:
    weight = layer.weight.detach().float()
    return (weight * scale.reshape([1, -1] + [1] * (weight.dim() - 2))).to(layer.weight.dtype)


def norm_groups(module: torch.nn.Module, layers: list[str], loop, samples: int = 2) -> dict[str, list[str]]:
    """LayerNorm -> the ``layers`` (all Linear) that read its output, for norms whose every Linear/Conv
    reader is among ``layers`` and reads nothing else; found by tensor identity on ``samples`` calls."""
    import weakref

    live: dict[int, tuple] = {}
    readers: dict[str, set] = {}
    norms = {n: m for n, m in module.named_modules() if isinstance(m, torch.nn.LayerNorm) and m.weight is not None
             and m.bias is not None}

    def produced(name):
        def hook(m, args, output):
            live[id(output)] = (weakref.ref(output), name)
        return hook

    def read(name):
        def hook(m, args, kwargs):
            x = call_input(m, args, kwargs, 0)
            entry = live.get(id(x)) if x is not None else None
            readers.setdefault(name, set()).add(entry[1] if entry is not None and entry[0]() is x else None)
        return hook

    handles = [m.register_forward_hook(produced(n)) for n, m in norms.items()]
    handles += [m.register_forward_pre_hook(read(n), with_kwargs=True) for n, m in module.named_modules()
                if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    run_data(module, loop, samples, handles)
    wanted, groups = set(layers), {}
    for norm in norms:
        members = sorted(n for n, seen in readers.items() if norm in seen)
        if members and all(readers[n] == {norm} and n in wanted and isinstance(module.get_submodule(n), torch.nn.Linear)
                           for n in members):
            groups[norm] = members
    return groups


def _fold_is_exact(module: torch.nn.Module, groups, folds, loop) -> bool:
    """The component's output on one calibration call with the folds applied equals the FP32 one (rel 1e-4)."""
    from ..sqnr import output_module

    outputs: list[torch.Tensor] = []

    def keep(m, args, output):
        value = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
        outputs.append(value.detach().float().clone())

    def one_call():
        run_data(module, loop, 1, [output_module(module).register_forward_hook(keep)])

    one_call()
    saved = {}
    with torch.no_grad():
        for norm, scale in folds.items():
            layer = module.get_submodule(norm)
            saved[norm] = (layer.weight.clone(), layer.bias.clone())
            layer.weight.div_(scale)
            layer.bias.div_(scale)
            for name in groups[norm]:
                sub = module.get_submodule(name)
                saved[name] = (sub.weight.clone(),)
                sub.weight.copy_(_scaled_weight(sub, scale))
    try:
        one_call()
    finally:
        with torch.no_grad():
            for name, values in saved.items():
                sub = module.get_submodule(name)
                sub.weight.copy_(values[0])
                if len(values) > 1:
                    sub.bias.copy_(values[1])
    reference, folded = outputs
    return bool(torch.linalg.vector_norm(folded - reference) <= 1e-4 * torch.linalg.vector_norm(reference))


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
        #: fold 1/s into a preceding LayerNorm's affine where that is exact (module docstring)
        fold: bool = True

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
        by_name = {p.name: p for p in chosen}
        groups = norm_groups(target.module, [p.name for p in chosen], target.forward_loop) if self.settings.fold else {}
        result = MethodResult()
        folds = {norm: self._scale([by_name[n] for n in members], stats[members[0]]) for norm, members in groups.items()}
        if folds and not _fold_is_exact(target.module, groups, folds, target.forward_loop):
            folds = {}
        folded = {n for norm in folds for n in groups[norm]}
        for norm, scale in folds.items():
            layer = target.module.get_submodule(norm)
            for leaf in ("weight", "bias"):
                result.weights[f"{norm}.{leaf}"] = (getattr(layer, leaf).detach().float() / scale).to(layer.weight.dtype)
            for name in groups[norm]:
                result.weights[f"{name}.weight"] = _scaled_weight(by_name[name].module, scale)
        for plan in chosen:
            if plan.name in folded:
                continue
            scale = self._scale([plan], stats[plan.name])
            result.weights[f"{plan.name}.weight"] = _scaled_weight(plan.module, scale)
            result.pre_scales[tensor_key(plan.name, "input")] = PreScale(stats[plan.name].axis,
                                                                       [float(1.0 / v) for v in scale])
        ranking = sorted(errors.items(), key=lambda item: item[1])
        result.stats = {"alpha": self.settings.alpha, "select": self.settings.select, "layers": [p.name for p in chosen],
                        "folded_into": {norm: groups[norm] for norm in folds},
                        "fold_refused": bool(groups) and not folds,
                        "input_sqnr_db_lowest": [[name, round(db, 2)] for name, db in ranking[:10]]}
        return result

    def _scale(self, plans: list, observed: "_InputStats") -> torch.Tensor:
        """``s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha)``, the weight maximum over every layer reading X."""
        alpha = self.settings.alpha
        w_absmax = torch.stack([_column_absmax(p.module) for p in plans]).amax(dim=0)
        x_absmax = observed.absmax.clamp(min=1e-5)
        return (x_absmax.pow(alpha) / w_absmax.clamp(min=1e-5).pow(1.0 - alpha)).clamp(min=1e-5)

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
