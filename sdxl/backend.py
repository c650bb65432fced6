"""The backend interface: the model calls the pipeline makes, and nothing about scheduling or batching.

The pipeline (:mod:`sdxl.pipeline`) owns the SDXL loop (scheduler, classifier-free guidance, latents,
uint8 conversion); a backend supplies the model calls it accelerates:

* :meth:`Backend.encode_prompts` -- both CLIP text encoders -> (``prompt_embeds``, ``pooled``),
  exactly as SDXL: ``hidden_states[-2]`` of each, concatenated; the pooled projection of encoder 2;
* :meth:`Backend.predict_noise` -- one UNet call on a CFG batch (negative rows first);
* :meth:`Backend.decode` -- the VAE decoder on *unscaled* latents, returning images in [-1, 1].

The interface lives here, beside the pipeline that calls it; the implementations and their registry
live above, in ``backends/``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from .models import ModelSpec

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class BackendOptions:
    """Settings every backend accepts; backend-specific ones go in ``extra``."""

    dtype: str = "fp32"
    device: str = "cpu"
    encodings: str | None = None
    recipe: str | None = None
    channels_last: bool | None = None
    show_progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


class Backend(ABC):
    """Runs the SDXL components for :class:`sdxl.pipeline.SDXLPipeline`."""

    #: registry name, e.g. ``"torch"``
    name: str = ""
    #: True when images come from real model calls (``null`` returns black images)
    runs_model: bool = True

    def __init__(self, spec: ModelSpec, options: BackendOptions):
        self.spec = spec
        self.options = options

    @property
    def device(self) -> torch.device:
        return torch.device(self.options.device)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of latents and embeddings handed to :meth:`predict_noise`."""
        return self.options.torch_dtype

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.spec.profile_config.get("vae", {}).get("scaling_factor", 0.13025))

    @abstractmethod
    def encode_prompts(self, ids_1: torch.Tensor, ids_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids ``(N, 77)`` of both tokenizers -> ``prompt_embeds (N, 77, D1+D2)``, ``pooled (N, P)``."""

    @abstractmethod
    def predict_noise(self, latent_input: torch.Tensor, timestep: torch.Tensor, prompt_embeds: torch.Tensor,
                      text_embeds: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        """The UNet's epsilon prediction for a (scaled) CFG batch at ``timestep``."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE-decode ``latents`` (already divided by the scaling factor); images ``(N, 3, H, W)`` in [-1, 1]."""

    def describe(self) -> dict[str, Any]:
        """Settings recorded in ``run.json``."""
        return {"name": self.name, "dtype": self.options.dtype, "device": self.options.device,
                "encodings": self.options.encodings, "recipe": self.options.recipe}
