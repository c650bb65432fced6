"""Thread settings benchmark: OpenMP wait policy (ACTIVE vs PASSIVE) x torch threads, tiny UNet.

    .venv/bin/python bench/threads.py [--calls 10] [--rounds 3]

GNU OpenMP reads ``OMP_WAIT_POLICY`` once per process, so each policy runs in its own child process;
inside a child the thread counts alternate call by call, so a burst of load on a shared machine hits
every setting alike. The harness defaults to PASSIVE (:func:`harness.cli.quiet_openmp_waits`); this
measures what that costs or saves on the machine at hand. Prints a table (median and best ms per CFG
UNet call) and writes JSON under ``results/bench/`` with the CPU's ISA and the machine's load average.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
OUT_DIR = REPO / "results" / "bench"
POLICIES = ("ACTIVE", "PASSIVE")


def child(calls: int, thread_counts: list[int]) -> dict[str, list[float]]:
    """Seconds per CFG UNet call for each thread count, the counts interleaved call by call."""
    import torch

    from backends import BackendOptions, create_backend
    from backends.onnx_export import unet_signature
    from sdxl.models import model_spec

    backend = create_backend("torch", model_spec("tiny"), BackendOptions(show_progress=False))
    sample, timestep, states, text_embeds, time_ids = unet_signature(backend.unet, batch=2).example_inputs
    inputs = (sample, timestep[0], states, text_embeds, time_ids)
    times: dict[str, list[float]] = {str(n): [] for n in thread_counts}
    with torch.inference_mode():
        backend.predict_noise(*inputs)  # warm-up
        for _ in range(calls):
            for n in thread_counts:
                torch.set_num_threads(n)
                start = time.perf_counter()
                backend.predict_noise(*inputs)
                times[str(n)].append(time.perf_counter() - start)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=10, help="timed calls per thread count per round")
    parser.add_argument("--rounds", type=int, default=2, help="child processes per policy, policies alternating")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", default=None, help="comma-separated torch thread counts (default 1,<cores>)")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    counts = [int(n) for n in args.threads.split(",")] if args.threads else sorted({1, cores})
    if args.child:
        print(json.dumps(child(args.calls, counts)))
        return 0
    from sdxl.io import format_table, write_json_atomic
    from sdxl.system_info import isa_summary, system_description

    results: dict[str, dict[str, list[float]]] = {p: {str(n): [] for n in counts} for p in POLICIES}
    load = []
    for round_ in range(args.rounds):
        for policy in POLICIES:
            print(f"round {round_ + 1}/{args.rounds}: OMP_WAIT_POLICY={policy}", flush=True)
            load.append(os.getloadavg()[0])
            env = {**os.environ, "OMP_WAIT_POLICY": policy}
            out = subprocess.run([sys.executable, __file__, "--child", "--calls", str(args.calls),
                                  "--threads", ",".join(map(str, counts))], env=env, check=True,
                                 capture_output=True, text=True).stdout
            for n, times in json.loads(out.strip().splitlines()[-1]).items():
                results[policy][n].extend(times)
    system = system_description()
    print(f"\nCPU: {system['cpu_model']} ({isa_summary()}), {cores} cores, load average during the run "
          f"{min(load):.2f}-{max(load):.2f}\n")
    rows = [[policy, n, f"{statistics.median(t) * 1e3:.0f}", f"{min(t) * 1e3:.0f}", f"{max(t) * 1e3:.0f}"]
            for policy in POLICIES for n, t in results[policy].items()]
    print("tiny UNet, one CFG call (batch 2), ms")
    print(format_table(["OMP_WAIT_POLICY", "torch threads", "median", "best", "worst"], rows))
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"threads-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    write_json_atomic(path, {"benchmark": "threads", "system": system, "load_average": load,
                             "seconds_per_call": results})
    print(f"\nwritten {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
