"""The testbed's caption sets in MLPerf's TSV format: 500 validation captions and a disjoint 500 for calibration.

Both are drawn from the grammar (:func:`testbed.scenes.all_scenes`) by a fixed seed, stratified so each
set holds half of the 180 one-shape captions and 410 of the 1,080 two-shape ones, shuffled. A row's
``id`` (= ``image_id``) is the caption's index in the grammar; its real image is
``render(scene, seed=id)``, which ``fid-stats`` renders for testbed-FID's reference statistics.
"""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd

from sdxl.benchmark_spec import CAPTIONS_TSV_COLUMNS

from .scenes import IMAGE_SIZE, all_scenes

SPLIT_SEED = 13
VALIDATION_FILE = "captions.tsv"
CALIBRATION_FILE = "calibration_captions.tsv"


def caption_sets() -> tuple[list[int], list[int]]:
    """(validation, calibration) grammar indices: disjoint, 500 each, 90 one-shape captions in each."""
    scenes = all_scenes()
    rng = random.Random(SPLIT_SEED)
    val: list[int] = []
    cal: list[int] = []
    for kind, per_set in (("one", 90), ("two", 410)):
        pool = [i for i, s in enumerate(scenes) if s.kind == kind]
        rng.shuffle(pool)
        val += pool[:per_set]
        cal += pool[per_set:2 * per_set]
    rng.shuffle(val)
    rng.shuffle(cal)
    return val, cal


def caption_frame(indices: list[int]) -> pd.DataFrame:
    scenes = all_scenes()
    return pd.DataFrame([{"id": i, "image_id": i, "caption": scenes[i].caption(), "height": IMAGE_SIZE,
                          "width": IMAGE_SIZE, "file_name": f"testbed_{i:04d}.png", "coco_url": ""}
                         for i in indices], columns=list(CAPTIONS_TSV_COLUMNS))


def write_caption_sets(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for indices, name in zip(caption_sets(), (VALIDATION_FILE, CALIBRATION_FILE)):
        path = directory / name
        caption_frame(indices).to_csv(path, sep="\t", index=False)
        paths.append(path)
    return paths
