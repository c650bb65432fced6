"""``--executor ray``, a LoadGen test's side: batches dispatched to the run's Ray actors.

The test process connects to the cluster the ``run`` parent started or attached to, and finds the
actors it built by name (:mod:`harness.ray_cluster`). Each of the SUT's lanes (``--threads`` per actor)
runs one batch at a time:

* **dispatch**: the least-busy live actor with fewer than ``--threads`` batches in flight takes it, so a
  Server run above capacity queues on the driver, never on an actor;
* **completion**: each lane waits (``ray.wait``) on its own batch only, so batches complete in the order
  they finish, whichever actor ran them -- never in issue order behind a slower one;
* **faults**: an actor that dies (process killed, node lost) is dropped and the batch re-issued once to
  another actor; with none left, or a batch lost twice, :class:`~harness.executors.WorkersLostError`
  names the actor and the error, and the SUT answers every outstanding sample empty so LoadGen ends. A
  batch is answered once either way: a late result from an abandoned call is never looked at.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field

from .executors import Aborted, BatchResult, BatchWork, WorkersLostError
from .ray_cluster import connect, first_line

#: how long a lane waits on its batch between looks at the abort flag (completion itself is not delayed)
_ABORT_POLL_S = 0.2


@dataclass(eq=False)
class _Actor:
    name: str
    handle: object
    in_flight: int = 0
    dispatched: int = 0  # batches given to it in this test: ties of least-busy go to the one given fewest
    error: str | None = None  # why it was dropped
    info: dict = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return self.error is None


class RayExecutor:
    """The run's actors, seen from one LoadGen test (one driver of the cluster)."""

    def __init__(self, session: dict, threads: int):
        self._ray = ray = connect(session["address"], session["namespace"], log_to_driver=False, quiet=True,
                                  auth_mode=session.get("auth_mode"))
        self.threads = threads
        self.test_id = uuid.uuid4().hex  # an abort names this test, never a later one on the same actors
        self._cond = threading.Condition()
        self._actors: list[_Actor] = []
        for name in session["actors"]:
            try:
                handle = ray.get_actor(name)
            except ValueError:  # gone since the previous test: it died (its record says so)
                continue
            self._actors.append(_Actor(name, handle))
        for actor, info in zip(self._actors, self._gather(lambda a: a.handle.info.remote())):
            actor.info = info or {}
        if not any(a.alive for a in self._actors):
            raise WorkersLostError(self._lost_message())
        self.lanes = len(self._actors) * threads
        self._baseline = self._sum_counters()

    # -- the Executor interface ----------------------------------------------------------------
    def run(self, work: BatchWork, abort: threading.Event) -> BatchResult:
        lost: list[_Actor] = []
        while True:
            actor = self._acquire(abort)
            try:
                images, compute_ns = self._call(actor, work, abort)
            except _ActorLost as exc:
                self._drop(actor, exc.reason)
                lost.append(actor)
                if len(lost) == 2:
                    raise WorkersLostError(
                        f"a batch of {len(work.indices)} (qsl_idx {work.indices[0]}...) was lost twice: Ray actor "
                        f"{lost[0].name} died ({lost[0].error}), then {lost[1].name} ({lost[1].error})") from None
                continue
            finally:
                self._release(actor)
            return BatchResult(images, actor.name, compute_ns, attempts=len(lost) + 1)

    def warmup(self, batches, steps: int) -> None:
        arrays = [(a.numpy(), b.numpy()) for a, b in batches]
        self._gather(lambda a: a.handle.warmup.remote(arrays, steps))
        self._baseline = self._sum_counters()

    def counters(self) -> dict[str, int]:
        """Since this test began (or its warm-up), summed over the actors alive now."""
        now = self._sum_counters()
        return {key: value - self._baseline.get(key, 0) for key, value in now.items()}

    def describe(self) -> dict:
        return {"executor": "ray", "workers": [{**a.info, "name": a.name, "alive": a.alive, "error": a.error}
                                               for a in self._actors]}

    def model_description(self) -> dict:
        return next(a.info["model"] for a in self._actors if a.info.get("model"))

    def close(self) -> None:
        self._ray.shutdown()  # this test's connection only: the parent owns the actors and the cluster

    # -- dispatch --------------------------------------------------------------------------------
    def _acquire(self, abort: threading.Event) -> _Actor:
        """The least-busy live actor with a free lane (ties: the one given fewest batches); waits for one."""
        with self._cond:
            while True:
                live = [a for a in self._actors if a.alive]
                if not live:
                    raise WorkersLostError(self._lost_message())
                free = [a for a in live if a.in_flight < self.threads]
                if free:
                    actor = min(free, key=lambda a: (a.in_flight, a.dispatched))
                    actor.in_flight += 1
                    actor.dispatched += 1
                    return actor
                if abort.is_set():
                    raise Aborted
                self._cond.wait(timeout=_ABORT_POLL_S)  # only after actors died: more lanes than free slots

    def _release(self, actor: _Actor) -> None:
        with self._cond:
            actor.in_flight -= 1
            self._cond.notify_all()

    def _drop(self, actor: _Actor, reason: str) -> None:
        with self._cond:
            if actor.alive:
                actor.error = reason
            self._cond.notify_all()

    def _call(self, actor: _Actor, work: BatchWork, abort: threading.Event):
        ray = self._ray
        ref = actor.handle.generate.remote(self.test_id, work.indices, work.ids_1.numpy(), work.ids_2.numpy())
        while not ray.wait([ref], timeout=_ABORT_POLL_S)[0]:
            if abort.is_set():
                actor.handle.abort.remote(self.test_id)  # the actor stops at its next denoising step
                raise Aborted
        try:
            return ray.get(ref)  # images: read-only numpy in the object store, zero-copy on this node
        except ray.exceptions.RayTaskError as exc:  # generate raised: the model's error, not the actor's loss
            if isinstance(exc.cause, Aborted):
                raise Aborted from None
            raise exc.cause if exc.cause is not None else exc from None
        except ray.exceptions.RayError as exc:  # the actor died, its node was lost, or the result with it
            raise _ActorLost(first_line(exc)) from None

    def _gather(self, call) -> list:
        """``call(actor)`` on every live actor at once; their results (None for one that died: it is dropped)."""
        ray = self._ray
        refs = [(a, call(a)) for a in self._actors if a.alive]
        out = {}
        for actor, ref in refs:
            try:
                out[actor.name] = ray.get(ref)
            except ray.exceptions.RayError as exc:
                self._drop(actor, first_line(exc))
        if not any(a.alive for a in self._actors):
            raise WorkersLostError(self._lost_message())
        return [out.get(a.name) for a in self._actors]

    def _sum_counters(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for counts in self._gather(lambda a: a.handle.counters.remote()):
            for key, value in (counts or {}).items():
                total[key] = total.get(key, 0) + value
        return total

    def _lost_message(self) -> str:
        dead = [f"{a.name} ({a.error})" for a in self._actors if not a.alive]
        if not self._actors:
            return "no Ray actor of this run is left (each died before this test began)"
        return "no Ray actor left to run the batches: " + "; ".join(dead) + " died"


class _ActorLost(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason
