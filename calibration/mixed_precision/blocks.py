"""Seed 003's global analysis: quantize the UNet's blocks cumulatively, watch the output SQNR per timestep.

Yang et al. (arXiv 2312.05431) quantize a diffusion UNet block by block, in execution order, and track
the output SQNR against FP32 at every denoising step; the blocks where it falls most get higher
precision ("hybrid precision"). Here: top-level blocks (``conv_in``, ``time_embedding``, each
``down_blocks.N``, ``mid_block``, each ``up_blocks.N``, ``conv_out``, ...), for a recipe's encodings:

* cumulative: blocks ``0..k`` quantized, output SQNR per timestep (the heat map's rows);
* alone: block ``k`` only quantized, the same.

The hybrid rule, stated so it can be reproduced: the output noise power of the cumulative model grows
as blocks are added; a block's share is its increment over the total with every block quantized. The
blocks kept at higher precision are the fewest whose shares add up to ``share`` (default 0.5): the
"where SQNR drops most" of the seed as a threshold on noise power, which, unlike a dB drop, also
applies to the first block (whose predecessor, FP32, has infinite SQNR).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch

from quant.encodings import parse_key

from .sensitivity import Entries, ForwardLoop, OutputRecorder, QuantizedLayers


def top_level_block(layer: str) -> str:
    parts = layer.split(".")
    return ".".join(parts[:2]) if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 1 else parts[0]


@dataclass
class BlockAnalysis:
    blocks: list[str]
    timesteps: list[int]
    cumulative_db: list[list[float]]  # [block k][timestep]: blocks 0..k quantized
    alone_db: list[list[float]]
    noise_share: list[float] = field(default_factory=list)  # per block, of the all-quantized output noise
    cumulative_total_db: list[float] = field(default_factory=list)  # over every timestep's output together
    alone_total_db: list[float] = field(default_factory=list)

    def sensitive(self, share: float = 0.5) -> list[str]:
        """The fewest blocks whose noise shares reach ``share`` (largest first)."""
        order = np.argsort(self.noise_share)[::-1]
        chosen, total = [], 0.0
        for index in order:
            if total >= share:
                break
            chosen.append(self.blocks[index])
            total += self.noise_share[index]
        return chosen

    def to_json(self) -> dict[str, Any]:
        return {"blocks": self.blocks, "timesteps": self.timesteps, "cumulative_sqnr_db": self.cumulative_db,
                "alone_sqnr_db": self.alone_db, "noise_share": self.noise_share,
                "cumulative_total_sqnr_db": self.cumulative_total_db, "alone_total_sqnr_db": self.alone_total_db}


def _per_timestep(run: OutputRecorder) -> list[tuple[int, torch.Tensor]]:
    outputs = run()
    return list(zip(run.timesteps, outputs))


def _sqnr_by_timestep(outputs, reference, timesteps: list[int]) -> tuple[list[float], float]:
    """SQNR (dB) per timestep, and the total noise power (for the shares)."""
    signal = dict.fromkeys(timesteps, 0.0)
    noise = dict.fromkeys(timesteps, 0.0)
    for (t, out), (_, ref) in zip(outputs, reference):
        signal[t] += float((ref ** 2).sum())
        noise[t] += float(((out - ref) ** 2).sum())
    db = [float("inf") if noise[t] == 0 else 10.0 * np.log10(signal[t] / noise[t]) for t in timesteps]
    return db, sum(noise.values())


def block_progressive(module: torch.nn.Module, entries: Entries, forward_loop: ForwardLoop, samples: int = 8,
                      progress=None) -> BlockAnalysis:
    """The cumulative and per-block output SQNR per timestep of ``entries`` on ``module``."""
    layers = sorted({parse_key(k)[0] for k in entries})
    order: list[str] = []
    handles = [sub.register_forward_pre_hook(lambda m, a, b=top_level_block(name): order.append(b)
                                             if b not in order else None)
               for name, sub in module.named_modules() if name in set(layers)]
    recorder = OutputRecorder(module, forward_loop, samples)
    run = lambda: _per_timestep(recorder)  # noqa: E731
    try:
        reference = run()
    finally:
        for handle in handles:
            handle.remove()
    blocks = order + sorted({top_level_block(layer) for layer in layers} - set(order))
    timesteps = sorted({t for t, _ in reference}, reverse=True)  # noisiest first, as the loop runs
    by_block = {b: [layer for layer in layers if top_level_block(layer) == b] for b in blocks}
    signal = sum(float((ref ** 2).sum()) for _, ref in reference)
    total_db = lambda power: float("inf") if power == 0 else 10.0 * np.log10(signal / power)  # noqa: E731
    cumulative, alone, noise, alone_noise = [], [], [], []
    iterate = progress or (lambda items, **_: items)
    for k in iterate(range(len(blocks)), desc="block sensitivity", total=len(blocks)):
        upto = [layer for b in blocks[:k + 1] for layer in by_block[b]]
        with QuantizedLayers(module, entries, upto):
            db, power = _sqnr_by_timestep(run(), reference, timesteps)
        cumulative.append(db)
        noise.append(power)
        with QuantizedLayers(module, entries, by_block[blocks[k]]):
            db, power = _sqnr_by_timestep(run(), reference, timesteps)
        alone.append(db)
        alone_noise.append(power)
    increments = np.diff([0.0] + noise)
    share = (increments / noise[-1]).tolist() if noise and noise[-1] > 0 else [0.0] * len(blocks)
    return BlockAnalysis(blocks, timesteps, cumulative, alone, share, [total_db(p) for p in noise],
                         [total_db(p) for p in alone_noise])


def hybrid_recipe(base: Mapping[str, Any], sensitive: list[str], higher: str) -> dict[str, Any]:
    """``base`` (a recipe's JSON) with the sensitive blocks at ``higher`` precision, as recipe overrides.

    ``higher``: ``a16`` (uint16 activations, the recipe's weights: W8A16 as QNN runs it) or ``fp16`` (the
    blocks left unquantized).
    """
    if higher not in ("a16", "fp16"):
        raise ValueError(f"higher must be a16 or fp16, got {higher!r}")
    recipe = dict(base)
    patterns = list(sensitive)  # plain names match whole dotted segments: "down_blocks.1" is that block
    if higher == "fp16":
        override = {"match": patterns, "weights": None, "inputs": None, "outputs": None}
    else:
        override = {"match": patterns, "inputs": {"dtype": "uint16", "symmetric": False, "axis": None,
                                                  "observer": "minmax"}}
    recipe["overrides"] = list(recipe.get("overrides") or []) + ([override] if sensitive else [])
    recipe["name"] = f"{base.get('name', 'recipe')}-hybrid-{higher}"
    recipe["description"] = (f"{base.get('name')} with {', '.join(sensitive) or 'no block'} at {higher} "
                             "(seed 003's hybrid precision, blocks chosen by block-sensitivity)")
    return recipe
