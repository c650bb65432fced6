"""Mixed-precision benchmark (issue 16): ANNA's DP against uniform FP8, random FP16 picks, greedy and seed 003's hybrid.

    .venv/bin/python bench/mixed_precision.py [--profile testbed] [--num-prompts 8] [--samples 16]
                                              [--images 64] [--sweep-images 100] [--schemes fp8,...]
                                              [--around fp32|fp8] [--output DIR]

On the trained testbed (quality figures mean nothing on random weights):

1. ``mixed-precision`` with ANNA's three FP8 variants: sensitivity of every candidate group, the size
   sweep (all-``fp8`` size +0.1 and +1 points, then 10-point steps), the DP candidates (over every
   scheme, and over FP16 and each scheme alone) with the measured pick, greedy, 5 random-FP16 draws of
   the reported DP's count, measured UNet output SQNR on the calibration samples, predicted-vs-measured
   rank correlation; with ``--sweep-images``, every reported configuration's images (the Pareto plot's
   image PSNR and caption accuracy panels);
2. ``block-sensitivity`` on ``fp8``: the block x timestep heat map; its hybrid configuration (sensitive
   blocks FP16, the rest ``fp8``) and the DP and greedy configurations at the hybrid's size;
3. end to end for the headline configurations (at the two near budgets: the reported DP, ANNA's DP over
   every scheme, greedy and the random draws; the hybrid comparison): ``--images`` validation captions,
   20 steps, mean image PSNR vs FP32 and caption accuracy (``testbed/checker.py``), each with its paired
   95% bootstrap interval against uniform ``fp8`` (per caption).

The model, the capture and the schemes' calibration are prepared once and shared by all three.

Prints the tables and writes JSON (with the CPU and ISA) under ``results/bench/``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT_DIR = ROOT / "results" / "bench"

from harness.study import format_interval, paired_interval  # noqa: E402
from sdxl.io import format_table, write_json_atomic  # noqa: E402
from sdxl.system_info import isa_summary, system_description  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="testbed")
    parser.add_argument("--num-prompts", type=int, default=8, help="calibration prompts (default 8)")
    parser.add_argument("--samples", type=int, default=16, help="UNet calls per measurement (default 16)")
    parser.add_argument("--images", type=int, default=64, help="validation captions for the end-to-end PSNR")
    parser.add_argument("--sweep-images", type=int, default=100,
                        help="validation captions per reported configuration of the sweep (Pareto plot; 0: none)")
    parser.add_argument("--schemes", help="the schemes to choose among (default ANNA's three FP8 variants; the "
                                          "first must be fp8, the uniform baseline and the hybrid's rest)")
    parser.add_argument("--around", default="fp32", help="where the measured model is expanded: fp32 (default) or a "
                                                         "scheme (see mixed-precision --around)")
    parser.add_argument("--output", help="work directory (default results/bench/mixed-precision-<stamp>)")
    parser.add_argument("--cache-dir", default=str(ROOT / "build" / "cache"))
    opts = parser.parse_args()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    work = Path(opts.output or OUT_DIR / f"mixed-precision-{stamp}")

    from calibration.mixed_precision.blocks import top_level_block
    from calibration.mixed_precision.commands import (
        ANNA_SCHEMES,
        block_sensitivity,
        mixed_precision,
        prepare,
    )
    from calibration.mixed_precision.search import (
        Configuration,
        SizeModel,
        configuration_entries,
        dp_candidates,
        measure_configuration,
    )
    from calibration.mixed_precision.sensitivity import FP16, OutputRecorder
    from calibration.mixed_precision.solver import greedy

    common = dict(profile=opts.profile, model_path=None, calibration_captions=None, num_prompts=opts.num_prompts,
                  timesteps=None, samples=opts.samples, cache_dir=opts.cache_dir)
    schemes_flag = opts.schemes or ANNA_SCHEMES
    if schemes_flag.split(",")[0] != "fp8":
        parser.error("--schemes must start with fp8 (the uniform baseline every row is compared with)")
    sweep_args = argparse.Namespace(**common, schemes=schemes_flag, output=str(work), percents=None, pairs="same",
                                    around=opts.around, scores="measured", constraint="size", baseline=None,
                                    pick="measured", images=opts.sweep_images or None, target_sqnr=None,
                                    target_psnr=None, random_draws=5)
    prepared = prepare(sweep_args)  # once: the sweep and the block analysis share the model, capture and schemes
    spec, unet, schemes, loop, data = prepared.spec, prepared.unet, prepared.schemes, prepared.loop, prepared.data
    sensitivity, _, _ = mixed_precision(sweep_args, prepared)
    print((work / "mixed_precision.md").read_text())
    blocks = block_sensitivity(argparse.Namespace(**common, recipe="fp8", share=0.5, higher="fp16",
                                                  output=str(work / "blocks")), prepared)
    result = json.loads((work / "mixed_precision.json").read_text())
    sizes = SizeModel(unet, sensitivity)
    problem = sensitivity.problem()
    options = [FP16, *sensitivity.schemes]
    reference = OutputRecorder(unet, loop, opts.samples)()

    # seed 003's hybrid, as a configuration of the same groups: sensitive blocks FP16, the rest fp8
    hybrid_choice = {g: FP16 if top_level_block(g) in blocks["sensitive"] else "fp8" for g in sensitivity.groups}
    hybrid_bits = sum(sensitivity.bits[g][o] for g, o in hybrid_choice.items())
    hybrid = Configuration("hybrid", "seed-003-hybrid", hybrid_choice, sizes.percent(hybrid_bits),
                           problem.cost([options.index(hybrid_choice[g]) for g in sensitivity.groups]))
    def as_point(solution) -> Configuration:
        return Configuration("hybrid size", solution.method, {g: options[j] for g, j in zip(sensitivity.groups, solution.choice)},
                             sizes.percent(solution.size), solution.cost)

    candidates = [as_point(s) for s in dp_candidates(problem, sensitivity.schemes, hybrid_bits)]
    extra = [hybrid, *candidates, as_point(greedy(problem, hybrid_bits))]
    for point in extra:
        entries = configuration_entries(point.choice, schemes, sensitivity.layers)
        point.measured_mse, point.measured_sqnr_db = measure_configuration(unet, entries, loop, opts.samples, reference)
    min(candidates, key=lambda p: p.measured_mse).chosen = True  # the measured pick, as the sweep's
    extra = [p for p in extra if p.chosen or p.method in ("seed-003-hybrid", "dp", "greedy")]

    # end to end: the headline configurations' images against FP32's
    points = [Configuration(**{k: p[k] for k in ("label", "method", "choice", "percent_of_fp16", "predicted_mse",
                                                 "measured_mse", "measured_sqnr_db", "chosen")})
              for p in result["points"]]
    smallest = points[0].percent_of_fp16
    near = [p.label for p in points if p.method == "dp"][:2]  # the all-fp8 size +0.1 and +1 points
    headline = [points[0]] + [p for p in points if p.label in near and p.method != "uniform"
                              and (p.chosen or not p.is_dp or p.method == "dp")] + extra
    end_to_end = _end_to_end(opts, spec, unet, schemes, sensitivity, data, headline)

    print(f"\nCPU: {system_description()['cpu_model']} ({isa_summary()}), torch threads {torch.get_num_threads()}")
    print(f"all-fp8 size {smallest:.2f}% of FP16; {len(sensitivity.groups)} groups; sensitivity "
          f"{sensitivity.forward_passes} UNet calls in {sensitivity.seconds:.0f} s")
    print("(* the DP configuration the sweep reports: the measured pick)")
    print(format_table(["configuration", "% of FP16", "FP16 groups", "UNet SQNR dB", "image PSNR dB",
                        f"Δ PSNR vs {end_to_end['paired_against']} [95% CI]", "caption accuracy", "Δ accuracy pts"],
                       [[f"{r['label']} {r['method']}{' *' if r['chosen'] else ''}", f"{r['percent_of_fp16']:.2f}", r["fp16_groups"],
                         f"{r['measured_sqnr_db']:.2f}", f"{r['psnr_db']:.2f}", format_interval(r.get("psnr_vs_uniform"), 1, 2),
                         "-" if r["caption_accuracy"] is None else f"{r['caption_accuracy']:.3f}", format_interval(r.get("accuracy_vs_uniform"), 100)]
                        for r in end_to_end["rows"]]))
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"mixed-precision-{opts.profile}-{stamp}.json"
    write_json_atomic(path, {"benchmark": "mixed_precision", "profile": opts.profile, "system": system_description(),
                             "work": str(work), "sweep": result, "block_sensitivity": blocks,
                             "hybrid_comparison": [p.to_json() for p in extra], "end_to_end": end_to_end})
    print(f"\nwritten {path}")
    return 0


def _end_to_end(opts, spec, unet, schemes, sensitivity, data, configurations) -> dict:
    """Images of each configuration on ``--images`` validation captions against FP32's; per caption, so that
    every row's PSNR and caption accuracy carry a paired 95% interval against the first row (uniform ``fp8``).
    A configuration equal to an earlier one (the same choice for every group) reuses its images."""
    from calibration.mixed_precision.commands import configuration_images
    from calibration.mixed_precision.images import ImageFidelity

    fidelity = ImageFidelity(spec, opts.images)
    fp32 = fidelity.correct(fidelity.reference)  # None off the testbed: the checker reads its captions only
    rows = [{"label": "FP32", "method": "-", "chosen": False, "percent_of_fp16": 100.0,
             "fp16_groups": len(sensitivity.groups), "measured_sqnr_db": float("inf"), "psnr_db": float("inf"),
             "caption_accuracy": None if fp32 is None else float(fp32.mean())}]
    per_caption = configuration_images(fidelity, configurations, sensitivity, schemes, spec, unet, data)
    for index, (point, (psnr, correct)) in enumerate(zip(configurations, per_caption)):
        row = {"label": point.label, "method": point.method, "chosen": point.chosen,
               "percent_of_fp16": point.percent_of_fp16, "fp16_groups": len(point.fp16_groups),
               "measured_sqnr_db": point.measured_sqnr_db, "psnr_db": point.image_psnr_db,
               "caption_accuracy": point.caption_accuracy}
        if index > 0 and np.isfinite(psnr).all() and np.isfinite(per_caption[0][0]).all():
            row["psnr_vs_uniform"] = paired_interval(psnr, per_caption[0][0])
        if index > 0 and correct is not None:
            row["accuracy_vs_uniform"] = paired_interval(correct, per_caption[0][1])
        rows.append(row)
    return {"captions": len(fidelity.captions),
            "paired_against": f"{configurations[0].label} {configurations[0].method}", "rows": rows}


if __name__ == "__main__":
    raise SystemExit(main())
