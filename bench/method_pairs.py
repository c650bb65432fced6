"""Calibration methods on the testbed, each recipe against a baseline at the same bits: the shared part
of ``bench/diffusion_ptq.py`` (issue 17) and ``bench/aimet_flow.py`` (issue 15).

One ``harness study`` (torch backend) runs every recipe on the same captions and calibration prompts;
this adds per (recipe, baseline) pair: component SQNR, image PSNR vs FP32 with a 95% bootstrap interval
of the mean and its difference from the baseline's paired per caption, Δ caption accuracy and Δ
testbed-CLIP against the baseline (paired per caption, 95% bootstrap), calibration seconds with the
iteration counts, and the UNet calls per image (QNCD's correction adds some).
"""

from __future__ import annotations

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
from sdxl.io import format_table  # noqa: E402

SHORT = {"unet": "UNet", "text_encoder": "TE1", "text_encoder_2": "TE2", "vae": "VAE"}


def builtin(name: str) -> dict:
    """A built-in recipe file as data (for derived variants)."""
    return yaml.safe_load((RECIPE_DIR / f"{name}.yaml").read_text())


def write_recipes(out: Path, recipes: dict[str, dict]) -> dict[str, Path]:
    """The derived recipes as files under ``out/recipes`` (name -> path)."""
    (out / "recipes").mkdir(parents=True, exist_ok=True)
    files = {}
    for name, recipe in recipes.items():
        files[name] = out / "recipes" / f"{name}.yaml"
        files[name].write_text(yaml.safe_dump(recipe, sort_keys=False))
    return files


def choose_pairs(all_pairs: list[tuple[str, str]], chosen: str, error) -> list[tuple[str, str]]:
    """``--pairs A,B``: only those rows (and their baselines); ``error`` reports an unknown row."""
    names = [name for name in chosen.split(",") if name]
    unknown = sorted(set(names) - {recipe for recipe, _ in all_pairs})
    if unknown:
        error(f"--pairs: no row {', '.join(unknown)}; rows: {', '.join(r for r, _ in all_pairs)}")
    return [pair for pair in all_pairs if not names or pair[0] in names]


def run_study(out: Path, recipe_files: dict[str, Path], pairs: list[tuple[str, str]], max_samples: int,
              num_prompts: int) -> dict:
    """FP32 and every recipe of ``pairs`` through one ``harness study`` under ``out/study`` (resumes)."""
    names = sorted({name for pair in pairs for name in pair})
    specs = ["fp32"] + [str(recipe_files[n]) if n in recipe_files else n for n in names]
    command = [sys.executable, "-m", "harness", "study", "--profile", "testbed", "--recipes", ",".join(specs),
               "--backends", "torch", "--max-samples", str(max_samples), "--num-prompts", str(num_prompts),
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


def psnr_delta(run_dir: Path, baseline_dir: Path) -> dict | None:
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
                "components": m.get("components"),
                **{k: m["settings"][k] for k in ("iterations",) if k in m.get("settings", {})}} for m in data["methods"]]
    return {"seconds": data["calibration"].get("seconds"), "methods": methods,
            "timesteps": data["calibration"].get("timesteps_spec"), "runtime": data.get("runtime") or {}}


def _unet_calls_per_image(run_dir: Path, images: int | None) -> float | None:
    """MLPerf's 20 CFG UNet calls per image plus the extra calls a sampler change (QNCD) made."""
    run = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    extra = sum(t.get("extra_unet_calls") or 0 for t in run.get("tests", []) if t.get("mode") == "accuracy")
    return 20 + extra / images if images else None


def pair_table(study: dict, pairs: list[tuple[str, str]]) -> list[dict]:
    """One row per (recipe, baseline) pair the study has both runs of."""
    rows = {r["recipe"]: r for r in study["rows"]}
    encodings = study["encodings"]
    out = []
    for recipe, baseline in pairs:
        mine, base = rows.get(recipe), rows.get(baseline)
        if mine is None or base is None:
            continue
        a, b = per_caption(Path(mine["run_dir"])), per_caption(Path(base["run_dir"]))
        delta = {}
        if a is not None and b is not None:
            common = a.index.intersection(b.index)
            delta = {"caption_accuracy": paired_interval(a.loc[common, "correct_all"], b.loc[common, "correct_all"]),
                     "testbed_clip": paired_interval(a.loc[common, "testbed_clip"], b.loc[common, "testbed_clip"])}
        delta["psnr_db"] = psnr_delta(Path(mine["run_dir"]), Path(base["run_dir"]))
        out.append({"recipe": recipe, "baseline": baseline,
                    "sqnr_db": mine.get("sqnr_db") or {}, "baseline_sqnr_db": base.get("sqnr_db") or {},
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


def _sqnr(row: dict, component: str) -> str:
    mine, base = row["sqnr_db"].get(component), row["baseline_sqnr_db"].get(component)
    return f"{mine:.1f} ({base:.1f})" if mine is not None and base is not None else "-"


def markdown(title: str, rows: list[dict], study: dict, max_samples: int, num_prompts: int,
             components: tuple[str, ...] = ("unet",)) -> list[str]:
    """The pair table with its header lines (a list of markdown lines)."""
    header = ["recipe", "baseline", *(f"{SHORT[c]} SQNR dB (base)" for c in components), "PSNR vs FP32 dB [95% CI]",
              "base PSNR", "Δ PSNR dB [95% CI]", "caption acc % (base)", "Δ acc pts [95% CI]", "testbed-CLIP",
              "Δ CLIP [95% CI]", "calibration", "UNet calls/image"]
    cells = []
    for p in rows:
        cal = p["calibration"]
        methods = ", ".join(f"{m['kind']}" + (f" {m['iterations']} it" if m.get("iterations") else "") +
                            (f" {m['seconds']:.0f} s" if m.get("seconds") is not None else "") for m in cal.get("methods", []))
        acc = p["caption_accuracy"]
        cells.append([p["recipe"], p["baseline"], *(_sqnr(p, c) for c in components),
                      _ci(p["psnr_db"], signed=False, digits=2), _ci(p["baseline_psnr_db"], signed=False, digits=2),
                      _ci(p["delta_vs_baseline"].get("psnr_db"), 1, 2),
                      f"{100 * acc:.1f} ({100 * p['baseline_caption_accuracy']:.1f})" if acc is not None else "-",
                      _ci(p["delta_vs_baseline"].get("caption_accuracy"), 100),
                      f"{p['testbed_clip']:.2f}" if p["testbed_clip"] is not None else "-",
                      _ci(p["delta_vs_baseline"].get("testbed_clip"), 1, 2),
                      f"{cal.get('seconds', '-')} s; {methods or 'min-max'}; steps {cal.get('timesteps')}",
                      f"{p['unet_calls_per_image']:.1f}" if p["unet_calls_per_image"] else "-"])
    system = study.get("system", {})
    return [f"# {title} ({dt.date.today()})", "",
            f"CPU {system.get('cpu_model')} ({system.get('isa')}); torch backend; {max_samples} validation "
            f"captions per run; {num_prompts} calibration prompts. Δ columns: recipe minus its baseline, paired "
            "per caption, 95% bootstrap interval; PSNR vs the FP32 run's image of the same caption (interval: "
            "bootstrap of the mean).", "", format_table(header, cells, markdown=True), ""]
