"""Where a UNet's up-block resnets read a concatenation: the boundaries shortcut splitting quantizes at.

Each resnet of a diffusers up block takes ``cat([hidden_states, skip], dim=1)``: the upsampling path's
activations and a skip connection from the down path, two tensors of very different ranges. Q-Diffusion
(``qdiff/quant_layer.py``, ``split``) quantizes such a layer's input -- and its weight, along the input
channels -- as two tensors with their own quantizers. In diffusers' ``ResnetBlock2D`` only
``conv_shortcut`` (the 1x1 conv on the skip path) reads the concatenation itself; ``conv1`` reads
``SiLU(GroupNorm(cat))``, one tensor again.

The boundary is the channel count of ``hidden_states`` before the concatenation, fixed by the
architecture (``UpBlock2D.__init__``: resnet ``j`` has ``resnet_in_channels`` = the previous block's
output for ``j == 0``, its own output after): it is read from the modules, with no data pass.
"""

from __future__ import annotations

import torch


def _out_channels(block: torch.nn.Module) -> int | None:
    resnets = getattr(block, "resnets", None)
    return int(resnets[-1].out_channels) if resnets else None


def concat_boundaries(module: torch.nn.Module) -> dict[str, int]:
    """``{"up_blocks.i.resnets.j.conv_shortcut": channels of the first concatenated tensor}``.

    Empty for modules without diffusers-style ``up_blocks`` (text encoders, the VAE, a test's toy model).
    Each boundary is checked against the resnet's input width (the skip's channels must be left over).
    """
    up_blocks = getattr(module, "up_blocks", None)
    if up_blocks is None:
        return {}
    previous = _out_channels(getattr(module, "mid_block", None) or up_blocks[0])
    out: dict[str, int] = {}
    for i, block in enumerate(up_blocks):
        for j, resnet in enumerate(getattr(block, "resnets", ())):
            hidden = previous if j == 0 else int(block.resnets[j - 1].out_channels)
            shortcut = getattr(resnet, "conv_shortcut", None)
            if isinstance(shortcut, torch.nn.Conv2d) and 0 < hidden < shortcut.in_channels:
                out[f"up_blocks.{i}.resnets.{j}.conv_shortcut"] = hidden
        previous = _out_channels(block) or previous
    return out
