"""Model profiles: where the SDXL components come from.

A profile is data (``sdxl/data/profiles/*.json``), not a code path: ``tiny`` and ``sdxl-random``
are SDXL architectures with seeded random weights, built without a download; ``testbed`` is tiny's
architecture with trained weights that ship in git (``sdxl/data/profiles/testbed/``, sha256 in the
profile); ``sdxl`` loads real weights from a local directory (diffusers layout, or MLPerf's reference
layout). Everything after
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
SHIPPED_PROFILES = ("testbed",)
PROFILES = ("testbed",) + RANDOM_PROFILES + ("sdxl",)
COMPONENT_NAMES = ("text_encoder", "text_encoder_2", "unet", "vae")

HOW_TO_GET_SDXL = (
    "get SDXL base 1.0 as safetensors in the diffusers layout (e.g. `huggingface-cli download "
    "stabilityai/stable-diffusion-xl-base-1.0 --include '*.json' '*.txt' '*.fp16.safetensors' '*.safetensors'`) "
    "or MLPerf's `stable_diffusion_fp32` checkpoint (text_to_image README of mlcommons/inference), "
    "and pass its directory as --model-path"
)


HOW_TO_GET_TESTBED = ("the testbed's weights ship with the repository: restore them with "
                      "`git checkout -- sdxl/data/profiles/testbed`, or retrain them with `./run.sh train-testbed`")


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
    #: weights shipped with the profile (``testbed``): the file, its sha256 recorded in the profile
    shipped_weights: Path | None = None

    @property
    def latent_size(self) -> int:
        return self.image_size // VAE_SCALE_FACTOR

    def fingerprint(self) -> str:
        """A stable id of the weights: config + seed for random profiles, file hashes for checkpoints."""
        if self.random_weights or self.shipped_weights is not None:
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
    if profile in RANDOM_PROFILES + SHIPPED_PROFILES:
        config = _read_json(PROFILE_DIR / f"{profile}.json")
        scheduler = _read_json(PROFILE_DIR / config["scheduler"])
        shipped = PROFILE_DIR / config["weights"] if profile in SHIPPED_PROFILES else None
        return ModelSpec(profile, int(config["image_size"]), scheduler, shipped is None, config["description"],
                         profile_config=config, shipped_weights=shipped)
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


def profile_default(profile: str, key: str) -> Path | None:
    """A built-in profile's default file (``default_captions``, ``default_calibration_captions``), if it names one."""
    if profile not in RANDOM_PROFILES + SHIPPED_PROFILES:
        return None
    name = _read_json(PROFILE_DIR / f"{profile}.json").get(key)
    return PROFILE_DIR / name if name else None


def build_random_components(spec: ModelSpec, show_progress: bool = True) -> ModelComponents:
    """Build a profile's architecture deterministically: component ``k`` is initialised after seeding ``seed + k``.

    For a shipped-weights profile the trained weights then replace every parameter (strictly).
    """
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
    shipped = None
    if spec.shipped_weights is not None:
        from .shipped_weights import load_shipped

        shipped = load_shipped(spec.shipped_weights, config.get("weights_sha256"), HOW_TO_GET_TESTBED)
    modules: dict[str, torch.nn.Module] = {}
    kind = "random weights" if shipped is None else "trained weights"
    for k, name in enumerate(progress(COMPONENT_NAMES, desc=f"building {spec.profile} ({kind})",
                                      disable=not show_progress)):
        torch.manual_seed(int(config["seed"]) + k)
        module = builders[name](config[name])
        if shipped is not None:
            from .shipped_weights import load_into, unpack

            load_into(module, unpack(shipped, name, int(config[name].get("vocab_size", 0))), name)
        modules[name] = module.eval().requires_grad_(False)
    return ModelComponents(spec, **modules)


def load_tokenizers(spec: ModelSpec) -> tuple[Any, Any]:
    """SDXL's two tokenizers: the checkpoint's own, or the CLIP BPE from open_clip for built-in profiles."""
    if spec.model_path is None:
        return build_sdxl_tokenizers()
    from .checkpoints import load_checkpoint_tokenizers

    return load_checkpoint_tokenizers(spec)


def load_components(spec: ModelSpec, dtype: torch.dtype = torch.float32, show_progress: bool = True) -> ModelComponents:
    """Build or load the modules of ``spec``; checkpoints load directly in ``dtype`` (no fp32 copy)."""
    if spec.model_path is None:
        return build_random_components(spec, show_progress)
    from .checkpoints import load_checkpoint_components

    return load_checkpoint_components(spec, dtype, show_progress)
