"""One LoadGen test in this process: executor (pipeline here, or the run's Ray actors) -> QSL + SUT -> ``StartTest`` -> summary.

Runs in the child process started by :mod:`harness.run_command`. ``StartTest`` blocks in C++, where
Python cannot deliver Ctrl-C, so it runs on a helper thread while the main thread waits; on Ctrl-C
the SUT answers the remaining samples at once and LoadGen finishes writing its logs.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from .run_config import RunConfig


def build_pipeline(config: RunConfig):
    """The backend and the pipeline for ``config`` (also used by benchmarks and calibration)."""
    from backends import BackendOptions, create_backend
    from sdxl.models import load_tokenizers, model_spec
    from sdxl.pipeline import SDXLPipeline
    from sdxl.progress import progress_enabled

    spec = model_spec(config.profile, config.model_path)
    options = BackendOptions(dtype=config.dtype, device=config.device, encodings=config.encodings,
                             recipe=config.recipe, show_progress=progress_enabled(),
                             extra={"cache_dir": config.cache_dir, **config.backend_extra})
    backend = create_backend(config.backend, spec, options)
    tokenizers = load_tokenizers(spec)
    return SDXLPipeline(backend, spec, tokenizers, noise_correction=noise_correction_of(config)), tokenizers


def make_executor(config: RunConfig):
    """``(executor, tokenizers)``: the pipeline built here (``threads``), or the run's Ray actors found (``ray``)."""
    if config.executor == "ray":
        from sdxl.models import load_tokenizers, model_spec

        from .ray_executor import RayExecutor

        return RayExecutor(config.ray_session, config.threads), load_tokenizers(model_spec(config.profile,
                                                                                           config.model_path))
    from sdxl.latents import load_latent

    from .executors import ThreadExecutor, share_intra_op_threads

    torch_threads = share_intra_op_threads(config.threads)  # before the build: ORT sizes its pool from it
    pipeline, tokenizers = build_pipeline(config)
    latent = load_latent(config.latents, pipeline.spec.latent_size).tensor
    return ThreadExecutor(pipeline, latent, config.threads, torch_threads), tokenizers


def noise_correction_of(config: RunConfig):
    """The sampler change the run's encodings record (QNCD's runtime correction), or None."""
    if not config.encodings:
        return None
    from quant.encodings import Encodings
    from sdxl.noise_correction import from_runtime

    return from_runtime(Encodings.load(config.encodings).runtime)


def _wait_through_interrupts(event: threading.Event) -> None:
    """Wait for ``event`` even if more Ctrl-Cs arrive: LoadGen must finish before its SUT is destroyed."""
    while True:
        try:
            event.wait()
            return
        except KeyboardInterrupt:
            continue


def run_loadgen_test(config: RunConfig, mode: str, test_dir: Path) -> dict[str, Any]:
    started = time.time()
    executor, tokenizers = make_executor(config)
    try:
        build_s = time.time() - started
        return _run_test(config, mode, test_dir, executor, tokenizers, build_s)
    finally:
        executor.close()


def _run_test(config: RunConfig, mode: str, test_dir: Path, executor, tokenizers, build_s: float) -> dict[str, Any]:
    import mlperf_loadgen as lg

    from sdxl.dataset import load_captions

    from .loadgen_results import summarize
    from .loadgen_settings import NO_AUDIT_CONFIG, Overrides, make_log_settings, make_test_settings
    from .qsl import CaptionQSL
    from .sut import BatchingSUT

    captions = load_captions(config.dataset_path, config.max_samples)
    qsl = CaptionQSL(captions, tokenizers)
    max_batch = 1 if config.scenario == "SingleStream" else config.max_batchsize
    sut = BatchingSUT(executor, qsl, max_batch=max_batch)
    settings = make_test_settings(config.scenario, mode, Path(config.user_conf),
                                  Path(config.audit_conf) if config.audit_conf else None,
                                  Overrides(config.time_s, config.count, config.qps))
    warmup_s = 0.0
    if config.warmup and mode == "performance":  # accuracy runs time nothing
        started = time.time()
        sut.warmup()  # on every worker; their counters restart after it
        warmup_s = time.time() - started
    sut_handle = sut.start()
    qsl_handle = qsl.construct()
    audit = str(Path(config.audit_conf).resolve()) if config.audit_conf else NO_AUDIT_CONFIG
    error: list[BaseException] = []
    finished = threading.Event()

    def start_test() -> None:
        try:
            lg.StartTestWithLogSettings(sut_handle, qsl_handle, settings, make_log_settings(test_dir), audit)
        except BaseException as exc:  # noqa: BLE001 -- re-raised on the main thread
            error.append(exc)
        finally:
            finished.set()

    runner = threading.Thread(target=start_test, name="loadgen")
    started = time.time()
    runner.start()
    # Wait on an Event, not on Thread.join(timeout): a KeyboardInterrupt raised inside join's wait makes
    # CPython (3.11/3.12, the bpo-45274 handling) mark the still-running thread as stopped, so the next
    # join returns at once, the SUT and QSL are destroyed under LoadGen, and it crashes (SIGSEGV) before
    # writing its logs: what Ctrl-C and SIGTERM used to leave behind.
    try:
        while not finished.wait(0.2):
            pass
    except KeyboardInterrupt:
        sut.abort()
        _wait_through_interrupts(finished)
        raise
    finally:
        test_s = time.time() - started
        sut.stop()
        lg.DestroyQSL(qsl_handle)
    if error:
        raise error[0]
    result = summarize(test_dir, config.scenario, mode)
    model, counters = executor.model_description(), executor.counters()
    result.update(build_s=round(build_s, 3), warmup_s=round(warmup_s, 3), test_s=round(test_s, 3),
                  sut=sut.stats.describe(), executor=executor.describe(), backend=model["backend"],
                  nonfinite_images=counters["nonfinite_images"])
    if model["noise_correction"] is not None:  # QNCD: one extra CFG call per estimate, per batch
        result.update(noise_correction=model["noise_correction"], extra_unet_calls=counters["extra_unet_calls"])
    return result
