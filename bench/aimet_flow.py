"""The SNPE/AIMET flow's methods on the testbed (issue 15): each recipe against its baseline at the same bits.

    .venv/bin/python bench/aimet_flow.py [--max-samples 100] [--num-prompts 16] [--output DIR] [--pairs A,B]

Seed 000's methods on 8-bit activations against ``snpe-w8a8`` (uint8 per-tensor weights and
activations, all four components): cross-layer equalization alone, bias correction alone, both
(``snpe-w8a8-cle-bc``), AdaRound on every component (``snpe-w8a8-adaround``), TF-enhanced ranges in
place of min-max (``snpe-w8a8-tfe``); the seed's own recipe ``snpe-sd`` (A16, CLE + bias correction on
UNet and VAE, AdaRound on the text encoders) against itself without its methods; AdaRound at 4 bits
(``w4a8-adaround`` against ``w4a8``); AI Hub's fixed softmax range (``aihub-w8a16`` against the same
recipe with observed ranges). SQNR is reported per component (``calibrate``'s report, its first 2
calibration calls: in-sample for AdaRound); image PSNR vs FP32 on the validation captions is the
held-out measure. The study and the pair table are ``bench/method_pairs.py``'s.

Writes ``aimet-flow.json`` and ``aimet-flow.md`` (with the CPU and ISA) into the output directory;
docs/calibration.md quotes such a run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

from method_pairs import builtin, choose_pairs, markdown, pair_table, run_study, write_recipes  # beside this file

from sdxl.io import write_json_atomic  # importable once method_pairs put the root on the path
from sdxl.system_info import system_description

COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae")
PAIRS = [("snpe-w8a8-cle", "snpe-w8a8"), ("snpe-w8a8-bc", "snpe-w8a8"), ("snpe-w8a8-cle-bc", "snpe-w8a8"),
         ("snpe-w8a8-adaround", "snpe-w8a8"), ("snpe-w8a8-tfe", "snpe-w8a8"), ("snpe-sd", "snpe-sd-minmax"),
         ("w4a8-adaround", "w4a8"), ("aihub-w8a16", "aihub-w8a16-observed")]


def derived_recipes() -> dict[str, dict]:
    """The variants and baselines this bench writes as recipe files (name -> recipe)."""
    cle, bc = builtin("snpe-w8a8-cle-bc")["methods"]
    base = builtin("snpe-w8a8")
    tfe = {**base["inputs"], "observer": "tf_enhanced"}
    aihub = builtin("aihub-w8a16")
    return {
        "snpe-w8a8-cle": {**base, "name": "snpe-w8a8-cle", "methods": [cle],
                          "description": "snpe-w8a8 with cross-layer equalization on the UNet and VAE"},
        "snpe-w8a8-bc": {**base, "name": "snpe-w8a8-bc", "methods": [bc],
                         "description": "snpe-w8a8 with bias correction on the UNet and VAE"},
        "snpe-w8a8-tfe": {**base, "name": "snpe-w8a8-tfe", "weights": {**base["weights"], "observer": "tf_enhanced"},
                          "inputs": tfe, "description": "snpe-w8a8 with TF-enhanced ranges (AIMET's default scheme)"},
        "snpe-sd-minmax": {**builtin("snpe-sd"), "name": "snpe-sd-minmax", "methods": [],
                           "description": "snpe-sd without its methods: min-max at the same bits"},
        "aihub-w8a16-observed": {**aihub, "name": "aihub-w8a16-observed", "overrides": [],
                                 "description": "aihub-w8a16 with the softmax operand's range observed, not fixed"},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-samples", type=int, default=100)
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--output", default=f"results/bench/aimet-flow-{dt.datetime.now():%Y%m%d-%H%M%S}")
    parser.add_argument("--pairs", default="", help="comma-separated recipes: only their rows (and baselines) are run")
    args = parser.parse_args()
    pairs = choose_pairs(PAIRS, args.pairs, parser.error)
    out = Path(args.output)
    study = run_study(out, write_recipes(out, derived_recipes()), pairs, args.max_samples, args.num_prompts)
    rows = pair_table(study, pairs)
    data = {"bench": "aimet_flow", "date": dt.datetime.now().isoformat(timespec="seconds"),
            "system": system_description(), "max_samples": args.max_samples, "num_prompts": args.num_prompts,
            "pairs": rows, "study": str(out / "study")}
    write_json_atomic(out / "aimet-flow.json", data)
    lines = markdown("The SNPE/AIMET flow on the testbed", rows, study, args.max_samples, args.num_prompts, COMPONENTS)
    (out / "aimet-flow.md").write_text("\n".join(lines) + "\n")
    print((out / "aimet-flow.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
