"""The testbed's scorer: a small CLIP trained on the scenes, not part of the model (as ViT-B/32 is not part of SDXL).

testbed-CLIP is MLPerf's CLIP score with this scorer in place of ViT-B/32: 100 x cosine of its
image and text features (no clamp), averaged over images. Its 64-dimensional image features are
testbed-FID's feature space (Inception's 2,048 would need far more than 500 images for a stable
covariance).
"""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np
import torch

from sdxl.models import HOW_TO_GET_TESTBED, PROFILE_DIR
from sdxl.shipped_weights import load_into, load_shipped, unpack
from sdxl.tokenizers import build_sdxl_tokenizers, tokenize

from .train import images_to_tensor

FEATURE_DIM = 64


class TestbedScorer:
    """Image and text features of the shipped scorer CLIP; call :func:`load_scorer` to get the shared one."""

    def __init__(self, model: torch.nn.Module, tokenizer):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer

    @torch.no_grad()
    def image_features(self, images: list[np.ndarray] | np.ndarray, batch_size: int = 256) -> np.ndarray:
        """``(N, 64)`` float64 features of uint8 ``(64, 64, 3)`` images."""
        images = np.asarray(images)
        out = [self.model.visual_projection(self.model.vision_model(images_to_tensor(images[i:i + batch_size])).pooler_output)
               for i in range(0, len(images), batch_size)]
        return torch.cat(out).double().numpy()

    @torch.no_grad()
    def text_features(self, captions: list[str]) -> np.ndarray:
        pooled = self.model.text_model(tokenize(self.tokenizer, captions)).pooler_output
        return self.model.text_projection(pooled).double().numpy()

    def clip_scores(self, images, captions: list[str]) -> np.ndarray:
        """Per image: 100 x cosine of its features and its caption's (MLPerf's CLIP score formula)."""
        image = self.image_features(images)
        text = self.text_features(captions)
        image /= np.linalg.norm(image, axis=1, keepdims=True)
        text /= np.linalg.norm(text, axis=1, keepdims=True)
        return 100.0 * (image * text).sum(1)


@lru_cache(maxsize=1)
def load_scorer() -> TestbedScorer:
    """The scorer named by the testbed profile, its file checked against the recorded sha256."""
    from transformers import CLIPConfig, CLIPModel

    profile = json.loads((PROFILE_DIR / "testbed.json").read_text())
    entry = profile.get("scorer")
    if not entry:
        raise FileNotFoundError(f"the testbed profile names no scorer: {HOW_TO_GET_TESTBED}")
    config = CLIPConfig.from_dict(json.loads((PROFILE_DIR / entry["config"]).read_text()))
    flat = load_shipped(PROFILE_DIR / entry["weights"], entry["sha256"], HOW_TO_GET_TESTBED)
    model = load_into(CLIPModel(config), unpack(flat, "scorer", config.text_config.vocab_size), "scorer")
    return TestbedScorer(model, build_sdxl_tokenizers()[0])
