"""A configuration's images against FP32's: the real run a fidelity target is verified by.

The search ranks configurations by the UNet's output error on a few calibration calls; what a
submitter is held to is the images (MLPerf's FID/CLIP window on real SDXL, PSNR against FP32 or
caption accuracy on the testbed). This runs the whole pipeline -- text encoders, 20 denoising steps,
VAE -- on the first ``count`` validation captions with MLPerf's fixed latent, once in FP32 and once
per configuration (its encodings file, through the torch fake-quant backend).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: captions per pipeline call
BATCH = 16


class ImageFidelity:
    """FP32's images of ``count`` captions (generated once), and any configuration's against them."""

    def __init__(self, spec, count: int, captions_path: str | Path | None = None):
        from sdxl.dataset import load_captions
        from sdxl.latents import draw_latent
        from sdxl.models import load_tokenizers, profile_default
        from sdxl.tokenizers import tokenize

        self.spec = spec
        self.captions = load_captions(captions_path or profile_default(spec.profile, "default_captions")).captions[:count]
        self.tokenizers = load_tokenizers(spec)
        self.latent = draw_latent(spec.latent_size)
        self.ids = [tokenize(t, self.captions) for t in self.tokenizers]
        self.reference = self.images(None, "FP32")

    def images(self, encodings: str | Path | None, label: str) -> np.ndarray:
        """The pipeline's uint8 images of every caption with ``encodings`` applied (None: FP32)."""
        from backends import BackendOptions, create_backend
        from sdxl.pipeline import SDXLPipeline
        from sdxl.progress import progress

        backend = create_backend("torch", self.spec, BackendOptions(show_progress=False,
                                                                    encodings=str(encodings) if encodings else None))
        pipeline = SDXLPipeline(backend, self.spec, self.tokenizers)
        return np.concatenate([pipeline.generate(*(i[s:s + BATCH] for i in self.ids), self.latent)
                               for s in progress(range(0, len(self.captions), BATCH), desc=label)])

    def psnr(self, generated: np.ndarray) -> np.ndarray:
        """Per caption, the PSNR (dB) of ``generated`` against FP32's image (inf where identical)."""
        return image_psnr(generated, self.reference)

    def correct(self, generated: np.ndarray) -> np.ndarray | None:
        """Per caption, 1.0 where the testbed's checker finds every attribute the caption asks for (its
        mean is the checker's overall accuracy); None off the testbed, whose captions alone it reads."""
        if self.spec.profile != "testbed":
            return None
        from testbed.checker import judge

        return np.array([float(judge(c, image)["all"]) for c, image in zip(self.captions, generated)])


def image_psnr(generated: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per image of two (N, H, W, 3) uint8 batches, ``10 log10(255² / MSE)`` (inf where identical).

    The definition ``accuracy.fidelity`` computes through torchmetrics (that package sits above this
    one, so it is not imported here; a test holds the two equal).
    """
    if generated.shape != reference.shape:
        raise ValueError(f"image shapes differ: {generated.shape} vs {reference.shape}")
    diff = generated.astype(np.float64) - reference.astype(np.float64)
    mse = (diff ** 2).reshape(len(diff), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return np.where(mse == 0, np.inf, 10.0 * np.log10(255.0 ** 2 / mse))


def mean_psnr(per_caption: np.ndarray) -> float:
    """The mean over the finite values (identical images, inf, carry no error to average); inf if none."""
    finite = per_caption[np.isfinite(per_caption)]
    return float(finite.mean()) if finite.size else float("inf")
