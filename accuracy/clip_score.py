"""CLIP score as MLPerf computes it (``tools/clip/clip_encoder.py`` + ``accuracy_coco.py``).

open_clip ``ViT-B/32`` with the ``openai`` weights, open_clip's own eval preprocess on the PIL image,
``open_clip.tokenize`` on the caption, both features L2-normalised, score = 100 x cosine per image
(no clamp at 0), averaged over the de-duplicated images.

Pitfall: MLPerf pins open_clip 2.26.1, whose ``openai`` tag builds OpenAI's QuickGELU model. open_clip
>= 3 builds ``ViT-B-32`` with nn.GELU unless told otherwise (it only warns), which moves the score by
~0.03 -- a sixth of MLPerf's ±0.2% window. The model is therefore always built with
``force_quick_gelu=True``, and the weights are loaded strictly from the resolved file.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image

from .weights import WeightFile

MODEL_NAME = "ViT-B-32"
PRETRAINED_TAG = "openai"
_RANDOM_SEED = 0
_OPENAI_TORCHSCRIPT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


def clip_scores_from_features(image_features: torch.Tensor | np.ndarray, text_features: torch.Tensor | np.ndarray) -> np.ndarray:
    """100 x cosine similarity of row-paired image/text features (each L2-normalised first, no clamp)."""
    image = torch.as_tensor(image_features, dtype=torch.float64)
    text = torch.as_tensor(text_features, dtype=torch.float64)
    image = image / image.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    return (100.0 * (image * text).sum(dim=-1)).numpy()


def uses_quick_gelu(model: torch.nn.Module) -> bool:
    """True when every activation in the transformer MLPs is QuickGELU (OpenAI's), none nn.GELU."""
    from open_clip.transformer import QuickGELU

    quick = sum(isinstance(m, QuickGELU) for m in model.modules())
    gelu = sum(isinstance(m, torch.nn.GELU) for m in model.modules())
    return quick > 0 and gelu == 0


def load_clip_state_dict(weights: WeightFile) -> dict[str, torch.Tensor]:
    """State dict of an accepted CLIP file: OpenAI TorchScript, open_clip safetensors, or a torch state dict."""
    if weights.format == "torchscript":
        state_dict = torch.jit.load(str(weights.path), map_location="cpu").state_dict()
    elif weights.format == "safetensors":
        from safetensors.torch import load_file

        state_dict = load_file(str(weights.path), device="cpu")
    else:
        state_dict = torch.load(weights.path, map_location="cpu", weights_only=True)
        if isinstance(state_dict, dict) and "state_dict" in state_dict:
            state_dict = state_dict["state_dict"]
    state_dict = {k.removeprefix("module."): v for k, v in dict(state_dict).items()}
    for key in _OPENAI_TORCHSCRIPT_EXTRA_KEYS:
        state_dict.pop(key, None)
    return state_dict


class ClipScorer:
    """open_clip ViT-B/32 (QuickGELU) with its eval preprocess; ``weights=None`` gives seeded random weights."""

    def __init__(self, weights: WeightFile | None, device: str = "cpu") -> None:
        import open_clip

        tag = open_clip.get_pretrained_cfg(MODEL_NAME, PRETRAINED_TAG)
        logging.getLogger().disabled, was_disabled = True, logging.getLogger().disabled  # "randomly initialized" noise
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_RANDOM_SEED)
                model, _, preprocess = open_clip.create_model_and_transforms(
                    MODEL_NAME, pretrained=None, force_quick_gelu=True, image_mean=tag["mean"], image_std=tag["std"],
                    image_interpolation=tag["interpolation"], image_resize_mode=tag["resize_mode"])
        finally:
            logging.getLogger().disabled = was_disabled
        if weights is not None:
            try:
                model.load_state_dict(load_clip_state_dict(weights), strict=True)
            except RuntimeError as exc:
                raise ValueError(f"{weights.path} is not a CLIP ViT-B-32 checkpoint: {str(exc).splitlines()[0]}") from None
        self.model = model.float().eval().to(device)
        self.preprocess = preprocess
        self.tokenize = open_clip.tokenize
        self.device = device
        self.weights = weights

    @torch.inference_mode()
    def __call__(self, images: list[np.ndarray], captions: list[str]) -> np.ndarray:
        """Per-image CLIP scores (100 x cos) of HxWx3 uint8 images against their captions."""
        pixels = torch.stack([self.preprocess(Image.fromarray(image).convert("RGB")) for image in images]).to(self.device)
        tokens = self.tokenize(list(captions)).to(self.device)
        return clip_scores_from_features(self.model.encode_image(pixels).float().cpu(),
                                         self.model.encode_text(tokens).float().cpu())
