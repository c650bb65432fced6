"""Sensitivity at full SDXL size (issue 16): one scheme, a subset of the UNet's groups, one step, on this machine.

    .venv/bin/python bench/sensitivity_scale.py [--profile sdxl-random] [--scheme fp8] [--groups 6] [--calibration-captions FILE]

The testbed shows what the search finds; this shows that its measurement runs at SDXL's size within
this machine's memory, and what it costs: the ``sdxl-random`` profile (the full-size architecture,
random weights: no quality figure here means anything), one calibration prompt captured at the
maximum-noise step (``--timesteps single``: one CFG batch of 2 at 1024x1024), the scheme calibrated on
it, then ``measure_sensitivity`` for ``--groups`` candidate groups spread over the UNet (every k-th in
name order: down, mid and up blocks), one UNet call per measurement. Records wall time per stage and
per group, the share of layer MACs the FP32 prefix reuse skipped, and the peak resident memory, then
scales the per-measurement time to every candidate group. Prints a table and writes JSON (with the CPU
and ISA) under ``results/bench/``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT_DIR = ROOT / "results" / "bench"

from calibration.mixed_precision.commands import prepare  # noqa: E402
from calibration.mixed_precision.sensitivity import candidate_groups, measure_sensitivity  # noqa: E402
from sdxl.io import format_table, write_json_atomic  # noqa: E402
from sdxl.system_info import peak_rss_mb, system_description  # noqa: E402


def spread(groups: dict[str, list[str]], count: int) -> dict[str, list[str]]:
    """``count`` of ``groups`` evenly spaced in name order (first and last included)."""
    names = sorted(groups)
    if count >= len(names):
        return groups
    step = (len(names) - 1) / max(count - 1, 1)
    return {names[round(i * step)]: groups[names[round(i * step)]] for i in range(count)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="sdxl-random")
    parser.add_argument("--scheme", default="fp8")
    parser.add_argument("--groups", type=int, default=6, help="candidate groups measured (default 6)")
    parser.add_argument("--calibration-captions", default=str(ROOT.parent / "shared" / "mlperf" / "coco_cal_captions_list.txt"),
                        help="calibration captions (default: MLPerf's list in ../shared/mlperf)")
    parser.add_argument("--cache-dir", default=str(ROOT / "build" / "cache"))
    opts = parser.parse_args()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    args = argparse.Namespace(profile=opts.profile, model_path=None, schemes=opts.scheme,
                              calibration_captions=opts.calibration_captions,
                              num_prompts=1, timesteps="single", samples=1,
                              output=tempfile.mkdtemp(prefix="sensitivity-scale-"), cache_dir=opts.cache_dir)
    started = time.perf_counter()
    prepared = prepare(args)  # load, capture one step, calibrate the scheme
    prepare_seconds, prepare_peak = time.perf_counter() - started, peak_rss_mb()
    entries = prepared.schemes[opts.scheme]
    _, everything = candidate_groups({opts.scheme: entries})
    chosen = spread(everything, opts.groups)

    marks: list[float] = []

    def timed(items, **_):  # measure_sensitivity's progress hook: a timestamp as each group starts and at the end
        for item in items:
            marks.append(time.perf_counter())
            yield item
        marks.append(time.perf_counter())

    started = time.perf_counter()
    sensitivity = measure_sensitivity(prepared.unet, {opts.scheme: entries}, prepared.loop, samples=1, pairs="none",
                                      groups=chosen, progress=timed)
    total = time.perf_counter() - started
    reference_seconds = marks[0] - started  # the FP32 reference pass (with the unit recordings)
    per_group = {g: marks[i + 1] - marks[i] for i, g in enumerate(sensitivity.groups)}
    mean_measurement = sum(per_group.values()) / len(per_group)
    params = sum(p.numel() for p in prepared.unet.parameters())
    record = {"benchmark": "sensitivity_scale", "date": dt.datetime.now().isoformat(timespec="seconds"),
              "system": system_description(), "torch_threads": torch.get_num_threads(), "profile": opts.profile,
              "unet_parameters": params, "image_size": prepared.spec.image_size, "scheme": opts.scheme,
              "calibration": {"prompts": 1, "timesteps": "single", "unet_calls_per_measurement": 1},
              "candidate_groups": len(everything), "measured_groups": sensitivity.groups,
              "prepare_seconds": prepare_seconds, "prepare_peak_rss_mb": prepare_peak,
              "reference_pass_seconds": reference_seconds, "seconds_per_group": per_group,
              "sensitivity_seconds": total, "reused_macs_fraction": sensitivity.reused_macs_fraction,
              "unary": sensitivity.unary, "peak_rss_mb": peak_rss_mb(),
              "all_groups_one_scheme_hours": (reference_seconds + mean_measurement * len(everything)) / 3600}
    system = record["system"]
    print(f"CPU {system['cpu_model']} ({system['isa']}), {torch.get_num_threads()} torch threads; {opts.profile} "
          f"UNet {params / 1e9:.2f} B parameters at {prepared.spec.image_size}px; scheme {opts.scheme}")
    print(format_table(["stage", "seconds", "note"], [
        ["load + capture 1 step + calibrate", f"{prepare_seconds:.0f}", f"peak RSS {prepare_peak / 1024:.1f} GiB"],
        ["FP32 reference pass", f"{reference_seconds:.0f}", "records the top-level units' outputs"],
        *[[f"group {g}", f"{s:.0f}", f"SQNR {sensitivity.unary[g][opts.scheme]['sqnr_db']:.1f} dB (random weights)"]
          for g, s in per_group.items()],
        ["sensitivity total", f"{total:.0f}", f"{100 * sensitivity.reused_macs_fraction:.0f}% of layer MACs skipped"],
    ]))
    print(f"peak RSS {record['peak_rss_mb'] / 1024:.1f} GiB; {len(everything)} candidate groups under {opts.scheme}: "
          f"all of them at one UNet call each ~{record['all_groups_one_scheme_hours']:.1f} h on this CPU")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"sensitivity-scale-{opts.profile}-{stamp}.json"
    write_json_atomic(path, record)
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
