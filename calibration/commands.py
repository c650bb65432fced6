"""``./run.sh calibrate``: capture, calibrate, write encodings + AIMET export + per-layer SQNR report."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from quant.encodings import EncodingsError
from sdxl.arg_types import int_at_least
from sdxl.io import check_writable_dir


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "calibrate", help="calibrate a quantization recipe and write encodings",
        description="Run the FP32 pipeline over calibration captions, calibrate RECIPE on the captured activations, "
                    "and write the encodings JSON, its AIMET 1.0.0 export and a per-layer SQNR report beside it.")
    parser.add_argument("--profile", default="testbed",
                        help="model profile: testbed, tiny, sdxl-random or sdxl (default testbed)")
    parser.add_argument("--model-path", help="SDXL checkpoint directory (profile sdxl)")
    from .recipes import builtin_recipes

    parser.add_argument("--recipe", required=True,
                        help=f"built-in recipe name ({', '.join(builtin_recipes())}) or a recipe file")
    parser.add_argument("--calibration-captions", help="calibration captions (MLPerf's train2014 list or TSV); "
                                                       "testbed and tiny default to their own")
    parser.add_argument("--num-prompts", type=int_at_least(1), help="use the first N captions")
    parser.add_argument("--timesteps", help="all | single | uniform:K | list:951,901,... (default: the recipe's, else all)")
    parser.add_argument("--output", required=True, help="encodings JSON file to write")
    parser.add_argument("--cache-dir", default="build/cache", help="cache root; calibration data under <dir>/calib")
    parser.add_argument("--sqnr-samples", type=int_at_least(0), default=2, help="UNet calls used for the SQNR report (0: skip it)")
    parser.set_defaults(func=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> int:
    from sdxl.errors import UserError

    output = Path(args.output)
    if output.suffix != ".json" or output.is_dir():
        raise UserError(f"--output is the encodings file and must end in .json (got {args.output})")
    check_writable_dir(output.parent, "--output")
    encodings, written, reports = calibrate_to_file(
        args.profile, args.model_path, args.recipe, output, calibration_captions=args.calibration_captions,
        num_prompts=args.num_prompts, timesteps=args.timesteps, cache_dir=args.cache_dir,
        sqnr_samples=args.sqnr_samples)
    _print_summary(encodings, output, written, reports)
    return 0


def calibrate_to_file(profile: str, model_path: str | None, recipe_name: str, output: Path, *,
                      calibration_captions: str | None = None, num_prompts: int | None = None,
                      timesteps: str | None = None, cache_dir: str = "build/cache", sqnr_samples: int = 2,
                      show_progress: bool = True):
    """Load the FP32 model, capture, calibrate ``recipe_name``; write the encodings, AIMET export, SQNR report.

    ``calibrate`` and ``run --recipe`` (which calibrates once, before its LoadGen tests, into the run
    directory) share it. Returns ``(encodings, {component: aimet path}, sqnr reports)``; bad recipes or
    calibration inputs raise :class:`sdxl.errors.UserError`.
    """
    from quant.aimet_export import export_aimet
    from quant.sizes import total_size
    from sdxl.errors import UserError
    from sdxl.models import load_components, model_spec

    from .capture import CalibrationDataError
    from .pipeline_calibration import calibrate_components, capture_for, forward_loop_for
    from .recipes import load_recipe

    started = time.time()
    try:
        recipe = load_recipe(recipe_name)
        spec = model_spec(profile, model_path)
        components = load_components(spec)
        data = capture_for(components, recipe, calibration_captions, num_prompts, timesteps, cache_dir,
                           free_text_encoders=True, show_progress=show_progress)
        encodings = calibrate_components(components, recipe, apply=False, data=data, show_progress=show_progress)
    except (EncodingsError, CalibrationDataError) as exc:
        raise UserError(str(exc)) from None
    reports = []
    if sqnr_samples > 0:
        from quant.fake_quant import apply_encodings

        from .sqnr import sqnr_report

        for name, entries in encodings.components.items():
            module = getattr(components, name)
            if module is None:
                continue
            fp32 = {k.partition(".")[2]: v for k, v in encodings.fp32_values.items() if k.startswith(f"{name}.")}
            reports.append(sqnr_report(module, name, entries, forward_loop_for(name, data, components),
                                       lambda m=module, e=entries, n=name: apply_encodings(m, e, n),
                                       samples=sqnr_samples, block_level=spec.image_size >= 1024, fp32_values=fp32))
    encodings.calibration["seconds"] = round(time.time() - started, 1)
    encodings.size["total"] = total_size({k: v for k, v in encodings.size.items() if k != "total"})
    output.parent.mkdir(parents=True, exist_ok=True)
    encodings.save(output)
    written = export_aimet(encodings, output)
    if reports:
        from .sqnr import write_report

        write_report(reports, output.with_suffix(".sqnr.csv"), output.with_suffix(".sqnr.png"))
    return encodings, written, reports


def _print_summary(encodings, output: Path, written: dict, reports: list) -> None:
    total = encodings.size.get("total", {})
    print(f"encodings: {output} ({encodings.num_quantizers()} quantizers, recipe {encodings.recipe.get('name')}, "
          f"{total.get('percent_of_fp16', '?')}% of FP16, {total.get('bits_per_parameter', '?')} bits/param)")
    for component, path in written.items():
        print(f"AIMET 1.0.0 export ({component}): {path}")
    for report in reports:
        rows = report.rows()
        final = next((r for r in rows if r["layer"] == "<output>"), None)
        worst = sorted((r for r in rows if r["local_sqnr_db"] != ""), key=lambda r: r["local_sqnr_db"])[:3]
        if final:
            print(f"{report.component}: output SQNR {final['accumulated_sqnr_db']} dB; lowest local: " +
                  ", ".join(f"{r['layer']} {r['local_sqnr_db']} dB" for r in worst))
    if reports:
        print(f"SQNR report: {output.with_suffix('.sqnr.csv')} and {output.with_suffix('.sqnr.png')}")
    sys.stdout.flush()
