"""Calibrate the SDXL components of a loaded model: capture from the pipeline, then ``quantize`` each.

The glue between the spine (models, pipeline, backend) and the algorithms: algorithms still only get
``(module, recipe, forward_loop)``; this module builds the forward loops from captured data.
Order matters: the capture runs first on the FP32 model (so every component is calibrated on FP32
activations), then text encoders, UNet and VAE are quantized in pipeline order.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from backends.torch_backend import TorchBackend
from quant.encodings import Encodings

from .capture import CalibrationData, CaptureRequest, capture, is_mlperf_calibration_set, read_calibration_captions
from .quantize import quantize
from .recipes import Recipe, load_recipe

log = logging.getLogger(__name__)
#: calibration order: a component's inputs come from the ones before it
COMPONENT_ORDER = ("text_encoder", "text_encoder_2", "unet", "vae")


def capture_for(components, recipe: Recipe, calibration_captions: str | Path | None = None,
                num_prompts: int | None = None, timesteps: str | None = None, cache_dir: str | Path = "build/cache",
                free_text_encoders: bool = False, show_progress: bool = True) -> CalibrationData:
    """Capture (or load from the cache) the calibration data ``recipe`` needs for ``components``."""
    from sdxl.models import load_tokenizers
    from sdxl.pipeline import SDXLPipeline

    spec = components.spec
    captions, source = read_calibration_captions(calibration_captions, spec.profile,
                                                 num_prompts or recipe.calibration.get("num_prompts"))
    request = CaptureRequest(captions, source, timesteps or recipe.calibration.get("timesteps", "all"),
                             chunk_prompts=1 if spec.image_size >= 1024 else 4, need_final="vae" in recipe.components)
    backend = TorchBackend.from_components(components)
    tokenizers = load_tokenizers(spec)
    pipeline = SDXLPipeline(backend, spec, tokenizers)

    def free() -> None:
        if free_text_encoders and not {"text_encoder", "text_encoder_2"} & set(recipe.components):
            backend.text_encoder = backend.text_encoder_2 = None
            components.text_encoder = components.text_encoder_2 = None

    data = capture(pipeline, spec, tokenizers, request, cache_dir, free, show_progress)
    data.mlperf_set = is_mlperf_calibration_set(calibration_captions, num_prompts or recipe.calibration.get("num_prompts"))
    return data


def forward_loop_for(name: str, data: CalibrationData, components, show_progress: bool = False):
    if name == "unet":
        return data.unet_forward_loop(show_progress)
    if name in ("text_encoder", "text_encoder_2"):
        return data.text_encoder_forward_loop(1 if name == "text_encoder" else 2)
    return data.vae_forward_loop(float(components.vae.config.scaling_factor))


def calibrate_components(components, recipe: str | Path | Recipe, *, calibration_captions: str | Path | None = None,
                         num_prompts: int | None = None, timesteps: str | None = None,
                         cache_dir: str | Path = "build/cache", apply: bool = True, free_text_encoders: bool = False,
                         show_progress: bool = True, data: CalibrationData | None = None) -> Encodings:
    """Encodings for every component the recipe names, calibrated on the pipeline's own activations."""
    recipe = load_recipe(recipe)
    if data is None:
        data = capture_for(components, recipe, calibration_captions, num_prompts, timesteps, cache_dir,
                           free_text_encoders, show_progress)
    spec = components.spec
    encodings = Encodings(recipe=recipe.to_json(), model={"profile": spec.profile, "fingerprint": spec.fingerprint()},
                          calibration=describe_data(data))
    for name in COMPONENT_ORDER:
        if name not in recipe.components:
            continue
        module = getattr(components, name)
        log.info("calibrating %s", name)
        encodings.merge(quantize(module, recipe, forward_loop_for(name, data, components, show_progress),
                                 component=name, apply=apply, work_dir=Path(data.directory) / "methods"))
    return encodings


def describe_data(data: CalibrationData) -> dict[str, Any]:
    m = data.manifest
    timestep = dict(zip(data.steps, data.timesteps))
    counts: dict[int, int] = {}
    for chunk in data.chunks():
        for step in data.chunk_steps(chunk):
            counts[timestep[step]] = counts.get(timestep[step], 0) + 1
    return {"captions": m["captions"], "captions_sha256": m["captions_sha256"], "num_prompts": m["num_prompts"],
            "mlperf_calibration_set": data.mlperf_set, "timesteps_spec": m.get("timesteps_spec"),
            "timesteps": m["timesteps"], "chunks_per_timestep": {str(t): c for t, c in sorted(counts.items(), reverse=True)},
            **({"importance": m["importance"]} if "importance" in m else {}), "cache": str(data.directory)}
