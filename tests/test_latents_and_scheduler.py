"""The fixed latent and the EulerDiscrete schedule, against MLPerf's files and the closed form."""

import numpy as np
import pytest
import torch

from sdxl.benchmark_spec import OFFICIAL_LATENT_TENSOR_SHA256
from sdxl.latents import draw_latent, load_latent, resolve_latent
from sdxl.pipeline import make_scheduler


def test_official_latent_loads_exactly(mlperf_dir):
    latent = load_latent(mlperf_dir / "latents.pt", 128)
    assert latent.tensor.shape == (1, 4, 128, 128) and latent.tensor.dtype == torch.float32
    assert latent.sha256 == OFFICIAL_LATENT_TENSOR_SHA256
    raw = torch.load(mlperf_dir / "latents.pt", weights_only=True)
    assert torch.equal(latent.tensor, raw)


def test_drawn_latent_agrees_with_official_to_1e6(mlperf_dir):
    official = load_latent(mlperf_dir / "latents.pt", 128).tensor
    drawn = draw_latent(128)
    # vectorised randn is not bit-stable across CPUs: a few hundred values differ in the last bit
    assert torch.allclose(drawn, official, rtol=0, atol=1e-6)
    assert (drawn != official).sum() < 0.05 * drawn.numel()


def test_latent_from_dataset_dir_and_shape_check(tmp_path, mlperf_dir):
    (tmp_path / "latents").mkdir()
    torch.save(torch.load(mlperf_dir / "latents.pt", weights_only=True), tmp_path / "latents" / "latents.pt")
    assert resolve_latent(128, dataset_path=tmp_path).sha256 == OFFICIAL_LATENT_TENSOR_SHA256
    with pytest.raises(ValueError, match=r"shape \(1, 4, 128, 128\); this profile needs \(1, 4, 32, 32\)"):
        load_latent(tmp_path, 32)
    with pytest.raises(FileNotFoundError, match="latents.pt"):
        load_latent(tmp_path / "nowhere.pt", 32)
    drawn = resolve_latent(32)
    assert drawn.source.startswith("drawn") and torch.equal(drawn.tensor, draw_latent(32))


def test_scheduler_timesteps_and_sigmas(tiny_spec):
    scheduler = make_scheduler(tiny_spec.scheduler_config)
    assert scheduler.timesteps.tolist() == list(range(951, 0, -50))  # 951, 901, ..., 1 (leading spacing)
    # closed form: SDXL's scaled-linear betas, sigma_t = sqrt((1 - abar_t) / abar_t)
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    abar = np.cumprod(1 - betas)
    expected = np.sqrt((1 - abar) / abar)[np.arange(951, 0, -50)]
    sigmas = scheduler.sigmas.numpy()
    assert sigmas[-1] == 0.0 and len(sigmas) == 21
    np.testing.assert_allclose(sigmas[:-1], expected, rtol=1e-5)
    assert sigmas[0] == pytest.approx(11.0283, abs=1e-4) and sigmas[-2] == pytest.approx(0.0413, abs=1e-4)
    assert float(scheduler.init_noise_sigma) == pytest.approx((sigmas[0] ** 2 + 1) ** 0.5, rel=1e-6)
