"""From a sensitivity table to configurations: the size sweep, DP vs greedy vs random, measured fidelity.

A configuration picks, per candidate group, FP16 or one scheme; its encodings are the chosen scheme's
entries for that group's layers (every scheme was calibrated on the same data, so an entry does not
depend on the other groups' choices: activation ranges are observed on FP32 activations, as ANNA's
PTQ does). Sizes are percent of the component's FP16 size: the groups' weight bits as chosen plus
every other parameter (biases, norms, excluded layers) at 16 bits, as :mod:`quant.sizes` counts.
Measured fidelity re-runs the forward loop with the configuration applied: the check on the
quadratic model's prediction, and what picks among the DP's candidates (:func:`choose`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from quant.encodings import parse_key

from ..recipes import Recipe
from .sensitivity import FP16, Entries, ForwardLoop, OutputRecorder, QuantizedLayers, Sensitivity, output_error
from .solver import Infeasible, Problem, Solution, greedy, solve_dp


@dataclass
class Configuration:
    """One point of the sweep: the choice, its size, predicted and (once measured) real error."""

    label: str
    method: str
    choice: dict[str, str]  # group -> "fp16" or a scheme name
    percent_of_fp16: float
    predicted_mse: float
    measured_mse: float | None = None
    measured_sqnr_db: float | None = None
    #: the DP configuration the sweep reports at this budget (:func:`choose`)
    chosen: bool = False
    #: once its images are generated: mean PSNR against FP32's, and caption accuracy (testbed)
    image_psnr_db: float | None = None
    caption_accuracy: float | None = None

    @property
    def fp16_groups(self) -> list[str]:
        return [g for g, option in self.choice.items() if option == FP16]

    @property
    def is_dp(self) -> bool:
        return self.method == "dp" or self.method.startswith("dp[")

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "method": self.method, "chosen": self.chosen,
                "percent_of_fp16": self.percent_of_fp16, "predicted_mse": self.predicted_mse,
                "measured_mse": self.measured_mse, "measured_sqnr_db": self.measured_sqnr_db,
                "image_psnr_db": self.image_psnr_db, "caption_accuracy": self.caption_accuracy,
                "fp16_groups": self.fp16_groups, "choice": self.choice}


class SizeModel:
    """Percent of the component's FP16 size for a choice of options (the solver works in bits)."""

    def __init__(self, module: torch.nn.Module, sensitivity: Sensitivity):
        total_params = sum(p.numel() for p in module.parameters())
        self.fp16_bits = 16.0 * total_params
        group_fp16 = sum(sensitivity.bits[g][FP16] for g in sensitivity.groups)
        self.fixed_bits = self.fp16_bits - group_fp16  # every parameter outside the candidate groups' weights

    def percent(self, group_bits: float) -> float:
        return 100.0 * (self.fixed_bits + group_bits) / self.fp16_bits

    def group_budget(self, percent: float) -> float:
        return percent / 100.0 * self.fp16_bits - self.fixed_bits


class BitOpsModel:
    """Percent of the candidate groups' FP16 BitOps (16 x 16 bits per MAC) for a choice of options.

    Layers outside the candidate groups are not counted (their MACs run at whatever they run at in
    every configuration alike), so the percentages are of the part the search decides.
    """

    def __init__(self, sensitivity: Sensitivity):
        self.fp16_bitops = sum(sensitivity.bitops[g][FP16] for g in sensitivity.groups)

    def percent(self, group_bitops: float) -> float:
        return 100.0 * group_bitops / self.fp16_bitops

    def group_budget(self, percent: float) -> float:
        return percent / 100.0 * self.fp16_bitops


def budget_model(module: torch.nn.Module, sensitivity: Sensitivity, constraint: str):
    return SizeModel(module, sensitivity) if constraint == "size" else BitOpsModel(sensitivity)


def configuration_entries(choice: Mapping[str, str], schemes: Mapping[str, Entries],
                          group_layers: Mapping[str, list[str]]) -> dict[str, Any]:
    """The component's encodings entries for a choice: each group's layers from its scheme, FP16 ones absent."""
    layer_group = {layer: g for g, layers in group_layers.items() for layer in layers}
    entries: dict[str, Any] = {}
    for scheme, scheme_entries in schemes.items():
        for key, value in scheme_entries.items():
            group = layer_group.get(parse_key(key)[0])
            if group is not None and choice.get(group) == scheme:
                entries[key] = value
    return entries


def configuration_recipe(choice: Mapping[str, str], recipes: Mapping[str, Recipe], group_layers: Mapping[str, list[str]],
                         module: torch.nn.Module, name: str, calibration: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A choice as a recipe (JSON) that ``calibrate`` turns into the configuration's entries.

    Nothing is quantized by default; one override per set of layers with the same quantizers names
    each layer a chosen scheme quantizes (``recipes[scheme].plan(module)``, so a scheme's own excludes
    and overrides carry over) with that scheme's quantizers; FP16 groups are simply not named. Every
    scheme is calibrated on the same FP32 activations, so this recipe, calibrated on the same data,
    writes the same entries. ``calibration`` (``num_prompts``, ``timesteps``: the capture the search
    used) overrides the first scheme's defaults, so that ``calibrate`` and ``study`` capture the same
    data without flags.
    """
    plans = {}
    for scheme in sorted({o for o in choice.values() if o != FP16}):
        plans[scheme] = {plan.name: plan for plan in recipes[scheme].plan(module)[0]}
    by_spec: dict[str, dict[str, Any]] = {}
    for group, option in choice.items():
        for layer in group_layers[group]:
            plan = plans.get(option, {}).get(layer)
            if plan is None:
                continue
            if plan.channel_groups or plan.operand_inputs:
                raise ValueError(f"{option}: {layer} is quantized in channel groups or per operand, which a "
                                 "mixed-precision recipe does not express")
            slots = {"weights": plan.weights, "inputs": plan.inputs, "outputs": plan.outputs}
            key = repr(sorted((k, v.to_json() if v else None) for k, v in slots.items()))
            by_spec.setdefault(key, {**slots, "match": []})["match"].append(layer)
    first = recipes[next(iter(recipes))]
    types = tuple(dict.fromkeys(t for r in recipes.values() for t in r.types))
    kept = sum(1 for o in choice.values() if o == FP16)
    recipe = Recipe(name=name, description=f"{len(choice) - kept} groups on {', '.join(plans) or 'no scheme'}, {kept} "
                                           "FP16 (the mixed-precision search's choice)",
                    components=first.components, types=types, overrides=list(by_spec.values()),
                    calibration={**first.calibration, **(calibration or {})})
    return recipe.to_json()


def measure_configuration(module: torch.nn.Module, entries: Entries, forward_loop: ForwardLoop, samples: int,
                          reference: list[torch.Tensor]) -> tuple[float, float]:
    """Output MSE and SQNR of ``module`` with ``entries`` applied, against ``reference``; weights restored."""
    with QuantizedLayers(module, entries, sorted({parse_key(k)[0] for k in entries})):
        return output_error(OutputRecorder(module, forward_loop, samples)(), reference)


def _as_configuration(label: str, solution: Solution, sensitivity: Sensitivity, sizes: SizeModel) -> Configuration:
    options = [FP16, *sensitivity.schemes]
    choice = {g: options[j] for g, j in zip(sensitivity.groups, solution.choice)}
    return Configuration(label, solution.method, choice, round(sizes.percent(solution.size), 4), solution.cost)


def random_fp16(problem: Problem, sensitivity: Sensitivity, scheme: str, keep: int, seed: int) -> Solution:
    """``keep`` groups drawn at random in FP16, the rest on ``scheme``: the baseline the DP must beat."""
    index = sensitivity.schemes.index(scheme) + 1
    chosen = set(random.Random(seed).sample(range(problem.n), keep))
    choice = [0 if i in chosen else index for i in range(problem.n)]
    return Solution(choice, problem.cost(choice), problem.total_size(choice), f"random-fp16 (seed {seed})")


def dp_candidates(problem: Problem, schemes: list[str], budget: float, resolution: int = 4000) -> list[Solution]:
    """ANNA's DP over every option, then (with several schemes) the DP over FP16 and each scheme alone.

    Every candidate is optimal for the quadratic model on its own option set; the model is least
    trustworthy where it mixes schemes, since it adds each group's error as measured alone, and
    errors that share a sign (activation clipping) add coherently in a way the consecutive-pair terms
    only partly see. Measuring all of them (:func:`choose`) keeps a mixture only where it is really
    better. Candidates identical to an earlier one are dropped; raises :class:`Infeasible` if even
    the full DP finds nothing within ``budget``.
    """
    candidates = [solve_dp(problem, budget, resolution)]
    if len(schemes) < 2:
        return candidates
    for index, scheme in enumerate(schemes, start=1):
        options = [0, index]
        try:
            solution = solve_dp(problem.restricted(options), budget, resolution)
        except Infeasible:  # this scheme alone does not fit (a larger one than the smallest)
            continue
        choice = [options[j] for j in solution.choice]
        if all(choice != c.choice for c in candidates):
            candidates.append(Solution(choice, problem.cost(choice), problem.total_size(choice), f"dp[{scheme}]",
                                       solution.exact, solution.notes))
    return candidates


def sweep(sensitivity: Sensitivity, sizes, percents: list[float], baseline_scheme: str,
          resolution: int = 4000, constraint: str = "size") -> list[Configuration]:
    """For each budget (% of FP16 size, or of FP16 BitOps): the DP candidates (:func:`dp_candidates`) and
    the greedy optimum. First the all-``baseline_scheme`` configuration: the point the budgets grow from.
    Budgets below the smallest configuration are skipped.
    """
    problem = sensitivity.problem(constraint)
    index = sensitivity.schemes.index(baseline_scheme) + 1
    uniform = [index] * problem.n
    points = [_as_configuration(f"all {baseline_scheme}", Solution(uniform, problem.cost(uniform),
                                                                    problem.total_size(uniform), "uniform"),
                                sensitivity, sizes)]
    for percent in percents:
        budget = sizes.group_budget(percent)
        try:
            candidates = dp_candidates(problem, sensitivity.schemes, budget, resolution)
        except Infeasible:
            continue
        label = f"{percent:g}%"
        points.extend(_as_configuration(label, c, sensitivity, sizes) for c in candidates)
        points.append(_as_configuration(label, greedy(problem, budget), sensitivity, sizes))
    return points


PICKS = ("measured", "model")


def choose(points: list[Configuration], pick: str = "measured") -> list[Configuration]:
    """Marks, per budget, the DP configuration the sweep reports, and returns them in budget order.

    ``measured``: the DP candidate with the lowest measured output MSE (every candidate must be
    measured); ``model``: ANNA's DP over every option, as its quadratic model ranks them.
    """
    if pick not in PICKS:
        raise ValueError(f"pick must be one of {', '.join(PICKS)}, got {pick!r}")
    chosen = []
    for label in dict.fromkeys(p.label for p in points if p.is_dp):
        candidates = [p for p in points if p.label == label and p.is_dp]
        if pick == "measured":
            if any(p.measured_mse is None for p in candidates):
                raise ValueError(f"{label}: every DP candidate must be measured before a measured pick")
            best = min(candidates, key=lambda p: p.measured_mse)
        else:
            best = next(p for p in candidates if p.method == "dp")
        for p in candidates:
            p.chosen = p is best
        chosen.append(best)
    return chosen


def smallest_meeting(points: list[Configuration], field: str, target: float) -> Configuration | None:
    """The smallest of ``points`` whose ``field`` (``measured_sqnr_db``, ``image_psnr_db``) reaches ``target``."""
    meeting = [p for p in points if getattr(p, field) is not None and getattr(p, field) >= target]
    return min(meeting, key=lambda p: p.percent_of_fp16) if meeting else None


def random_baselines(sensitivity: Sensitivity, sizes, point: Configuration, baseline_scheme: str, draws: int,
                     constraint: str = "size") -> list[Configuration]:
    """``draws`` configurations with as many groups FP16 as ``point`` has, drawn at random, the rest on
    ``baseline_scheme``: what a search must beat to have found anything."""
    keep = len(point.fp16_groups)
    if not 0 < keep < len(sensitivity.groups):
        return []
    problem = sensitivity.problem(constraint)
    return [_as_configuration(point.label, random_fp16(problem, sensitivity, baseline_scheme, keep, seed),
                              sensitivity, sizes) for seed in range(draws)]


def rank_correlation(predicted: list[float], measured: list[float]) -> float | None:
    """Spearman's rho (average ranks for ties); None with fewer than 3 points or no spread."""
    if len(predicted) < 3:
        return None

    def ranks(values: list[float]) -> np.ndarray:
        order = np.argsort(values, kind="mergesort")
        out = np.empty(len(values))
        sorted_values = np.asarray(values)[order]
        i = 0
        while i < len(values):
            j = i
            while j + 1 < len(values) and sorted_values[j + 1] == sorted_values[i]:
                j += 1
            out[order[i:j + 1]] = (i + j) / 2.0
            i = j + 1
        return out

    a, b = ranks(predicted), ranks(measured)
    if a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])
