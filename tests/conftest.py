"""Shared fixtures: the real MLPerf files in ../shared (tests only), and one tiny model per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("SDXL_BENCH_NO_PROGRESS", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED_MLPERF = REPO.parent / "shared" / "mlperf"


@pytest.fixture(scope="session")
def mlperf_dir() -> Path:
    """MLPerf's captions_source.tsv, latents.pt, ... (present beside the checkout here and in CI)."""
    if not (SHARED_MLPERF / "latents.pt").is_file():
        pytest.skip(f"MLPerf reference files not found at {SHARED_MLPERF}")
    return SHARED_MLPERF


@pytest.fixture(scope="session")
def tiny_spec():
    from harness.models import model_spec

    return model_spec("tiny")


@pytest.fixture(scope="session")
def tiny_tokenizers(tiny_spec):
    from harness.models import load_tokenizers

    return load_tokenizers(tiny_spec)


@pytest.fixture(scope="session")
def tiny_backend(tiny_spec):
    from backends.base import BackendOptions, create_backend

    return create_backend("torch", tiny_spec, BackendOptions(show_progress=False))


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_backend, tiny_spec, tiny_tokenizers):
    from harness.pipeline import SDXLPipeline

    return SDXLPipeline(tiny_backend, tiny_spec, tiny_tokenizers)
