"""The Ray actor of ``--executor ray``: one backend and pipeline, built once, serving every test of a run.

An actor may run on another node, which cannot read the driver's files: what the run calibrated (the
encodings file and its weights delta) and the run's latent travel to it as bytes through Ray's object
store, and are written into the actor's node-local cache under a directory named by their content. The
model itself is loaded from ``--model-path`` (or the testbed's packaged weights) on that node, as every
Ray cluster runs one environment on every node.

Backends are built one at a time per node, under a lock in the cache directory: the first actor builds
any export (the ORT backend's ONNX models), the next ones find the finished entry.

Per batch the actor receives sample indices and token ids and returns ``(N, H, W, 3)`` uint8 images as
numpy, which Ray's object store hands to a driver on the same node without a copy.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from pathlib import Path

import ray

from .executors import PipelineRunner, share_intra_op_threads

#: names of the shipped files inside an actor's shipped directory
LATENTS_FILE = "latents.pt"


def shipped_files(encodings: str | None, latents: str) -> dict[str, bytes]:
    """The driver's files an actor needs, by name: the encodings JSON and its weights delta, the latent."""
    files = {LATENTS_FILE: Path(latents).read_bytes()}
    if encodings:
        from quant.encodings import Encodings

        path = Path(encodings)
        files[path.name] = path.read_bytes()
        delta = Encodings.load(path).weights_delta
        if delta:
            files[delta] = (path.parent / delta).read_bytes()
    return files


def unpack_shipped(files: dict[str, bytes], cache_dir: Path) -> Path:
    """Write ``files`` under ``<cache_dir>/shipped/<content digest>/`` (atomically, once); that directory."""
    from sdxl.io import atomic_path

    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    directory = cache_dir / "shipped" / digest.hexdigest()[:16]
    for name, content in files.items():
        target = directory / name
        if not target.is_file():
            with atomic_path(target) as tmp:
                tmp.write_bytes(content)
    return directory


class PipelineWorker:
    """One actor: :class:`~harness.executors.PipelineRunner` over its own backend, on its own device.

    ``max_concurrency`` (set by the driver to ``--threads``) batches run at once; abort, counters and
    info run in a ``control`` group of their own, so they are answered while every lane is busy.
    """

    def __init__(self, name: str, config: dict, files: dict[str, bytes], threads: int):
        from sdxl.io import exclusive_lock
        from sdxl.latents import load_latent

        from .loadgen_run import build_pipeline
        from .run_config import RunConfig

        started = time.time()
        run = RunConfig(**config)
        cache_dir = Path(run.cache_dir)
        shipped = unpack_shipped(files, cache_dir)
        encodings_name = Path(run.encodings).name if run.encodings else None
        run.encodings = str(shipped / encodings_name) if encodings_name else None
        run.latents = str(shipped / LATENTS_FILE)
        gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        if run.device.startswith("cuda"):
            run.device = "cuda"  # Ray shows this actor its one GPU as cuda:0 (CUDA_VISIBLE_DEVICES)
        torch_threads = share_intra_op_threads(threads)
        with exclusive_lock(cache_dir / ".backend-build.lock"):
            pipeline, _ = build_pipeline(run)
        latent = load_latent(run.latents, pipeline.spec.latent_size).tensor
        self._runner = PipelineRunner(pipeline, latent)
        self._aborted: set[str] = set()
        self._lock = threading.Lock()
        context = ray.get_runtime_context()
        self._info = {"name": name, "node_ip": ray.util.get_node_ip_address(), "node_id": context.get_node_id(),
                      "hostname": socket.gethostname(), "pid": os.getpid(), "device": run.device,
                      "gpu_ids": gpu_ids, "gpus": _gpu_names(run.device), "threads": threads,
                      "torch_threads": torch_threads, "backend": run.backend,
                      "build_s": round(time.time() - started, 3)}

    def generate(self, test_id: str, indices: list[int], ids_1, ids_2):
        """``(images, compute_ns)`` for one batch; an abort of ``test_id`` abandons it at the next step."""
        import torch

        del indices  # carried for Ray's task listings and error messages; the ids are the input
        return self._runner.generate(torch.tensor(ids_1), torch.tensor(ids_2), lambda: test_id in self._aborted)

    def warmup(self, batches, steps: int) -> None:
        import torch

        self._runner.warmup([(torch.tensor(a), torch.tensor(b)) for a, b in batches], steps)

    @ray.method(concurrency_group="control")
    def abort(self, test_id: str) -> None:
        with self._lock:
            self._aborted.add(test_id)

    @ray.method(concurrency_group="control")
    def counters(self) -> dict[str, int]:
        return self._runner.counters()

    @ray.method(concurrency_group="control")
    def info(self) -> dict:
        return {**self._info, "model": self._runner.description()}


def _gpu_names(device: str) -> list[str]:
    if not device.startswith("cuda"):
        return []
    import torch

    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
