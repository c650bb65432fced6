"""``compare``: fidelity of a (quantized) run's images against a reference run's, pair by pair.

Quantization users first ask "how far did my images move?"; FID/CLIP answer "is it still a good
model?" only over 5000 images. This writes ``per_image.csv`` (``qsl_idx,psnr,ssim``), ``compare.json``
(summary: PSNR mean/min, SSIM mean/min, FID between the two sets, CLIP difference), ``grid.png``
(lowest-PSNR samples: quantized | reference | amplified difference) and ``psnr_histogram.png``.
Both logs are streamed; the reference side is parked on disk (:class:`accuracy.fidelity.ImageSpill`).
Two runs whose ``run.json`` shows different prompts or latents are refused: their images differ
for reasons unrelated to quantization.
"""

from __future__ import annotations

import csv
import heapq
import math
from pathlib import Path
from typing import Any

import numpy as np

from sdxl.io import atomic_path, write_json_atomic

from .evaluate import evaluate_log
from .evaluators import RANDOM_WEIGHTS_REASON, Evaluators, build_evaluators
from .fid import FidUndefined, frechet_distance
from .fidelity import ImageSpill, psnr_ssim
from .log_reader import AccuracyLogError
from .report import AuditOptions, load_caption_list
from .run_info import RunInfoError, incompatibilities, load_run_info

LOG_NAME = "mlperf_log_accuracy.json"
DIFF_AMPLIFICATION = 8
GRID_ROWS = 4
GRID_THUMBNAIL = 256


def resolve_log(path: str | Path) -> Path:
    """A log file, or a run directory holding ``accuracy/mlperf_log_accuracy.json`` (or the log itself)."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "accuracy" / LOG_NAME, path / LOG_NAME):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"{path} holds no accuracy/{LOG_NAME} (not an accuracy run directory)")
    if not path.is_file():
        raise FileNotFoundError(f"accuracy log {path} not found")
    return path


class _Pairer:
    """Image sink for the quantized log: scores each image against its spilled reference twin."""

    def __init__(self, spill: ImageSpill, csv_path: Path, grid_rows: int) -> None:
        self.spill = spill
        self._csv = open(csv_path, "w", newline="")
        self._writer = csv.writer(self._csv)
        self._writer.writerow(["qsl_idx", "psnr", "ssim"])
        self.grid_rows = grid_rows
        self.worst: list[tuple[float, int, np.ndarray]] = []  # max-heap on -psnr: the lowest PSNRs
        self.pairs = self.identical = 0
        self.unpaired: list[int] = []
        self.paired: set[int] = set()
        self.psnr_sum = self.ssim_sum = 0.0
        self.psnr_finite = 0
        self.psnr_min = math.inf
        self.ssim_min = math.inf

    def __call__(self, qsl_idx: int, image: np.ndarray) -> None:
        if qsl_idx not in self.spill:
            self.unpaired.append(qsl_idx)
            return
        psnr, ssim = psnr_ssim(image, self.spill.get(qsl_idx))
        self._writer.writerow([qsl_idx, "inf" if math.isinf(psnr) else f"{psnr:.6f}", f"{ssim:.8f}"])
        self.pairs += 1
        self.paired.add(qsl_idx)
        self.ssim_sum += ssim
        self.ssim_min = min(self.ssim_min, ssim)
        self.psnr_min = min(self.psnr_min, psnr)
        if math.isinf(psnr):
            self.identical += 1
        else:
            self.psnr_sum += psnr
            self.psnr_finite += 1
        entry = (-psnr, qsl_idx, np.array(image))
        if len(self.worst) < self.grid_rows:
            heapq.heappush(self.worst, entry)
        elif entry[0] > self.worst[0][0]:
            heapq.heapreplace(self.worst, entry)

    def close(self) -> None:
        self._csv.close()

    def summary(self) -> dict[str, Any]:
        finite = lambda v: None if v is None or math.isinf(v) else v  # noqa: E731
        return {
            "psnr_db": {"mean": self.psnr_sum / self.psnr_finite if self.psnr_finite else None,
                        "mean_over": "images that differ (identical pairs have infinite PSNR)",
                        "min": finite(self.psnr_min) if self.pairs else None, "identical_images": self.identical},
            "ssim": {"mean": self.ssim_sum / self.pairs if self.pairs else None,
                     "min": self.ssim_min if self.pairs else None},
        }


def _write_grid(path: Path, rows: list[tuple[float, int, np.ndarray]], spill: ImageSpill) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    def thumb(array: np.ndarray) -> np.ndarray:
        image = Image.fromarray(array)
        image.thumbnail((GRID_THUMBNAIL, GRID_THUMBNAIL))
        return np.asarray(image)

    rows = sorted(rows, key=lambda r: -r[0])  # lowest PSNR first
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3 * len(rows)), squeeze=False)
    for axis_row, (neg_psnr, idx, quantized) in zip(axes, rows):
        reference = spill.get(idx)
        diff = np.clip(np.abs(quantized.astype(np.int16) - reference.astype(np.int16)) * DIFF_AMPLIFICATION, 0, 255)
        for axis, image, title in zip(axis_row, (quantized, reference, diff.astype(np.uint8)),
                                      (f"quantized qsl_idx {idx}", f"reference (PSNR {-neg_psnr:.2f} dB)",
                                       f"|difference| x{DIFF_AMPLIFICATION}")):
            axis.imshow(thumb(image))
            axis.set_title(title, fontsize=9)
            axis.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def _write_histogram(path: Path, csv_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    psnr = pd.read_csv(csv_path)["psnr"].astype(float)
    finite = psnr[np.isfinite(psnr)]
    fig, axis = plt.subplots(figsize=(6, 4))
    axis.hist(finite, bins=min(50, max(5, len(finite) // 5)), color="tab:blue")
    axis.set_xlabel("PSNR vs reference (dB)")
    axis.set_ylabel("images")
    axis.set_title(f"{len(finite)} differing images, {int((~np.isfinite(psnr)).sum())} identical")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def compare_logs(quantized_log: str | Path, reference_log: str | Path, *, output_dir: str | Path,
                 dataset_path: str | Path | None = None, options: AuditOptions | None = None,
                 evaluators: Evaluators | None = None, grid_rows: int = GRID_ROWS) -> dict[str, Any]:
    """Compare two accuracy logs image by image; write the outputs listed in the module doc; return the summary.

    FID between the two sets needs Inception weights (or ``options.random_weights``); the CLIP
    difference needs CLIP weights and the captions (``dataset_path`` or the quantized run's
    ``run.json``). Without them those two figures are N/A with the reason; PSNR/SSIM need nothing.
    """
    options = options or AuditOptions(missing="na")
    quantized_log, reference_log = Path(quantized_log), Path(reference_log)
    output_dir = Path(output_dir)
    q_info, r_info = load_run_info(quantized_log, options.image_size), load_run_info(reference_log, options.image_size)
    refused = incompatibilities(q_info, r_info)
    if refused:
        raise RunInfoError(f"refusing to compare {quantized_log} with {reference_log}: " + "; ".join(refused))
    if q_info.image_size != r_info.image_size:
        raise RunInfoError(f"image sizes differ: {q_info.image_size} ({q_info.image_size_source}) vs "
                           f"{r_info.image_size} ({r_info.image_size_source})")
    image_size = q_info.image_size
    captions, dataset_desc, caption_note = load_caption_list(dataset_path, q_info, options)
    if evaluators is None:
        evaluators = build_evaluators(fid=True, clip=captions is not None, random_weights=options.random_weights,
                                      inception_weights=options.inception_weights, clip_weights=options.clip_weights,
                                      device=options.device, missing=options.missing)
    clip = evaluators.clip if captions is not None else None
    output_dir.mkdir(parents=True, exist_ok=True)
    csv_path = output_dir / "per_image.csv"
    # every output appears whole or not at all: a truncated log fails before per_image.csv is renamed in
    with ImageSpill(output_dir, image_size) as spill, atomic_path(csv_path) as csv_tmp:
        reference = evaluate_log(reference_log, image_size, captions=captions, inception=evaluators.inception,
                                 clip=clip, sinks=(spill,), batch_size=options.batch_size, desc="reference log")
        pairer = _Pairer(spill, csv_tmp, grid_rows)
        try:
            quantized = evaluate_log(quantized_log, image_size, captions=captions, inception=evaluators.inception,
                                     clip=clip, sinks=(pairer,), batch_size=options.batch_size, desc="quantized log")
        finally:
            pairer.close()
        if pairer.pairs == 0:
            raise AccuracyLogError(f"{quantized_log} and {reference_log} share no qsl_idx: nothing to compare")
        files = {"per_image_csv": str(csv_path)}
        if pairer.worst:
            _write_grid(output_dir / "grid.png", pairer.worst, spill)
            files["grid_png"] = str(output_dir / "grid.png")
        unpaired_reference = len(spill.indices() - pairer.paired)
    _write_histogram(output_dir / "psnr_histogram.png", csv_path)
    files["psnr_histogram_png"] = str(output_dir / "psnr_histogram.png")

    fid, fid_note = None, evaluators.fid_note
    if quantized.gaussian is not None and reference.gaussian is not None:
        try:
            fid = frechet_distance(quantized.gaussian.mean, quantized.gaussian.covariance,
                                   reference.gaussian.mean, reference.gaussian.covariance)
            fid_note = None
        except FidUndefined as exc:
            fid_note = str(exc)
    clip_difference = None
    if quantized.clip_score is not None and reference.clip_score is not None:
        clip_difference = quantized.clip_score - reference.clip_score
    not_comparable = ([RANDOM_WEIGHTS_REASON] if options.random_weights else []) + evaluators.unofficial_weights()
    summary: dict[str, Any] = {
        "compare_json_version": 1,
        "quantized": {"log": str(quantized_log.resolve()), "sha256": quantized.stats.sha256,
                      "n_images": quantized.n_images, "clip_score": quantized.clip_score, "run": q_info.describe()},
        "reference": {"log": str(reference_log.resolve()), "sha256": reference.stats.sha256,
                      "n_images": reference.n_images, "clip_score": reference.clip_score, "run": r_info.describe()},
        "image_size": image_size,
        "pairs": pairer.pairs,
        "unpaired_quantized": len(pairer.unpaired),
        "unpaired_reference": unpaired_reference,
        **pairer.summary(),
        "fid_between_sets": fid,
        "fid_between_sets_note": fid_note,
        "clip_score_difference": clip_difference,
        "clip_score_difference_note": None if clip_difference is not None else (caption_note or evaluators.clip_note),
        "comparable": not not_comparable,
        "not_comparable_reasons": not_comparable,
        "random_weights": options.random_weights,
        "weights": evaluators.describe_weights(),
        "dataset": dataset_desc,
        "files": files,
    }
    write_json_atomic(output_dir / "compare.json", summary)
    return summary


def format_compare_report(summary: dict[str, Any]) -> str:
    """The printed fidelity summary (one line per figure, caveats last)."""
    def fmt(value, unit=""):
        return "N/A" if value is None else f"{value:.4f}{unit}"

    psnr, ssim = summary["psnr_db"], summary["ssim"]
    lines = [f"pairs: {summary['pairs']} ({summary['unpaired_quantized']} quantized and "
             f"{summary['unpaired_reference']} reference images without a partner)",
             f"PSNR: mean {fmt(psnr['mean'], ' dB')}, min {fmt(psnr['min'], ' dB')}, "
             f"{psnr['identical_images']} identical images",
             f"SSIM: mean {fmt(ssim['mean'])}, min {fmt(ssim['min'])}",
             f"FID between the two sets: {fmt(summary['fid_between_sets'])}"
             + (f" ({summary['fid_between_sets_note']})" if summary["fid_between_sets_note"] else ""),
             f"CLIP score difference (quantized - reference): {fmt(summary['clip_score_difference'])}"
             + (f" ({summary['clip_score_difference_note']})" if summary["clip_score_difference_note"] else "")]
    lines += [f"!!! NOT COMPARABLE: {reason} !!!" for reason in summary["not_comparable_reasons"]]
    lines.append(f"outputs: {', '.join(summary['files'].values())}")
    return "\n".join(lines)
