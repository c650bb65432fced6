"""``fid-stats``: FID statistics (``mu``, ``sigma`` npz) of a set of images, e.g. an FP32 run or COCO images.

Same pipeline as the FID of :mod:`accuracy.fid` (no outside resize; Inception resizes to 299), so the
npz can be used as ``--statistics-path``. Which images made MLPerf's ``val2014.npz`` is not recorded,
so this does not claim to reproduce it; for MLPerf numbers use the official file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from sdxl.progress import progress

from .evaluate import evaluate_log
from .fid import FEATURE_DIM, InceptionFeatures, RunningGaussian, save_statistics
from .run_info import load_run_info

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def iter_image_dir(directory: str | Path) -> Iterator[np.ndarray]:
    """HxWx3 uint8 RGB arrays of the image files in ``directory`` (sorted by name, not recursive)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"image directory {directory} not found")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{directory} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    for file in progress(files, desc="images", unit="img"):
        with Image.open(file) as image:
            yield np.asarray(image.convert("RGB"))


def statistics_of_images(images: Iterator[np.ndarray], inception: InceptionFeatures, batch_size: int = 8) -> RunningGaussian:
    """Gaussian of the Inception features; images of different sizes are batched separately."""
    gaussian = RunningGaussian(FEATURE_DIM)
    batch: list[np.ndarray] = []
    for image in images:
        if batch and (len(batch) >= batch_size or image.shape != batch[0].shape):
            gaussian.update(inception(batch))
            batch = []
        batch.append(image)
    if batch:
        gaussian.update(inception(batch))
    return gaussian


def fid_stats(output: str | Path, inception: InceptionFeatures, *, log: str | Path | None = None,
              images: str | Path | None = None, batch_size: int = 8, image_size: int | None = None) -> RunningGaussian:
    """Write the npz of a log's images (size ``image_size``, else its ``run.json``'s, else 1024) or of a directory."""
    if (log is None) == (images is None):
        raise ValueError("give exactly one of --log or --images")
    if log is not None:
        gaussian = evaluate_log(log, load_run_info(log, image_size).image_size, inception=inception,
                                batch_size=batch_size, desc="accuracy log").gaussian
    else:
        gaussian = statistics_of_images(iter_image_dir(images), inception, batch_size)
    gaussian.covariance  # noqa: B018 -- raises FidUndefined for fewer than 2 images, before writing
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    save_statistics(output, gaussian)
    return gaussian
