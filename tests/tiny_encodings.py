"""Encodings of the tiny UNet in a second or so, for tests that need a real encodings file."""

from __future__ import annotations

import copy

from backends.onnx_export import unet_signature
from calibration.quantize import quantize


def unet_example_args(tiny_backend) -> tuple:
    """One CFG batch of UNet inputs: ``(sample, timestep, states, text_embeds, time_ids)``."""
    sample, timestep, states, text_embeds, time_ids = unet_signature(tiny_backend.unet, batch=2).example_inputs
    return sample, timestep[0], states, text_embeds, time_ids


def tiny_unet_loop(unet_args):
    """A forward loop of two CFG batches (``unet_args`` and half its latent), the same data on every call."""
    sample, timestep, states, text_embeds, time_ids = unet_args

    def forward_loop(module):
        for scale in (1.0, 0.5):
            module(sample * scale, timestep, encoder_hidden_states=states,
                   added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids})
    return forward_loop


def calibrate_tiny_unet(tiny_backend, unet_args, recipe: str, directory):
    """Calibrate the tiny UNet with ``recipe`` on two random CFG batches (the algorithm never sees a pipeline)."""
    unet = copy.deepcopy(tiny_backend.unet)
    encodings = quantize(unet, recipe, tiny_unet_loop(unet_args), component="unet", apply=False)
    return encodings, encodings.save(directory / f"{recipe}.json")
