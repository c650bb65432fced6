"""One streaming pass over an accuracy log, feeding FID features, CLIP scores and any image sinks.

Images arrive one at a time from :func:`accuracy.log_reader.iter_accuracy_log`; they are grouped in
small batches for the networks and dropped as soon as their features are taken, so memory is one
batch of images plus the fixed-size FID accumulator, whatever the number of images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from sdxl.progress import progress

from .clip_score import ClipScorer
from .fid import FEATURE_DIM, InceptionFeatures, RunningGaussian
from .log_reader import AccuracyLogError, LogStats, iter_accuracy_log

ImageSink = Callable[[int, np.ndarray], None]


@dataclass
class LogEvaluation:
    """What one pass over a log produced: counts, the FID Gaussian and the CLIP score sum."""

    stats: LogStats = field(default_factory=LogStats)
    gaussian: RunningGaussian | None = None
    clip_sum: float = 0.0
    clip_count: int = 0

    @property
    def n_images(self) -> int:
        return self.stats.images

    @property
    def clip_score(self) -> float | None:
        return self.clip_sum / self.clip_count if self.clip_count else None


def evaluate_log(log_path: str | Path, image_size: int, *, captions: list[str] | None = None,
                 inception: InceptionFeatures | None = None, clip: ClipScorer | None = None,
                 sinks: tuple[ImageSink, ...] = (), batch_size: int = 8, desc: str = "accuracy log") -> LogEvaluation:
    """Stream ``log_path`` once; ``captions[qsl_idx]`` is each image's prompt (needed with ``clip``).

    Every distinct image goes to each sink (e.g. compliance PNGs, the compare pairing) and, batched,
    to the Inception and CLIP networks given. A ``qsl_idx`` outside ``captions`` is an error: it
    means the log was made from a different captions file.
    """
    result = LogEvaluation(gaussian=RunningGaussian(FEATURE_DIM) if inception is not None else None)
    batch: list[tuple[int, np.ndarray]] = []
    log_path = Path(log_path)

    def flush() -> None:
        if not batch:
            return
        images = [image for _, image in batch]
        if inception is not None:
            result.gaussian.update(inception(images))
        if clip is not None:
            scores = clip(images, [captions[idx] for idx, _ in batch])
            result.clip_sum += float(np.sum(scores))
            result.clip_count += len(scores)
        batch.clear()

    for qsl_idx, image in progress(iter_accuracy_log(log_path, image_size, result.stats), desc=desc, unit="img"):
        if captions is not None and qsl_idx >= len(captions):
            raise AccuracyLogError(f"{log_path}: qsl_idx {qsl_idx} is beyond the {len(captions)} rows of the captions "
                                   "file (was the run made with another --dataset-path or --max-samples?)")
        for sink in sinks:
            sink(qsl_idx, image)
        if inception is not None or clip is not None:
            batch.append((qsl_idx, image))
            if len(batch) >= batch_size:
                flush()
    flush()
    if result.stats.entries == 0:
        raise AccuracyLogError(f"{log_path} holds no accuracy entries (an empty run, or not a LoadGen "
                               "mlperf_log_accuracy.json)")
    return result
