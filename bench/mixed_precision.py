"""Mixed-precision benchmark (issue 16): ANNA's DP against uniform FP8, random FP16 picks, greedy and seed 003's hybrid.

    .venv/bin/python bench/mixed_precision.py [--profile testbed] [--num-prompts 8] [--samples 16]
                                              [--images 64] [--output DIR]

On the trained testbed (quality figures mean nothing on random weights):

1. ``mixed-precision`` with ANNA's three FP8 variants: sensitivity of every candidate group, the size
   sweep (all-``fp8`` size +0.1 and +1 points, then 10-point steps), DP / greedy / 5 random-FP16 draws
   of the DP's count, measured UNet output SQNR on the calibration samples, predicted-vs-measured rank
   correlation;
2. ``block-sensitivity`` on ``fp8``: the block x timestep heat map; its hybrid configuration (sensitive
   blocks FP16, the rest ``fp8``) and the DP and greedy configurations at the hybrid's size;
3. end to end for the headline configurations: ``--images`` validation captions, 20 steps, mean image
   PSNR vs FP32 and caption accuracy (``testbed/checker.py``).

Prints the tables and writes JSON (with the CPU and ISA) under ``results/bench/``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT_DIR = ROOT / "results" / "bench"

from accuracy.fidelity import psnr_ssim  # noqa: E402
from harness.cli import main as harness_main  # noqa: E402
from sdxl.io import format_table, write_json_atomic  # noqa: E402
from sdxl.system_info import isa_summary, system_description  # noqa: E402


def _flags(opts, output: Path) -> list[str]:
    return ["--profile", opts.profile, "--num-prompts", str(opts.num_prompts), "--samples", str(opts.samples),
            "--output", str(output), "--cache-dir", str(opts.cache_dir)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="testbed")
    parser.add_argument("--num-prompts", type=int, default=8, help="calibration prompts (default 8)")
    parser.add_argument("--samples", type=int, default=16, help="UNet calls per measurement (default 16)")
    parser.add_argument("--images", type=int, default=64, help="validation captions for the end-to-end PSNR")
    parser.add_argument("--output", help="work directory (default results/bench/mixed-precision-<stamp>)")
    parser.add_argument("--cache-dir", default=str(ROOT / "build" / "cache"))
    opts = parser.parse_args()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    work = Path(opts.output or OUT_DIR / f"mixed-precision-{stamp}")
    if harness_main(["mixed-precision", *_flags(opts, work)]) != 0:
        return 1
    if harness_main(["block-sensitivity", "--recipe", "fp8", "--higher", "fp16", *_flags(opts, work / "blocks")]) != 0:
        return 1

    from calibration.mixed_precision.blocks import top_level_block
    from calibration.mixed_precision.commands import prepare
    from calibration.mixed_precision.search import (
        Configuration,
        SizeModel,
        configuration_entries,
        measure_configuration,
    )
    from calibration.mixed_precision.sensitivity import FP16, OutputRecorder, measure_sensitivity
    from calibration.mixed_precision.solver import greedy, solve_dp

    result = json.loads((work / "mixed_precision.json").read_text())
    blocks = json.loads((work / "blocks" / "block_sensitivity.json").read_text())
    args = argparse.Namespace(profile=opts.profile, model_path=None, schemes=",".join(result["schemes"]),
                              calibration_captions=None, num_prompts=opts.num_prompts, timesteps=None,
                              samples=opts.samples, output=str(work), cache_dir=opts.cache_dir)
    spec, unet, schemes, loop, data = prepare(args)
    sensitivity = measure_sensitivity(unet, schemes, loop, samples=opts.samples, pairs=result["pairs"],
                                      cache=work / "sensitivity.json")
    sizes = SizeModel(unet, sensitivity)
    problem = sensitivity.problem()
    options = [FP16, *sensitivity.schemes]
    reference = OutputRecorder(unet, loop, opts.samples)()

    # seed 003's hybrid, as a configuration of the same groups: sensitive blocks FP16, the rest fp8
    hybrid_choice = {g: FP16 if top_level_block(g) in blocks["sensitive"] else "fp8" for g in sensitivity.groups}
    hybrid_bits = sum(sensitivity.bits[g][o] for g, o in hybrid_choice.items())
    hybrid = Configuration("hybrid", "seed-003-hybrid", hybrid_choice, sizes.percent(hybrid_bits),
                           problem.cost([options.index(hybrid_choice[g]) for g in sensitivity.groups]))
    extra = [hybrid]
    for solver, name in ((solve_dp, "dp"), (greedy, "greedy")):
        solution = solver(problem, hybrid_bits)
        extra.append(Configuration("hybrid size", name, {g: options[j] for g, j in zip(sensitivity.groups, solution.choice)},
                                   sizes.percent(solution.size), solution.cost))
    for point in extra:
        entries = configuration_entries(point.choice, schemes, sensitivity.layers)
        point.measured_mse, point.measured_sqnr_db = measure_configuration(unet, entries, loop, opts.samples, reference)

    # end to end: the headline configurations' images against FP32's
    points = [Configuration(**{k: p[k] for k in ("label", "method", "choice", "percent_of_fp16", "predicted_mse",
                                                 "measured_mse", "measured_sqnr_db")})
              for p in result["points"]]
    smallest = points[0].percent_of_fp16
    near = [p.label for p in points if p.method == "dp"][:2]  # the all-fp8 size +0.1 and +1 points
    headline = [points[0]] + [p for p in points if p.label in near and p.method != "uniform"] + extra
    end_to_end = _end_to_end(opts, spec, unet, schemes, sensitivity, data, headline)

    print(f"\nCPU: {system_description()['cpu_model']} ({isa_summary()}), torch threads {torch.get_num_threads()}")
    print(f"all-fp8 size {smallest:.2f}% of FP16; {len(sensitivity.groups)} groups; sensitivity "
          f"{sensitivity.forward_passes} UNet calls in {sensitivity.seconds:.0f} s")
    print(format_table(["configuration", "% of FP16", "FP16 groups", "UNet SQNR dB", "image PSNR dB",
                        "caption accuracy"],
                       [[f"{r['label']} {r['method']}", f"{r['percent_of_fp16']:.2f}", r["fp16_groups"],
                         f"{r['measured_sqnr_db']:.2f}", f"{r['psnr_db']:.2f}", f"{r['caption_accuracy']:.3f}"]
                        for r in end_to_end["rows"]]))
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"mixed-precision-{opts.profile}-{stamp}.json"
    write_json_atomic(path, {"benchmark": "mixed_precision", "profile": opts.profile, "system": system_description(),
                             "work": str(work), "sweep": result, "block_sensitivity": blocks,
                             "hybrid_comparison": [p.to_json() for p in extra], "end_to_end": end_to_end})
    print(f"\nwritten {path}")
    return 0


def _end_to_end(opts, spec, unet, schemes, sensitivity, data, configurations) -> dict:
    from backends import BackendOptions, create_backend
    from calibration.mixed_precision.commands import save_configuration
    from calibration.mixed_precision.search import configuration_entries
    from sdxl.dataset import load_captions
    from sdxl.latents import draw_latent
    from sdxl.models import load_tokenizers, profile_default
    from sdxl.pipeline import SDXLPipeline
    from sdxl.tokenizers import tokenize
    from testbed.checker import caption_accuracy

    captions = load_captions(profile_default(opts.profile, "default_captions")).captions[:opts.images]
    tokenizers = load_tokenizers(spec)
    latent = draw_latent(spec.latent_size)
    ids = [tokenize(t, captions) for t in tokenizers]
    scratch = Path(tempfile.mkdtemp(prefix="mp-bench-"))

    def images(encodings: Path | None) -> np.ndarray:
        backend = create_backend("torch", spec, BackendOptions(show_progress=False,
                                                               encodings=str(encodings) if encodings else None))
        pipeline = SDXLPipeline(backend, spec, tokenizers)
        return np.concatenate([pipeline.generate(*(i[s:s + 16] for i in ids), latent)
                               for s in range(0, len(captions), 16)])

    fp32 = images(None)
    rows = [{"label": "FP32", "method": "-", "percent_of_fp16": 100.0, "fp16_groups": len(sensitivity.groups),
             "measured_sqnr_db": float("inf"), "psnr_db": float("inf"),
             "caption_accuracy": caption_accuracy(captions, list(fp32))["overall"]["all"]}]
    for index, point in enumerate(configurations):
        path = save_configuration(scratch / f"{index}.json", point,
                                  configuration_entries(point.choice, schemes, sensitivity.layers),
                                  sensitivity.schemes, spec, unet, data)
        generated = images(path)
        psnr = [psnr_ssim(a, b)[0] for a, b in zip(generated, fp32)]
        rows.append({"label": point.label, "method": point.method, "percent_of_fp16": point.percent_of_fp16,
                     "fp16_groups": len(point.fp16_groups), "measured_sqnr_db": point.measured_sqnr_db,
                     "psnr_db": float(np.mean([p for p in psnr if np.isfinite(p)] or [float("inf")])),
                     "caption_accuracy": caption_accuracy(captions, list(generated))["overall"]["all"]})
    return {"captions": len(captions), "rows": rows}


if __name__ == "__main__":
    raise SystemExit(main())
