"""Model size accounting for every encodings record: bytes, bits per parameter, % of the FP16 size.

Seed 001 reports its mixed-precision checkpoint as "50.1%" of FP16: that is what ``percent_of_fp16``
is. Quantized weights count at their bit width plus one float32 scale (and, when asymmetric, one
zero point of the weight's width) per channel; every other parameter (biases, norms, excluded
layers) counts as FP16, the precision a deployment keeps them in.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .encodings import Encoding, tensor_key


def model_size(module: torch.nn.Module, entries: Mapping[str, Encoding | list[Encoding]]) -> dict[str, Any]:
    total_bits = 0.0
    params = quantized = 0
    for name, param in module.named_parameters():
        params += param.numel()
        owner, _, leaf = name.rpartition(".")
        value = entries.get(tensor_key(owner, "weight")) if leaf == "weight" else None
        if value is None:
            total_bits += 16 * param.numel()
            continue
        quantized += param.numel()
        total_bits += weight_bits(param.numel(), value)
    size_bytes = total_bits / 8
    return {"parameters": params, "quantized_parameters": quantized, "bytes": int(round(size_bytes)),
            "fp16_bytes": 2 * params, "bits_per_parameter": round(total_bits / max(params, 1), 4),
            "percent_of_fp16": round(100.0 * size_bytes / max(2 * params, 1), 2)}


def weight_bits(numel: int, value: Encoding | list[Encoding] | None) -> float:
    """Bits a weight of ``numel`` elements takes: FP16 unquantized, else its width plus per-channel scales."""
    if value is None:
        return 16.0 * numel
    enc = value[0] if isinstance(value, list) else value
    return float(enc.bits * numel + enc.channels * (32 + (0 if enc.symmetric else enc.bits)))


def total_size(sizes: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Sum of per-component records (the whole pipeline's size)."""
    params = sum(s["parameters"] for s in sizes.values())
    size_bytes = sum(s["bytes"] for s in sizes.values())
    return {"parameters": params, "quantized_parameters": sum(s["quantized_parameters"] for s in sizes.values()),
            "bytes": size_bytes, "fp16_bytes": 2 * params, "bits_per_parameter": round(8 * size_bytes / max(params, 1), 4),
            "percent_of_fp16": round(100.0 * size_bytes / max(2 * params, 1), 2)}
