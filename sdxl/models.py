"""Model profiles: where the SDXL components come from.

A profile is data (``sdxl/data/profiles/*.json``), not a code path: ``tiny`` and ``sdxl-random``
are SDXL architectures with seeded random weights, built without a download; ``sdxl`` loads real
weights from a local directory (diffusers layout, or MLPerf's reference layout). Everything after
loading -- backends, pipeline, calibration -- sees the same :class:`ModelComponents`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .benchmark_spec import VAE_SCALE_FACTOR
from .errors import UserError
from .tokenizers import build_sdxl_tokenizers

PROFILE_DIR = Path(__file__).parent / "data" / "profiles"
RANDOM_PROFILES = ("tiny", "sdxl-random")
PROFILES = RANDOM_PROFILES + ("sdxl",)
COMPONENT_NAMES = ("text_encoder", "text_encoder_2", "unet", "vae")

HOW_TO_GET_SDXL = (
    "get SDXL base 1.0 as safetensors in the diffusers layout (e.g. `huggingface-cli download "
    "stabilityai/stable-diffusion-xl-base-1.0 --include '*.json' '*.txt' '*.fp16.safetensors' '*.safetensors'`) "
    "or MLPerf's `stable_diffusion_fp32` checkpoint (text_to_image README of mlcommons/inference), "
    "and pass its directory as --model-path"
)


class ModelLoadError(UserError, RuntimeError):
    """A model directory or profile that cannot be loaded; the message says what is missing and how to fix it."""


@dataclass
class ModelSpec:
    """What the harness needs to know about a model before (or without) building its weights."""

    profile: str
    image_size: int
    scheduler_config: dict[str, Any]
    random_weights: bool
    description: str
    model_path: Path | None = None
    profile_config: dict[str, Any] = field(default_factory=dict)

    @property
    def latent_size(self) -> int:
        return self.image_size // VAE_SCALE_FACTOR

    def fingerprint(self) -> str:
        """A stable id of the weights: config + seed for random profiles, file hashes for checkpoints."""
        if self.random_weights:
            blob = json.dumps({"profile": self.profile, **self.profile_config}, sort_keys=True)
            return f"{self.profile}-" + hashlib.sha256(blob.encode()).hexdigest()[:16]
        from .checkpoints import checkpoint_fingerprint

        return checkpoint_fingerprint(self.model_path)


@dataclass
class ModelComponents:
    """The SDXL modules, as diffusers/transformers objects, in fp32 on the CPU unless loaded otherwise."""

    spec: ModelSpec
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module

    def modules(self) -> dict[str, torch.nn.Module]:
        return {name: getattr(self, name) for name in COMPONENT_NAMES}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path} is missing") from None
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from None


def model_spec(profile: str, model_path: str | Path | None = None) -> ModelSpec:
    """Resolve a profile name (and, for ``sdxl``, a model directory) to a :class:`ModelSpec`."""
    if profile in RANDOM_PROFILES:
        config = _read_json(PROFILE_DIR / f"{profile}.json")
        scheduler = _read_json(PROFILE_DIR / config["scheduler"])
        return ModelSpec(profile, int(config["image_size"]), scheduler, True, config["description"],
                         profile_config=config)
    if profile == "sdxl":
        from .checkpoints import resolve_checkpoint

        layout = resolve_checkpoint(model_path)
        scheduler = _read_json(layout.scheduler_dir / "scheduler_config.json")
        vae = _read_json(layout.pipe_dir / "vae" / "config.json")
        unet = _read_json(layout.pipe_dir / "unet" / "config.json")
        image_size = int(unet.get("sample_size", 128)) * (2 ** (len(vae["block_out_channels"]) - 1))
        return ModelSpec("sdxl", image_size, scheduler, False, f"SDXL checkpoint at {layout.root} ({layout.kind} layout)",
                         model_path=layout.root)
    raise ModelLoadError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")


def build_random_components(spec: ModelSpec, show_progress: bool = True) -> ModelComponents:
    """Build a random-weights profile deterministically: component ``k`` is initialised after seeding ``seed + k``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .progress import progress

    config = spec.profile_config
    builders = {
        "text_encoder": lambda c: CLIPTextModel(CLIPTextConfig(**c)),
        "text_encoder_2": lambda c: CLIPTextModelWithProjection(CLIPTextConfig(**c)),
        "unet": lambda c: UNet2DConditionModel(**c),
        "vae": lambda c: AutoencoderKL(**c),
    }
    modules: dict[str, torch.nn.Module] = {}
    for k, name in enumerate(progress(COMPONENT_NAMES, desc=f"building {spec.profile} (random weights)",
                                      disable=not show_progress)):
        torch.manual_seed(int(config["seed"]) + k)
        modules[name] = builders[name](config[name]).eval().requires_grad_(False)
    return ModelComponents(spec, **modules)


def load_tokenizers(spec: ModelSpec) -> tuple[Any, Any]:
    """SDXL's two tokenizers: the checkpoint's own, or the CLIP BPE from open_clip for random profiles."""
    if spec.random_weights:
        return build_sdxl_tokenizers()
    from .checkpoints import load_checkpoint_tokenizers

    return load_checkpoint_tokenizers(spec)


def load_components(spec: ModelSpec, dtype: torch.dtype = torch.float32, show_progress: bool = True) -> ModelComponents:
    """Build or load the modules of ``spec``; checkpoints load directly in ``dtype`` (no fp32 copy)."""
    if spec.random_weights:
        return build_random_components(spec, show_progress)
    from .checkpoints import load_checkpoint_components

    return load_checkpoint_components(spec, dtype, show_progress)
