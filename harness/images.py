"""``--save-images``: the accuracy run's images as PNGs and one contact-sheet grid, from LoadGen's log.

Images are read back from ``mlperf_log_accuracy.json`` (streamed) rather than captured inside the
SUT, so saving them can never slow down or change a timed run.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from sdxl.dataset import CaptionSet

GRID_MAX_IMAGES = 16
GRID_TILE = 256


def save_run_images(test_dir: Path, image_size: int, captions: CaptionSet) -> dict:
    """Write ``images/<qsl_idx>.png``, ``images/captions.txt`` and ``images/grid.png``; return what was written."""
    from accuracy.log_reader import iter_accuracy_log

    out = test_dir / "images"
    out.mkdir(parents=True, exist_ok=True)
    tiles: list[np.ndarray] = []
    lines = []
    count = 0
    for qsl_idx, image in iter_accuracy_log(test_dir / "mlperf_log_accuracy.json", image_size):
        Image.fromarray(image).save(out / f"{qsl_idx}.png")
        lines.append(f"{qsl_idx}  {captions.captions[qsl_idx]}")
        count += 1
        if len(tiles) < GRID_MAX_IMAGES:
            tiles.append(np.asarray(Image.fromarray(image).resize((GRID_TILE, GRID_TILE), Image.BILINEAR)))
    (out / "captions.txt").write_text("\n".join(lines) + "\n")
    if tiles:
        Image.fromarray(make_grid(tiles)).save(out / "grid.png")
    return {"dir": str(out), "count": count, "grid": str(out / "grid.png") if tiles else None}


def make_grid(tiles: list[np.ndarray]) -> np.ndarray:
    """Tile equally-sized HxWx3 images row-major into a near-square grid (black padding)."""
    columns = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    height, width, channels = tiles[0].shape
    grid = np.zeros((rows * height, columns * width, channels), dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        grid[r * height:(r + 1) * height, c * width:(c + 1) * width] = tile
    return grid
