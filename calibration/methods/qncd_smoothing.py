"""``qncd_smoothing``: QNCD's embedding-derived smoothing of each resblock's second conv (seed 004, intra noise).

QNCD (huanpengchu/QNCD, ``--scale_split_static``, ``quant/quant_block.py``: ``save_temb``,
``set_conv_weight``) divides the input of each resblock's second conv by a per-channel factor and
multiplies the conv's weights by it (exact in FP32). The factor comes from the time embedding the
block adds before its second norm: per calibration call, the projected embedding ``emb_out`` is
group-normalised as the block's norm would (``(norm(emb_out) - beta) / gamma``: the norm without its
affine), clamped below at 1; the mean over calls, clamped at 1 again, times the norm's ``gamma``, is the
factor ``s`` (static, one per channel, not per step).

Mapped onto diffusers' ``ResnetBlock2D`` (``time_embedding_norm="default"``): ``emb_out`` is
``time_emb_proj(silu(temb))``, added before ``norm2`` -> SiLU -> ``conv2``; ``conv2``'s input gets the
pre-scale ``1/s`` and its weights ``* s`` on the input-channel axis. One deviation: QNCD keeps the first
batch row of the mean (in SD v1 every row has the same time embedding); SDXL's embedding also carries
the pooled text and size conditioning (``text_time``), which differs per prompt, so the mean here is
over every row of every call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quant.encodings import PreScale, tensor_key

from . import register_method
from .base import Method, MethodError, MethodResult, MethodTarget, run_data


def resnet_blocks(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The diffusers ``ResnetBlock2D`` s whose time embedding is added before ``norm2`` (the case QNCD treats)."""
    from diffusers.models.resnet import ResnetBlock2D

    return [(name, sub) for name, sub in module.named_modules()
            if isinstance(sub, ResnetBlock2D) and sub.time_emb_proj is not None
            and getattr(sub, "time_embedding_norm", "default") == "default"]


def group_normalised(emb_out: torch.Tensor, norm: torch.nn.GroupNorm) -> torch.Tensor:
    """``(norm(emb_out) - beta) / gamma`` for ``emb_out`` ``(N, C)``: the group norm without its affine."""
    n, c = emb_out.shape
    grouped = emb_out.float().reshape(n, norm.num_groups, c // norm.num_groups)
    mean = grouped.mean(dim=-1, keepdim=True)
    var = grouped.var(dim=-1, unbiased=False, keepdim=True)
    return ((grouped - mean) / torch.sqrt(var + norm.eps)).reshape(n, c)


@register_method
class QncdSmoothing(Method):
    kind = "qncd_smoothing"
    phase = "pre_ranges"

    @dataclass(frozen=True)
    class Settings:
        #: smallest |factor| accepted (a norm gamma of 0 would divide by zero)
        min_factor: float = 1e-6

    def run(self, target: MethodTarget) -> MethodResult:
        if target.forward_loop is None:
            raise MethodError("qncd_smoothing needs calibration data (the time embeddings of the calibration calls)")
        planned = {p.name for p in target.plans}
        blocks = [(name, block) for name, block in resnet_blocks(target.module)
                  if (f"{name}.conv2" if name else "conv2") in planned]
        sums: dict[str, torch.Tensor] = {}
        rows: dict[str, int] = {}

        def keep(name: str, block):
            def hook(_module, _args, output):
                clamped = group_normalised(output.detach(), block.norm2).clamp(min=1.0)
                sums[name] = sums.get(name, 0) + clamped.sum(dim=0)
                rows[name] = rows.get(name, 0) + clamped.shape[0]
            return hook

        run_data(target.module, target.forward_loop,
                 handles=[block.time_emb_proj.register_forward_hook(keep(name, block)) for name, block in blocks])
        result = MethodResult()
        largest = []
        for name, block in blocks:
            if name not in sums:
                continue
            mean = (sums[name] / rows[name]).clamp(min=1.0)
            factor = block.norm2.weight.detach().float() * mean
            factor = torch.where(factor.abs() < self.settings.min_factor,
                                 torch.full_like(factor, self.settings.min_factor), factor)
            conv = f"{name}.conv2" if name else "conv2"
            weight = block.conv2.weight.detach().float()
            result.weights[f"{conv}.weight"] = (weight * factor[None, :, None, None]).to(block.conv2.weight.dtype)
            result.pre_scales[tensor_key(conv, "input")] = PreScale(1, [float(1.0 / v) for v in factor])
            largest.append((conv, float(factor.abs().max())))
        largest.sort(key=lambda item: -item[1])
        result.stats = {"blocks": len(largest), "largest_factors": [[n, round(v, 4)] for n, v in largest[:5]]}
        return result
