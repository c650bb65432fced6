"""What a log's ``run.json`` says about it: image size, random model weights, prompts and latents.

The spine writes ``<run_dir>/run.json`` and the log at ``<run_dir>/accuracy/mlperf_log_accuracy.json``;
logs from other harnesses (e.g. MLPerf's reference) have no ``run.json``, and are then taken to be
MLPerf's 1024x1024 images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdxl.errors import UserError

from .spec import official_image_size


class RunInfoError(UserError, ValueError):
    """A ``run.json`` that cannot be used, or two runs that cannot be compared."""


@dataclass(frozen=True)
class RunInfo:
    """The parts of ``run.json`` the accuracy tools use; ``path`` is None when there is none."""

    path: Path | None
    data: dict[str, Any] = field(default_factory=dict)
    image_size_override: int | None = None  # --image-size

    @property
    def image_size(self) -> int:
        return int(self.image_size_override or self.data.get("image_size") or official_image_size())

    @property
    def image_size_source(self) -> str:
        if self.image_size_override:
            return "--image-size"
        return f"run.json ({self.path})" if self.path and self.data.get("image_size") else \
            f"default {official_image_size()} (MLPerf; no run.json beside the log; --image-size N for others)"

    @property
    def model_random_weights(self) -> bool:
        return bool(self.data.get("random_weights", False))

    @property
    def dataset(self) -> dict[str, Any]:
        return dict(self.data.get("dataset") or {})

    @property
    def latent(self) -> dict[str, Any]:
        return dict(self.data.get("latent") or {})

    def describe(self) -> dict[str, Any]:
        """A short summary for ``accuracy.json``."""
        if self.path is None:
            return {"path": None}
        backend = self.data.get("backend") or {}
        return {"path": str(self.path), "profile": self.data.get("profile"), "random_weights": self.model_random_weights,
                "backend": backend.get("name"), "dtype": backend.get("dtype"), "recipe": backend.get("recipe"),
                "max_samples": self.data.get("max_samples"), "dataset_sha256": self.dataset.get("sha256"),
                "latent_sha256": self.latent.get("sha256")}


def find_run_json(log_path: Path) -> Path | None:
    """``run.json`` beside the log, or one level up (the run directory of ``<run>/accuracy/<log>``)."""
    for directory in (log_path.parent, log_path.parent.parent):
        candidate = directory / "run.json"
        if candidate.is_file():
            return candidate
    return None


def load_run_info(log_path: str | Path, image_size: int | None = None) -> RunInfo:
    """The :class:`RunInfo` of a log (empty when no ``run.json`` is found); ``image_size`` overrides its size."""
    run_json = find_run_json(Path(log_path))
    if run_json is None:
        return RunInfo(None, image_size_override=image_size)
    try:
        data = json.loads(run_json.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RunInfoError(f"cannot read {run_json}: {exc}") from None
    if not isinstance(data, dict):
        raise RunInfoError(f"{run_json} is not a JSON object")
    size = data.get("image_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise RunInfoError(f"{run_json}: image_size {size!r} is not a positive integer")
    return RunInfo(run_json, data, image_size)


def incompatibilities(quantized: RunInfo, reference: RunInfo) -> list[str]:
    """Why two runs' images cannot be compared pairwise (empty: they can).

    Per-image PSNR/SSIM only mean something when both runs denoised the same prompts from the same
    initial latent; a different captions file, ``--max-samples`` or latent makes every pair differ
    for reasons that have nothing to do with quantization. Runs without ``run.json`` cannot be
    checked and are accepted (only the image size is then checked, from the logs themselves).
    """
    reasons = []
    if quantized.path is None or reference.path is None:
        return reasons
    if quantized.image_size != reference.image_size:
        reasons.append(f"image size {quantized.image_size} vs {reference.image_size}")
    if quantized.dataset.get("sha256") != reference.dataset.get("sha256"):
        reasons.append("different captions files (dataset.sha256)")
    if quantized.data.get("max_samples") != reference.data.get("max_samples"):
        reasons.append(f"different --max-samples ({quantized.data.get('max_samples')} vs "
                       f"{reference.data.get('max_samples')})")
    if quantized.latent.get("sha256") != reference.latent.get("sha256"):
        reasons.append("different initial latents (latent.sha256)")
    return reasons
