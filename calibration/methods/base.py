"""What a calibration method is: a phase, checked settings, and ``run(target) -> MethodResult``.

``quantize()`` runs the methods a recipe names at three points (their *phase*):

* ``pre_ranges`` -- before anything is observed: change weights and add per-input pre-scales (CLE,
  SmoothQuant, QNCD's smoothing). Weight encodings are then computed from the changed weights.
* ``post_weight_ranges`` -- after the weight encodings, which are then **frozen** (AdaRound, block
  reconstruction's rounding): a method may change weight values, never their scales, since a scale
  recomputed from rounded weights would shift every integer.
* ``post_ranges`` -- after the activation ranges (bias correction, learned step sizes): weights
  (biases) and activation encodings may change; weight encodings stay frozen.

A method returns data; ``quantize()`` applies it to the module at once (so later methods and the
observers see it) and writes it into the encodings: parameters into the weights delta, pre-scales and
encodings into their sections, and a provenance record (settings, seconds, the method's ``stats``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import torch

from quant.encodings import Encoding, PreScale

from ..recipes import RecipeError

PHASES = ("pre_ranges", "post_weight_ranges", "post_ranges")
ForwardLoop = Callable[[torch.nn.Module], None]


class MethodError(RecipeError):
    """A method a recipe cannot use (unknown kind, bad setting) or a result its phase does not allow."""


@dataclass(frozen=True)
class MethodTarget:
    """What a method sees: one component's module, its planned layers, and a data callback -- not the pipeline.

    ``plans`` are the recipe's :class:`~calibration.recipes.LayerPlan` s for this component (which
    layers are quantized, and how); ``entries`` the encodings so far (none before ranges; weight ones
    after them), ``pre_scales`` the input factors earlier methods added.
    """

    module: torch.nn.Module
    component: str
    plans: list
    forward_loop: ForwardLoop | None
    entries: Mapping[str, Encoding | list[Encoding]]
    pre_scales: Mapping[str, PreScale]
    #: where a long method may keep resumable state (the capture's cache directory), or None
    work_dir: Path | None = None
    #: parameters as they were before methods after the weight encodings changed them (rounding, corrected
    #: biases; an added bias: zeros): the FP32 reference a ``post_ranges`` method reconstructs against
    fp_weights: Mapping[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class MethodResult:
    """What a method produced, as data.

    ``weights``: parameter name inside the component -> new value (a ``<layer>.bias`` the layer lacks
    is added); ``pre_scales``: input key -> factor (``pre_ranges`` only; several methods' factors
    multiply); ``encodings``: activation keys -> encoding (``post_ranges`` only); ``stats``: what the
    method reports about its work (recorded in the encodings' provenance).
    """

    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    pre_scales: dict[str, PreScale] = field(default_factory=dict)
    encodings: dict[str, Encoding | list[Encoding]] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    #: settings the sampling loop reads from the encodings (``runtime``; methods with ``changes_sampler`` only)
    runtime: dict[str, Any] = field(default_factory=dict)


class Method:
    """Base of every calibration method; subclasses set the class attributes and implement :meth:`run`."""

    #: the name recipes use (``kind:``)
    kind: ClassVar[str] = ""
    #: when it runs, one of :data:`PHASES`
    phase: ClassVar[str] = ""
    #: True for methods that change the denoising loop (QNCD's noise correction): not MLPerf's closed division
    changes_sampler: ClassVar[bool] = False

    @dataclass(frozen=True)
    class Settings:
        """The method's recipe settings (a frozen dataclass; subclasses define their own)."""

    def __init__(self, settings: Any):
        self.settings = settings

    @classmethod
    def check_settings(cls, settings: Any) -> str | None:
        """A problem with ``settings`` beyond their types (a value out of range), or None."""
        return None

    def run(self, target: MethodTarget) -> MethodResult:
        raise NotImplementedError


def run_data(module: torch.nn.Module, forward_loop: ForwardLoop, samples: int | None = None, handles=()) -> None:
    """Feed the calibration data through ``module`` without gradients (the first ``samples`` component
    calls when given), then take ``handles``' hooks off."""
    from ..sqnr import limited

    try:
        with torch.no_grad():
            (limited(forward_loop, samples) if samples else forward_loop)(module)
    finally:
        for handle in handles:
            handle.remove()


def execution_order(module: torch.nn.Module, names, forward_loop: ForwardLoop, samples: int | None = None) -> list[str]:
    """``names`` (submodule names) in the order the data first reaches them."""
    seen: list[str] = []
    wanted = set(names)
    handles = [sub.register_forward_pre_hook(lambda m, a, n=name: seen.append(n) if n not in seen else None)
               for name, sub in module.named_modules() if name in wanted]
    run_data(module, forward_loop, samples, handles)
    return seen
