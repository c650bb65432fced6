"""``./run.sh study``: recipes x backends measured side by side on the same captions.

Each recipe is calibrated once (``<output>/encodings/<recipe>.json``, with its SQNR report); each
recipe x backend is one LoadGen accuracy run (``<output>/runs/<recipe>-<backend>/``) of the same
captions, audited and compared with the FP32 torch run. Then one table (``study.md``, ``.csv``,
``.json``) and three plots: quality against UNet size with the Pareto front, per-block SQNR of each
recipe, and an image grid (same captions, one row per recipe). A pair that cannot run is a row that
says why. Re-running resumes: finished calibrations and runs are reused, as their files say.

Generation is deterministic (one fixed latent), so the spread of a difference is the sampling
error over captions: each quality delta against FP32 comes with a 95% bootstrap interval of the
paired per-caption differences.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sdxl.arg_types import int_at_least
from sdxl.errors import UserError
from sdxl.io import check_writable_dir, format_table, write_json_atomic

FP32 = "fp32"  # the unquantized pseudo-recipe
DEFAULT_RECIPES = "fp32,w8a16,w8a8,w8a8-qlinear,fp8,w4a8"
BOOTSTRAP_RESAMPLES = 2000


@dataclass
class StudyRow:
    recipe: str
    backend: str
    run_dir: Path
    error: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    record: Any = None  # the RunRecord when this invocation ran it (not when reused)


def register(subparsers) -> None:
    from sdxl.models import PROFILES

    parser = subparsers.add_parser("study", help="recipes x backends side by side: size, SQNR, fidelity, accuracy",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="testbed", choices=PROFILES)
    parser.add_argument("--model-path", help="SDXL checkpoint directory (profile sdxl)")
    parser.add_argument("--recipes", default=DEFAULT_RECIPES, help=f"comma-separated built-in names or recipe files "
                                                                   f"(named by their stem); '{FP32}' is unquantized "
                                                                   f"(default {DEFAULT_RECIPES})")
    parser.add_argument("--backends", default="torch,ort", help="comma-separated (default torch,ort)")
    parser.add_argument("--max-samples", type=int_at_least(2), default=100, help="captions per run (default 100)")
    parser.add_argument("--max-batchsize", type=int_at_least(1), default=8,
                        help="largest batch each run's SUT forms (default 8: Offline batches of 8 images, as a "
                             "submission would run; 1 reproduces SingleStream-like serial generation)")
    parser.add_argument("--mode", choices=("accuracy", "both"), default="accuracy",
                        help="LoadGen tests per run: accuracy, or both (an Offline performance test first; images/s "
                             "from it)")
    parser.add_argument("--num-prompts", type=int_at_least(1), help="calibration prompts (default: each recipe's, else all)")
    parser.add_argument("--dataset-path", help="captions TSV (default: the profile's)")
    parser.add_argument("--calibration-captions", help="calibration captions (default: the profile's)")
    parser.add_argument("--statistics-path", help="FID reference statistics")
    parser.add_argument("--grid-captions", type=int_at_least(0), default=6, help="images per recipe in the grid (default 6)")
    parser.add_argument("--cache-dir", default="build/cache")
    parser.add_argument("--output", help="study directory; re-running with the same one resumes in it "
                                          "(default results/<timestamp>-study-<profile>)")
    parser.set_defaults(func=run_study)


def _names(text: str, what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UserError(f"--{what} is empty")
    if len(set(names)) != len(names):
        raise UserError(f"--{what} names one twice: {text}")
    return names


def check_study_inputs(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Every name and count checked before anything loads: one line per problem."""
    from backends.registry import canonical_backend_name
    from calibration.recipes import load_recipe
    from quant.encodings import EncodingsError

    recipes, backends = _names(args.recipes, "recipes"), _names(args.backends, "backends")
    labels = [recipe_label(r) for r in recipes]
    if len(set(labels)) != len(labels):
        raise UserError(f"--recipes names two recipes of one name: {args.recipes}")
    for recipe in recipes:
        if recipe != FP32:
            try:
                load_recipe(recipe)
            except EncodingsError as exc:
                raise UserError(f"--recipes: {exc}") from None
    backends = [canonical_backend_name(b) for b in backends]
    return recipes, backends


def run_study(args: argparse.Namespace) -> int:
    import datetime as _dt

    specs, backends = check_study_inputs(args)
    output = Path(args.output or f"results/{_dt.datetime.now():%Y%m%d-%H%M%S}-study-{args.profile}")
    _claim(output, args)
    labels = {recipe_label(r): r for r in specs}
    recipes = list(labels)
    encodings = {r: _calibrate(args, labels[r], r, output) for r in recipes if r != FP32}
    reference = output / "runs" / f"{FP32}-torch"
    pairs = [(FP32, "torch")] + [(r, b) for r in recipes for b in backends if (r, b) != (FP32, "torch")]
    rows = []
    for recipe, backend in pairs:
        row = StudyRow(recipe, backend, output / "runs" / f"{recipe}-{backend}")
        calibration_error = encodings.get(recipe, {}).get("error")
        if calibration_error:
            row.error = f"calibration failed: {calibration_error}"
        else:
            _run(args, row, encodings.get(recipe, {}).get("path"), None if row.run_dir == reference else reference)
        rows.append(row)
    if FP32 not in recipes:  # the reference ran for PSNR only
        rows = [r for r in rows if r.recipe != FP32]
    _collect(rows, encodings, reference)
    write_study(output, rows, encodings, args)
    ran = [r.record for r in rows if r.record is not None]
    if ran and args.mode == "both":
        from .results import print_results_table

        print_results_table(ran)
        print()
    print((output / "study.md").read_text())
    return 0 if not any(r.error for r in rows) else 1


#: what makes runs and encodings in a study directory reusable: the same values of these flags
SETTINGS = ("profile", "model_path", "max_samples", "max_batchsize", "num_prompts", "dataset_path", "calibration_captions",
            "statistics_path")


def _claim(output: Path, args: argparse.Namespace) -> None:
    """Record the study's settings in ``output``; a directory holding a study with other settings is refused."""
    settings = {key: getattr(args, key) for key in SETTINGS}
    path = output / "study-settings.json"
    if path.is_file():
        before = json.loads(path.read_text())
        changed = [f"--{k.replace('_', '-')} {before.get(k)} -> {v}" for k, v in settings.items() if before.get(k) != v]
        if changed:
            raise UserError(f"{output} holds a study with other settings ({'; '.join(changed)}): its runs cannot be "
                            "reused; pass a new --output")
    elif output.exists() and any(output.iterdir()):
        raise UserError(f"{output} exists and is not a study directory (no study-settings.json); pass a new --output")
    check_writable_dir(output, "--output")
    write_json_atomic(path, settings)


def recipe_label(recipe: str) -> str:
    """A recipe's name in a study (files, run directories, rows): a recipe file's stem, a built-in's name."""
    return Path(recipe).stem if recipe.endswith((".yaml", ".yml", ".json")) else recipe


def _calibrate(args: argparse.Namespace, recipe: str, label: str, output: Path) -> dict[str, Any]:
    """Encodings (+ SQNR report) of ``recipe``, reused when the file exists."""
    from calibration.commands import calibrate_to_file
    from quant.encodings import Encodings

    path = output / "encodings" / f"{label}.json"
    if path.is_file() and path.with_suffix(".sqnr.csv").is_file():
        return {"path": str(path), "size": Encodings.load(path).size, "reused": True}
    print(f"study: calibrating {recipe}", file=sys.stderr, flush=True)
    try:
        encodings, _, _ = calibrate_to_file(args.profile, args.model_path, recipe, path,
                                            calibration_captions=args.calibration_captions,
                                            num_prompts=args.num_prompts, cache_dir=args.cache_dir, sqnr_samples=2)
    except UserError as exc:
        return {"error": str(exc)}
    return {"path": str(path), "size": encodings.size, "reused": False}


def _run(args: argparse.Namespace, row: StudyRow, encodings: str | None, reference: Path | None) -> None:
    """One accuracy run of ``row`` (reused when a completed one is there); errors become the row's note."""
    from .run_command import execute_run
    from .run_config import RunConfig

    record_path = row.run_dir / "run.json"
    if record_path.is_file():
        data = json.loads(record_path.read_text())
        ran = {t.get("mode") for t in data.get("tests", [])}
        wanted = {"performance", "accuracy"} if args.mode == "both" else {"accuracy"}
        if (data.get("status") == "completed" and wanted <= ran and data.get("accuracy")
                and not data["accuracy"].get("error")):
            return
    print(f"study: {row.recipe} on {row.backend}", file=sys.stderr, flush=True)
    modes = ("performance", "accuracy") if args.mode == "both" else ("accuracy",)
    config = RunConfig(profile=args.profile, model_path=args.model_path, backend=row.backend, encodings=encodings,
                       modes=modes, dataset_path=args.dataset_path, max_samples=args.max_samples,
                       max_batchsize=args.max_batchsize,
                       output=str(row.run_dir), overwrite=True, cache_dir=args.cache_dir, statistics_path=args.statistics_path,
                       reference_run=str(reference) if reference else None)
    try:
        record = execute_run(config)
    except UserError as exc:
        row.error = str(exc)
        return
    row.record = record
    if record.status != "completed":
        row.error = record.data.get("error") or record.status
    elif (record.data.get("accuracy") or {}).get("error"):
        row.error = record.data["accuracy"]["error"]


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _sqnr_by_component(encodings_path: str | None) -> dict[str, float]:
    """Output SQNR (dB) of each component the recipe quantizes, from ``calibrate``'s report."""
    if not encodings_path:
        return {}
    csv_path = Path(encodings_path).with_suffix(".sqnr.csv")
    if not csv_path.is_file():
        return {}
    with open(csv_path, newline="") as handle:
        return {r["component"]: float(r["accumulated_sqnr_db"]) for r in csv.DictReader(handle)
                if r["layer"] == "<output>" and r["accumulated_sqnr_db"] not in ("", "inf")}


def paired_interval(values: np.ndarray, reference: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Mean of ``values - reference`` (paired per caption) and its 95% percentile-bootstrap interval."""
    diff = np.asarray(values, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (BOOTSTRAP_RESAMPLES, len(diff)))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(diff.mean()), "low": float(low), "high": float(high), "n": int(len(diff))}


def per_caption(run_dir: Path):
    """A run's testbed per-caption table indexed by ``qsl_idx``, or None when it has none."""
    import pandas as pd

    path = run_dir / "accuracy" / "testbed_per_caption.csv"
    return pd.read_csv(path).set_index("qsl_idx") if path.is_file() else None


def _images_per_s(tests: list[dict]) -> float | None:
    """The performance test's samples/s, else the accuracy test's images over its duration."""
    for test in tests:
        if test.get("mode") == "performance" and test.get("qps"):
            return float(test["qps"])
    for test in tests:
        if test.get("mode") == "accuracy" and test.get("samples") and test.get("test_s"):
            return test["samples"] / test["test_s"]
    return None


def _collect(rows: list[StudyRow], encodings: dict, reference: Path) -> None:
    ref_table = per_caption(reference)
    for row in rows:
        enc = encodings.get(row.recipe, {})
        unet_size = (enc.get("size") or {}).get("unet", {}).get("percent_of_fp16") if row.recipe != FP32 else 200.0
        metrics: dict[str, Any] = {"unet_percent_of_fp16": unet_size, "sqnr_db": _sqnr_by_component(enc.get("path"))}
        run = _read_json(row.run_dir / "run.json")
        accuracy = _read_json(row.run_dir / "accuracy" / "accuracy.json")
        compare = _read_json(row.run_dir / "compare" / "compare.json")
        metrics["images_per_s"] = _images_per_s(run.get("tests", []))
        metrics["psnr_db"] = float("inf") if row.run_dir == reference else (compare.get("psnr_db") or {}).get("mean")
        for key in ("testbed_clip", "testbed_fid", "fid", "clip_score", "n_images", "verdict"):
            if accuracy.get(key) is not None:
                metrics[key] = accuracy[key]
        if accuracy.get("caption_accuracy"):
            metrics["caption_accuracy"] = accuracy["caption_accuracy"]["overall"]["all"]
            metrics["caption_accuracy_one_shape"] = accuracy["caption_accuracy"]["one_shape"]["all"]
        table = per_caption(row.run_dir)
        if table is not None and ref_table is not None and row.run_dir != reference:
            common = table.index.intersection(ref_table.index)
            metrics["delta_vs_fp32"] = {
                "caption_accuracy": paired_interval(table.loc[common, "correct_all"], ref_table.loc[common, "correct_all"]),
                "testbed_clip": paired_interval(table.loc[common, "testbed_clip"], ref_table.loc[common, "testbed_clip"])}
        row.metrics = metrics


def _fmt(value, digits=2, suffix="") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and np.isinf(value):
        return "ref"
    return f"{value:.{digits}f}{suffix}"


def format_interval(delta: dict | None, scale: float = 1.0, digits: int = 1) -> str:
    """``+mean [+low, +high]`` of a :func:`paired_interval` (times ``scale``), or ``-``."""
    if not delta:
        return "-"
    return (f"{scale * delta['mean']:+.{digits}f} [{scale * delta['low']:+.{digits}f}, "
            f"{scale * delta['high']:+.{digits}f}]")


def table_rows(rows: list[StudyRow]) -> tuple[list[str], list[list[str]]]:
    testbed = any("testbed_clip" in r.metrics for r in rows)
    header = ["recipe", "backend", "UNet % of FP16", "SQNR dB (UNet; others)", "PSNR vs FP32 dB"]
    header += (["testbed-CLIP", "testbed-FID", "caption acc %", "Δ acc vs FP32, pts [95% CI]",
                "Δ testbed-CLIP [95% CI]"] if testbed else ["FID", "CLIP", "MLPerf verdict"])
    header += ["images/s", "note"]
    out = []
    for row in rows:
        m = row.metrics
        sqnr = m.get("sqnr_db", {})
        sqnr_text = _fmt(sqnr.get("unet"), 1) + "".join(f"; {k} {v:.1f}" for k, v in sqnr.items() if k != "unet")
        cells = [row.recipe, row.backend, _fmt(m.get("unet_percent_of_fp16"), 1), sqnr_text if sqnr else "-",
                 _fmt(m.get("psnr_db"), 1)]
        if testbed:
            delta = m.get("delta_vs_fp32") or {}
            cells += [_fmt(m.get("testbed_clip")), _fmt(m.get("testbed_fid")),
                      _fmt(100 * m["caption_accuracy"], 1) if m.get("caption_accuracy") is not None else "-",
                      format_interval(delta.get("caption_accuracy"), 100), format_interval(delta.get("testbed_clip"), 1, 2)]
        else:
            cells += [_fmt(m.get("fid")), _fmt(m.get("clip_score")), m.get("verdict") or "-"]
        cells += [_fmt(m.get("images_per_s")), row.error or ""]
        out.append(cells)
    return header, out


def write_study(output: Path, rows: list[StudyRow], encodings: dict, args: argparse.Namespace) -> None:
    from sdxl.system_info import system_description

    header, cells = table_rows(rows)
    with open(output / "study.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(cells)
    system = system_description()
    data = {"study_json_version": 1, "profile": args.profile, "max_samples": args.max_samples,
            "num_prompts": args.num_prompts, "system": system,
            "rows": [{"recipe": r.recipe, "backend": r.backend, "run_dir": str(r.run_dir), "error": r.error,
                      **r.metrics} for r in rows],
            "encodings": {k: {kk: vv for kk, vv in v.items() if kk != "size"} for k, v in encodings.items()}}
    write_json_atomic(output / "study.json", data)
    plots = write_plots(output, rows, encodings, args)
    captions = f"{args.max_samples} captions per run" + (f", {args.num_prompts} calibration prompts" if args.num_prompts else "")
    md = [f"# study: profile {args.profile}, {captions}", "",
          f"CPU {system.get('cpu_model')} ({system.get('isa')}). PSNR against the FP32 torch run; "
          "Δ columns: paired per-caption differences against it, 95% bootstrap interval.", "",
          format_table(header, cells, markdown=True), ""]
    md += [f"![{name}]({Path(path).name})" for name, path in plots.items()]
    (output / "study.md").write_text("\n".join(md) + "\n")


def write_plots(output: Path, rows: list[StudyRow], encodings: dict, args: argparse.Namespace) -> dict[str, str]:
    """quality_vs_size.png, sqnr_heatmap.png, grid.png (whichever have data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .study_plots import image_grid, pareto_front, sqnr_by_block

    written: dict[str, str] = {}
    quality_key = "caption_accuracy" if any("caption_accuracy" in r.metrics for r in rows) else "clip_score"
    points = [(r.metrics.get("unet_percent_of_fp16"), r.metrics.get(quality_key), f"{r.recipe}/{r.backend}")
              for r in rows if r.metrics.get("unet_percent_of_fp16") is not None and r.metrics.get(quality_key) is not None]
    if points:
        fig, ax = plt.subplots(figsize=(6, 4))
        for x, y, label in points:
            ax.scatter(x, y, s=20)
            ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front = pareto_front([(x, y) for x, y, _ in points])
        ax.plot(*zip(*front), "k--", lw=0.8, label="Pareto front")
        ax.set_xlabel("UNet size, % of FP16")
        ax.set_ylabel(quality_key.replace("_", " "))
        ax.legend(fontsize=7)
        fig.tight_layout()
        written["quality vs size"] = str(output / "quality_vs_size.png")
        fig.savefig(written["quality vs size"], dpi=110)
        plt.close(fig)
    blocks = {r: sqnr_by_block(Path(e["path"]).with_suffix(".sqnr.csv")) for r, e in encodings.items() if e.get("path")}
    blocks = {r: b for r, b in blocks.items() if b}
    if blocks:
        names = list(dict.fromkeys(n for b in blocks.values() for n in b))
        grid = np.array([[blocks[r].get(n, np.nan) for n in names] for r in blocks])
        fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(names)), 1 + 0.45 * len(blocks)))
        image = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(blocks)), list(blocks), fontsize=8)
        fig.colorbar(image, ax=ax, label="mean local SQNR, dB (UNet)")
        fig.tight_layout()
        written["per-block SQNR"] = str(output / "sqnr_heatmap.png")
        fig.savefig(written["per-block SQNR"], dpi=110)
        plt.close(fig)
    torch_rows = [r for r in rows if r.backend == "torch" and not r.error]
    if args.grid_captions and torch_rows and image_grid(output / "grid.png", torch_rows, args.grid_captions):
        written["image grid"] = str(output / "grid.png")
    return written
