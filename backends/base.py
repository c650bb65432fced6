"""The backend interface: the four things a backend runs, and nothing about scheduling or batching.

The harness owns the SDXL loop (scheduler, classifier-free guidance, latents, uint8 conversion,
``harness/pipeline.py``); a backend supplies the model calls it accelerates:

* :meth:`Backend.encode_prompts` -- both CLIP text encoders -> (``prompt_embeds``, ``pooled``),
  exactly as SDXL: ``hidden_states[-2]`` of each, concatenated; the pooled projection of encoder 2;
* :meth:`Backend.predict_noise` -- one UNet call on a CFG batch (negative rows first);
* :meth:`Backend.decode` -- the VAE decoder on *unscaled* latents, returning images in [-1, 1].

Backends are looked up by name (``--backend``); a new backend is a new module that calls
:func:`register_backend` at import time and is listed in ``_BACKEND_MODULES``.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from harness.models import ModelSpec

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
    """Runs the SDXL components for :class:`harness.pipeline.SDXLPipeline`."""

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


BackendFactory = Callable[[ModelSpec, BackendOptions], Backend]
_REGISTRY: dict[str, BackendFactory] = {}
_ALIASES: dict[str, str] = {}
#: modules imported on first lookup, so that optional backends' dependencies load only when used
_BACKEND_MODULES = ("backends.null_backend", "backends.torch_backend", "backends.ort_backend")


def register_backend(name: str, factory: BackendFactory, aliases: tuple[str, ...] = ()) -> None:
    _REGISTRY[name] = factory
    for alias in aliases:
        _ALIASES[alias] = name


def _load_registry() -> None:
    for module in _BACKEND_MODULES:
        importlib.import_module(module)


def available_backends() -> list[str]:
    _load_registry()
    return sorted(_REGISTRY) + sorted(_ALIASES)


def canonical_backend_name(name: str) -> str:
    _load_registry()
    name = _ALIASES.get(name, name)
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(available_backends())}")
    return name


def create_backend(name: str, spec: ModelSpec, options: BackendOptions) -> Backend:
    """Instantiate backend ``name`` (aliases allowed) for ``spec``."""
    return _REGISTRY[canonical_backend_name(name)](spec, options)
