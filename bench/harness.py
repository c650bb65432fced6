"""Harness benchmark: the SUT's own per-query overhead, and tiny fp32 vs bf16 throughput.

    .venv/bin/python bench/harness.py [--images N] [--force-bf16]

1. ``null`` backend at 1024x1024 through real LoadGen runs in each scenario: per-query overhead
   (Offline: wall time per sample; SingleStream/Server: mean latency) including the uint8 conversion
   of a 3 MB image -- the goal is <= 1 ms -- and the SUT's own share of it (``run.json``'s
   ``sut.timing_ms``); Server at 20 and at 200 QPS, to show what idling between queries costs. The
   conversion alone is timed separately, also after idle pauses.
2. tiny profile, torch backend, fp32 vs bf16 images/s, measured alternately in one process so the
   ratio is fair on a shared machine. On CPUs without native bf16 (AVX2-only) bf16 is emulated,
   ~100x slower: it is skipped there unless ``--force-bf16``.

Prints a table and writes JSON under ``results/bench/`` with the CPU model and ISA.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sdxl.io import format_table, write_json_atomic  # noqa: E402
from sdxl.system_info import isa_summary, native_bf16, system_description  # noqa: E402

OUT_DIR = REPO / "results" / "bench"


def null_overhead(stamp: str) -> list[dict]:
    from harness.run_command import execute_run
    from harness.run_config import RunConfig

    rows = []
    # Server at the user.conf's 20 QPS idles ~50 ms between queries, at 200 QPS ~5 ms: side by side they
    # show what idling costs the SUT's own work (both well below the null SUT's capacity)
    for scenario, batch, qps in (("Offline", 1, None), ("Offline", 8, None), ("Server", 1, None), ("Server", 1, 200.0),
                                 ("SingleStream", 1, None)):
        config = RunConfig(profile="sdxl-random", backend="null", scenario=scenario, max_batchsize=batch, qps=qps,
                           user_conf=str(REPO / "bench" / "null_overhead_user.conf"),
                           output=str(OUT_DIR / f"{stamp}-null-{scenario}-b{batch}{f'-{qps:g}qps' if qps else ''}"))
        record = execute_run(config)
        (test,) = record.tests
        if scenario == "Server":
            scenario = f"Server ({test['target_qps']:g} QPS)"
        offline = scenario == "Offline"
        per_query = 1.0 / test["qps"] if offline else test["mean_latency_s"]
        latency = {} if offline else test  # Offline's latencies are those of its one query
        sut = test["sut"]
        sut_ms = sut["timing_ms"]["service_per_batch"]["mean"] * sum(sut["batch_sizes"].values()) / sut["samples"]
        rows.append({"scenario": scenario, "max_batch": batch, "queries": test["samples"],
                     "validity": test["validity"], "per_query_ms": per_query * 1e3,
                     "p50_ms": latency.get("p50_latency_s", 0) * 1e3,
                     "p99_ms": latency.get("p99_latency_s", 0) * 1e3, "sut_service_ms_per_sample": sut_ms,
                     "sut_queue_wait_p50_ms": sut["timing_ms"]["queue_wait_per_sample"]["p50"]})
    return rows


def conversion_ms(repeats: int = 20) -> dict[str, dict[str, float]]:
    """Median ms per 1024x1024 image to turn VAE output into MLPerf's uint8 HWC bytes, batch 1 and 8.

    Ours (:func:`sdxl.image_bytes.images_to_uint8`, one compiled pass) against the reference's way
    (diffusers' batch-wide postprocess, then MLPerf's PostProcessCoco per image), interleaved.
    """
    import numpy as np

    from sdxl.image_bytes import images_to_uint8

    def reference(x: torch.Tensor) -> np.ndarray:
        pt = (x / 2 + 0.5).clamp(0, 1)
        return np.stack([(img.permute(1, 2, 0).float().numpy() * 255).round().astype(np.uint8) for img in pt])

    out = {}
    for batch in (1, 8):
        decoded = torch.rand(batch, 3, 1024, 1024) * 2 - 1
        ways = {"ours": lambda: images_to_uint8(decoded, from_vae=True), "reference": lambda: reference(decoded)}
        times: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(repeats + 1):  # the first round is a warm-up
            for name, way in ways.items():
                start = time.perf_counter()
                way()
                times[name].append(time.perf_counter() - start)
        out[f"batch {batch}"] = {name: statistics.median(t[1:]) * 1e3 / batch for name, t in times.items()}
    return out


def conversion_after_pause_ms(pauses_s=(0.0, 0.01, 0.05), repeats: int = 20) -> dict[str, float]:
    """Median ms of our conversion of one image after busy-waiting ``pause`` seconds (no sleep, no memory use).

    Server at a low QPS leaves the SUT idle between queries; on a shared machine the image may leave
    the cache meanwhile (other tenants share the L3). A real backend's VAE writes the image just
    before converting it, so a slow figure here is the ``null`` backend's cost, not the harness's.
    """
    from sdxl.image_bytes import images_to_uint8

    decoded = torch.full((1, 3, 1024, 1024), -1.0)
    images_to_uint8(decoded, from_vae=True)
    out = {}
    for pause in pauses_s:
        times = []
        for _ in range(repeats):
            until = time.perf_counter() + pause
            while time.perf_counter() < until:
                pass
            start = time.perf_counter()
            images_to_uint8(decoded, from_vae=True)
            times.append(time.perf_counter() - start)
        out[f"{pause * 1e3:g} ms"] = statistics.median(times) * 1e3
    return out


def tiny_throughput(images: int, dtypes: list[str]) -> dict[str, float]:
    """Images/s per dtype, generating one image per dtype in turn (interleaved, batch 1)."""
    from backends import BackendOptions, create_backend
    from sdxl.latents import draw_latent
    from sdxl.models import load_tokenizers, model_spec
    from sdxl.pipeline import SDXLPipeline
    from sdxl.tokenizers import tokenize

    spec = model_spec("tiny")
    tokenizers = load_tokenizers(spec)
    pipelines = {d: SDXLPipeline(create_backend("torch", spec, BackendOptions(dtype=d, show_progress=False)), spec,
                                 tokenizers) for d in dtypes}
    ids = [tokenize(t, ["A red bicycle leaning against a brick wall."]) for t in tokenizers]
    latent = draw_latent(spec.latent_size)
    elapsed = {d: 0.0 for d in dtypes}
    for d in dtypes:  # warm-up
        pipelines[d].generate(*ids, latent)
    for _ in range(images):
        for d in dtypes:
            start = time.perf_counter()
            pipelines[d].generate(*ids, latent)
            elapsed[d] += time.perf_counter() - start
    return {d: images / elapsed[d] for d in dtypes}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5, help="tiny images per dtype (default 5)")
    parser.add_argument("--force-bf16", action="store_true", help="measure bf16 even where it is emulated")
    args = parser.parse_args()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    OUT_DIR.mkdir(parents=True, exist_ok=True)

    overhead = null_overhead(stamp)
    convert = conversion_ms()
    after_pause = conversion_after_pause_ms()
    dtypes = ["fp32"]
    bf16_note = ""
    if native_bf16() or args.force_bf16:
        dtypes.append("bf16")
    else:
        bf16_note = "bf16 skipped: this CPU has no native bf16 (torch emulates it, ~100x slower); --force-bf16 to measure"
    throughput = tiny_throughput(args.images, dtypes)

    print(f"CPU: {system_description()['cpu_model']} ({isa_summary()}), torch threads {torch.get_num_threads()}\n")
    print("null backend at 1024x1024 (the harness's own per-query overhead; goal <= 1 ms)")
    print("(Offline: wall time per sample; SingleStream and Server: mean latency. SUT: the SUT's own work per\n"
          " sample, from a worker taking the batch to QuerySamplesComplete, and the wait for a worker)")
    print(format_table(["scenario", "max batch", "queries", "result", "per query (ms)", "p50 (ms)", "p99 (ms)",
                        "SUT work (ms)", "SUT wait p50 (ms)"],
                       [[r["scenario"], str(r["max_batch"]), str(r["queries"]), r["validity"],
                         f"{r['per_query_ms']:.3f}", f"{r['p50_ms']:.3f}" if r["p50_ms"] else "-",
                         f"{r['p99_ms']:.2f}" if r["p99_ms"] else "-", f"{r['sut_service_ms_per_sample']:.3f}",
                         f"{r['sut_queue_wait_p50_ms']:.3f}"] for r in overhead]))
    print("VAE output -> uint8 HWC bytes, ms per 1024x1024 image (median): " + "; ".join(
        f"{batch}: ours {v['ours']:.2f}, reference's postprocessing {v['reference']:.2f}" for batch, v in convert.items()))
    print("ours after a busy-wait that touches no memory (the image may leave the cache meanwhile): " + "; ".join(
        f"{pause}: {ms:.2f}" for pause, ms in after_pause.items()))
    print()
    print("tiny profile, torch backend, batch 1, interleaved")
    rows = [[d, f"{throughput[d]:.3f}", f"{throughput[d] / throughput['fp32']:.2f}x"] for d in dtypes]
    print(format_table(["dtype", "images/s", "vs fp32"], rows))
    if bf16_note:
        print(bf16_note)
    path = OUT_DIR / f"harness-{stamp}.json"
    write_json_atomic(path, {"benchmark": "harness", "system": system_description(), "null_overhead": overhead,
                             "uint8_conversion_ms": convert, "uint8_conversion_after_pause_ms": after_pause,
                             "tiny_images_per_s": throughput, "note": bf16_note})
    print(f"\nwritten {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
