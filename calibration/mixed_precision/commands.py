"""``sensitivity`` and ``mixed-precision``: seed 001's search for the smallest UNet that stays close to FP32.

``sensitivity`` calibrates each scheme (recipe) on the UNet once, then measures every candidate group
under every scheme alone (and consecutive pairs): ``<output>/sensitivity.json`` (the cache a killed
run resumes from) and ``sensitivity.csv``. ``mixed-precision`` reuses it, sweeps size budgets (% of
FP16), solves each with the DP (over every scheme and over FP16 and each scheme alone; the greedy and
random-FP16 baselines), measures every configuration (output MSE/SQNR vs FP32 on the calibration
samples), reports per budget the DP candidate measured best, optionally generates the reported ones'
images, and writes ``mixed_precision.{json,md}``, the Pareto plot and the reported configurations as
encodings files every backend loads, each with the recipe that reproduces it.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from sdxl.arg_types import int_at_least
from sdxl.errors import UserError
from sdxl.io import atomic_path, check_writable_dir, format_table, write_json_atomic, write_text_atomic

from .search import PICKS

ANNA_SCHEMES = "fp8,fp8-p5-95,fp8-p10-90"


def _add_common(parser: argparse.ArgumentParser, schemes: bool = True) -> None:
    from sdxl.models import PROFILES

    parser.add_argument("--profile", default="testbed", choices=PROFILES)
    parser.add_argument("--model-path", help="SDXL checkpoint directory (profile sdxl)")
    if schemes:
        parser.add_argument("--schemes", default=ANNA_SCHEMES,
                            help=f"comma-separated UNet recipes to choose among (default ANNA's: {ANNA_SCHEMES}; on "
                                 "the testbed fp8 alone chooses better near the all-FP8 size: docs/mixed-precision.md)")
    parser.add_argument("--calibration-captions", help="calibration captions (default: the profile's)")
    parser.add_argument("--num-prompts", type=int_at_least(1), default=8, help="calibration prompts (default 8)")
    parser.add_argument("--timesteps", help="captured steps: all | uniform:K | list:... (default: the first scheme's)")
    parser.add_argument("--samples", type=int_at_least(1), default=8,
                        help="UNet calls (CFG batches) each measurement runs (default 8)")
    if schemes:
        parser.add_argument("--pairs", default="same", choices=("none", "same", "all"),
                            help="consecutive-group interactions to measure: none, same scheme on both (default), all")
        parser.add_argument("--scores", default="measured", choices=("measured", "gradient"),
                            help="measured: each group quantized alone, the output MSE (ANNA; default); gradient: "
                                 "AutoQuantize's Taylor scores from one backward pass per sample (no pair terms)")
        parser.add_argument("--around", default="fp32",
                            help="where the measured model is expanded: fp32 (each group quantized with the rest "
                                 "FP32; default) or one of --schemes (every group on it, each moved to FP16 or "
                                 "another scheme: exact near the all-quantized size, where small budgets choose)")
    parser.add_argument("--output", required=True, help="output directory (sensitivity.json resumes in it)")
    parser.add_argument("--cache-dir", default="build/cache", help="calibration data cache")


def register(subparsers) -> None:
    sens = subparsers.add_parser("sensitivity", help="per-module sensitivity of the UNet to each scheme (seed 001)",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(sens)
    sens.set_defaults(func=run_sensitivity)
    mixed = subparsers.add_parser("mixed-precision", help="ANNA's size-constrained mixed precision by DP, swept",
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(mixed)
    mixed.add_argument("--percents", help="size budgets, % of FP16, comma-separated (default: the all-quantized "
                                          "size +0.1, +1, then +10-point steps to 100)")
    mixed.add_argument("--constraint", default="size", choices=("size", "bitops"),
                       help="what the budget limits: weight size (default; ANNA's, all options 8-bit activations) "
                            "or BitOps, MACs x weight bits x activation bits (AIMET AMP's; for schemes that "
                            "differ in activation bits)")
    mixed.add_argument("--baseline", help="the uniform scheme the budgets grow from (default: the first scheme)")
    mixed.add_argument("--target-sqnr", type=float, help="report the smallest DP configuration whose measured "
                                                         "output SQNR reaches this (dB)")
    mixed.add_argument("--pick", default="measured", choices=PICKS,
                       help="which DP configuration a budget reports: measured (default; the lowest measured output "
                            "MSE among the DP over every scheme and the DP over FP16 and each scheme alone) or "
                            "model (the DP over every scheme, as the quadratic model ranks it)")
    mixed.add_argument("--images", type=int_at_least(1),
                       help="generate this many validation captions end to end for uniform and every reported DP "
                            "configuration: image PSNR vs FP32 (and caption accuracy on the testbed) per budget, "
                            "in the table and the Pareto plot (default: none; 32 with --target-psnr)")
    mixed.add_argument("--target-psnr", type=float, help="report the smallest DP configuration whose images reach this "
                                                         "mean PSNR against FP32's (dB), verified by generating them")
    mixed.add_argument("--random-draws", type=int_at_least(0), default=5,
                       help="random-FP16 baselines per budget (default 5)")
    mixed.set_defaults(func=run_mixed_precision)
    blocks = subparsers.add_parser("block-sensitivity", help="seed 003: blocks quantized cumulatively, SQNR per "
                                                             "timestep, and the hybrid-precision recipe",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(blocks, schemes=False)
    blocks.add_argument("--recipe", default="w8a8", help="the UNet recipe analysed (default w8a8)")
    blocks.add_argument("--share", type=float, default=0.5,
                        help="keep at higher precision the fewest blocks whose output-noise shares reach this "
                             "(0-1, default 0.5)")
    blocks.add_argument("--higher", default="a16", choices=("a16", "fp16"),
                        help="what sensitive blocks get: 16-bit activations (default) or no quantization")
    blocks.set_defaults(func=run_block_sensitivity)


def _schemes(args: argparse.Namespace) -> list[str]:
    from calibration.recipes import load_recipe
    from quant.encodings import EncodingsError

    given = getattr(args, "schemes", None) or args.recipe
    names = [n.strip() for n in given.split(",") if n.strip()]
    if not names or len(set(names)) != len(names):
        raise UserError(f"--schemes needs distinct recipe names (got {given!r})")
    for name in names:
        try:
            recipe = load_recipe(name)
        except EncodingsError as exc:
            raise UserError(f"--schemes: {exc}") from None
        if recipe.components != ("unet",) or recipe.methods:
            raise UserError(f"--schemes: {name} must quantize the UNet only and run no methods (a scheme is "
                            "one PTQ variant; methods change weights the other schemes share)")
    return names


def _around(args: argparse.Namespace, names: list[str]) -> str | None:
    """``--around`` as ``measure_sensitivity`` takes it (None: FP32), checked before any model loads."""
    around = getattr(args, "around", "fp32")
    if around == "fp32":
        return None
    if around not in names:
        raise UserError(f"--around must be fp32 or one of --schemes ({', '.join(names)}), got {around!r}")
    if getattr(args, "scores", "measured") == "gradient":
        raise UserError("--around applies to measured scores; --scores gradient is a Taylor expansion at FP32")
    return around


@dataclass
class Prepared:
    """What every command here starts from: the FP32 UNet, each scheme's entries for it, its forward loop."""

    spec: Any
    unet: torch.nn.Module
    schemes: dict[str, Any]
    loop: Callable[[torch.nn.Module], None]
    data: Any


def prepare(args: argparse.Namespace) -> Prepared:
    """Load the FP32 model, capture, calibrate each scheme (once: a bench running several commands shares it)."""
    from calibration.capture import CalibrationDataError
    from calibration.pipeline_calibration import calibrate_components, capture_for, forward_loop_for
    from calibration.recipes import load_recipe
    from quant.encodings import EncodingsError
    from sdxl.models import load_components, model_spec
    from sdxl.progress import progress_enabled

    names = _schemes(args)
    _around(args, names)
    output = Path(args.output)
    check_writable_dir(output, "--output")
    spec = model_spec(args.profile, args.model_path)
    components = load_components(spec)
    try:
        data = capture_for(components, load_recipe(names[0]), args.calibration_captions, args.num_prompts,
                           args.timesteps, args.cache_dir, free_text_encoders=True, show_progress=progress_enabled())
        schemes = {name: calibrate_components(components, name, apply=False, data=data,
                                              show_progress=False).components["unet"] for name in names}
    except (EncodingsError, CalibrationDataError) as exc:
        raise UserError(str(exc)) from None
    return Prepared(spec, components.unet, schemes, forward_loop_for("unet", data, components), data)


def measure(args, prepared: Prepared):
    """The sensitivity of ``prepared``'s UNet: measured (cached, and resumed, in ``<output>/sensitivity.json``)
    or, with ``--scores gradient``, AutoQuantize's scores (seconds: written there, not resumed)."""
    from sdxl.progress import progress

    from .gradient_scores import gradient_sensitivity
    from .sensitivity import measure_sensitivity

    cache = Path(args.output) / "sensitivity.json"
    if getattr(args, "scores", "measured") == "gradient":
        sensitivity = gradient_sensitivity(prepared.unet, prepared.schemes, prepared.loop, samples=args.samples)
        write_json_atomic(cache, {"scores": "gradient", **sensitivity.to_json()})
        return sensitivity
    return measure_sensitivity(prepared.unet, prepared.schemes, prepared.loop, samples=args.samples,
                               pairs=args.pairs, cache=cache, progress=progress,
                               around=_around(args, list(prepared.schemes)))


def run_sensitivity(args: argparse.Namespace) -> int:
    from .sensitivity import FP16

    sensitivity = measure(args, prepare(args))
    output = Path(args.output)
    with atomic_path(output / "sensitivity.csv") as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["group", "option", "mse", "sqnr_db", "bits", "around"])
        for group in sensitivity.groups:
            for option in sensitivity.moves:
                cell = sensitivity.unary[group][option]
                writer.writerow([group, option, f"{cell['mse']:.6g}", f"{cell['sqnr_db']:.3f}",
                                 sensitivity.bits[group][option], sensitivity.around or "fp32"])
    if sensitivity.around:
        first, what = FP16, (f"groups that move the output most when FP16 (of {len(sensitivity.groups)}; output "
                             f"SQNR with that group alone FP16, every other on {sensitivity.around}: "
                             f"{sensitivity.base_sqnr_db:.2f} dB with none)")
    else:
        first = sensitivity.schemes[0]
        what = (f"most sensitive groups under {first} (of {len(sensitivity.groups)}; output SQNR with that group "
                "alone quantized)")
    rows = [[g, f"{sensitivity.unary[g][first]['sqnr_db']:.2f}", f"{mse:.3g}"]
            for g, mse in sensitivity.ranking(first)[:10]]
    print(f"{what}:")
    print(format_table(["group", "SQNR dB", "MSE"], rows))
    print(f"{sensitivity.forward_passes} UNet calls, {sensitivity.seconds:.1f} s "
          f"({100 * sensitivity.reused_macs_fraction:.0f}% of their layer MACs skipped: FP32 outputs reused "
          f"before each group); wrote {output / 'sensitivity.json'} and {output / 'sensitivity.csv'}")
    return 0


def _percents(args: argparse.Namespace, smallest: float) -> list[float]:
    if args.percents:
        try:
            return [float(p) for p in args.percents.split(",")]
        except ValueError:
            raise UserError(f"--percents takes numbers (got {args.percents!r})") from None
    steps = [smallest + 0.1, smallest + 1.0] + [float(p) for p in range(int(smallest // 10 + 1) * 10, 101, 10)]
    return [round(p, 4) for p in sorted(set(steps)) if p <= 100.0]


def run_mixed_precision(args: argparse.Namespace) -> int:
    if args.baseline and args.baseline not in _schemes(args):
        raise UserError(f"--baseline {args.baseline} is not one of --schemes")
    output = mixed_precision(args, prepare(args))[2]
    print((output / "mixed_precision.md").read_text())
    sys.stdout.flush()
    return 0


def mixed_precision(args: argparse.Namespace, prepared: Prepared):
    """The sweep on ``prepared``: its sensitivity, the configurations (measured, the reported DP ones
    chosen, their images with ``--images``) and the result written to ``<output>/mixed_precision.{json,md}``
    and ``pareto.png``; returns ``(sensitivity, points, output)``."""
    import yaml

    from calibration.recipes import load_recipe

    from .search import (
        budget_model,
        choose,
        configuration_entries,
        configuration_recipe,
        measure_configuration,
        random_baselines,
        rank_correlation,
        smallest_meeting,
        sweep,
    )
    from .sensitivity import OutputRecorder

    started = time.time()
    spec, unet, schemes, loop, data = prepared.spec, prepared.unet, prepared.schemes, prepared.loop, prepared.data
    sensitivity = measure(args, prepared)
    sizes = budget_model(unet, sensitivity, args.constraint)
    baseline = args.baseline or sensitivity.schemes[0]
    costs = sensitivity.bits if args.constraint == "size" else sensitivity.bitops
    smallest = sizes.percent(sum(min(c.values()) for c in costs.values()))
    points = sweep(sensitivity, sizes, _percents(args, smallest), baseline, constraint=args.constraint)
    reference = OutputRecorder(unet, loop, args.samples)()

    def measure_all(configurations):
        for point in configurations:
            entries = configuration_entries(point.choice, schemes, sensitivity.layers)
            point.measured_mse, point.measured_sqnr_db = measure_configuration(unet, entries, loop, args.samples,
                                                                               reference)
        return configurations

    measure_all(points)
    dp = choose(points, args.pick)
    for point in dp:  # random FP16 picks of the reported configuration's count, after the budget's other points
        randoms = measure_all(random_baselines(sensitivity, sizes, point, baseline, args.random_draws, args.constraint))
        last = max(i for i, p in enumerate(points) if p.label == point.label)
        points[last + 1:last + 1] = randoms
    recipes = {name: load_recipe(name).for_component("unet") for name in sensitivity.schemes}
    capture = {"num_prompts": args.num_prompts, **({"timesteps": args.timesteps} if args.timesteps else {})}
    output = Path(args.output)
    (output / "encodings").mkdir(exist_ok=True)
    for point in dp:
        entries = configuration_entries(point.choice, schemes, sensitivity.layers)
        stem = dp_stem(point)
        encodings_path, recipe_path = output / "encodings" / f"{stem}.json", output / "encodings" / f"{stem}.yaml"
        save_configuration(encodings_path, point, entries, sensitivity.schemes, spec, unet, data)
        recipe = configuration_recipe(point.choice, recipes, sensitivity.layers, unet, f"mixed-precision-{stem}",
                                      capture)
        write_text_atomic(recipe_path, f"# written by ./run.sh mixed-precision: {point.label} DP configuration "
                          f"({point.method}); ./run.sh calibrate --recipe {recipe_path} (with the same calibration "
                          f"captions) writes {encodings_path.name}'s entries\n" + yaml.safe_dump(recipe, sort_keys=False))
    model_dp = [p for p in points if p.method == "dp"]
    result: dict[str, Any] = {
        "mixed_precision_json_version": 2, "profile": spec.profile, "schemes": sensitivity.schemes,
        "baseline": baseline, "samples": args.samples, "scores": args.scores,
        "pairs": "none" if args.scores == "gradient" else args.pairs, "around": sensitivity.around or "fp32",
        "constraint": args.constraint, "pick": args.pick,
        "percent_of": "FP16 weight size of the UNet" if args.constraint == "size" else
                      "FP16 BitOps (16x16 bits per MAC) of the candidate groups",
        "sensitivity": {"groups": len(sensitivity.groups), "unet_calls": sensitivity.forward_passes,
                        "seconds": round(sensitivity.seconds, 1)},
        "rank_correlation_dp": rank_correlation([p.predicted_mse for p in model_dp],
                                                [p.measured_mse for p in model_dp]),
        "rank_correlation_reported": rank_correlation([p.predicted_mse for p in dp], [p.measured_mse for p in dp]),
        "rank_correlation_all": rank_correlation([p.predicted_mse for p in points], [p.measured_mse for p in points])}
    images = args.images or (32 if args.target_psnr is not None else None)
    if images:
        from .images import ImageFidelity

        fidelity = ImageFidelity(spec, images)
        configuration_images(fidelity, [points[0], *dp], sensitivity, schemes, spec, unet, data)
        fp32 = fidelity.correct(fidelity.reference)
        result["images"] = {"captions": len(fidelity.captions),
                            "fp32_caption_accuracy": None if fp32 is None else float(fp32.mean())}
    if args.target_sqnr is not None:
        best = smallest_meeting(dp, "measured_sqnr_db", args.target_sqnr)
        result["target"] = {"sqnr_db": args.target_sqnr, "smallest": best.to_json() if best else None}
    if args.target_psnr is not None:
        best = smallest_meeting(dp, "image_psnr_db", args.target_psnr)
        result["target_psnr"] = {"psnr_db": args.target_psnr, "images": images,
                                 "best_psnr_db": max((p.image_psnr_db for p in dp), default=None),
                                 "smallest": best.to_json() if best else None}
    result.update(points=[p.to_json() for p in points], seconds=round(time.time() - started, 1))
    write_json_atomic(output / "mixed_precision.json", result)
    _write_table(output, points, result)
    _write_plot(output / "pareto.png", points, result.get("images", {}).get("fp32_caption_accuracy"))
    return sensitivity, points, output


def dp_stem(point) -> str:
    """A DP configuration's file name stem, ``dp-51.5061`` for the 51.5061% budget (no ``with_suffix``:
    the label has a dot)."""
    return f"dp-{point.label.rstrip('%')}"


def configuration_images(fidelity, points: list, sensitivity, schemes, spec, unet, data) -> list[tuple]:
    """Each of ``points`` generated end to end on ``fidelity``'s captions (an
    :class:`~calibration.mixed_precision.images.ImageFidelity`): per caption, its image PSNR against
    FP32's and (testbed; else None) the checker's verdict, one ``(psnr, correct)`` pair per point; the
    means are set on the point (``image_psnr_db``, ``caption_accuracy``). Points with the same choice
    generate once."""
    import tempfile

    from .images import mean_psnr
    from .search import configuration_entries

    generated_for: dict[tuple, tuple] = {}
    out = []
    with tempfile.TemporaryDirectory(prefix="mp-images-") as scratch:
        for index, point in enumerate(points):
            key = tuple(sorted(point.choice.items()))
            if key not in generated_for:
                path = save_configuration(Path(scratch) / f"{index}.json", point,
                                          configuration_entries(point.choice, schemes, sensitivity.layers),
                                          sensitivity.schemes, spec, unet, data)
                generated = fidelity.images(path, f"{point.label} {point.method} images")
                generated_for[key] = (fidelity.psnr(generated), fidelity.correct(generated))
            psnr, correct = generated_for[key]
            point.image_psnr_db = mean_psnr(psnr)
            point.caption_accuracy = None if correct is None else float(correct.mean())
            out.append((psnr, correct))
    return out


def save_configuration(path: Path, point, entries, schemes: list[str], spec, unet, data) -> Path:
    """A configuration as an encodings file (fake-quant, ONNX QDQ and the AIMET export all read it)."""
    from quant.encodings import Encodings
    from quant.sizes import model_size

    encodings = Encodings(components={"unet": entries},
                          recipe={"name": f"mixed-precision-{point.method}-{point.label}", "schemes": schemes,
                                  "fp16_groups": point.fp16_groups},
                          model={"profile": spec.profile, "fingerprint": spec.fingerprint()},
                          calibration={"captions": data.manifest["captions"], "num_prompts": data.manifest["num_prompts"],
                                       "timesteps": data.manifest["timesteps"]},
                          size={"unet": model_size(unet, entries)})
    return encodings.save(path)


def _write_table(output: Path, points, result: dict) -> None:
    images = "images" in result
    rows = []
    for label in dict.fromkeys(p.label for p in points):
        group = [p for p in points if p.label == label]
        randoms = [p for p in group if p.method.startswith("random")]
        for p in group:
            if p.method.startswith("random"):
                continue
            row = [label, p.method + (" *" if p.chosen else ""), f"{p.percent_of_fp16:.2f}", len(p.fp16_groups),
                   f"{p.predicted_mse:.3g}", f"{p.measured_mse:.3g}", f"{p.measured_sqnr_db:.2f}"]
            if images:
                row += ["-" if p.image_psnr_db is None else f"{p.image_psnr_db:.2f}",
                        "-" if p.caption_accuracy is None else f"{p.caption_accuracy:.3f}"]
            rows.append(row)
        if randoms:
            sqnr = [p.measured_sqnr_db for p in randoms]
            rows.append([label, f"random FP16 x{len(randoms)}", f"{sum(p.percent_of_fp16 for p in randoms) / len(randoms):.2f}",
                         len(randoms[0].fp16_groups), "-", f"{sum(p.measured_mse for p in randoms) / len(randoms):.3g}",
                         f"{sum(sqnr) / len(sqnr):.2f} (min {min(sqnr):.2f})"] + (["-", "-"] if images else []))
    headers = ["budget", "method", "% of FP16", "FP16 groups", "predicted MSE", "measured MSE", "output SQNR dB"]
    if images:
        headers += ["image PSNR dB", "caption accuracy"]
    rho = result["rank_correlation_dp"]
    pick = ("the lowest measured output MSE among the DP candidates (dp: every scheme; dp[s]: FP16 and s alone)"
            if result["pick"] == "measured" else "the DP over every scheme, as the model ranks it")
    lines = [f"# Mixed precision: {', '.join(result['schemes'])} (profile {result['profile']})", "",
             f"Budgets and sizes: % of {result['percent_of']}.", "",
             f"{result['sensitivity']['groups']} candidate groups; sensitivity {result['sensitivity']['unet_calls']} UNet "
             f"calls in {result['sensitivity']['seconds']} s; {result['samples']} samples per measurement; model "
             f"expanded around {result['around']}, pairs {result['pairs']}. Reported per budget (*): {pick}.", "",
             format_table(headers, rows, markdown=True), "",
             f"Rank correlation, predicted vs measured MSE over the DP sweep: {rho:.3f} (over the reported "
             f"configurations: {_rho(result['rank_correlation_reported'])})" if rho is not None else
             "Rank correlation: too few distinct points"]
    if images:
        fp32 = result["images"]["fp32_caption_accuracy"]
        lines.append(f"Images: {result['images']['captions']} validation captions, 20 steps, PSNR against FP32's images"
                     + (f"; FP32's caption accuracy {fp32:.3f}" if fp32 is not None else ""))
    if "target" in result:
        best = result["target"]["smallest"]
        lines.append(f"Smallest DP configuration with output SQNR >= {result['target']['sqnr_db']} dB: " +
                     (f"{best['label']} ({best['percent_of_fp16']:.2f}% of FP16, {len(best['fp16_groups'])} groups FP16)"
                      if best else "none in the sweep"))
    if "target_psnr" in result:
        target = result["target_psnr"]
        best = target["smallest"]
        lines.append(f"Smallest DP configuration with mean image PSNR >= {target['psnr_db']} dB against FP32 "
                     f"({target['images']} captions, generated): " +
                     (f"{best['label']} ({best['percent_of_fp16']:.2f}% of FP16, {best['image_psnr_db']:.2f} dB)" if best
                      else "none in the sweep" + (f" (best {target['best_psnr_db']:.2f} dB)"
                                                  if target["best_psnr_db"] is not None else "")))
    write_text_atomic(output / "mixed_precision.md", "\n".join(lines) + "\n")


def _rho(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _write_plot(path: Path, points, fp32_accuracy: float | None = None) -> None:
    """Size against UNet output SQNR; with images, also against image PSNR and caption accuracy (FP32's
    as a line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("measured_sqnr_db", "UNet output SQNR vs FP32 (dB)")]
    if any(p.image_psnr_db is not None for p in points):
        panels.append(("image_psnr_db", "image PSNR vs FP32 (dB)"))
    if any(p.caption_accuracy is not None for p in points):
        panels.append(("caption_accuracy", "caption accuracy (testbed checker)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    styles = {"reported DP": ("tab:blue", "o", lambda p: p.chosen),
              "other DP candidates": ("tab:cyan", "x", lambda p: p.is_dp and not p.chosen),
              "greedy": ("tab:orange", "s", lambda p: p.method == "greedy"),
              "uniform": ("black", "*", lambda p: p.method == "uniform"),
              "random FP16 (same count)": ("tab:gray", ".", lambda p: p.method.startswith("random"))}
    for axis, (field, ylabel) in zip(axes[0], panels):
        for label, (colour, marker, keep) in styles.items():
            chosen = [p for p in points if keep(p) and getattr(p, field) is not None]
            if chosen:
                axis.plot([p.percent_of_fp16 for p in chosen], [getattr(p, field) for p in chosen], marker=marker,
                          color=colour, linestyle="-" if label == "reported DP" else "none", label=label)
        if field == "caption_accuracy" and fp32_accuracy is not None:
            axis.axhline(fp32_accuracy, color="tab:green", linestyle="--", label="FP32")
            axis.legend(fontsize=8)
        axis.set_xlabel("UNet size, % of FP16")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def run_block_sensitivity(args: argparse.Namespace) -> int:
    if not 0.0 < args.share <= 1.0:
        raise UserError(f"--share must be in (0, 1], got {args.share}")
    block_sensitivity(args, prepare(args))
    return 0


def block_sensitivity(args: argparse.Namespace, prepared: Prepared) -> dict[str, Any]:
    """Seed 003's analysis of ``args.recipe`` (one of ``prepared``'s schemes): ``block_sensitivity.json``,
    the heat map and the hybrid recipe in ``args.output``; returns what the JSON holds."""
    import yaml

    from calibration.recipes import load_recipe
    from sdxl.progress import progress

    from .blocks import block_progressive, hybrid_recipe

    if args.recipe not in prepared.schemes:
        raise UserError(f"--recipe {args.recipe} is not one of the calibrated schemes ({', '.join(prepared.schemes)})")
    check_writable_dir(Path(args.output), "--output")
    analysis = block_progressive(prepared.unet, prepared.schemes[args.recipe], prepared.loop, samples=args.samples,
                                 progress=progress)
    sensitive = analysis.sensitive(args.share)
    output = Path(args.output)
    hybrid = hybrid_recipe(load_recipe(args.recipe).to_json(), sensitive, args.higher)
    recipe_path = output / f"{hybrid['name']}.yaml"
    write_text_atomic(recipe_path, f"# written by ./run.sh block-sensitivity --recipe {args.recipe} --share {args.share} "
                           f"--higher {args.higher}\n" + yaml.safe_dump(hybrid, sort_keys=False))
    result = {"recipe": args.recipe, "share": args.share, "higher": args.higher, "sensitive": sensitive,
              "hybrid_recipe": str(recipe_path), **analysis.to_json()}
    write_json_atomic(output / "block_sensitivity.json", result)
    _write_heatmap(output / "block_sqnr.png", analysis, args.recipe)
    rows = [[b, f"{c:.2f}", f"{a:.2f}", f"{100 * s:.1f}", "yes" if b in sensitive else ""]
            for b, c, a, s in zip(analysis.blocks, analysis.cumulative_total_db, analysis.alone_total_db,
                                  analysis.noise_share)]
    print("output SQNR vs FP32 over every captured timestep (per timestep: the heat map)")
    print(format_table(["block (execution order)", "cumulative SQNR dB", "alone SQNR dB", "noise share %",
                        f"kept {args.higher}"], rows))
    print(f"hybrid recipe: {recipe_path} (calibrate it with ./run.sh calibrate --recipe {recipe_path}); heat map: "
          f"{output / 'block_sqnr.png'}")
    return result


def _write_heatmap(path: Path, analysis, recipe: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 0.35 * len(analysis.blocks) + 2), sharey=True)
    for axis, values, title in ((axes[0], analysis.cumulative_db, "cumulative (blocks 0..k quantized)"),
                                (axes[1], analysis.alone_db, "block k alone")):
        data = np.array(values, dtype=float)
        data[~np.isfinite(data)] = np.nan
        image = axis.imshow(data, aspect="auto", cmap="viridis")
        axis.set_xticks(range(len(analysis.timesteps)), [str(t) for t in analysis.timesteps], rotation=90, fontsize=7)
        axis.set_xlabel("timestep")
        axis.set_title(f"{recipe}: output SQNR (dB), {title}", fontsize=9)
        fig.colorbar(image, ax=axis)
    axes[0].set_yticks(range(len(analysis.blocks)), analysis.blocks, fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
