"""``--executor ray``, the driver's side: the cluster's lifetime and the run's actors.

The ``run`` parent process owns both. It attaches to ``--ray-address`` (or ``RAY_ADDRESS``), or starts a
local Ray with this machine's resources; plans one actor per device (:func:`plan_actors`); starts them
with what they need shipped through the object store; and records them in ``run.json``. Every LoadGen
test then runs in its own child process, which connects to the same cluster as a second driver and
finds the actors by name (:mod:`harness.ray_executor`): the actors, owned by the parent, live for the
whole run, across ``--mode both``'s tests. On every way out of the parent -- success, error, Ctrl-C,
SIGTERM -- the actors are killed and Ray is shut down, which stops a local Ray the parent started (its
processes also die with the parent if it is killed outright: Ray starts them with a parent-death signal).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from sdxl.errors import UserError

#: how often a waiting driver reports actors that are still starting
_REPORT_EVERY_S = 30.0


def import_ray():
    """``ray``, or one line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'ray>=2.60,<3' "
                        "(./run.sh installs it into .venv)") from None
    return ray


def connect(address: str | None, namespace: str, log_to_driver: bool, quiet: bool = False,
            auth_mode: str | None = None):
    """``ray.init`` as a driver of ``address`` (None: ``RAY_ADDRESS``, else a new local Ray); the ``ray`` module.

    ``ray.init`` replaces the SIGTERM handler with ``sys.exit``; the previous one (the harness's, which
    ends a run cleanly and records it as interrupted) is put back. ``auth_mode`` is the parent's
    ``RAY_AUTH_MODE``: a local Ray started by ``ray.init`` turns token authentication on in the starting
    process only, so a test process (forked from a server that may predate it) is told explicitly.
    """
    if auth_mode:
        os.environ["RAY_AUTH_MODE"] = auth_mode
    ray = import_ray()
    check_address(address or os.environ.get("RAY_ADDRESS"))
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        ray.init(address=address or None, namespace=namespace, include_dashboard=False, log_to_driver=log_to_driver,
                 logging_level=logging.ERROR if quiet else logging.WARNING)
    except ConnectionError as exc:
        where = f"--ray-address {address or os.environ.get('RAY_ADDRESS')}"
        if "InvalidAuthToken" in _chain_text(exc):
            raise UserError(f"{where}: the cluster wants its authentication token (RAY_AUTH_MODE=token, and the "
                            "token in ~/.ray/auth_token or RAY_AUTH_TOKEN: see `ray get-auth-token`)") from None
        raise UserError(f"{where}: no Ray cluster answers ({str(exc).splitlines()[0]})") from None
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return ray


@dataclass(frozen=True)
class ActorSpec:
    """One actor to start: its name, the resources it asks Ray for, and the node it is pinned to (or None)."""

    name: str
    num_cpus: float
    num_gpus: float
    node_id: str | None = None


def plan_actors(device: str, requested: int | None, nodes: list[dict]) -> list[ActorSpec]:
    """One actor per device of the cluster's alive ``nodes`` (``ray.nodes()``), or ``requested`` of them.

    On GPUs: one GPU each (``requested`` default: every GPU). On CPUs: ``requested`` actors with the
    largest equal share of CPUs the nodes can place; by default one per node, pinned there, with all its
    CPUs (a CPU node is one device). A plan the cluster cannot place is refused now: Ray would wait forever.
    """
    alive = [n for n in nodes if n.get("Alive")]
    if device.startswith("cuda"):
        total = int(sum(n["Resources"].get("GPU", 0) for n in alive))
        count = requested or total
        if total == 0:
            raise UserError("--executor ray --device cuda: the Ray cluster has no GPU (use --device cpu)")
        if count > total:
            raise UserError(f"--ray-actors {count} with --device cuda needs {count} GPUs; the Ray cluster has {total}")
        return [ActorSpec(f"worker-{i}", 0, 1) for i in range(count)]
    cpus = [int(n["Resources"].get("CPU", 0)) for n in alive]
    if not any(cpus):
        raise UserError("--executor ray: the Ray cluster has no CPU to run an actor on")
    if requested is None:
        placed = [(n["NodeID"], c) for n, c in zip(alive, cpus) if c >= 1]
        return [ActorSpec(f"worker-{i}", c, 0, node) for i, (node, c) in enumerate(placed)]
    # the largest equal share that still places every actor on some node
    share = next((s for s in range(sum(cpus) // requested, 0, -1) if sum(c // s for c in cpus) >= requested), 0)
    if not share:
        raise UserError(f"--ray-actors {requested}: the Ray cluster has {sum(cpus)} CPUs "
                        f"({'+'.join(map(str, cpus))} over its nodes), fewer than one per actor")
    return [ActorSpec(f"worker-{i}", share, 0) for i in range(requested)]


@contextlib.contextmanager
def ray_workers(config, record) -> Iterator[None]:
    """For the block (the run's LoadGen tests): the cluster attached or started, the actors built.

    Fills ``config.ray_session`` (address, namespace, actor names), which each test process reads, and
    ``run.json``'s ``executor``; kills the actors and shuts Ray down however the block ends.
    """
    from .ray_worker import PipelineWorker, shipped_files

    namespace = f"sdxl-ptq-bench-{uuid.uuid4().hex[:12]}"
    ray = connect(config.ray_address, namespace, log_to_driver=True)
    handles = []
    try:
        started_here = not (config.ray_address or os.environ.get("RAY_ADDRESS"))
        specs = plan_actors(config.device, config.ray_actors, ray.nodes())
        files = ray.put(shipped_files(config.encodings, config.latents))
        actor_class = ray.remote(concurrency_groups={"control": 1})(PipelineWorker)
        # paths as absolute ones: an actor on another node does not start in this working directory
        actor_config = {**config.to_dict(), "cache_dir": str(Path(config.cache_dir).resolve()),
                        "model_path": str(Path(config.model_path).resolve()) if config.model_path else None}
        for spec in specs:
            options = {"name": spec.name, "num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus,
                       "max_concurrency": config.threads}
            if spec.node_id is not None:
                from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

                options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(spec.node_id, soft=False)
            handles.append(actor_class.options(**options).remote(spec.name, actor_config, files, config.threads))
        infos = _wait_ready(ray, handles, specs)
        address = ray.get_runtime_context().gcs_address
        config.ray_session = {"address": address, "namespace": namespace, "actors": [s.name for s in specs],
                              "auth_mode": os.environ.get("RAY_AUTH_MODE")}
        record.data["executor"] = {
            "executor": "ray", "address": address, "started_local_cluster": started_here, "namespace": namespace,
            "ray_version": ray.__version__, "threads_per_actor": config.threads,
            "nodes": sorted({info["node_ip"] for info in infos}),
            "actors": [{**info, "num_cpus": s.num_cpus, "num_gpus": s.num_gpus} for info, s in zip(infos, specs)]}
        record.save()
        yield
        _record_survivors(ray, handles, record)
    finally:
        for handle in handles:
            with contextlib.suppress(Exception):
                ray.kill(handle)
        ray.shutdown()


def _wait_ready(ray, handles: list, specs: list[ActorSpec]) -> list[dict]:
    """Each actor's ``info()`` once built; an actor that failed to start fails the run in one line naming it."""
    from sdxl.progress import progress_enabled

    pending = {handle.info.remote(): i for i, handle in enumerate(handles)}
    infos: list[dict | None] = [None] * len(handles)
    started, last_report = time.time(), time.time()
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)  # short waits: Ctrl-C stays responsive
        for ref in ready:
            index = pending.pop(ref)
            try:
                infos[index] = ray.get(ref)
            except ray.exceptions.RayError as exc:
                raise UserError(f"Ray actor {specs[index].name} failed to start: {first_line(exc)}") from None
        if (pending and time.time() - last_report >= _REPORT_EVERY_S) or (ready and progress_enabled()):
            last_report = time.time()
            print(f"ray: {len(handles) - len(pending)}/{len(handles)} actors ready after {time.time() - started:.0f} s "
                  "(an actor waits for its resources, then builds its model)", flush=True)
    return infos


def _record_survivors(ray, handles: list, record) -> None:
    """``alive_at_end`` for each actor in ``run.json``: a dead one was lost during the run (its batches re-issued)."""
    refs = [handle.info.remote() for handle in handles]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=10.0)
    for actor, ref in zip(record.data["executor"]["actors"], refs):
        alive = False
        if ref in ready:
            with contextlib.suppress(ray.exceptions.RayError):
                ray.get(ref)
                alive = True
        actor["alive_at_end"] = alive
    record.save()


def check_address(address: str | None, timeout_s: float = 5.0) -> None:
    """A ``HOST:PORT`` that accepts a TCP connection, or one line now: ``ray.init`` retries an unreachable
    GCS for minutes, deaf to Ctrl-C and SIGTERM. ``auto`` and ``ray://`` addresses are left to Ray."""
    if not address or address == "auto" or "://" in address:
        return
    import socket

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--ray-address {address}: expected HOST:PORT of the cluster's head (e.g. 10.0.0.1:6379)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise UserError(f"--ray-address {address}: no Ray cluster answers ({exc.strerror or exc})") from None


def _chain_text(exc: BaseException | None) -> str:
    parts = []
    while exc is not None:
        parts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def first_line(exc: BaseException) -> str:
    """The cause of a Ray error in one line (a task error's remote exception, not Ray's traceback banner)."""
    cause = getattr(exc, "cause", None)
    if cause is not None and not isinstance(cause, type(exc)):
        return f"{type(cause).__name__}: {cause}".splitlines()[0]
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
