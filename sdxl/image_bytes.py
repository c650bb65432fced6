"""Decoded images -> the uint8 HWC bytes MLPerf logs, in one pass over the floats.

The reference converts with diffusers' postprocess ``(x / 2 + 0.5).clamp(0, 1)`` and then
``(x * 255).round()`` per image, after a CHW -> HWC permute: five float passes over 12 MB per 1024²
image plus a strided transpose, 8-11 ms on one EPYC core (``bench/harness.py``). That is the
harness's own per-query cost, which the spine issue holds to 1 ms. The CPU path here is one compiled
loop that reads each row of the three planes once, applies the *same* float32 operations in the same
order (no fused multiply-add, round half to even), and writes the interleaved bytes: the same bytes,
about 0.4 ms. Devices other than the CPU keep the torch ops, run where the tensor is, and copy only
the uint8 result (a quarter of the bytes).
"""

from __future__ import annotations

import numpy as np
import torch

_HALF, _ONE, _ZERO, _MAX = np.float32(0.5), np.float32(1.0), np.float32(0.0), np.float32(255.0)
_compiled = None


def _planes_to_hwc(planes: np.ndarray, out: np.ndarray, from_vae: bool) -> bool:
    """:func:`_planes_to_hwc_loop`, compiled by numba on first use (CPU images only: a run whose images
    are on a GPU never imports numba, so the lent GPU machine does not need it)."""
    global _compiled
    if _compiled is None:
        import numba

        _compiled = numba.njit(nogil=True, cache=True)(_planes_to_hwc_loop)
    return _compiled(planes, out, from_vae)


def _planes_to_hwc_loop(planes: np.ndarray, out: np.ndarray, from_vae: bool) -> bool:
    """``planes`` (3, H, W) float32 -> ``out`` (H, W, 3) uint8, row by row (a row's planes stay in L1).

    Returns whether any value was NaN or Inf, found in the same pass (a separate ``torch.isfinite`` over
    the 12 MB of a 1024² image cost more than the conversion itself).
    """
    _, height, width = planes.shape
    row = np.empty((3, width), np.uint8)
    nonfinite = False
    for y in range(height):
        for c in range(3):
            source, target = planes[c, y], row[c]
            for x in range(width):
                value = source[x]
                nonfinite |= not np.isfinite(value)
                if from_vae:
                    value = value / np.float32(2.0) + _HALF
                value = min(max(value, _ZERO), _ONE) * _MAX
                target[x] = np.uint8(np.rint(value))
        flat = out[y].reshape(-1)
        red, green, blue = row[0], row[1], row[2]
        for x in range(width):
            flat[3 * x], flat[3 * x + 1], flat[3 * x + 2] = red[x], green[x], blue[x]
    return nonfinite


def images_to_uint8(images: torch.Tensor, from_vae: bool = False) -> np.ndarray:
    """:func:`convert_images`' images."""
    return convert_images(images, from_vae)[0]


def convert_images(images: torch.Tensor, from_vae: bool = False) -> tuple[np.ndarray, int]:
    """``(N, 3, H, W)`` floats in [0, 1] -> ``(N, H, W, 3)`` uint8, as the reference's ``(x*255).round()``.

    ``from_vae``: the input is the VAE's output in [-1, 1], first mapped by diffusers' postprocess
    ``(x / 2 + 0.5).clamp(0, 1)`` in its own dtype. Values outside [0, 1] clamp to 0 and 255 (the
    reference's VAE path clamps; its [0, 1] path has nothing to clamp). The input is never modified.
    Also returns how many images held a NaN or Inf value (they come out black where NaN).
    """
    n, channels, height, width = images.shape
    if channels != 3:
        raise ValueError(f"expected RGB images (N, 3, H, W), got {tuple(images.shape)}")
    out = np.empty((n, height, width, channels), dtype=np.uint8)
    nonfinite = 0
    for i in range(n):
        image = images[i]
        if image.device.type == "cpu" and image.dtype == torch.float32:
            nonfinite += _planes_to_hwc(image.numpy(), out[i], from_vae)  # any strides (channels-last): no copy
            continue
        nonfinite += not bool(torch.isfinite(image).all())  # on the device, where the tensor is
        if from_vae:
            image = (image / 2 + 0.5).clamp_(0, 1)  # diffusers' postprocess, in the VAE's dtype
        scaled = image.float().mul(255.0).round_().to(torch.uint8)
        torch.from_numpy(out[i]).copy_(scaled.permute(1, 2, 0))  # from the device: 4x fewer bytes than floats
    return out, nonfinite
