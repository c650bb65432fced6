"""Diffusion PTQ methods on the testbed (issue 17): each recipe against plain min-max at the same bits.

    .venv/bin/python bench/diffusion_ptq.py [--max-samples 100] [--num-prompts 16] [--output DIR] [--pairs A,B]

Every method recipe is paired with its baseline: the same recipe with no methods, no shortcut split
and the same calibration steps (``<recipe>-minmax``), or an existing recipe of the same bits and
exclusions (``w8a8`` for the modelopt-style ones). Variants isolate parts of a method: shortcut
splitting alone, layer-wise AdaRound (+ split) against block reconstruction (at the recipe's 200
iterations per block, without its learned step sizes, and at 800: AdaRound's total steps), single-step against
all-step ranges, PSNR-importance steps against all steps. The study and the pair table are
``bench/method_pairs.py``'s.

Then QNCD's effect as the issue defines it (``--noise-captions``): along the quantized trajectory, the
mean of (quantized - FP32 noise prediction) at the steps *between* estimates, with the correction and
with it forced to 0.

Writes ``diffusion-ptq.json`` and ``diffusion-ptq.md`` (with the CPU and ISA) into the output directory;
docs/calibration.md quotes such a run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

from method_pairs import builtin, choose_pairs, markdown, pair_table, run_study, write_recipes  # beside this file

from sdxl.io import format_table, write_json_atomic  # importable once method_pairs put the root on the path
from sdxl.system_info import system_description

#: (recipe, its baseline); "minmax" derives ``<recipe>-minmax``
PAIRS = [("qdiff-w8a8", "minmax"), ("qdiff-w4a8", "minmax"), ("qdiff-w4a8-split", "qdiff-w4a8-minmax"),
         ("qdiff-w4a8-adaround", "qdiff-w4a8-minmax"), ("qdiff-w4a8-brecq-weights", "qdiff-w4a8-minmax"),
         ("qdiff-w4a8-brecq800", "qdiff-w4a8-minmax"), ("ptq4dm-w8a8", "w8a8"), ("w8a8-single", "w8a8"),
         ("w8a8-psnr", "w8a8"), ("smoothquant-w8a8", "w8a8"), ("sqnr-smooth-w8a8", "w8a8"),
         ("qncd-w8a8", "minmax"), ("qncd-w8a8-full", "minmax"), ("qncd-w4a8", "minmax")]


def derived_recipes() -> dict[str, dict]:
    """The baselines and variants this bench writes as recipe files (name -> recipe)."""
    out: dict[str, dict] = {}
    for recipe, baseline in PAIRS:
        if baseline == "minmax":
            base = builtin(recipe)
            base.update(name=f"{recipe}-minmax", methods=[], shortcut_split=False,
                        description=f"{recipe} without its methods or shortcut split: min-max at the same bits")
            out[base["name"]] = base
    w4 = builtin("qdiff-w4a8")
    out["qdiff-w4a8-split"] = {**w4, "name": "qdiff-w4a8-split", "methods": [],
                               "description": "qdiff-w4a8 with shortcut splitting only (min-max ranges)"}
    out["qdiff-w4a8-adaround"] = {**w4, "name": "qdiff-w4a8-adaround",
                                  "methods": [{"kind": "adaround", "components": ["unet"], "iterations": 200,
                                               "samples": 8, "schedule": "linear"}],
                                  "description": "qdiff-w4a8 with layer-wise AdaRound (200 iterations) instead of BRECQ"}
    brecq_w, brecq_a = w4["methods"]
    out["qdiff-w4a8-brecq-weights"] = {**w4, "name": "qdiff-w4a8-brecq-weights", "methods": [brecq_w],
                                       "description": "qdiff-w4a8 without its learned activation step sizes"}
    out["qdiff-w4a8-brecq800"] = {**w4, "name": "qdiff-w4a8-brecq800",
                                  "methods": [{**brecq_w, "iterations": 800}, brecq_a],
                                  "description": "qdiff-w4a8 at 800 weight iterations per block: as many "
                                                 "optimisation steps in all as layer-wise AdaRound's 200 per layer"}
    out["w8a8-single"] = {**builtin("w8a8"), "name": "w8a8-single", "calibration": {"timesteps": "single"},
                          "description": "w8a8 with ranges from the maximum-noise step only (seed 003)"}
    out["w8a8-psnr"] = {**builtin("w8a8"), "name": "w8a8-psnr", "calibration": {"timesteps": "psnr:10"},
                        "description": "w8a8 with calibration steps by PSNR importance (seed 002), 10 per chunk"}
    return out


def resolved(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``minmax`` baselines named: ``<recipe>-minmax``."""
    return [(recipe, f"{recipe}-minmax" if baseline == "minmax" else baseline) for recipe, baseline in pairs]


def noise_markdown(noise: dict) -> list[str]:
    return ["## QNCD: mean of (quantized - FP32 noise prediction) between estimates", "",
            format_table(["recipe", "correction", "mean abs(bias) between estimates", "mean bias", "image PSNR vs FP32 dB"],
                         [[n["recipe"], n["correction"], f"{n['mean_abs_bias']:.3e}", f"{n['mean_bias']:+.3e}",
                           f"{n['psnr_db']:.2f}"] for n in noise["rows"]], markdown=True), ""]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-samples", type=int, default=100)
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--noise-captions", type=int, default=8, help="captions for the QNCD noise measurement (0: skip)")
    parser.add_argument("--output", default=f"results/bench/diffusion-ptq-{dt.datetime.now():%Y%m%d-%H%M%S}")
    parser.add_argument("--pairs", default="", help="comma-separated recipes: only their rows (and baselines) are run")
    args = parser.parse_args()
    pairs = resolved(choose_pairs(PAIRS, args.pairs, parser.error))
    out = Path(args.output)
    study = run_study(out, write_recipes(out, derived_recipes()), pairs, args.max_samples, args.num_prompts)
    rows = pair_table(study, pairs)
    qncd = {r["recipe"]: (study["encodings"].get(r["recipe"]) or {}).get("path")
            for r in study["rows"] if r["recipe"].startswith("qncd-w") and not r["recipe"].endswith("minmax")}
    noise = None
    if args.noise_captions and qncd:
        from qncd_noise import measure  # beside this file

        noise = measure(qncd, args.noise_captions)
    data = {"bench": "diffusion_ptq", "date": dt.datetime.now().isoformat(timespec="seconds"),
            "system": system_description(), "max_samples": args.max_samples, "num_prompts": args.num_prompts,
            "pairs": rows, "qncd_noise": noise, "study": str(out / "study")}
    write_json_atomic(out / "diffusion-ptq.json", data)
    lines = markdown("Diffusion PTQ methods on the testbed", rows, study, args.max_samples, args.num_prompts)
    (out / "diffusion-ptq.md").write_text("\n".join(lines + (noise_markdown(noise) if noise else [])) + "\n")
    print((out / "diffusion-ptq.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
