"""Quantize / dequantize primitives with ONNX ``QuantizeLinear`` semantics, and range -> (scale, offset).

Why ONNX semantics: the encodings we write are consumed by ONNX Runtime, QNN and TensorRT, so the
PyTorch simulation must produce the same integers they do. ONNX QuantizeLinear (opset 19+) is
``y = saturate(round_half_to_even(x / y_scale) + y_zero_point)`` -- a true division by the scale (not a
multiplication by its reciprocal, which differs in the last bit for ~1 in 4 values), and saturation to
the integer range. For FP8 outputs with ``saturate=1`` values are clamped to the format's largest
finite value before the round-to-nearest-even cast (torch's ``e5m2`` cast overflows to ``inf``
instead, so we clamp first).

Throughout, ``offset`` is the ONNX ``y_zero_point`` (AIMET's own "offset" is ``qmin - zero_point``,
converted only in :mod:`quant.aimet_export`). All arithmetic runs in float32, whatever the
model dtype, because fp16 division would change the rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats import QFormat


@dataclass
class QParams:
    """Scale and offset (ONNX zero point) of one quantizer; 1-element tensors when per-tensor."""

    fmt: QFormat
    scale: torch.Tensor  # float32, shape (C,) or (1,); (C_a, C_b) along two axes (a grouped encoding's)
    offset: torch.Tensor  # float32 holding integers, same shape
    axis: int | tuple[int, int] | None = None
    symmetric: bool = True

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The representable real range ``[min, max]`` (after nudging, zero exact)."""
        if self.fmt.is_float:
            return -self.fmt.fmax * self.scale, self.fmt.fmax * self.scale
        return (self.fmt.qmin - self.offset) * self.scale, (self.fmt.qmax - self.offset) * self.scale


def _broadcast(param: torch.Tensor, x: torch.Tensor, axis: int | tuple[int, int] | None) -> torch.Tensor:
    """Shape a per-channel parameter so it broadcasts along ``axis`` (or two increasing axes) of ``x``."""
    if axis is None or param.numel() == 1:
        return param.reshape(())
    shape = [1] * x.dim()
    if isinstance(axis, tuple):
        shape[axis[0]], shape[axis[1]] = param.shape
    else:
        shape[axis] = -1
    return param.reshape(shape)


def quantize_tensor(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """``x`` -> integers (as float32) or FP8-representable values (as float32), ONNX-exact."""
    x = x.float()
    scale = _broadcast(qp.scale.to(x.device), x, qp.axis)
    y = x / scale
    if qp.fmt.is_float:
        y = y.clamp(-qp.fmt.fmax, qp.fmt.fmax)
        return y.to(qp.fmt.torch_dtype).float()
    offset = _broadcast(qp.offset.to(x.device), x, qp.axis)
    return (torch.round(y) + offset).clamp_(qp.fmt.qmin, qp.fmt.qmax)


def dequantize(q: torch.Tensor, qp: QParams) -> torch.Tensor:
    """ONNX ``DequantizeLinear``: ``(q - zero_point) * scale`` in float32."""
    scale = _broadcast(qp.scale.to(q.device), q, qp.axis)
    if qp.fmt.is_float:
        return q * scale
    return (q - _broadcast(qp.offset.to(q.device), q, qp.axis)) * scale


def fake_quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Quantize then dequantize, returned in ``x``'s dtype (the simulation of a Q/DQ pair)."""
    return dequantize(quantize_tensor(x, qp), qp).to(x.dtype)


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, fmt: QFormat, symmetric: bool,
                       axis: int | None = None) -> QParams:
    """Observed range -> scale/offset.

    Symmetric: ``scale = amax / qmax`` with ``amax = max(|lo|, |hi|)`` and offset 0 (modelopt and AIMET
    use the same ``/127`` for int8; the grid keeps ``qmin = -128`` as ONNX does). FP8 is always
    symmetric: ``scale = amax / fmax``. Asymmetric (TF-style): the range is widened to contain 0,
    ``scale = (hi - lo) / (qmax - qmin)`` and the offset is rounded to an integer so that zero is exact.
    A zero-width range gets scale 1 (all its values were 0, which any scale represents exactly).
    """
    lo = torch.as_tensor(lo, dtype=torch.float32).reshape(-1)
    hi = torch.as_tensor(hi, dtype=torch.float32).reshape(-1)
    if fmt.is_float or symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        # unsigned symmetric grids centre on 2**(bits-1) (ONNX Runtime's uint8 symmetric zero point 128)
        mid = 0 if (fmt.is_float or fmt.signed) else 2 ** (fmt.bits - 1)
        denom = fmt.fmax if fmt.is_float else float(fmt.qmax - mid)
        scale = amax / denom
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return QParams(fmt, scale, torch.full_like(scale, float(mid)), axis, True)
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    scale = (hi - lo) / float(fmt.qmax - fmt.qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    offset = torch.round(fmt.qmin - lo / scale).clamp_(fmt.qmin, fmt.qmax)
    return QParams(fmt, scale, offset, axis, False)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(E[x^2] / E[(x - x_hat)^2])`` in dB (AIMET's AMP metric)."""
    ref = reference.double()
    noise = (ref - approx.double()).pow(2).sum()
    signal = ref.pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10.0 * torch.log10(signal / noise))
