"""The study's plot helpers: Pareto front, per-block SQNR from ``calibrate``'s report, the image grid."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not beaten by a smaller-or-equal one of higher-or-equal quality, by increasing size."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def block_of(layer: str) -> str:
    """``down_blocks.1.attentions.0.proj_in`` -> ``down_blocks.1``; ``conv_in`` -> ``conv_in``."""
    parts = layer.split(".")
    return ".".join(parts[:2]) if parts[0].endswith("blocks") else parts[0]


def sqnr_by_block(csv_path: Path, component: str = "unet") -> dict[str, float]:
    """Mean local SQNR (dB) of each block's layers, in execution order."""
    if not csv_path.is_file():
        return {}
    sums: dict[str, list[float]] = {}
    with open(csv_path, newline="") as handle:
        for row in csv.DictReader(handle):
            if row["component"] == component and row["local_sqnr_db"] not in ("", "inf") and row["layer"] != "<output>":
                sums.setdefault(block_of(row["layer"]), []).append(float(row["local_sqnr_db"]))
    return {block: float(np.mean(values)) for block, values in sums.items()}


def image_grid(path: Path, rows, n_captions: int) -> bool:
    """One row per run (its first ``n_captions`` images by qsl_idx), the recipe named at the left."""
    import matplotlib.pyplot as plt

    from accuracy.log_reader import iter_accuracy_log
    from accuracy.run_info import load_run_info

    images = {}
    for row in rows:
        log = row.run_dir / "accuracy" / "mlperf_log_accuracy.json"
        if not log.is_file():
            continue
        size = load_run_info(log).image_size
        found = dict(iter_accuracy_log(log, size))
        images[row.recipe] = [found[i] for i in sorted(found)[:n_captions]]
    if not images:
        return False
    columns = max(len(v) for v in images.values())
    fig, axes = plt.subplots(len(images), columns, figsize=(1.3 * columns + 0.8, 1.3 * len(images)), squeeze=False)
    for r, (recipe, row_images) in enumerate(images.items()):
        for c in range(columns):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(row_images):
                ax.imshow(row_images[c], interpolation="nearest")
        axes[r][0].set_ylabel(recipe, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
