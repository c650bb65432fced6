"""Known answers for the FID, CLIP-score, verdict and PSNR/SSIM arithmetic (no networks)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from accuracy.clip_score import clip_scores_from_features
from accuracy.fid import FidUndefined, RunningGaussian, frechet_distance
from accuracy.fidelity import psnr_ssim
from accuracy.spec import window
from accuracy.verdict import FAIL, NOT_APPLICABLE, PASS, mlperf_verdict


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    var1, var2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))  # 5 + (1 + 1 + 4)
    assert expected == pytest.approx(11.0)
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, abs=1e-9)


def test_frechet_distance_of_full_covariances_is_rotation_invariant():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    s1, s2 = a @ a.T + np.eye(4), b @ b.T + np.eye(4)
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    mu = rng.normal(size=4)
    d = frechet_distance(mu, s1, 0 * mu, s2)
    assert frechet_distance(q @ mu, q @ s1 @ q.T, 0 * mu, q @ s2 @ q.T) == pytest.approx(d, rel=1e-9)


def test_imaginary_sqrtm_is_reported_not_returned():
    with pytest.raises(FidUndefined, match="imaginary"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([-1.0, 1.0]))


def test_running_gaussian_equals_numpy_on_stacked_features():
    rng = np.random.default_rng(0)
    features = rng.normal(3.0, 2.0, size=(103, 6))
    gaussian = RunningGaussian(6)
    for start in range(0, 103, 10):  # uneven batches, last one of 3
        gaussian.update(features[start:start + 10])
    assert gaussian.count == 103
    np.testing.assert_allclose(gaussian.mean, features.mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(gaussian.covariance, np.cov(features, rowvar=False), atol=1e-10)


def test_fid_of_a_set_against_itself_is_zero_and_a_shift_adds_its_squared_norm():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(400, 8))
    own = RunningGaussian(8)
    own.update(features)
    assert frechet_distance(own.mean, own.covariance, own.mean, own.covariance) == pytest.approx(0.0, abs=1e-9)
    shift = np.array([3.0, 0, 0, 4.0, 0, 0, 0, 0])  # |shift|^2 = 25; a shift leaves the covariance unchanged
    moved = RunningGaussian(8)
    moved.update(features + shift)
    assert frechet_distance(moved.mean, moved.covariance, own.mean, own.covariance) == pytest.approx(25.0, abs=1e-8)


def test_covariance_needs_two_images():
    gaussian = RunningGaussian(3)
    gaussian.update(np.ones((1, 3)))
    with pytest.raises(FidUndefined, match="at least 2"):
        gaussian.covariance  # noqa: B018


def test_clip_score_is_100_cos_of_normalised_features_without_clamp():
    angle = 0.3
    image = np.array([[2.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    text = np.array([[math.cos(angle) * 7, math.sin(angle) * 7, 0.0], [-3.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    np.testing.assert_allclose(clip_scores_from_features(image, text), [100 * math.cos(angle), -100.0, 100.0], atol=1e-9)


FID_LOW, FID_HIGH = window("fid").low, window("fid").high
CLIP_LOW, CLIP_HIGH = window("clip_score").low, window("clip_score").high


def _verdict(fid=23.5, clip=31.75, n=5000, size=1024, comparable=True):
    return mlperf_verdict(fid=fid, clip_score=clip, n_images=n, image_size=size, comparable=comparable,
                          fid_note="no weights", clip_note="no weights", not_comparable_reason="random weights")


def test_window_values_are_mlperfs():
    assert (FID_LOW, FID_HIGH) == (23.01085758, 23.95007626)
    assert (CLIP_LOW, CLIP_HIGH) == (31.68631873, 31.81331801)


@pytest.mark.parametrize("fid, clip, status", [
    (FID_LOW, CLIP_LOW, PASS), (FID_HIGH, CLIP_HIGH, PASS),  # edges are inside (checker: >= target, <= limit)
    (np.nextafter(FID_LOW, 0), 31.75, FAIL), (np.nextafter(FID_HIGH, 99), 31.75, FAIL),
    (23.5, np.nextafter(CLIP_LOW, 0), FAIL), (23.5, np.nextafter(CLIP_HIGH, 99), FAIL),
])
def test_window_edges(fid, clip, status):
    assert _verdict(fid=float(fid), clip=float(clip)).status == status


def test_fail_reason_names_the_metric_and_limit():
    assert "above the window's upper limit 23.95007626" in _verdict(fid=24.0).reason


@pytest.mark.parametrize("kwargs, reason", [
    ({"size": 256}, "256x256 images"), ({"n": 4999}, "4999 of 5000 images"),
    ({"comparable": False}, "not comparable: random weights"), ({"fid": None}, "FID unavailable (no weights)"),
    ({"clip": None}, "CLIP score unavailable (no weights)"),
    ({"size": 256, "fid": 99.0}, "256x256"),  # N/A wins over an out-of-window number
])
def test_not_applicable_rules(kwargs, reason):
    verdict = _verdict(**kwargs)
    assert verdict.status == NOT_APPLICABLE and reason in verdict.reason


def test_psnr_of_a_constant_offset_and_of_identical_images():
    rng = np.random.default_rng(0)
    image = rng.integers(10, 240, size=(32, 32, 3), dtype=np.uint8)
    psnr, ssim = psnr_ssim(image + 5, image)
    assert psnr == pytest.approx(20 * math.log10(255 / 5), abs=1e-5)  # MSE = 25 (torchmetrics: float32 inside)
    psnr, ssim = psnr_ssim(image, image)
    assert psnr == math.inf and ssim == pytest.approx(1.0, abs=1e-12)


def test_ssim_of_two_flat_images_is_the_luminance_term():
    a, b = np.full((32, 32, 3), 51, np.uint8), np.full((32, 32, 3), 153, np.uint8)  # 0.2 and 0.6 of the range
    c1 = 0.01 ** 2
    _, ssim = psnr_ssim(a, b)
    assert ssim == pytest.approx((2 * 0.2 * 0.6 + c1) / (0.2 ** 2 + 0.6 ** 2 + c1), abs=1e-9)
