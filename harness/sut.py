"""The system under test: one SUT for every scenario; scenarios differ only in how samples are batched.

LoadGen's issue thread only enqueues ``(response id, qsl_idx)`` pairs and returns, so it is never
blocked however far queries outpace the model (Server). One worker thread per lane of the
:mod:`executor <harness.executors>` (``--threads``; for Ray, ``--threads`` per actor) takes the first
waiting sample and then whatever else has already arrived, up to ``max_batch``, and has the executor
run that batch -- in this process or on a Ray actor; batching is the same either way:

* Offline: the one query's samples are all waiting, so workers run full batches;
* Server: batches form from the queries that arrived while the workers were busy (the reference
  never batches across Server queries; ``--max-batchsize 1`` reproduces that);
* SingleStream: one query is in flight at a time, so batches are of one.

Every sample is answered even when generation fails (with an empty response, once), so LoadGen never
waits forever; the first error is re-raised by :meth:`BatchingSUT.stop` and fails the run. A batch is
taken from the queue whole, under a lock: the same samples form the same batches whatever the lanes,
so a run through Ray actors can reproduce the in-process run's bytes.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .executors import Aborted, BatchWork, Executor, WorkersLostError
from .qsl import CaptionQSL

log = logging.getLogger(__name__)
_STOP = object()


@dataclass
class SUTStats:
    """What the SUT did, and where its share of LoadGen's latency went.

    ``queue_wait_ns`` (per sample: from ``issue_queries`` to a worker taking it) and ``service_ns``
    (per batch: from taking it to calling ``QuerySamplesComplete``, where LoadGen stamps the end of
    each sample's latency) split a query's latency into waiting for a worker and the work itself;
    what LoadGen reports beyond their sum is LoadGen's own scheduling. Server runs are tuned with
    exactly this split.
    """

    batches: Counter = field(default_factory=Counter)  # batch size -> count
    samples: int = 0
    failed_samples: int = 0
    queue_wait_ns: list[int] = field(default_factory=list)
    service_ns: list[int] = field(default_factory=list)
    #: per worker (``local``, or each Ray actor): samples, batches, and service vs the worker's own compute
    workers: dict[str, "WorkerStats"] = field(default_factory=dict)

    def add(self, worker: str, samples: int, queue_wait_ns: list[int], service_ns: int, compute_ns: int,
            reissued: bool) -> None:
        self.batches[samples] += 1
        self.samples += samples
        self.queue_wait_ns.extend(queue_wait_ns)
        self.service_ns.append(service_ns)
        stats = self.workers.setdefault(worker, WorkerStats())
        stats.samples += samples
        stats.batches += 1
        stats.reissued_batches += reissued
        stats.service_ns.append(service_ns)
        stats.compute_ns.append(compute_ns)

    def describe(self) -> dict:
        out = {"samples": self.samples, "failed_samples": self.failed_samples,
               "batch_sizes": {str(k): v for k, v in sorted(self.batches.items())}}
        if self.service_ns:
            out["timing_ms"] = {"queue_wait_per_sample": _percentiles_ms(self.queue_wait_ns),
                                "service_per_batch": _percentiles_ms(self.service_ns)}
        out["workers"] = {name: stats.describe() for name, stats in sorted(self.workers.items())}
        return out


@dataclass
class WorkerStats:
    """One worker's share: ``service`` is measured here (issue to images back), ``compute`` where it ran.

    Their difference is what the executor costs per batch (for Ray: the call, the object store, the
    network between nodes); ``reissued_batches`` counts batches it took over from a worker that died.
    """

    samples: int = 0
    batches: int = 0
    reissued_batches: int = 0
    service_ns: list[int] = field(default_factory=list)
    compute_ns: list[int] = field(default_factory=list)

    def describe(self) -> dict:
        return {"samples": self.samples, "batches": self.batches, "reissued_batches": self.reissued_batches,
                "timing_ms": {"service_per_batch": _percentiles_ms(self.service_ns),
                              "compute_per_batch": _percentiles_ms(self.compute_ns)}}


def _percentiles_ms(values_ns: list[int]) -> dict[str, float]:
    ms = np.asarray(values_ns, dtype=np.float64) / 1e6
    return {"mean": round(float(ms.mean()), 4), "p50": round(float(np.percentile(ms, 50)), 4),
            "p99": round(float(np.percentile(ms, 99)), 4)}


#: denoising steps of each warm-up generation
WARMUP_STEPS = 2


class BatchingSUT:
    """A LoadGen SUT that has an :class:`~harness.executors.Executor` run batches of waiting samples."""

    def __init__(self, executor: Executor, qsl: CaptionQSL, max_batch: int = 1, name: str = "sdxl-ptq-bench"):
        if max_batch < 1:
            raise ValueError("--max-batchsize must be >= 1")
        self.executor, self.qsl, self.max_batch, self.name = executor, qsl, max_batch, name
        self.stats = SUTStats()
        self._queue: queue.Queue = queue.Queue()
        self._take_lock = threading.Lock()
        self._error: BaseException | None = None
        self._abort = threading.Event()
        self._stats_lock = threading.Lock()
        self._workers = [threading.Thread(target=self._work, name=f"sut-lane-{i}", daemon=True)
                         for i in range(executor.lanes)]
        self._handle = None

    # -- LoadGen callbacks -------------------------------------------------------------------
    def issue_queries(self, query_samples) -> None:
        issued = time.perf_counter_ns()
        for sample in query_samples:
            self._queue.put((sample.id, sample.index, issued))

    def flush_queries(self) -> None:
        """Nothing is held back: workers always drain the queue."""

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self):
        import mlperf_loadgen as lg

        for worker in self._workers:
            worker.start()
        self._handle = lg.ConstructSUT(self.issue_queries, self.flush_queries)
        return self._handle

    def abort(self) -> None:
        """Answer every further sample at once with an empty response (Ctrl-C, SIGTERM): LoadGen then ends quickly.

        A batch being generated is abandoned at its next denoising step, not finished: one 1024² SDXL
        batch takes minutes on a CPU, longer than a scheduler waits after its SIGTERM.
        """
        self._abort.set()

    def stop(self) -> None:
        """Stop the workers; re-raise the first generation error, if any."""
        import mlperf_loadgen as lg

        for _ in self._workers:
            self._queue.put(_STOP)
        for worker in self._workers:
            worker.join()
        if self._handle is not None:
            lg.DestroySUT(self._handle)
            self._handle = None
        if isinstance(self._error, WorkersLostError):
            raise self._error  # its message is the run's one line: which worker, and why
        if self._error is not None:
            raise RuntimeError(f"generation failed: {self._error!r}") from self._error

    def warmup(self, prompt: str = "warm-up", batch_sizes: tuple[int, ...] | None = None) -> None:
        """Untimed generations at the run's batch sizes, on every worker, so lazy initialisation is not measured.

        Two denoising steps per batch size run every kernel (text encoders, UNet, VAE) at every shape
        the run will see; the other 18 would only repeat them.
        """
        from sdxl.tokenizers import tokenize

        batches = []
        for n in batch_sizes or sorted({1, self.max_batch}):
            ids = [tokenize(tok, [prompt] * n) for tok in self.qsl.tokenizers]
            batches.append((ids[0], ids[1]))
        self.executor.warmup(batches, WARMUP_STEPS)

    # -- workers -----------------------------------------------------------------------------
    def _next_batch(self) -> list[tuple[int, int, int]] | None:
        with self._take_lock:  # one lane takes a whole batch at a time: batches are runs of the queue
            first = self._queue.get()
            if first is _STOP:
                return None
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    self._queue.put(_STOP)  # leave it for the next round
                    break
                batch.append(item)
            return batch

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._run_batch(batch)

    def _run_batch(self, batch: list[tuple[int, int, int]]) -> None:
        import mlperf_loadgen as lg

        start = time.perf_counter_ns()
        ids = [response_id for response_id, _, _ in batch]
        if self._error is not None or self._abort.is_set():
            self._complete_empty(ids)
            return
        try:
            indices = [index for _, index, _ in batch]
            ids_1, ids_2 = self.qsl.get(indices)
            result = self.executor.run(BatchWork(indices, ids_1, ids_2), self._abort)
        except Aborted:
            self._complete_empty(ids)
            return
        except BaseException as exc:  # noqa: BLE001 -- any failure must still answer LoadGen
            if isinstance(exc, WorkersLostError):
                log.error("%s", exc)
            else:
                log.exception("generation failed for a batch of %d", len(batch))
            if self._error is None:
                self._error = exc
            self._complete_empty(ids)
            return
        images = result.images  # referenced until QuerySamplesComplete returns (it may be Ray's shared memory)
        responses = [lg.QuerySampleResponse(rid, _address(img), img.nbytes) for rid, img in zip(ids, images)]
        end = time.perf_counter_ns()
        lg.QuerySamplesComplete(responses)  # LoadGen copies the bytes it logs during this call
        with self._stats_lock:
            self.stats.add(result.worker, len(batch), [start - issued for _, _, issued in batch], end - start,
                           result.compute_ns, result.attempts > 1)

    def _complete_empty(self, ids: list[int]) -> None:
        import mlperf_loadgen as lg

        lg.QuerySamplesComplete([lg.QuerySampleResponse(rid, 0, 0) for rid in ids])
        with self._stats_lock:
            self.stats.failed_samples += len(ids)


def _address(image: np.ndarray) -> int:
    assert image.flags["C_CONTIGUOUS"]
    return image.__array_interface__["data"][0]
