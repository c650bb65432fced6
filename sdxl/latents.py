"""The fixed initial latent: MLPerf's ``latents.pt``, or one drawn the same way.

MLPerf ships one ``(1, 4, 128, 128)`` fp32 tensor (``tools/latent.py``: diffusers ``randn_tensor``
with ``torch.Generator().manual_seed(0)``) and uses it for every prompt. Vectorised ``randn`` is not
bit-stable across CPUs (a few hundred of 65,536 values differ in the last bit from the official
file), so submission runs load the file (``--latents``), and ``run.json`` records the source and hash.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .benchmark_spec import LATENT_CHANNELS, LATENT_SEED
from .errors import UserError


class LatentError(UserError, ValueError):
    """A latent file that does not fit the profile, or (:class:`LatentNotFound`) is missing."""


class LatentNotFound(LatentError, FileNotFoundError):
    """No latent file where one was named; the message says where MLPerf's is."""


@dataclass(frozen=True)
class Latent:
    tensor: torch.Tensor
    source: str  # "file:<path>" or "drawn:seed=0"

    @property
    def sha256(self) -> str:
        return latent_sha256(self.tensor)

    def describe(self) -> dict:
        return {"source": self.source, "sha256": self.sha256, "shape": list(self.tensor.shape),
                "dtype": str(self.tensor.dtype).replace("torch.", "")}


def latent_sha256(tensor: torch.Tensor) -> str:
    """Hash of the tensor's fp32 bytes (independent of how it was stored)."""
    return hashlib.sha256(tensor.detach().to(torch.float32).contiguous().cpu().numpy().tobytes()).hexdigest()


def draw_latent(latent_size: int, seed: int = LATENT_SEED) -> torch.Tensor:
    """``torch.randn`` from a CPU generator seeded ``seed`` -- what ``tools/latent.py`` does via ``randn_tensor``."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((1, LATENT_CHANNELS, latent_size, latent_size), generator=generator, dtype=torch.float32)


def _resolve_latent_file(path: Path) -> Path:
    """Accept the file itself or a reference-layout dataset directory (``latents/latents.pt``)."""
    if path.is_dir():
        for candidate in (path / "latents" / "latents.pt", path / "latents.pt"):
            if candidate.is_file():
                return candidate
        raise LatentNotFound(f"no latents.pt under {path} (expected {path}/latents/latents.pt, as MLPerf's "
                             "tools/coco.py lays it out; the file is text_to_image/tools/latents.pt in mlcommons/inference)")
    if not path.is_file():
        raise LatentNotFound(f"latent file {path} not found (MLPerf's is text_to_image/tools/latents.pt "
                             "in mlcommons/inference)")
    return path


def load_latent(path: str | Path, latent_size: int) -> Latent:
    """Load a ``latents.pt`` (tensor, safe ``weights_only`` load) and check it fits the profile."""
    file = _resolve_latent_file(Path(path))
    try:
        tensor = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- torch raises many types here (UnpicklingError, RuntimeError, EOFError)
        # torch's own message suggests weights_only=False, i.e. running the file's code: never pass that on
        raise LatentError(f"{file} is not a tensor file torch can load safely ({type(exc).__name__}); "
                          "MLPerf's latents.pt is text_to_image/tools/latents.pt in mlcommons/inference") from None
    if not isinstance(tensor, torch.Tensor):
        raise LatentError(f"{file} holds a {type(tensor).__name__}, not a tensor")
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise LatentError(f"{file} holds NaN or Inf values: every image would be black")
    expected = (1, LATENT_CHANNELS, latent_size, latent_size)
    if tuple(tensor.shape) != expected:
        raise LatentError(f"{file} has shape {tuple(tensor.shape)}; this profile needs {expected} "
                          f"({latent_size * 8}x{latent_size * 8} images)")
    return Latent(tensor.to(torch.float32), f"file:{file.resolve()}")


def resolve_latent(latent_size: int, latents_path: str | Path | None = None, dataset_path: str | Path | None = None) -> Latent:
    """``--latents`` if given; else ``latents/latents.pt`` of a reference-layout dataset; else drawn (seed 0)."""
    if latents_path:
        return load_latent(latents_path, latent_size)
    if dataset_path and Path(dataset_path).is_dir() and (Path(dataset_path) / "latents" / "latents.pt").is_file():
        return load_latent(dataset_path, latent_size)
    return Latent(draw_latent(latent_size), f"drawn:torch.randn(seed={LATENT_SEED})")


def save_latent(latent: Latent, path: Path) -> None:
    torch.save(latent.tensor, path)
