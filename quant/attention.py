"""Attention matmuls as named modules, so recipes can quantize Q·Kᵀ and softmax·V like any layer.

diffusers computes attention with one fused ``scaled_dot_product_attention`` call, which has no place
for a quantizer between its two matmuls. As modelopt's ``quantize_mha`` for SDXL, the fused call is
written out -- ``softmax(Q·Kᵀ · scale) · V`` -- through two :class:`MatMul` modules added to every
diffusers ``Attention``: ``<attn>.bmm_qk`` (inputs Q and Kᵀ) and ``<attn>.bmm_pv`` (inputs the
probabilities and V). Their inputs then get ordinary keys (``...attn1.bmm_qk:input[1]``), observed
by ``quantize()``, fake-quantized by ``apply_encodings`` and marked for the ONNX Q/DQ export (where
both inputs quantized turn the MatMul into an integer kernel).

The surgery is added when a recipe's ``types`` include ``MatMul`` or when encodings name one of
these modules; without it the model keeps diffusers' fused SDPA.
"""

from __future__ import annotations

from typing import Iterable

import torch

#: the attribute names of the two matmuls on each attention module
MATMUL_NAMES = ("bmm_qk", "bmm_pv")


class MatMul(torch.nn.Module):
    """``a @ b`` as a module: quantizers hook its two inputs by name."""

    quantized_inputs = 2  # observers and quantizers go on input[0] and input[1]

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)


class ExplicitAttnProcessor:
    """diffusers' ``AttnProcessor2_0`` for SDXL's attention blocks, with SDPA written out as two matmuls.

    Covers what SDXL's UNet and VAE use (self/cross attention, 3-D or 4-D input, the VAE's group norm
    and residual); :func:`add_attention_matmuls` refuses modules with other features. Softmax runs in
    float32 whatever the model dtype, as SDPA's CPU kernels accumulate it.
    """

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 **kwargs) -> torch.Tensor:
        if attention_mask is not None:
            raise NotImplementedError("attention matmul quantization does not support attention masks")
        residual = hidden_states
        four_d = hidden_states.ndim == 4
        if four_d:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        batch = query.shape[0]
        head_dim = key.shape[-1] // attn.heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        scores = attn.bmm_qk(heads(query), heads(key).transpose(-1, -2)) * head_dim ** -0.5  # SDPA's scale
        probs = scores.float().softmax(dim=-1).to(query.dtype)
        out = attn.bmm_pv(probs, heads(value))
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        if four_d:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _unsupported(attn) -> list[str]:
    checks = {"spatial_norm": attn.spatial_norm is not None, "norm_q/norm_k": attn.norm_q is not None,
              "norm_cross": bool(attn.norm_cross), "added_kv_proj": getattr(attn, "add_k_proj", None) is not None}
    return [name for name, present in checks.items() if present]


def add_attention_matmuls(module: torch.nn.Module) -> int:
    """Give every diffusers ``Attention`` in ``module`` its two :class:`MatMul` modules; returns how many.

    Idempotent. The output equals diffusers' SDPA to float rounding (a test holds it).
    """
    from diffusers.models.attention_processor import Attention

    added = 0
    for name, sub in module.named_modules():
        if not isinstance(sub, Attention) or isinstance(getattr(sub, "bmm_qk", None), MatMul):
            continue
        bad = _unsupported(sub)
        if bad:
            raise ValueError(f"{name}: attention with {', '.join(bad)} is not supported by the matmul quantizers")
        sub.bmm_qk, sub.bmm_pv = MatMul(), MatMul()
        sub.set_processor(ExplicitAttnProcessor())
        added += 1
    return added


def names_attention_matmuls(module_names: Iterable[str]) -> bool:
    """Whether any of these module names is an attention matmul (so the model needs the surgery)."""
    return any(name.rsplit(".", 1)[-1] in MATMUL_NAMES for name in module_names)
