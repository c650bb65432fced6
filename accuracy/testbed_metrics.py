"""The testbed's accuracy metrics for a LoadGen accuracy log: testbed-CLIP, testbed-FID, caption accuracy.

They are the MLPerf pair transposed to the testbed, and named so that nobody mistakes them for
MLPerf's FID/CLIP: the accuracy report of a testbed run carries no MLPerf verdict.

* ``testbed_clip``: MLPerf's CLIP-score formula with the testbed's scorer CLIP.
* ``testbed_fid``: the project's Fréchet distance on the scorer's 64 image features, against the
  statistics of real rendered scenes: ``--statistics-path`` (``fid-stats --profile testbed``
  writes them for the validation set), else the real scenes of exactly the captions the run
  generated (row ``id`` = render seed), so a ``--max-samples`` run is compared like with like.
* ``caption_accuracy``: :func:`testbed.checker.caption_accuracy`, per attribute.

Per-caption values go to ``testbed_per_caption.csv`` (paired comparisons between runs use them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from testbed.checker import ATTRIBUTES, judge
from testbed.scenes import render_caption

from .fid import FidUndefined, RunningGaussian, frechet_distance, load_statistics
from .log_reader import LogStats, iter_accuracy_log

PER_CAPTION_CSV = "testbed_per_caption.csv"
NOT_MLPERF = "testbed run: testbed-CLIP / testbed-FID / caption accuracy are the testbed's metrics, not MLPerf's FID/CLIP"


def real_scenes(captions: list[str], ids: list[int]) -> list[np.ndarray]:
    """Each caption's real image: its scene rendered with the row's ``id`` as seed."""
    return [render_caption(c, int(i)) for c, i in zip(captions, ids)]


def gaussian_of(features: np.ndarray) -> RunningGaussian:
    gaussian = RunningGaussian(features.shape[1])
    gaussian.update(features)
    return gaussian


def testbed_metrics(captions: list[str], ids: list[int], images: list[np.ndarray],
                    statistics: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[dict[str, Any], pd.DataFrame]:
    """(summary, per-caption frame) for generated ``images`` of ``captions``."""
    from testbed.checker import summarize_verdicts
    from testbed.scorer import load_scorer

    scorer = load_scorer()
    clip = scorer.clip_scores(images, captions)
    statistics_source = "file" if statistics is not None else "real scenes of the same captions"
    try:
        if statistics is None:
            reference = gaussian_of(scorer.image_features(real_scenes(captions, ids)))
            statistics = (reference.mean, reference.covariance)
        generated = gaussian_of(scorer.image_features(images))
        fid = frechet_distance(generated.mean, generated.covariance, *statistics)
    except FidUndefined:
        fid = None
    verdicts = [judge(c, im) for c, im in zip(captions, images)]
    per_caption = pd.DataFrame({"caption": captions, "id": ids, "testbed_clip": clip,
                                **{f"correct_{a}": [int(v[a]) for v in verdicts] for a in ATTRIBUTES}})
    summary = {"testbed_clip": float(clip.mean()), "testbed_fid": fid, "testbed_fid_reference": statistics_source,
               "caption_accuracy": summarize_verdicts(captions, verdicts)}
    return summary, per_caption


def audit_testbed_log(log_path: Path, frame: pd.DataFrame, image_size: int, statistics_path: str | None,
                      output_dir: Path | None) -> dict[str, Any]:
    """Testbed metrics of one accuracy log (``frame``: the captions TSV the run used, row = qsl_idx)."""
    stats = LogStats()
    by_idx = dict(iter_accuracy_log(log_path, image_size, stats))
    if not by_idx:
        raise ValueError(f"{log_path} holds no accuracy entries")
    order = sorted(by_idx)
    if order[-1] >= len(frame):
        raise ValueError(f"{log_path}: qsl_idx {order[-1]} is beyond the {len(frame)} rows of the captions file")
    rows = frame.iloc[order]
    statistics = load_statistics(statistics_path) if statistics_path else None
    summary, per_caption = testbed_metrics(rows["caption"].tolist(), rows["id"].tolist(), [by_idx[i] for i in order],
                                           statistics)
    per_caption.insert(0, "qsl_idx", order)
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        per_caption.to_csv(output_dir / PER_CAPTION_CSV, index=False)
    return {**summary, "n_images": len(order), "n_entries": stats.entries, "duplicates_skipped": stats.duplicates,
            "log_stats": stats}


def format_testbed_report(result: dict[str, Any]) -> str:
    from sdxl.io import format_table

    acc = result["caption_accuracy"]
    rows = [["testbed-CLIP", f"{result['testbed_clip']:.3f}"],
            ["testbed-FID", "N/A" if result["testbed_fid"] is None else f"{result['testbed_fid']:.3f}"]]
    for group, label in (("overall", "all captions"), ("one_shape", "one-shape"), ("two_shapes", "two-shape")):
        if acc[group]["n"]:
            rows.append([f"caption accuracy, {label} (n={acc[group]['n']})",
                         " ".join(f"{a} {100 * acc[group][a]:.0f}%" for a in ATTRIBUTES)])
    return "\n".join([format_table(["testbed metric", "value"], rows), f"images: {result['n_images']}",
                      f"note: {NOT_MLPERF}; no MLPerf verdict"])
