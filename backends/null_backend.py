"""``null``: black images at once, to measure the harness's own per-query overhead."""

from __future__ import annotations

import torch

from harness.benchmark_spec import VAE_SCALE_FACTOR

from .base import Backend, register_backend


class NullBackend(Backend):
    """Every model call returns zeros of the right shape; decode yields -1 (black after postprocessing)."""

    name = "null"
    runs_model = False
    _EMBED_DIM = 8

    def encode_prompts(self, ids_1, ids_2):
        n = ids_1.shape[0]
        return (torch.zeros(n, ids_1.shape[1], self._EMBED_DIM, dtype=self.dtype),
                torch.zeros(n, self._EMBED_DIM, dtype=self.dtype))

    def predict_noise(self, latent_input, timestep, prompt_embeds, text_embeds, time_ids):
        return torch.zeros_like(latent_input)

    def decode(self, latents):
        n, _, h, w = latents.shape
        return torch.full((n, 3, h * VAE_SCALE_FACTOR, w * VAE_SCALE_FACTOR), -1.0, dtype=torch.float32)


register_backend("null", NullBackend)
