"""``cross_layer_equalization``: CLE (Nagel et al. 2019; AIMET's ``equalize_model``) on the pairs where it is exact.

For two layers ``y = W2 f(W1 x + b1)`` where ``f`` commutes with a positive per-channel scaling
(``f(x / s) = f(x) / s``), ``W1[c] / s_c``, ``b1[c] / s_c``, ``W2[:, c] * s_c`` give the same ``y``;
``s_c = sqrt(r1_c / r2_c)`` from the per-channel absmax of ``W1``'s output row and ``W2``'s input
column makes both ranges ``sqrt(r1_c r2_c)``, which per-tensor weight quantization loses less to.

AIMET only pairs convs with ReLU/PReLU between them. SDXL has GroupNorm + SiLU between its convs, and
neither commutes with a per-channel scaling, so those pairs do not exist here. The pairs that do
(found by structure, per component):

* attention ``to_v`` -> ``to_out.0`` (diffusers ``Attention``) and ``v_proj`` -> ``out_proj`` (CLIP):
  the attention weights mix tokens, not channels, so a value channel's scale passes straight through
  (per head, channel for channel);
* GEGLU's value half ``ff.net.0.proj`` rows ``[:inner]`` -> ``ff.net.2``: ``value * gelu(gate)`` is
  linear in the value.

Everything else is left alone; the method's stats list the pairs found.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import register_method
from .base import Method, MethodResult, MethodTarget


def equalization_pairs(module: torch.nn.Module) -> list[tuple[str, str, int]]:
    """``(first, second, channels)``: Linear pairs where per-channel scaling between them is exact.

    ``channels`` is how many of ``first``'s output rows feed ``second`` one to one (GEGLU: the value half).
    """
    from diffusers.models.activations import GEGLU
    from diffusers.models.attention_processor import Attention

    pairs = []
    for name, sub in module.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(sub, Attention) and isinstance(sub.to_v, torch.nn.Linear) and \
                isinstance(sub.to_out[0], torch.nn.Linear):
            pairs.append((f"{prefix}to_v", f"{prefix}to_out.0", sub.to_v.out_features))
        elif type(sub).__name__ == "CLIPAttention" and isinstance(getattr(sub, "v_proj", None), torch.nn.Linear):
            pairs.append((f"{prefix}v_proj", f"{prefix}out_proj", sub.v_proj.out_features))
        elif type(sub).__name__ == "FeedForward" and isinstance(sub.net[0], GEGLU) and \
                isinstance(sub.net[-1], torch.nn.Linear):
            pairs.append((f"{prefix}net.0.proj", f"{prefix}net.{len(sub.net) - 1}", sub.net[-1].in_features))
    return pairs


@register_method
class CrossLayerEqualization(Method):
    kind = "cross_layer_equalization"
    phase = "pre_ranges"

    @dataclass(frozen=True)
    class Settings:
        #: smallest per-channel factor (AIMET clamps nothing; a guard against a dead channel's 0)
        min_range: float = 1e-8

    def run(self, target: MethodTarget) -> MethodResult:
        modules = dict(target.module.named_modules())
        result = MethodResult()
        found, before, after = [], [], []
        for first_name, second_name, channels in equalization_pairs(target.module):
            first, second = modules[first_name], modules[second_name]
            w1 = first.weight.detach().float().clone()
            w2 = second.weight.detach().float().clone()
            r1 = w1[:channels].abs().amax(dim=1).clamp(min=self.settings.min_range)
            r2 = w2.abs().amax(dim=0).clamp(min=self.settings.min_range)
            scale = torch.sqrt(r1 / r2)
            w1[:channels] /= scale[:, None]
            w2 *= scale[None, :]
            result.weights[f"{first_name}.weight"] = w1.to(first.weight.dtype)
            result.weights[f"{second_name}.weight"] = w2.to(second.weight.dtype)
            if first.bias is not None:
                b1 = first.bias.detach().float().clone()
                b1[:channels] /= scale
                result.weights[f"{first_name}.bias"] = b1.to(first.bias.dtype)
            found.append(f"{first_name} -> {second_name}")
            before.append(float((r1.max() / r1.min()).item()))
            after.append(float(((r1 / scale).max() / (r1 / scale).min()).item()))
        result.stats = {"pairs": len(found), "pair_names": found[:50],
                        "largest_row_range_ratio_before": round(max(before), 3) if before else None,
                        "largest_row_range_ratio_after": round(max(after), 3) if after else None}
        return result
