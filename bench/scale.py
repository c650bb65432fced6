"""Scale-out benchmark (issue 18): the SUT's batches on Ray actors against the in-process SUT.

    .venv/bin/python bench/scale.py [--rounds 2] [--skip-cluster]

Every figure is a real LoadGen run through ``harness.run_command.execute_run``; the variants of each
part alternate in every round, so a ratio is measured side by side on this shared machine.

a. Per-query overhead of the null backend at 1024x1024 (``sdxl-random`` spec; 3 MB images), Offline
   (wall time per sample, batch 1) and Server (mean latency, 20 QPS): in-process vs one Ray actor, one
   lane each, so the difference is what Ray adds per query (the call, the image through the object
   store). Goal: <= 2 ms.
   Beside it, Ray's floor on this machine, outside LoadGen: the median round trip of an actor call that
   returns nothing, and of one that returns a 1024x1024 uint8 image (3 MB through the object store),
   against a bare 3 MB numpy copy into fresh memory.
b. tiny profile, torch backend, Offline images/s: in-process with 2 threads vs 1 actor x 2 threads vs
   2 actors x 1 thread (the same torch threads per batch in all three: 1).
c. (b)'s workload on a simulated 2-node cluster (``ray.cluster_utils.Cluster``: a head without CPUs, two
   nodes of 1 CPU each; the default plan puts one actor on each node), interleaved with (b)'s variants.

Prints tables and writes JSON under ``results/bench/`` with the CPU model and ISA.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sdxl.io import format_table, write_json_atomic  # noqa: E402
from sdxl.system_info import isa_summary, system_description  # noqa: E402

OUT_DIR = REPO / "results" / "bench"
NULL_CONF = REPO / "bench" / "null_overhead_user.conf"


def _run(out: Path, **settings) -> dict:
    """One LoadGen performance test; its ``run.json`` test entry with the run's executor record."""
    from harness.run_command import execute_run
    from harness.run_config import RunConfig

    record = execute_run(RunConfig(output=str(out), **settings))
    if record.status != "completed":
        raise SystemExit(f"bench run {out} {record.status}: {record.data.get('error')}")
    (test,) = record.tests
    return {**test, "run_executor": record.data["executor"]}


def null_overhead(work: Path, rounds: int) -> list[dict]:
    variants = {"in-process": {}, "ray, 1 actor": {"executor": "ray", "ray_actors": 1}}
    rows = []
    for scenario in ("Offline", "Server"):
        figures: dict[str, list[float]] = {name: [] for name in variants}
        service: dict[str, list[float]] = {name: [] for name in variants}
        for r in range(rounds):
            for name, extra in variants.items():
                test = _run(work / f"null-{scenario}-{name.replace(' ', '').replace(',', '-')}-{r}", profile="sdxl-random",
                            backend="null", scenario=scenario, user_conf=str(NULL_CONF), **extra)
                per_query = 1.0 / test["qps"] if scenario == "Offline" else test["mean_latency_s"]
                figures[name].append(per_query * 1e3)
                service[name].append(test["sut"]["timing_ms"]["service_per_batch"]["mean"])
        base = statistics.median(figures["in-process"])
        for name in variants:
            rows.append({"scenario": scenario, "variant": name, "per_query_ms": figures[name],
                         "service_per_batch_ms": service[name],
                         "added_ms": statistics.median(figures[name]) - base})
    return rows


def ray_floor(calls: int = 200) -> dict[str, float]:
    """Median ms: an empty actor call, one returning a 3 MB image, and a bare 3 MB copy (see the docstring)."""
    import numpy as np
    import ray

    def median_ms(call) -> float:
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    @ray.remote(num_cpus=1)
    class Echo:
        def __init__(self):
            self.image = np.full((1, 1024, 1024, 3), 7, np.uint8)

        def nothing(self):
            return None

        def image_copy(self):
            return self.image.copy()  # a fresh array, as a backend's uint8 conversion makes one

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        echo = Echo.remote()
        ray.get(echo.image_copy.remote())
        source = np.full((1, 1024, 1024, 3), 7, np.uint8)
        return {"empty_call_ms": median_ms(lambda: ray.get(echo.nothing.remote())),
                "image_call_ms": median_ms(lambda: ray.get(echo.image_copy.remote())),
                "bare_copy_ms": median_ms(source.copy)}
    finally:
        ray.shutdown()


def _tiny_run(work: Path, label: str, **extra) -> tuple[float, dict, list]:
    """images/s of one tiny Offline run of 12 samples; samples per worker; the nodes it ran on."""
    conf = work / "tiny_user.conf"
    conf.write_text("*.*.min_duration = 0\n*.Offline.min_query_count = 12\n")
    test = _run(work / f"tiny-{label}", profile="tiny", backend="torch", user_conf=str(conf), **extra)
    workers = {w: s["samples"] for w, s in test["sut"]["workers"].items()}
    return test["qps"], workers, test["run_executor"].get("nodes", ["local"])


def tiny_variants(work: Path, rounds: int, cluster_address: str | None) -> list[dict]:
    variants = {"in-process, 2 threads": {"threads": 2},
                "ray, 1 actor x 2 threads": {"executor": "ray", "ray_actors": 1, "threads": 2},
                "ray, 2 actors x 1 thread": {"executor": "ray", "ray_actors": 2}}
    if cluster_address:
        variants["ray, 2 nodes x 1 CPU (simulated), 1 actor each"] = {"executor": "ray", "ray_address": cluster_address}
    results = {name: {"variant": name, "images_per_s": []} for name in variants}
    for r in range(rounds):  # interleaved: every variant once per round
        for i, (name, extra) in enumerate(variants.items()):
            per_s, workers, nodes = _tiny_run(work, f"{i}-{r}", **extra)
            results[name]["images_per_s"].append(per_s)
            results[name].update(samples_per_worker=workers, nodes=nodes)
    return list(results.values())


@contextlib.contextmanager
def two_node_cluster():
    """A simulated cluster: a head without CPUs and two nodes of one CPU each; its address."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster.address
    finally:
        cluster.shutdown()


def _spread(values: list[float], digits: int = 3) -> str:
    med = statistics.median(values)
    return f"{med:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="runs of every variant, interleaved (default 2)")
    parser.add_argument("--skip-cluster", action="store_true", help="skip (c), the simulated 2-node cluster")
    args = parser.parse_args()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work = Path(tmp)
        overhead = null_overhead(work, args.rounds)
        floor = ray_floor()
        with contextlib.nullcontext() if args.skip_cluster else two_node_cluster() as cluster_address:
            tiny = tiny_variants(work, args.rounds, cluster_address)

    print(f"\nCPU: {system_description()['cpu_model']} ({isa_summary()}); median (min-max) of {args.rounds} "
          "interleaved runs\n")
    print("(a) null backend at 1024x1024, one lane: per query (Offline: wall time per sample; Server: mean "
          "latency at 20 QPS); goal: Ray adds <= 2 ms")
    print(format_table(["scenario", "variant", "per query (ms)", "SUT service per batch (ms)", "added (ms)"],
                       [[r["scenario"], r["variant"], _spread(r["per_query_ms"]), _spread(r["service_per_batch_ms"]),
                         f"{r['added_ms']:+.3f}"] for r in overhead]))
    print(f"Ray's floor (median of 200, outside LoadGen): empty actor call {floor['empty_call_ms']:.3f} ms; call "
          f"returning a 3 MB image {floor['image_call_ms']:.3f} ms; a bare 3 MB copy {floor['bare_copy_ms']:.3f} ms")
    base = statistics.median(tiny[0]["images_per_s"])
    print("\n(b, c) tiny, torch fp32, Offline, 12 samples, batch 1, 1 torch thread per batch")
    print(format_table(["variant", "images/s", "vs in-process", "samples per worker"],
                       [[t["variant"], _spread(t["images_per_s"]),
                         f"{statistics.median(t['images_per_s']) / base:.2f}x",
                         ", ".join(f"{w} {n}" for w, n in sorted(t["samples_per_worker"].items()))] for t in tiny]))
    path = OUT_DIR / f"scale-{stamp}.json"
    write_json_atomic(path, {"benchmark": "scale", "system": system_description(), "rounds": args.rounds,
                             "null_overhead": overhead, "ray_floor": floor, "tiny": tiny})
    print(f"\nwritten {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
