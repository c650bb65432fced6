"""The SDXL text-to-image loop, written once, exactly as MLPerf's reference runs it.

MLPerf's ``backend_pytorch.py`` calls diffusers' ``StableDiffusionXLPipeline`` with pre-computed
prompt embeddings (``hidden_states[-2]`` of both encoders, pooled output of encoder 2), the fixed
negative prompt, guidance 8.0, 20 EulerDiscrete steps, one fixed latent for every prompt, no
watermark, ``output_type="pt"``, then ``(x * 255).round()`` to uint8 HWC. This module performs the
same operations in the same order (so images equal diffusers' bit for bit; a test checks it), but
calls a :class:`sdxl.backend.Backend` for the three model parts, so that backends only swap what
they accelerate and scenarios only change how prompts are batched.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from diffusers import EulerDiscreteScheduler

from .backend import Backend
from .benchmark_spec import GUIDANCE_SCALE, NEGATIVE_PROMPT, NUM_INFERENCE_STEPS
from .image_bytes import convert_images
from .models import ModelSpec
from .tokenizers import tokenize


@dataclass(frozen=True)
class StepContext:
    """What a noise-correction hook sees at one denoising step (before the scheduler's update).

    ``latents`` in the scheduler's sample space (``x = x0 + sigma * eps``); ``sigma``/``sigma_next`` this
    step's and the next one's; ``predict(x)`` the guided (CFG) noise prediction for latents ``x`` at this
    step's timestep and sigma -- one extra UNet call on a CFG batch.
    """

    step: int
    timestep: Any
    sigma: float
    sigma_next: float
    latents: torch.Tensor
    predict: Callable[[torch.Tensor], torch.Tensor]


def make_scheduler(scheduler_config: dict, steps: int = NUM_INFERENCE_STEPS) -> EulerDiscreteScheduler:
    """SDXL's EulerDiscrete scheduler with ``steps`` timesteps set (951, 901, ..., 1 for 20 leading steps)."""
    scheduler = EulerDiscreteScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps, device="cpu")
    return scheduler


def cfg_conditioning(negative: dict[str, torch.Tensor], embeds: torch.Tensor,
                     pooled: torch.Tensor) -> dict[str, torch.Tensor]:
    """The UNet's classifier-free-guidance batch for ``n`` prompts: the negative rows first, as diffusers orders them.

    ``negative`` is :meth:`SDXLPipeline.negative_conditioning`; ``embeds``/``pooled`` the prompts' encodings.
    """
    n = embeds.shape[0]
    return {"prompt_embeds": torch.cat([negative["prompt_embeds"].expand(n, -1, -1), embeds]),
            "text_embeds": torch.cat([negative["text_embeds"].expand(n, -1), pooled]),
            "time_ids": negative["time_ids"].expand(2 * n, -1).contiguous()}


class SDXLPipeline:
    """Generates MLPerf SDXL images from token ids through a backend.

    Thread-safe for concurrent :meth:`generate` calls on backends that are (each call copies the
    scheduler state); the negative-prompt embeddings are computed once.
    """

    def __init__(self, backend: Backend, spec: ModelSpec, tokenizers: tuple, steps: int = NUM_INFERENCE_STEPS,
                 guidance_scale: float = GUIDANCE_SCALE, noise_correction=None):
        self.backend = backend
        #: a sampler change (QNCD's runtime noise correction, :mod:`sdxl.noise_correction`): its ``start()``
        #: gives each denoising run a hook ``(StepContext, noise) -> noise``; None is MLPerf's loop unchanged
        self.noise_correction = noise_correction
        self.spec = spec
        self.guidance_scale = guidance_scale
        self._scheduler = make_scheduler(spec.scheduler_config, steps)
        self._negative_ids = tuple(tokenize(tok, [NEGATIVE_PROMPT]) for tok in tokenizers)
        self._negative: dict[str, torch.Tensor] | None = None
        #: images whose decoded pixels held NaN/Inf (they convert to black): a broken recipe or input
        self.nonfinite_images = 0
        self._count_lock = threading.Lock()

    @property
    def timesteps(self) -> torch.Tensor:
        return self._scheduler.timesteps

    @property
    def scheduler_sigmas(self) -> torch.Tensor:
        """The schedule's sigmas, one per step plus the final 0 (sample space ``x = x0 + sigma * eps``)."""
        return self._scheduler.sigmas

    def negative_conditioning(self) -> dict[str, torch.Tensor]:
        """MLPerf's negative prompt as one CFG row: ``prompt_embeds``, ``text_embeds``, ``time_ids`` (computed once).

        Public so the calibration capture stores exactly what the pipeline feeds the UNet.
        """
        if self._negative is None:
            with torch.inference_mode():
                embeds, pooled = self.backend.encode_prompts(*self._negative_ids)
            size = self.spec.image_size  # SDXL micro-conditioning: original size, crop (0, 0), target size
            time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=embeds.dtype, device=self.backend.device)
            self._negative = {"prompt_embeds": embeds, "text_embeds": pooled, "time_ids": time_ids}
        return self._negative

    def conditioning(self, ids_1: torch.Tensor, ids_2: torch.Tensor) -> dict[str, torch.Tensor]:
        """The UNet's CFG conditioning for a batch of prompts' token ids."""
        embeds, pooled = self.backend.encode_prompts(ids_1, ids_2)
        return cfg_conditioning(self.negative_conditioning(), embeds, pooled)

    def denoise(self, latent: torch.Tensor, conditioning: dict[str, torch.Tensor], n: int,
                step_callback=None, max_steps: int | None = None) -> torch.Tensor:
        """Run the EulerDiscrete loop from the shared initial ``latent`` ``(1, 4, h, w)`` for ``n`` prompts.

        ``step_callback(step, t, latent_input, conditioning)``, when given, sees every UNet input
        (calibration uses it to capture timestep-aware data). ``max_steps`` stops the loop early: a
        warm-up needs every kernel at every shape once, not the whole schedule.
        """
        latents = latent.to(self.backend.device, self.backend.dtype).expand(n, -1, -1, -1)
        if not self.backend.runs_model:
            return latents  # the null backend measures the harness's overhead: no denoising math
        scheduler = copy.deepcopy(self._scheduler)
        latents = latents * scheduler.init_noise_sigma
        hook = self.noise_correction.start() if self.noise_correction is not None else None

        def guided(latent_input: torch.Tensor, t) -> torch.Tensor:
            noise = self.backend.predict_noise(latent_input, t, **conditioning)
            noise_uncond, noise_text = noise.chunk(2)
            return noise_uncond + self.guidance_scale * (noise_text - noise_uncond)

        for step, t in enumerate(scheduler.timesteps[:max_steps]):
            latent_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            if step_callback is not None:
                step_callback(step, t, latent_input, conditioning)
            noise = guided(latent_input, t)
            if hook is not None:
                sigma, sigma_next = float(scheduler.sigmas[step]), float(scheduler.sigmas[step + 1])
                # scaled by hand: scale_model_input would use the scheduler's own step index, not this sigma
                predict = lambda x, t=t, sigma=sigma: guided(torch.cat([x] * 2) / (sigma ** 2 + 1) ** 0.5, t)  # noqa: E731
                noise = hook(StepContext(step, t, sigma, sigma_next, latents, predict), noise)
            latents = scheduler.step(noise, t, latents, return_dict=False)[0]
        return latents

    def generate(self, ids_1: torch.Tensor, ids_2: torch.Tensor, latent: torch.Tensor,
                 max_steps: int | None = None, step_callback=None) -> np.ndarray:
        """Token ids of ``N`` prompts and the shared latent -> ``(N, H, W, 3)`` uint8 images.

        ``max_steps`` (warm-up only) decodes a partly denoised latent: not an MLPerf image.
        ``step_callback`` as :meth:`denoise`'s (the SUT's raises to abandon a batch on Ctrl-C/SIGTERM).
        """
        with torch.inference_mode():
            conditioning = self.conditioning(ids_1, ids_2)
            latents = self.denoise(latent, conditioning, ids_1.shape[0], step_callback=step_callback,
                                   max_steps=max_steps)
            decoded = self.backend.decode(latents / self.backend.vae_scaling_factor)
            images, nonfinite = convert_images(decoded, from_vae=True)
            if nonfinite:
                with self._count_lock:
                    self.nonfinite_images += nonfinite
            return images
