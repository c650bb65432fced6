"""Number formats a quantizer can produce, named as ONNX ``QuantizeLinear`` / AIMET 2.0.0 ``output_dtype``.

One table maps a dtype name to its grid: integers by their ``[qmin, qmax]``, floats (FP8) by their
largest finite value. Every other module asks this table instead of re-deriving bit widths, so that a
new format (e.g. ``int4``, ``float8e5m2``) is one row here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Bumped when the meaning of a recipe/scheme row changes; recorded in every encodings file header.
SCHEME_TABLE_VERSION = 1


@dataclass(frozen=True)
class QFormat:
    """A quantized number format: integer grid ``[qmin, qmax]`` or an FP8 format with ``fmax``."""

    name: str
    bits: int
    is_float: bool
    signed: bool
    qmin: int = 0
    qmax: int = 0
    fmax: float = 0.0
    mantissa_bits: int = 0
    min_exponent: int = 0  # smallest normal exponent; below it the spacing is the subnormal step
    torch_dtype: torch.dtype | None = None

    @property
    def levels(self) -> int:
        return self.qmax - self.qmin + 1


def _int_format(bits: int, signed: bool) -> QFormat:
    if signed:
        return QFormat(f"int{bits}", bits, False, True, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return QFormat(f"uint{bits}", bits, False, False, 0, 2**bits - 1)


#: Integer widths we simulate exactly in float32 (16-bit grids are exact below 2**24).
INT_BITS = (2, 4, 8, 16)
FORMATS: dict[str, QFormat] = {f.name: f for bits in INT_BITS for f in (_int_format(bits, True), _int_format(bits, False))}
# FP8 maxima as in the ONNX spec's saturate tables (float8e4m3fn: 448, float8e5m2: 57344).
FORMATS["float8e4m3fn"] = QFormat("float8e4m3fn", 8, True, True, fmax=448.0, mantissa_bits=3, min_exponent=-6,
                                   torch_dtype=torch.float8_e4m3fn)
FORMATS["float8e5m2"] = QFormat("float8e5m2", 8, True, True, fmax=57344.0, mantissa_bits=2, min_exponent=-14,
                                 torch_dtype=torch.float8_e5m2)
#: Friendly aliases accepted in recipes.
ALIASES = {"e4m3": "float8e4m3fn", "fp8": "float8e4m3fn", "fp8_e4m3": "float8e4m3fn", "e5m2": "float8e5m2",
           "fp8_e5m2": "float8e5m2"}


def get_format(name: str) -> QFormat:
    """Look up a format by ONNX name (``int8``, ``uint16``, ``float8e4m3fn``) or alias (``e4m3``)."""
    key = ALIASES.get(name, name)
    try:
        return FORMATS[key]
    except KeyError:
        raise ValueError(f"unknown quantized dtype {name!r}; choose one of {', '.join(sorted(FORMATS))}") from None
