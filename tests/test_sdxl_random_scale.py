"""Full-size SDXL architecture with random weights: names, size, one UNet step (slow: minutes on 2 cores)."""

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def full_backend():
    from backends import BackendOptions, create_backend
    from sdxl.models import model_spec

    return create_backend("torch", model_spec("sdxl-random"), BackendOptions(show_progress=False))


def test_full_size_architecture(full_backend):
    unet = full_backend.unet
    params = sum(p.numel() for p in unet.parameters())
    assert 2.55e9 < params < 2.6e9  # SDXL base UNet: 2,567,463,684 parameters
    names = dict(unet.named_modules())
    assert "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k" in names  # 10 transformer layers
    assert "add_embedding.linear_1" in names and names["add_embedding.linear_1"].in_features == 2816
    assert sum(p.numel() for p in full_backend.text_encoder_2.parameters()) > 690e6


def test_one_unet_step_at_1024(full_backend):
    latent = torch.randn(2, 4, 128, 128)
    embeds = torch.randn(2, 77, 2048)
    with torch.inference_mode():
        out = full_backend.predict_noise(latent, torch.tensor(951.0), embeds, torch.randn(2, 1280),
                                         torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2))
    assert out.shape == latent.shape and torch.isfinite(out).all()
