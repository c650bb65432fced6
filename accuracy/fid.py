"""FID exactly as MLPerf computes it, with constant memory.

MLPerf (``tools/fid/fid_score.py``, a copy of pytorch-fid): uint8 image -> float [0, 1] (ToTensor, no
outside resize) -> pytorch-fid ``InceptionV3([3])`` (FID Inception, internal bilinear resize to 299,
2x-1 normalisation, pool3 2048-d) -> ``mu = mean``, ``sigma = np.cov(rowvar=False)`` -> Fréchet
distance with ``scipy.linalg.sqrtm``. Here the network is pytorch-fid's own class; only the mean and
covariance are accumulated incrementally (:class:`RunningGaussian`) instead of stacking every feature
vector, so memory does not grow with the number of images.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Iterator
from unittest import mock

import numpy as np
import torch

from .weights import WeightFile

FEATURE_DIM = 2048
_RANDOM_SEED = 0


class FidUndefined(ValueError):
    """The Fréchet distance cannot be computed (e.g. a rank-deficient covariance from few images)."""


class RunningGaussian:
    """Mean and sample covariance of feature vectors added in batches, in O(dim²) memory.

    Uses the pairwise (Chan et al.) update of the co-moment matrix, which is numerically as good
    as ``np.cov`` on the stacked features; ``covariance`` has ``np.cov``'s ``ddof=1`` convention.
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.count = 0
        self._mean = np.zeros(dim, dtype=np.float64)
        self._comoment = np.zeros((dim, dim), dtype=np.float64)

    def update(self, features: np.ndarray) -> None:
        batch = np.asarray(features, dtype=np.float64).reshape(-1, self.dim)
        n_b = batch.shape[0]
        if n_b == 0:
            return
        mean_b = batch.mean(axis=0)
        centered = batch - mean_b
        comoment_b = centered.T @ centered
        n_a, total = self.count, self.count + n_b
        delta = mean_b - self._mean
        self._comoment += comoment_b + np.outer(delta, delta) * (n_a * n_b / total)
        self._mean += delta * (n_b / total)
        self.count = total

    @property
    def mean(self) -> np.ndarray:
        return self._mean.copy()

    @property
    def covariance(self) -> np.ndarray:
        if self.count < 2:
            raise FidUndefined(f"a covariance needs at least 2 images (got {self.count})")
        return self._comoment / (self.count - 1)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6) -> float:
    """d² = |mu1 - mu2|² + Tr(s1 + s2 - 2 sqrt(s1 s2)), as pytorch-fid's ``calculate_frechet_distance``.

    Same rules as MLPerf's copy: if ``sqrtm`` of the product is not finite, ``eps`` is added to both
    diagonals; an imaginary part above 1e-3 on the diagonal is an error (:class:`FidUndefined`), which
    callers report as N/A instead of a number.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise FidUndefined(f"statistics of different dimensions: {mu1.shape} vs {mu2.shape}")
    from scipy import linalg  # here, not at import: the command line builds its parser without scipy

    diff = mu1 - mu2
    with warnings.catch_warnings():  # singular products are expected with few images and handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise FidUndefined(f"sqrtm of the covariance product has an imaginary component "
                               f"{np.max(np.abs(covmean.imag)):.3g} > 1e-3 (too few images for a "
                               f"{sigma1.shape[0]}-d covariance)")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def load_statistics(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``mu`` and ``sigma`` of an npz such as MLPerf's ``val2014.npz``."""
    path = Path(path)
    try:
        with np.load(path) as data:
            return np.asarray(data["mu"], dtype=np.float64), np.asarray(data["sigma"], dtype=np.float64)
    except FileNotFoundError:
        raise FileNotFoundError(f"FID statistics {path} not found") from None
    except (KeyError, ValueError, OSError) as exc:
        raise ValueError(f"{path} is not an FID statistics npz with 'mu' and 'sigma' ({exc})") from None


def save_statistics(path: str | Path, gaussian: RunningGaussian) -> None:
    """Write ``mu``/``sigma`` the way pytorch-fid's ``--save-stats`` does (``np.savez_compressed``)."""
    np.savez_compressed(Path(path), mu=gaussian.mean, sigma=gaussian.covariance)


@contextlib.contextmanager
def _pytorch_fid_weights(state_dict: dict | None) -> Iterator[None]:
    """Make pytorch-fid's ``fid_inception_v3`` use ``state_dict`` (None: keep the seeded random init).

    pytorch-fid always calls ``load_state_dict_from_url`` (a download when the cache is empty); the
    weights are resolved by :mod:`accuracy.weights` instead, so the network is never touched.
    """
    import torchvision
    from pytorch_fid import inception as pf_inception

    original_load = torchvision.models.Inception3.load_state_dict

    def load_unless_random(module, sd, *args, **kwargs):
        return None if sd is None else original_load(module, sd, *args, **kwargs)

    with mock.patch.object(pf_inception, "load_state_dict_from_url", lambda *a, **k: state_dict), \
            mock.patch.object(torchvision.models.Inception3, "load_state_dict", load_unless_random):
        yield


def _rescale_random_init(model: torch.nn.Module) -> None:
    """Variance-preserving (He) init of the random network's convolutions.

    PyTorch's default conv init shrinks activations ~2x per layer; after Inception's ~90 layers the
    pool3 features are ~1e-8, deep in float32 denormals (10x slower on CPU) and useless for exercising
    FID. Only used with ``--random-weights``, whose numbers are never comparable anyway.
    """
    generator = torch.Generator().manual_seed(_RANDOM_SEED)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=generator)


class InceptionFeatures:
    """pytorch-fid's ``InceptionV3([3])`` (FID weights, resize 299, normalise) as uint8 batch -> pool3 features."""

    def __init__(self, weights: WeightFile | None, device: str = "cpu") -> None:
        from pytorch_fid.inception import InceptionV3

        state_dict = None if weights is None else torch.load(weights.path, map_location="cpu", weights_only=True)
        with torch.random.fork_rng(devices=[]), _pytorch_fid_weights(state_dict):
            torch.manual_seed(_RANDOM_SEED)
            self.model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[FEATURE_DIM]], resize_input=True,
                                     normalize_input=True, use_fid_inception=True)
        if weights is None:
            _rescale_random_init(self.model)
        self.model.eval().to(device)
        self.device = device
        self.weights = weights

    @torch.inference_mode()
    def __call__(self, images: list[np.ndarray]) -> np.ndarray:
        """``(N, 2048)`` float64 features of N HxWx3 uint8 images (ToTensor: /255, no resize here)."""
        batch = torch.from_numpy(np.stack(images)).to(self.device).permute(0, 3, 1, 2).float().div(255)
        pooled = self.model(batch)[0]
        return pooled.squeeze(3).squeeze(2).double().cpu().numpy()
