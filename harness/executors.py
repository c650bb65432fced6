"""Where the SUT's batches run: the seam between batching (:mod:`harness.sut`) and the model.

The SUT forms batches exactly as before in every scenario; an executor only runs them. It offers
``lanes`` (how many batches may run at once) and ``run(work, abort)``, which blocks its lane until the
batch's images are back. Two executors exist:

* :class:`ThreadExecutor` (``--executor threads``, the default): the pipeline in this process, one
  lane per ``--threads`` worker thread -- the harness as it always ran;
* :class:`harness.ray_executor.RayExecutor` (``--executor ray``): Ray actors anywhere in a cluster,
  ``--threads`` lanes per actor.

Because lanes are the only capacity, a Server run far above capacity queues on the driver, in the SUT,
and never floods a worker.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


class Aborted(Exception):
    """The SUT was aborted (Ctrl-C, SIGTERM) while the batch ran: answer it empty."""


class WorkersLostError(RuntimeError):
    """The executor has no worker left to run a batch (every actor died), or a batch failed on two of them.

    Its message is the run's one-line error: which worker, and why.
    """


@dataclass(frozen=True)
class BatchWork:
    """One batch as it travels to a worker: sample indices and token ids, nothing heavier."""

    indices: list[int]
    ids_1: torch.Tensor
    ids_2: torch.Tensor


@dataclass
class BatchResult:
    """``(N, H, W, 3)`` uint8 images; who made them; how long the work took where it ran.

    ``images`` may be a read-only view into Ray's object store: it must stay referenced until
    ``QuerySamplesComplete`` has returned (LoadGen copies what it logs during that call).
    """

    images: np.ndarray
    worker: str
    compute_ns: int
    attempts: int = 1


class Executor(Protocol):
    #: batches that may run at once; the SUT runs one worker thread per lane
    lanes: int

    def run(self, work: BatchWork, abort: threading.Event) -> BatchResult:
        """Run one batch; raise :class:`Aborted` once ``abort`` is set, :class:`WorkersLostError` when nothing can."""

    def warmup(self, batches: list[tuple[torch.Tensor, torch.Tensor]], steps: int) -> None:
        """Untimed generations of ``steps`` steps on every worker; then zero :meth:`counters`."""

    def counters(self) -> dict[str, int]:
        """Since the test began (or its warm-up): ``nonfinite_images``; ``extra_unet_calls`` with noise correction."""

    def describe(self) -> dict:
        """``executor`` (kind) and ``workers``: one entry per worker (for Ray: node, device, pid)."""

    def model_description(self) -> dict:
        """``backend`` (the backend's ``describe()``) and ``noise_correction`` (or None): the same on every worker."""

    def close(self) -> None:
        """Release what this process holds (the cluster connection); the workers themselves outlive a test."""


def share_intra_op_threads(threads: int) -> int:
    """Give each of ``threads`` concurrent batches its share of this process's torch threads; the share.

    Oversubscribed OpenMP pools spin against each other (measured here: 10x slower). The same rule runs
    in this process and in each Ray actor (whose default is its ``num_cpus``), so that a run through
    actors can use the very kernels of the in-process run.
    """
    if threads > 1:
        torch.set_num_threads(max(1, torch.get_num_threads() // threads))
    return torch.get_num_threads()


class PipelineRunner:
    """A pipeline and the run's latent, as a worker holds them: generation, warm-up, counters.

    Shared by :class:`ThreadExecutor` (in this process) and the Ray actor (in its own), so both run a
    batch with the same code.
    """

    def __init__(self, pipeline, latent: torch.Tensor):
        self.pipeline, self.latent = pipeline, latent

    def generate(self, ids_1: torch.Tensor, ids_2: torch.Tensor, aborted) -> tuple[np.ndarray, int]:
        """Images of one batch and the nanoseconds it took; ``aborted()`` is polled between denoising steps."""

        def check(*_step) -> None:
            if aborted():
                raise Aborted

        started = time.perf_counter_ns()
        images = self.pipeline.generate(ids_1, ids_2, self.latent, step_callback=check)
        return images, time.perf_counter_ns() - started

    def warmup(self, batches, steps: int) -> None:
        for ids_1, ids_2 in batches:
            self.pipeline.generate(ids_1, ids_2, self.latent, max_steps=steps)
        self.pipeline.nonfinite_images = 0  # the count is the test's images', not the partly denoised warm-up's
        if self.pipeline.noise_correction is not None:
            self.pipeline.noise_correction.extra_unet_calls = 0

    def description(self) -> dict:
        correction = self.pipeline.noise_correction
        return {"backend": self.pipeline.backend.describe(),
                "noise_correction": correction.describe() if correction is not None else None}

    def counters(self) -> dict[str, int]:
        out = {"nonfinite_images": self.pipeline.nonfinite_images}
        if self.pipeline.noise_correction is not None:
            out["extra_unet_calls"] = self.pipeline.noise_correction.extra_unet_calls
        return out


class ThreadExecutor:
    """The pipeline in this process; ``threads`` lanes share it (and this process's cores).

    ``torch_threads`` is what :func:`share_intra_op_threads` gave each lane, called before the backend
    was built (ONNX Runtime sizes its pool from torch's thread count when its session is made).
    """

    def __init__(self, pipeline, latent: torch.Tensor, threads: int, torch_threads: int):
        if threads < 1:
            raise ValueError("--threads must be >= 1")
        self.lanes, self.torch_threads = threads, torch_threads
        self.runner = PipelineRunner(pipeline, latent)

    def run(self, work: BatchWork, abort: threading.Event) -> BatchResult:
        images, compute_ns = self.runner.generate(work.ids_1, work.ids_2, abort.is_set)
        return BatchResult(images, "local", compute_ns)

    def warmup(self, batches, steps: int) -> None:
        self.runner.warmup(batches, steps)

    def counters(self) -> dict[str, int]:
        return self.runner.counters()

    def describe(self) -> dict:
        return {"executor": "threads", "workers": [{"name": "local", "threads": self.lanes,
                                                    "torch_threads": self.torch_threads}]}

    def model_description(self) -> dict:
        return self.runner.description()

    def close(self) -> None:
        """Nothing to release: the pipeline goes with this process."""
