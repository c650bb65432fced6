"""QNCD's effect measured as issue 17 defines it, not as the estimate it subtracts.

Along each quantized trajectory (testbed validation captions, MLPerf's loop with the fixed latent), at
every step the FP32 UNet predicts the noise on the *same* model input; the quantization noise is
``mean(prediction_used - prediction_fp32)`` with ``prediction_used`` the guided quantized prediction as
the sampler uses it (corrected, or with the correction forced to 0). Reported over the steps *between*
estimates (after the first estimate, estimation steps themselves excluded), plus the final images'
PSNR against the FP32 pipeline's. The FP32 model with the correction on shows what the estimator
reads where there is no quantization noise at all. Used by ``bench/diffusion_ptq.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class _Measured:
    """A pipeline ``noise_correction`` that runs ``inner`` (or no correction) and records the noise vs FP32."""

    def __init__(self, inner, fp_backend, conditioning, guidance: float):
        self.inner, self.fp, self.conditioning, self.guidance = inner, fp_backend, conditioning, guidance
        self.bias: dict[int, float] = {}
        self.extra_unet_calls = 0

    def start(self):
        inner = self.inner.start() if self.inner is not None else None

        def hook(ctx, noise):
            used = inner(ctx, noise) if inner is not None else noise
            x = torch.cat([ctx.latents] * 2) / (ctx.sigma ** 2 + 1) ** 0.5
            fp = self.fp.predict_noise(x, ctx.timestep, **self.conditioning)
            uncond, text = fp.chunk(2)
            self.bias[ctx.step] = float((used - (uncond + self.guidance * (text - uncond))).float().mean())
            return used
        return hook


def measure(encodings: dict[str, str | None], captions: int) -> dict:
    """For each recipe's encodings (with a QNCD runtime section): bias between estimates and PSNR, on and off."""
    from accuracy.fidelity import psnr_ssim
    from backends import BackendOptions, create_backend
    from quant.encodings import Encodings
    from sdxl.dataset import read_captions_tsv
    from sdxl.image_bytes import convert_images
    from sdxl.latents import draw_latent
    from sdxl.models import load_tokenizers, model_spec
    from sdxl.noise_correction import from_runtime
    from sdxl.pipeline import SDXLPipeline
    from sdxl.tokenizers import tokenize

    spec = model_spec("testbed")
    tokenizers = load_tokenizers(spec)
    table = read_captions_tsv(Path(__file__).resolve().parents[1] / "sdxl/data/profiles/testbed/captions.tsv")
    prompts = list(table["caption"][:captions])  # the first validation captions, as the study's runs
    ids = [tokenize(t, prompts) for t in tokenizers]
    latent = draw_latent(spec.latent_size)
    fp_backend = create_backend("torch", spec, BackendOptions(show_progress=False))
    fp_pipeline = SDXLPipeline(fp_backend, spec, tokenizers)
    with torch.inference_mode():
        conditioning = fp_pipeline.conditioning(*ids)
        reference, _ = convert_images(fp_backend.decode(fp_pipeline.denoise(latent, conditioning, len(prompts))
                                                        / fp_backend.vae_scaling_factor), from_vae=True)
    rows = []
    for recipe, path in encodings.items():
        if not path:
            continue
        correction = from_runtime(Encodings.load(path).runtime)
        if correction is None:
            continue
        backend = create_backend("torch", spec, BackendOptions(encodings=path, show_progress=False))
        runs = [(recipe, backend, "on", correction), (recipe, backend, "forced to 0", None)]
        if not any(r["recipe"] == "fp32" for r in rows):  # the estimator on the unquantized model: its own noise
            runs.append(("fp32", fp_backend, "on", correction))
        for recipe_label, backend, label, inner in runs:
            measured = _Measured(inner, fp_backend, conditioning, fp_pipeline.guidance_scale)
            pipeline = SDXLPipeline(backend, spec, tokenizers, noise_correction=measured)
            with torch.inference_mode():
                images, _ = convert_images(backend.decode(pipeline.denoise(latent, conditioning, len(prompts))
                                                          / backend.vae_scaling_factor), from_vae=True)
            first = min(s for s in range(20) if correction.is_estimation_step(s))
            between = [s for s in measured.bias if s > first and not correction.is_estimation_step(s)]
            rows.append({"recipe": recipe_label, "correction": label, "steps": between,
                         "mean_bias": float(np.mean([measured.bias[s] for s in between])),
                         "mean_abs_bias": float(np.mean([abs(measured.bias[s]) for s in between])),
                         "bias_per_step": measured.bias,
                         "psnr_db": float(np.mean([psnr_ssim(a, b)[0] for a, b in zip(images, reference)]))})
    return {"captions": len(prompts), "rows": rows}
