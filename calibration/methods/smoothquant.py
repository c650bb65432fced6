"""``smoothquant``: migrate activation outliers into the weights (Xiao et al.; seed 003, local).

For a layer ``y = W x`` and per input channel ``s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha)``
(mit-han-lab/smoothquant's ``smooth_ln_fcs``, ``max|X|`` over the calibration data, clamped at 1e-5),
``x_j / s_j`` and ``W_:,j * s_j`` give the same ``y``: the input's outlier channels shrink, the
weights' matching columns grow, and per-tensor activation quantization loses less. ``alpha`` is a
recipe setting (modelopt recommends 0.8 for SDXL, Brevitas 0.9, the paper 0.5 for LLMs).

``1/s`` is folded into the op that produces the input wherever that is exact, so that no op is added at
run time (``fold: true``, :class:`Fold`):

* a LayerNorm's affine (``gamma / s``, ``beta / s``) when the norm's output is read only by smoothed
  Linear layers (a transformer block's ``norm1`` -> ``to_q``/``to_k``/``to_v``, ``norm2`` -> ``attn2.to_q``,
  ``norm3`` -> ``ff.net.0.proj``), one ``s`` for the group (``max|W_:,j|`` over its layers), as the
  reference's ``smooth_ln_fcs`` does; the readers are found on the data (tensor identity);
* a ``Transformer2DModel``'s GroupNorm affine for ``proj_in`` (a reshape sits between them);
* a previous Linear's output rows where the op between commutes with a per-channel scale, CLE's pairs:
  ``to_v`` -> ``to_out.0``, ``v_proj`` -> ``out_proj``, GEGLU's value half -> ``ff.net.2``.

The candidates are kept only if the component's FP32 output is unchanged by them on one calibration call
(else each kind is checked alone; ``fold_refused`` lists what was not kept). Every other input gets
``1/s`` as an explicit per-channel pre-scale (fake quant hooks it, the ONNX QDQ export writes a ``Mul``
before the input's Q/DQ): in SDXL's UNet that is the cross-attention ``to_k``/``to_v`` (reading the text
states) and convs after GroupNorm -> SiLU. ``fold: false`` keeps every ``1/s`` explicit, one ``s`` per layer.

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
FOLD_KINDS = ("layer_norm", "group_norm", "linear")


def _channel_axis(layer: torch.nn.Module) -> int:
    return -1 if isinstance(layer, torch.nn.Linear) else 1


def _column_absmax(layer: torch.nn.Module) -> torch.Tensor:
    weight = layer.weight.detach().float()
    return weight.abs().movedim(1, 0).reshape(weight.shape[1], -1).amax(dim=1)


@dataclass(frozen=True)
class Fold:
    """``1/s`` of the smoothed ``members`` (one ``s`` for all of them) absorbed by ``source``'s output channels.

    ``kind``: ``layer_norm`` / ``group_norm`` (the norm's affine, ``gamma / s`` and ``beta / s``) or
    ``linear`` (a previous Linear's leading ``len(s)`` output rows and their bias, ``W[c] / s_c``).
    """

    source: str
    members: tuple[str, ...]
    kind: str


def layer_norm_folds(module: torch.nn.Module, layers: list[str], loop, samples: int = 2) -> list[Fold]:
    """LayerNorms whose every Linear/Conv reader is among ``layers``, a Linear, and reads nothing else;
    found by tensor identity on ``samples`` calls (a transformer block's ``norm1`` -> ``to_q/k/v``)."""
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
    wanted, folds = set(layers), []
    for norm in norms:
        members = sorted(n for n, seen in readers.items() if norm in seen)
        if members and all(readers[n] == {norm} and n in wanted and isinstance(module.get_submodule(n), torch.nn.Linear)
                           for n in members):
            folds.append(Fold(norm, tuple(members), "layer_norm"))
    return folds


def structural_folds(module: torch.nn.Module, layers: list[str]) -> list[Fold]:
    """Folds that a reshape between the two ops hides from tensor identity, found by diffusers' structure.

    * ``Transformer2DModel``: ``norm`` (GroupNorm) -> permute/reshape -> ``proj_in``; a per-channel scale
      passes through the reshape, and nothing else reads the norm's output;
    * CLE's exact pairs (:func:`equalization_pairs`): attention ``to_v`` -> ``to_out.0``, CLIP ``v_proj`` ->
      ``out_proj``, GEGLU's value half ``ff.net.0.proj[:inner]`` -> ``ff.net.2``: the second layer's ``1/s``
      goes into the first's output rows.
    """
    from .cross_layer_equalization import equalization_pairs

    wanted, folds = set(layers), []
    for name, sub in module.named_modules():
        prefix = f"{name}." if name else ""
        norm, proj_in = getattr(sub, "norm", None), getattr(sub, "proj_in", None)
        if type(sub).__name__ == "Transformer2DModel" and isinstance(norm, torch.nn.GroupNorm) and norm.affine \
                and f"{prefix}proj_in" in wanted and isinstance(proj_in, (torch.nn.Linear, torch.nn.Conv2d)):
            folds.append(Fold(f"{prefix}norm", (f"{prefix}proj_in",), "group_norm"))
    for first, second, channels in equalization_pairs(module):
        if second in wanted and module.get_submodule(second).in_features == channels:
            folds.append(Fold(first, (second,), "linear"))
    return folds


def weight_edits(module: torch.nn.Module, scales: dict[str, torch.Tensor], folds: list[Fold]) -> dict[str, torch.Tensor]:
    """Parameter -> new value: each smoothed layer's input columns times its ``s``, each fold's source
    output channels divided by its members' ``s``. A layer can be both (``to_v``: its input smoothed
    into ``norm1``, its output rows taking ``to_out.0``'s ``1/s``); the factors compose."""
    edits: dict[str, torch.Tensor] = {}

    def current(name: str) -> torch.Tensor:
        return edits[name] if name in edits else module.get_parameter(name).detach().float()

    for name, scale in scales.items():
        weight = current(f"{name}.weight")
        edits[f"{name}.weight"] = weight * scale.reshape([1, -1] + [1] * (weight.dim() - 2))
    for fold in folds:
        scale = scales[fold.members[0]]
        source = module.get_submodule(fold.source)
        for leaf in ("weight", "bias"):
            if getattr(source, leaf, None) is None:
                continue
            value = current(f"{fold.source}.{leaf}").clone()
            value[: scale.numel()] /= scale.reshape([-1] + [1] * (value.dim() - 1))
            edits[f"{fold.source}.{leaf}"] = value
    return {name: value.to(module.get_parameter(name).dtype) for name, value in edits.items()}


class _FoldCheck:
    """The component's output on one calibration call, FP32 as given and with candidate edits applied."""

    def __init__(self, module: torch.nn.Module, loop):
        self.module, self.loop = module, loop
        self.reference = self._output()

    def _output(self) -> torch.Tensor:
        from ..sqnr import output_module

        outputs: list[torch.Tensor] = []

        def keep(m, args, output):
            value = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
            outputs.append(value.detach().float().clone())

        run_data(self.module, self.loop, 1, [output_module(self.module).register_forward_hook(keep)])
        return outputs[0]

    def exact(self, edits: dict[str, torch.Tensor]) -> bool:
        """Equal to FP32 within rel 1e-4 with ``edits`` applied (and undone afterwards)."""
        saved = {name: self.module.get_parameter(name).detach().clone() for name in edits}
        with torch.no_grad():
            for name, value in edits.items():
                self.module.get_parameter(name).copy_(value)
        try:
            output = self._output()
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    self.module.get_parameter(name).copy_(value)
        return bool(torch.linalg.vector_norm(output - self.reference)
                    <= 1e-4 * torch.linalg.vector_norm(self.reference))


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
        #: fold 1/s into the op producing the input where that is exact (module docstring)
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
        kept, refused = self._exact_folds(target, by_name, stats) if self.settings.fold else ([], [])
        scales = self._fold_scales(kept, by_name, stats)
        result = MethodResult()
        for plan in chosen:
            if plan.name not in scales:
                scales[plan.name] = self._scale([plan], stats[plan.name])
                result.pre_scales[tensor_key(plan.name, "input")] = PreScale(
                    stats[plan.name].axis, [float(1.0 / v) for v in scales[plan.name]])
        result.weights = weight_edits(target.module, scales, kept)
        ranking = sorted(errors.items(), key=lambda item: item[1])
        result.stats = {"alpha": self.settings.alpha, "select": self.settings.select, "layers": [p.name for p in chosen],
                        "folded_into": {fold.source: list(fold.members) for fold in kept},
                        "folds_by_kind": {kind: sum(f.kind == kind for f in kept) for kind in FOLD_KINDS},
                        "fold_refused": sorted(fold.source for fold in refused),
                        "input_sqnr_db_lowest": [[name, round(db, 2)] for name, db in ranking[:10]]}
        return result

    def _exact_folds(self, target: MethodTarget, by_name: dict, stats: dict) -> tuple[list[Fold], list[Fold]]:
        """(kept, refused) folds: the candidates are checked together on one calibration call; if together they
        change the FP32 output, each kind is checked alone and only the kinds that are exact are kept."""
        names = list(by_name)
        candidates = layer_norm_folds(target.module, names, target.forward_loop) + structural_folds(target.module, names)
        if not candidates:
            return [], []

        def exact(folds: list[Fold]) -> bool:
            return check.exact(weight_edits(target.module, self._fold_scales(folds, by_name, stats), folds))

        check = _FoldCheck(target.module, target.forward_loop)
        if exact(candidates):
            return candidates, []
        kept = []
        for kind in FOLD_KINDS:
            group = [f for f in candidates if f.kind == kind]
            if group and exact(group):
                kept += group
        return kept, [f for f in candidates if f not in kept]

    def _fold_scales(self, folds: list[Fold], by_name: dict, stats: dict) -> dict[str, torch.Tensor]:
        """Each folded layer's ``s``: one per fold, the weight maximum over all of its members."""
        scales = {}
        for fold in folds:
            scale = self._scale([by_name[n] for n in fold.members], stats[fold.members[0]])
            scales.update({name: scale for name in fold.members})
        return scales

    def _scale(self, plans: list, observed: "_InputStats") -> torch.Tensor:
        """``s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha)``, the weight maximum over every layer reading X."""
        alpha = self.settings.alpha
        w_absmax = torch.stack([_column_absmax(p.module) for p in plans]).amax(dim=0)
        x_absmax = observed.absmax.clamp(min=1e-5)
        return (x_absmax.pow(alpha) / w_absmax.clamp(min=1e-5).pow(1.0 - alpha)).clamp(min=1e-5)

    def _observe(self, target: MethodTarget, plans: list, stats: dict[str, _InputStats]) -> dict[str, float]:
        """Two passes over the data: the inputs' ranges, then their quantization error under the recipe's quantizer.

        Layers the data never runs (the VAE's encoder in text-to-image) are dropped from ``plans`` and
        ``stats``: there is nothing to smooth, and the range calibration leaves them in high precision.
        """
        run_data(target.module, target.forward_loop, handles=[p.module.register_forward_pre_hook(
            lambda m, args, kwargs, s=stats[p.name]: s.observe(call_input(m, args, kwargs, 0)), with_kwargs=True)
            for p in plans])
        plans[:] = [p for p in plans if stats[p.name].absmax is not None]
        for name in [n for n, s in stats.items() if s.absmax is None]:
            del stats[name]
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
