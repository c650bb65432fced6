"""Per-image fidelity of a quantized run against a reference run: PSNR and SSIM (torchmetrics).

PSNR is ``10 log10(255² / MSE)`` over all pixels and channels of the uint8 images (identical images
give +inf). SSIM is torchmetrics' default (11x11 Gaussian window, sigma 1.5, k1 0.01, k2 0.03) on
[0, 1] images, averaged over channels. Both are computed in float64 so they match closed forms.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def _as_batch(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(image, dtype=np.float64)).permute(2, 0, 1).unsqueeze(0) / 255.0


def psnr_ssim(quantized: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """``(psnr_db, ssim)`` of two HxWx3 uint8 images (PSNR +inf when identical)."""
    if quantized.shape != reference.shape:
        raise ValueError(f"image shapes differ: {quantized.shape} vs {reference.shape}")
    q, r = _as_batch(quantized), _as_batch(reference)
    mse = float(torch.mean((q - r) ** 2))
    psnr = float("inf") if mse == 0 else float(peak_signal_noise_ratio(q, r, data_range=1.0))
    ssim = float(structural_similarity_index_measure(q, r, data_range=1.0))
    return psnr, ssim


class ImageSpill:
    """Reference images parked on disk by ``qsl_idx`` so a second log can be paired in any order.

    Two LoadGen logs list the same samples in different orders; holding one side in memory would cost
    3 MB per SDXL image (15 GB for 5000). Instead each image is appended to one raw file in
    ``directory`` and found again by offset; RAM holds only the ``qsl_idx -> slot`` map.
    """

    def __init__(self, directory: Path, image_size: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".reference-images-", suffix=".raw", dir=directory)
        self.path = Path(name)
        self._file = os.fdopen(fd, "w+b")
        self.image_size = image_size
        self._slot: dict[int, int] = {}

    @property
    def image_bytes(self) -> int:
        return self.image_size * self.image_size * 3

    def __call__(self, qsl_idx: int, image: np.ndarray) -> None:
        """Image-sink signature (see :func:`accuracy.evaluate.evaluate_log`)."""
        self._file.seek(0, os.SEEK_END)
        self._slot[qsl_idx] = len(self._slot)
        self._file.write(np.ascontiguousarray(image, dtype=np.uint8).tobytes())

    def __contains__(self, qsl_idx: int) -> bool:
        return qsl_idx in self._slot

    def indices(self) -> set[int]:
        return set(self._slot)

    def get(self, qsl_idx: int) -> np.ndarray:
        self._file.seek(self._slot[qsl_idx] * self.image_bytes)
        raw = self._file.read(self.image_bytes)
        return np.frombuffer(raw, dtype=np.uint8).reshape(self.image_size, self.image_size, 3)

    def close(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> "ImageSpill":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
