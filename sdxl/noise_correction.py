"""QNCD's runtime noise correction (seed 004, inter noise), for SDXL's EulerDiscrete sampler.

QNCD (huanpengchu/QNCD, ``ldm/models/diffusion/plms.py``: ``sample_reverse``) estimates, every
``reverse_interval`` steps, the mean of the quantized UNet's noise error and subtracts it from the noise
predictions until the next estimate. At an estimation step (QNCD's condition ``(l_step - 2) % interval
== interval // 2`` with ``l_step`` counted from 1: step indices 6, 16 of 20 for interval 10) it takes the
step as usual, re-noises the new latent back to the current noise level with a known Gaussian ``e``,
runs the UNet (with CFG) on it, and takes the scalar ``mean(prediction - e)`` as the estimate; the
step's own prediction is then corrected with it too. QNCD also computes a std term and zeroes it
(``self.quant_noise_std = 0``): done the same way here, so there is no std term.

QNCD's sampler is PLMS/DDIM (``x_re = sqrt(a_t/a_prev) x_prev + sqrt(1 - a_t/a_prev) e``). SDXL's
EulerDiscrete works in sigma space, ``x = x0 + sigma * eps``; the same re-noising from ``sigma_next``
back to ``sigma`` is ``x_re = x_next + sqrt(sigma^2 - sigma_next^2) * e``, and the model input is scaled
by ``1 / sqrt(sigma^2 + 1)`` by hand (the pipeline's :class:`~sdxl.pipeline.StepContext` ``predict``;
``scale_model_input`` would use the scheduler's own step index). ``x_next`` is the Euler step the
scheduler takes with ``s_churn = 0``: ``x + (sigma_next - sigma) * noise``.

The extra UNet calls change MLPerf's sampler: a run that uses this is not closed-division compliant.
"""

from __future__ import annotations

import threading

import torch


class QncdNoiseCorrection:
    """The pipeline's ``noise_correction``: ``start()`` per denoising run; counts the extra UNet calls."""

    def __init__(self, interval: int = 10, seed: int = 0):
        if interval < 1:
            raise ValueError(f"noise correction interval must be >= 1, got {interval}")
        self.interval, self.seed = interval, seed
        self.extra_unet_calls = 0
        self._lock = threading.Lock()

    def describe(self) -> dict:
        return {"kind": "qncd", "interval": self.interval, "seed": self.seed, "std_term": "zeroed, as QNCD's code"}

    def is_estimation_step(self, step: int) -> bool:
        return (step - 1) % self.interval == self.interval // 2

    def start(self):
        estimate = [0.0]  # before the first estimate nothing is subtracted, as QNCD's initial mean of 0

        def hook(ctx, noise: torch.Tensor) -> torch.Tensor:
            if self.is_estimation_step(ctx.step):
                x_next = ctx.latents + (ctx.sigma_next - ctx.sigma) * noise
                generator = torch.Generator(device="cpu").manual_seed(self.seed * 1000 + ctx.step)
                e = torch.randn(x_next.shape, generator=generator, dtype=torch.float32).to(x_next.device, x_next.dtype)
                x_re = x_next + max(ctx.sigma ** 2 - ctx.sigma_next ** 2, 0.0) ** 0.5 * e
                estimate[0] = float((ctx.predict(x_re).float() - e.float()).mean())
                with self._lock:
                    self.extra_unet_calls += 1
            return noise - estimate[0]

        return hook


def from_runtime(runtime: dict) -> QncdNoiseCorrection | None:
    """The correction an encodings file's ``runtime`` section asks for, or None (MLPerf's loop unchanged)."""
    settings = dict((runtime or {}).get("noise_correction") or {})
    if not settings:
        return None
    kind = settings.pop("kind", None)
    if kind != "qncd":
        raise ValueError(f"unknown runtime noise correction {kind!r} (this code knows qncd)")
    return QncdNoiseCorrection(**settings)
