"""Shared fixtures: the real MLPerf files in ../shared (tests only), and one tiny model per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("SDXL_BENCH_NO_PROGRESS", "1")
# before any test module imports torch (libgomp reads it once): see harness.cli.quiet_openmp_waits
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# one intra-op thread for the tiny models the suite runs (LoadGen children and subprocesses inherit it):
# their ops are too small to split. bench/threads.py on a quiet 2-core EPYC, one tiny CFG UNet call
# with PASSIVE waits (the harness default): 90 ms median at 1 thread, 120 ms at 2.
os.environ.setdefault("OMP_NUM_THREADS", "1")

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
    from sdxl.models import model_spec

    return model_spec("tiny")


@pytest.fixture(scope="session")
def tiny_tokenizers(tiny_spec):
    from sdxl.models import load_tokenizers

    return load_tokenizers(tiny_spec)


@pytest.fixture(scope="session")
def tiny_backend(tiny_spec):
    from backends import BackendOptions, create_backend

    return create_backend("torch", tiny_spec, BackendOptions(show_progress=False))


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_backend, tiny_spec, tiny_tokenizers):
    from sdxl.pipeline import SDXLPipeline

    return SDXLPipeline(tiny_backend, tiny_spec, tiny_tokenizers)


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    """Caches pointed at empty directories: no evaluation weights on this 'machine'."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
