"""Sensitivity with and without the FP32 prefix reuse (issue 16), side by side on one machine.

    .venv/bin/python bench/sensitivity_reuse.py [--profile testbed] [--schemes fp8] [--samples 4] [--rounds 2]

``measure_sensitivity`` replays the FP32 outputs of the component's top-level units that finish before
each measured group (``calibration/mixed_precision/prefix_reuse.py``). This times the same measurement
(every candidate group, one scheme, ``--pairs none``) with the reuse and with ``reuse_limit_bytes=0``
(the whole forward every time), alternating per round, checks that the measured numbers are identical,
and reports the share of layer MACs skipped. Prints a table and writes JSON (with the CPU and ISA)
under ``results/bench/``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT_DIR = ROOT / "results" / "bench"

from calibration.mixed_precision.commands import prepare  # noqa: E402
from calibration.mixed_precision.sensitivity import measure_sensitivity  # noqa: E402
from sdxl.io import format_table, write_json_atomic  # noqa: E402
from sdxl.system_info import system_description  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="testbed")
    parser.add_argument("--schemes", default="fp8")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cache-dir", default="build/cache")
    opts = parser.parse_args()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    args = argparse.Namespace(profile=opts.profile, model_path=None, schemes=opts.schemes, calibration_captions=None,
                              num_prompts=opts.num_prompts, timesteps=None, samples=opts.samples,
                              output=str(OUT_DIR / f"sensitivity-reuse-{stamp}"), cache_dir=opts.cache_dir)
    prepared = prepare(args)
    unet, schemes, loop = prepared.unet, prepared.schemes, prepared.loop
    seconds: dict[str, list[float]] = {"reuse": [], "whole": []}
    results = {}
    for _ in range(opts.rounds):
        for arm, limit in (("reuse", 2 << 30), ("whole", 0)):
            started = time.perf_counter()
            results[arm] = measure_sensitivity(unet, schemes, loop, samples=opts.samples, pairs="none",
                                               reuse_limit_bytes=limit)
            seconds[arm].append(time.perf_counter() - started)
    identical = results["reuse"].unary == results["whole"].unary
    ratio = statistics.median(w / r for w, r in zip(seconds["whole"], seconds["reuse"]))
    record = {"benchmark": "sensitivity_reuse", "date": dt.datetime.now().isoformat(timespec="seconds"),
              "system": system_description(), "torch_threads": torch.get_num_threads(), "profile": opts.profile,
              "schemes": opts.schemes, "samples": opts.samples, "groups": len(results["reuse"].groups),
              "seconds": seconds, "speedup_median": ratio, "identical": identical,
              "reused_macs_fraction": results["reuse"].reused_macs_fraction}
    system = record["system"]
    print(f"CPU {system['cpu_model']} ({system['isa']}); {opts.profile}, {record['groups']} groups x {opts.schemes}, "
          f"{opts.samples} UNet calls each")
    print(format_table(["arm", "seconds per round", "MACs skipped"],
                       [[arm, ", ".join(f"{s:.1f}" for s in seconds[arm]),
                         f"{100 * results[arm].reused_macs_fraction:.1f}%"] for arm in seconds]))
    print(f"whole / reuse: {ratio:.2f}x (median of paired rounds); numbers identical: {identical}")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"sensitivity-reuse-{opts.profile}-{stamp}.json"
    write_json_atomic(path, record)
    print(f"written {path}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
