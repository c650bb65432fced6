"""ANNA's measured sensitivity against modelopt AutoQuantize's gradient scores (issue 16), at equal size.

    .venv/bin/python bench/autoquantize.py [--profile testbed] [--num-prompts 8] [--samples 8] [--output DIR]

Both see the same UNet, ANNA's three FP8 schemes and the same calibration samples:

* **measured** (ANNA, ``measure_sensitivity``): each group quantized alone under each scheme, the
  output MSE against FP32, and consecutive-pair interactions (``--pairs same``);
* **measured, no pairs**: the same table without its pair terms (an ablation: what the pairs add);
* **measured around fp8** (``around="fp8"``): the same quadratic model expanded at the all-``fp8``
  configuration (each group moved to FP16 or another variant with the rest ``fp8``), with and
  without its pairs, and greedy on it;
* **gradient** (AutoQuantize, ``gradient_scores.gradient_sensitivity``): ``Σ (∂L/∂Y)² (Q(Y) − Y)²``
  per layer from one backward pass per sample, separable.

Reported: the cost of each (seconds, UNet calls), Spearman's rank correlation of their per-(group,
scheme) costs, and for budgets above the all-``fp8`` size the configuration each one's DP picks (and
greedy on the measured table, AIMET AMP's order) with its *measured* UNet output SQNR against FP32 on
the calibration samples. Prints a table and writes JSON (with the CPU and ISA) under ``results/bench/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT_DIR = ROOT / "results" / "bench"

from calibration.mixed_precision.commands import ANNA_SCHEMES, prepare  # noqa: E402
from calibration.mixed_precision.gradient_scores import gradient_sensitivity  # noqa: E402
from calibration.mixed_precision.search import (  # noqa: E402
    SizeModel,
    configuration_entries,
    measure_configuration,
    rank_correlation,
)
from calibration.mixed_precision.sensitivity import FP16, OutputRecorder, measure_sensitivity  # noqa: E402
from calibration.mixed_precision.solver import Problem, greedy, solve_dp  # noqa: E402
from sdxl.io import format_table, write_json_atomic  # noqa: E402
from sdxl.progress import progress  # noqa: E402
from sdxl.system_info import system_description  # noqa: E402

#: points above the all-fp8 size at which the choices are compared
STEPS = (0.1, 1.0, 3.0, 8.0)


def separable(problem: Problem) -> Problem:
    """``problem`` without its pair terms: the measured unary table alone, as the gradient one is."""
    return dataclasses.replace(problem, pair=[np.zeros_like(p) for p in problem.pair])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="testbed")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8, help="UNet calls per measurement and per score")
    parser.add_argument("--output", help="work directory (default results/bench/autoquantize-<stamp>)")
    parser.add_argument("--cache-dir", default=str(ROOT / "build" / "cache"))
    opts = parser.parse_args()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    work = Path(opts.output or OUT_DIR / f"autoquantize-{stamp}")
    args = argparse.Namespace(profile=opts.profile, model_path=None, schemes=ANNA_SCHEMES, calibration_captions=None,
                              num_prompts=opts.num_prompts, timesteps=None, samples=opts.samples, output=str(work),
                              cache_dir=opts.cache_dir)
    prepared = prepare(args)
    unet, schemes, loop = prepared.unet, prepared.schemes, prepared.loop
    started = time.perf_counter()
    measured = measure_sensitivity(unet, schemes, loop, samples=opts.samples, pairs="same",
                                   cache=work / "sensitivity.json", progress=progress)
    measured_seconds = time.perf_counter() - started  # 0-ish when resumed from the cache: see the JSON's own
    around = measure_sensitivity(unet, schemes, loop, samples=opts.samples, pairs="same", around="fp8",
                                 cache=work / "sensitivity-around-fp8.json", progress=progress)
    started = time.perf_counter()
    scored = gradient_sensitivity(unet, schemes, loop, samples=opts.samples)
    scored_seconds = time.perf_counter() - started
    assert scored.groups == measured.groups, "the two tables must describe the same groups"
    cells = [(g, s) for g in measured.groups for s in measured.schemes]
    rho = rank_correlation([scored.unary[g][s]["mse"] for g, s in cells], [measured.unary[g][s]["mse"] for g, s in cells])

    sizes = SizeModel(unet, measured)
    options = [FP16, *measured.schemes]
    reference = OutputRecorder(unet, loop, opts.samples)()
    uniform_bits = sum(measured.bits[g]["fp8"] for g in measured.groups)
    smallest = sizes.percent(uniform_bits)
    rows = []
    uniform = {g: "fp8" for g in measured.groups}
    problems = {"measured DP": measured.problem(), "measured DP, no pairs": separable(measured.problem()),
                "gradient DP": scored.problem(), "measured greedy": measured.problem(),
                "around-fp8 DP": around.problem(), "around-fp8 DP, no pairs": separable(around.problem()),
                "around-fp8 greedy": around.problem()}
    for percent, method, choice in [(smallest, "uniform fp8", uniform)] + [
            (smallest + step, name, None) for step in STEPS for name in problems]:
        if choice is None:
            solver = greedy if method.endswith("greedy") else solve_dp
            solution = solver(problems[method], sizes.group_budget(percent))
            choice = {g: options[j] for g, j in zip(measured.groups, solution.choice)}
        bits = sum(measured.bits[g][o] for g, o in choice.items())
        predicted = problems.get(method, problems["measured DP"]).cost([options.index(choice[g]) for g in measured.groups])
        entries = configuration_entries(choice, schemes, measured.layers)
        mse, sqnr = measure_configuration(unet, entries, loop, opts.samples, reference)
        rows.append({"budget_percent": round(percent, 3), "method": method, "percent_of_fp16": sizes.percent(bits),
                     "fp16_groups": sum(1 for o in choice.values() if o == FP16), "predicted_mse": predicted,
                     "measured_mse": mse,
                     "measured_sqnr_db": sqnr, "choice": choice})
    record = {"benchmark": "autoquantize", "date": dt.datetime.now().isoformat(timespec="seconds"),
              "system": system_description(), "torch_threads": torch.get_num_threads(), "profile": opts.profile,
              "schemes": measured.schemes, "samples": opts.samples, "num_prompts": opts.num_prompts,
              "groups": len(measured.groups),
              "measured": {"seconds": measured.seconds, "unet_calls": measured.forward_passes,
                           "seconds_this_invocation": measured_seconds},
              "around_fp8": {"seconds": around.seconds, "unet_calls": around.forward_passes,
                             "base_mse": around.base_mse, "base_sqnr_db": around.base_sqnr_db},
              "gradient": {"seconds": scored_seconds, "unet_calls": scored.forward_passes, "probes": 1},
              "rank_correlation_unary": rho, "rows": rows,
              "unary": {"measured": measured.unary, "gradient": scored.unary, "around_fp8": around.unary}}
    system = record["system"]
    print(f"CPU {system['cpu_model']} ({system['isa']}); {opts.profile}, {len(measured.groups)} groups x "
          f"{len(measured.schemes)} schemes, {opts.samples} UNet calls per measurement")
    print(f"measured sensitivity: {measured.forward_passes} UNet calls, {measured.seconds:.0f} s; gradient scores: "
          f"{scored.forward_passes} forward+backward, {scored_seconds:.1f} s; Spearman rho of the unary costs {rho:.3f}")
    print(f"measured around fp8: {around.forward_passes} UNet calls, {around.seconds:.0f} s; all-fp8 output SQNR "
          f"{around.base_sqnr_db:.2f} dB")
    print(format_table(["budget % of FP16", "method", "% of FP16", "FP16 groups", "predicted MSE", "measured MSE",
                        "measured output SQNR dB"],
                       [[f"{r['budget_percent']:.2f}", r["method"], f"{r['percent_of_fp16']:.2f}", r["fp16_groups"],
                         f"{r['predicted_mse']:.3g}", f"{r['measured_mse']:.3g}", f"{r['measured_sqnr_db']:.2f}"]
                        for r in rows]))
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"autoquantize-{opts.profile}-{stamp}.json"
    write_json_atomic(path, record)
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
