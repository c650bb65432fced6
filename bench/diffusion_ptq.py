"""Diffusion PTQ methods on the testbed (issue 17): each recipe against plain min-max at the same bits.

    .venv/bin/python bench/diffusion_ptq.py [--max-samples 100] [--num-prompts 16] [--output DIR] [--pairs A,B]

Every method recipe is paired with its baseline: the same recipe with no methods, no shortcut split
and the same calibration steps (``<recipe>-minmax``), or an existing recipe of the same bits and
exclusions (``w8a8`` for the modelopt-style ones). Variants isolate parts of a method: shortcut
splitting alone, layer-wise AdaRound (+ split) against block reconstruction (at the recipe's 200
iterations per block, without its learned step sizes, and at 800: AdaRound's total steps), single-step against
all-step ranges, PSNR-importance steps against all steps. One ``harness study`` (torch backend) runs them all on the same captions; this adds
per pair: Δ UNet SQNR, image PSNR vs FP32 with a 95% bootstrap interval of the mean and its difference
from the baseline's paired per caption, Δ caption
accuracy and Δ testbed-CLIP against the baseline (paired per caption, 95% bootstrap), calibration
seconds with the iteration counts, and the UNet calls per image (QNCD's correction adds some).

Then QNCD's effect as the issue defines it (``--noise-captions``): along the quantized trajectory, the
mean of (quantized - FP32 noise prediction) at the steps *between* estimates, with the correction and
with it forced to 0.

Writes ``diffusion-ptq.json`` and ``diffusion-ptq.md`` (with the CPU and ISA) into the output directory;
docs/calibration.md quotes such a run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calibration.recipes import RECIPE_DIR  # noqa: E402
from harness.study import paired_interval, per_caption  # noqa: E402
from sdxl.io import format_table, write_json_atomic  # noqa: E402
from sdxl.system_info import system_description  # noqa: E402

#: (recipe, its baseline); "minmax" derives ``<recipe>-minmax``
PAIRS = [("qdiff-w8a8", "minmax"), ("qdiff-w4a8", "minmax"), ("qdiff-w4a8-split", "qdiff-w4a8-minmax"),
         ("qdiff-w4a8-adaround", "qdiff-w4a8-minmax"), ("qdiff-w4a8-brecq-weights", "qdiff-w4a8-minmax"),
         ("qdiff-w4a8-brecq800", "qdiff-w4a8-minmax"), ("ptq4dm-w8a8", "w8a8"), ("w8a8-single", "w8a8"),
         ("w8a8-psnr", "w8a8"), ("smoothquant-w8a8", "w8a8"), ("sqnr-smooth-w8a8", "w8a8"),
         ("qncd-w8a8", "minmax"), ("qncd-w8a8-full", "minmax"), ("qncd-w4a8", "minmax")]


def _builtin(name: str) -> dict:
    return yaml.safe_load((RECIPE_DIR / f"{name}.yaml").read_text())


def derived_recipes() -> dict[str, dict]:
    """The baselines and variants this bench writes as recipe files (name -> recipe)."""
    out: dict[str, dict] = {}
    for recipe, baseline in PAIRS:
        if baseline == "minmax":
            base = _builtin(recipe)
            base.update(name=f"{recipe}-minmax", methods=[], shortcut_split=False,
                        description=f"{recipe} without its methods or shortcut split: min-max at the same bits")
            out[base["name"]] = base
    w4 = _builtin("qdiff-w4a8")
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
    out["w8a8-single"] = {**_builtin("w8a8"), "name": "w8a8-single", "calibration": {"timesteps": "single"},
                          "description": "w8a8 with ranges from the maximum-noise step only (seed 003)"}
    out["w8a8-psnr"] = {**_builtin("w8a8"), "name": "w8a8-psnr", "calibration": {"timesteps": "psnr:10"},
                        "description": "w8a8 with calibration steps by PSNR importance (seed 002), 10 per chunk"}
    return out


def run_study(args, out: Path, recipe_files: dict[str, Path], pairs: list[tuple[str, str]]) -> dict:
    names = sorted({r for pair in pairs for r in pair if r != "minmax"} | {f"{r}-minmax" for r, b in pairs if b == "minmax"})
    specs = ["fp32"] + [str(recipe_files[n]) if n in recipe_files else n for n in names]
    command = [sys.executable, "-m", "harness", "study", "--profile", "testbed", "--recipes", ",".join(specs),
               "--backends", "torch", "--max-samples", str(args.max_samples), "--num-prompts", str(args.num_prompts),
               "--output", str(out / "study")]
    subprocess.run(command, cwd=ROOT, check=False)
    return json.loads((out / "study" / "study.json").read_text())


def _per_image_psnr(run_dir: Path) -> pd.Series | None:
    path = run_dir / "compare" / "per_image.csv"
    if not path.is_file():
        return None
    return pd.read_csv(path).set_index("qsl_idx")["psnr"].replace([np.inf], np.nan).dropna()


def _psnr(run_dir: Path) -> dict | None:
    values = _per_image_psnr(run_dir)
    return None if values is None else paired_interval(values.to_numpy(), np.zeros(len(values)))


def _psnr_delta(run_dir: Path, baseline_dir: Path) -> dict | None:
    """PSNR vs FP32 of the recipe minus the baseline's, paired per caption."""
    a, b = _per_image_psnr(run_dir), _per_image_psnr(baseline_dir)
    if a is None or b is None:
        return None
    common = a.index.intersection(b.index)
    return paired_interval(a.loc[common].to_numpy(), b.loc[common].to_numpy())


def _calibration(encodings_path: str | None) -> dict:
    if not encodings_path or not Path(encodings_path).is_file():
        return {}
    data = json.loads(Path(encodings_path).read_text())
    # a block-reconstruction method resumed from an earlier run reports the seconds its blocks took then
    methods = [{"kind": m["kind"], "seconds": (m.get("stats") or {}).get("compute_seconds", m.get("seconds")),
                "resumed_blocks": (m.get("stats") or {}).get("resumed_blocks"),
                **{k: m["settings"][k] for k in ("iterations",) if k in m.get("settings", {})}} for m in data["methods"]]
    return {"seconds": data["calibration"].get("seconds"), "methods": methods,
            "timesteps": data["calibration"].get("timesteps_spec"), "runtime": data.get("runtime") or {}}


def _unet_calls_per_image(run_dir: Path, images: int | None) -> float | None:
    """MLPerf's 20 CFG UNet calls per image plus the extra calls a sampler change (QNCD) made."""
    run = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    extra = sum(t.get("extra_unet_calls") or 0 for t in run.get("tests", []) if t.get("mode") == "accuracy")
    return 20 + extra / images if images else None


def pair_table(study: dict, pairs: list[tuple[str, str]]) -> list[dict]:
    rows = {r["recipe"]: r for r in study["rows"]}
    encodings = study["encodings"]
    out = []
    for recipe, baseline in pairs:
        baseline = f"{recipe}-minmax" if baseline == "minmax" else baseline
        mine, base = rows.get(recipe), rows.get(baseline)
        if mine is None or base is None:
            continue
        a, b = per_caption(Path(mine["run_dir"])), per_caption(Path(base["run_dir"]))
        delta = {}
        if a is not None and b is not None:
            common = a.index.intersection(b.index)
            delta = {"caption_accuracy": paired_interval(a.loc[common, "correct_all"], b.loc[common, "correct_all"]),
                     "testbed_clip": paired_interval(a.loc[common, "testbed_clip"], b.loc[common, "testbed_clip"])}
        delta["psnr_db"] = _psnr_delta(Path(mine["run_dir"]), Path(base["run_dir"]))
        out.append({"recipe": recipe, "baseline": baseline,
                    "sqnr_db": (mine.get("sqnr_db") or {}).get("unet"), "baseline_sqnr_db": (base.get("sqnr_db") or {}).get("unet"),
                    "psnr_db": _psnr(Path(mine["run_dir"])), "baseline_psnr_db": _psnr(Path(base["run_dir"])),
                    "caption_accuracy": mine.get("caption_accuracy"), "baseline_caption_accuracy": base.get("caption_accuracy"),
                    "testbed_clip": mine.get("testbed_clip"), "delta_vs_baseline": delta,
                    "calibration": _calibration((encodings.get(recipe) or {}).get("path")),
                    "unet_calls_per_image": _unet_calls_per_image(Path(mine["run_dir"]), mine.get("n_images")),
                    "error": mine.get("error") or base.get("error")})
    return out


def _ci(d: dict | None, scale: float = 1.0, digits: int = 1, signed: bool = True) -> str:
    if not d:
        return "-"
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    return f"{f.format(scale * d['mean'])} [{f.format(scale * d['low'])}, {f.format(scale * d['high'])}]"


def markdown(pairs: list[dict], study: dict, args, noise: dict | None) -> str:
    header = ["recipe", "baseline", "UNet SQNR dB (base)", "PSNR vs FP32 dB [95% CI]", "base PSNR",
              "Δ PSNR dB [95% CI]",
              "caption acc % (base)", "Δ acc pts [95% CI]", "testbed-CLIP", "Δ CLIP [95% CI]", "calibration",
              "UNet calls/image"]
    cells = []
    for p in pairs:
        cal = p["calibration"]
        methods = ", ".join(f"{m['kind']}" + (f" {m['iterations']} it" if m.get("iterations") else "") +
                            (f" {m['seconds']:.0f} s" if m.get("seconds") is not None else "") for m in cal.get("methods", []))
        acc = p["caption_accuracy"]
        cells.append([p["recipe"], p["baseline"],
                      f"{p['sqnr_db']:.1f} ({p['baseline_sqnr_db']:.1f})" if p["sqnr_db"] and p["baseline_sqnr_db"] else "-",
                      _ci(p["psnr_db"], signed=False, digits=2), _ci(p["baseline_psnr_db"], signed=False, digits=2),
                      _ci(p["delta_vs_baseline"].get("psnr_db"), 1, 2),
                      f"{100 * acc:.1f} ({100 * p['baseline_caption_accuracy']:.1f})" if acc is not None else "-",
                      _ci(p["delta_vs_baseline"].get("caption_accuracy"), 100),
                      f"{p['testbed_clip']:.2f}" if p["testbed_clip"] is not None else "-",
                      _ci(p["delta_vs_baseline"].get("testbed_clip"), 1, 2),
                      f"{cal.get('seconds', '-')} s; {methods or 'min-max'}; steps {cal.get('timesteps')}",
                      f"{p['unet_calls_per_image']:.1f}" if p["unet_calls_per_image"] else "-"])
    system = study.get("system", {})
    lines = [f"# Diffusion PTQ methods on the testbed ({dt.date.today()})", "",
             f"CPU {system.get('cpu_model')} ({system.get('isa')}); torch backend; {args.max_samples} validation "
             f"captions per run; {args.num_prompts} calibration prompts. Δ columns: recipe minus its baseline, paired "
             "per caption, 95% bootstrap interval; PSNR vs the FP32 run's image of the same caption (interval: "
             "bootstrap of the mean).", "", format_table(header, cells, markdown=True), ""]
    if noise:
        lines += ["## QNCD: mean of (quantized - FP32 noise prediction) between estimates", "",
                  format_table(["recipe", "correction", "mean abs(bias) between estimates", "mean bias", "image PSNR vs FP32 dB"],
                               [[n["recipe"], n["correction"], f"{n['mean_abs_bias']:.3e}", f"{n['mean_bias']:+.3e}", f"{n['psnr_db']:.2f}"]
                                for n in noise["rows"]], markdown=True), ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-samples", type=int, default=100)
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--noise-captions", type=int, default=8, help="captions for the QNCD noise measurement (0: skip)")
    parser.add_argument("--output", default=f"results/bench/diffusion-ptq-{dt.datetime.now():%Y%m%d-%H%M%S}")
    parser.add_argument("--pairs", default="", help="comma-separated recipes: only their rows (and baselines) are run")
    args = parser.parse_args()
    chosen = [name for name in args.pairs.split(",") if name]
    unknown = sorted(set(chosen) - {recipe for recipe, _ in PAIRS})
    if unknown:
        parser.error(f"--pairs: no row {', '.join(unknown)}; rows: {', '.join(r for r, _ in PAIRS)}")
    pairs = [pair for pair in PAIRS if not chosen or pair[0] in chosen]
    out = Path(args.output)
    (out / "recipes").mkdir(parents=True, exist_ok=True)
    files = {}
    for name, recipe in derived_recipes().items():
        files[name] = out / "recipes" / f"{name}.yaml"
        files[name].write_text(yaml.safe_dump(recipe, sort_keys=False))
    study = run_study(args, out, files, pairs)
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
    (out / "diffusion-ptq.md").write_text(markdown(rows, study, args, noise) + "\n")
    print((out / "diffusion-ptq.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
