"""TensorRT backend benchmark, for a machine with an NVIDIA GPU and TensorRT (``docs/tensorrt.md``).

    .venv/bin/python bench/trt.py --encodings FP8.json [--profile sdxl --model-path DIR]
                                  [--batches 8,16] [--samples 256] [--server-qps 1.5] [--server-time 300]

Real LoadGen runs of the harness, ``--backend trt --dtype fp16 --device cuda`` with NVIDIA's engine
set: the UNet an engine built from the encodings' FP8-FP16 graph, both CLIP encoders FP16 engines, the
VAE decoder an engine from the encodings' VAE section (INT8 as NVIDIA's, with a recipe that quantizes
it), else FP32 (SDXL's VAE overflows in FP16; NVIDIA's B200 entry runs it FP32 too); the scheduler
step and CFG in torch on the GPU:

1. **Offline samples/s per GPU** at each ``--batches`` with the FP8 engine, against NVIDIA's published
   per-GPU results for this GPU (closed division, result / 8: H100 2.04 in v4.1, H200 2.18 in v4.1 and
   2.37 in v5.0, B200 3.80 in v5.0).
2. **FP8 vs FP16 engine**: the unquantized FP16 engine set at the largest batch; the ratio (whole
   pipeline: with ``nvidia-sdxl`` encodings it includes the INT8 VAE's gain over FP32) against
   modelopt's SDXL anchors (FP8 1.14-1.45x over FP16, pipeline latency).
3. **Server** at ``--server-qps``: p99 latency and LoadGen's validity.
4. **Engine build time** (summed over the engine set; each is built in a fresh cache unless ``--cache-dir``
   is given; per engine in the JSON) and the
   **GPU memory** peak of each run (device-wide, ``nvidia-smi`` sampled every 0.5 s).

``--samples`` caps Offline's query (``--count``), ``--server-time`` Server's duration (``--time``): both
make the runs non-compliant, which the table says; a submission run is ``./run.sh run`` without them.
Without TensorRT or a CUDA GPU it stops in one line (exit 2). Prints a table and writes JSON under
``results/bench/``, with the GPU, driver, TensorRT and CUDA versions.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sdxl.io import format_table, write_json_atomic  # noqa: E402

OUT_DIR = REPO / "results" / "bench"
#: NVIDIA's closed-division SDXL Offline samples/s per GPU (``../shared/reference/tensorrt.md``)
NVIDIA_OFFLINE_PER_GPU = {"H100": {"v4.1": 2.04}, "H200": {"v4.1": 2.18, "v5.0": 2.37}, "B200": {"v5.0": 3.80}}
#: modelopt's SDXL FP8-over-FP16 engine speed-ups
MODELOPT_FP8_SPEEDUP = (1.14, 1.45)


class GpuMemory:
    """Peak device-wide GPU memory in MiB while the block runs (``nvidia-smi``, sampled every ``interval`` s)."""

    def __init__(self, index: int = 0, interval: float = 0.5):
        self.index, self.interval = index, interval
        self.peak_mib: float | None = None
        self._stop = threading.Event()

    def _read(self) -> float | None:
        if shutil.which("nvidia-smi") is None:
            return None
        done = subprocess.run(["nvidia-smi", f"--id={self.index}", "--query-gpu=memory.used",
                               "--format=csv,noheader,nounits"], capture_output=True, text=True)
        return float(done.stdout.strip()) if done.returncode == 0 and done.stdout.strip() else None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            used = self._read()
            if used is not None:
                self.peak_mib = max(self.peak_mib or 0.0, used)

    def __enter__(self) -> "GpuMemory":
        self.baseline_mib = self._read()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def gpu_anchor(gpu_name: str) -> dict[str, float]:
    """NVIDIA's per-GPU Offline results for this GPU's class (empty for a GPU they did not submit on)."""
    return next((v for k, v in NVIDIA_OFFLINE_PER_GPU.items() if k in gpu_name.upper()), {})


def check_machine(args) -> str | None:
    """Why this machine cannot run the bench, in one line (None: it can). Nothing is loaded."""
    import torch

    from backends.registry import BackendOptionsError
    from backends.trt_engine import require_tensorrt

    if args.encodings is not None and not Path(args.encodings).is_file():
        return f"--encodings {args.encodings}: no such file (calibrate first: ./run.sh calibrate --recipe fp8-mha ...)"
    try:
        require_tensorrt()
    except BackendOptionsError as exc:
        return str(exc)
    if not torch.cuda.is_available():
        return "bench/trt.py runs TensorRT engines on a CUDA GPU; torch sees none here"
    return None


def run_row(args, label: str, scenario: str, batch: int, encodings: str | None, cache_dir: Path,
            out_dir: Path) -> dict:
    from harness.run_command import execute_run
    from harness.run_config import RunConfig

    config = RunConfig(profile=args.profile, model_path=args.model_path, backend="trt", dtype="fp16", device="cuda",
                       encodings=encodings, scenario=scenario, max_batchsize=batch, cache_dir=str(cache_dir),
                       count=args.samples if scenario == "Offline" else None,
                       time_s=args.server_time if scenario == "Server" else None,
                       qps=args.server_qps if scenario == "Server" else None,
                       backend_extra={"trt_max_batch": batch, "trt_optimization_level": args.trt_optimization_level},
                       output=str(out_dir / f"{label}-{scenario}-b{batch}"))
    with GpuMemory() as memory:
        record = execute_run(config)
    test = record.tests[0] if record.tests else {}
    engines = [e["engine_info"] for e in ((test.get("backend") or {}).get("engines") or {}).values()]
    built = [e["build_s"] for e in engines if e.get("built")]
    return {"engine": label, "scenario": scenario, "batch": batch, "status": record.status,
            "error": record.data.get("error"), "validity": test.get("validity"),
            "samples_per_s": test.get("qps"), "p99_latency_s": test.get("p99_latency_s"),
            "target_qps": test.get("target_qps"), "samples": test.get("samples"),
            "engine_build_s": sum(built) if built else None, "backend_build_s": test.get("build_s"),
            "engine_mib": sum(e.get("engine_bytes") or 0 for e in engines) / 2**20 or None,
            "engines": {Path(e["onnx"]).stem: e for e in engines},
            "gpu_memory_peak_mib": memory.peak_mib, "gpu_memory_idle_mib": memory.baseline_mib,
            "run_dir": str(record.run_dir)}


def system_facts() -> dict:
    import tensorrt
    import torch

    from sdxl.system_info import system_description

    facts = {**system_description(), "gpu": torch.cuda.get_device_name(0), "cuda": torch.version.cuda,
             "compute_capability": list(torch.cuda.get_device_capability(0)), "tensorrt": tensorrt.__version__}
    if shutil.which("nvidia-smi"):
        done = subprocess.run(["nvidia-smi", "--id=0", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True)
        facts["driver"] = done.stdout.strip() or None
    return facts


def _fixed(value, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="sdxl")
    parser.add_argument("--model-path")
    parser.add_argument("--encodings", required=True,
                        help="FP8 encodings: calibrate --recipe nvidia-sdxl (NVIDIA's FP8 UNet and INT8 VAE) or fp8-mha")
    parser.add_argument("--batches", default="8,16", help="SUT batch sizes (images; the UNet runs twice that)")
    parser.add_argument("--samples", type=int, default=256, help="Offline query size (--count)")
    parser.add_argument("--server-qps", type=float, default=1.5, help="Server's target QPS (0: no Server run)")
    parser.add_argument("--server-time", type=float, default=300.0, help="Server's duration in seconds (--time)")
    parser.add_argument("--trt-optimization-level", type=int, default=3)
    parser.add_argument("--cache-dir", help="reuse engines from here (default: a fresh cache, builds timed)")
    args = parser.parse_args()
    try:
        batches = sorted({int(b) for b in args.batches.split(",")})
    except ValueError:
        parser.error(f"--batches takes comma-separated integers, got {args.batches!r}")
    if (reason := check_machine(args)) is not None:
        print(f"bench/trt.py: {reason}", file=sys.stderr)
        return 2
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = OUT_DIR / f"trt-{args.profile}-{stamp}"
    cache_dir = Path(args.cache_dir) if args.cache_dir else out_dir / "cache"
    rows = [run_row(args, "fp8", "Offline", b, args.encodings, cache_dir, out_dir) for b in batches]
    rows.append(run_row(args, "fp16", "Offline", batches[-1], None, cache_dir, out_dir))
    if args.server_qps > 0:
        rows.append(run_row(args, "fp8", "Server", batches[-1], args.encodings, cache_dir, out_dir))
    facts = system_facts()
    anchor = gpu_anchor(facts["gpu"])
    fp8 = next((r["samples_per_s"] for r in rows if r["engine"] == "fp8" and r["scenario"] == "Offline"
                and r["batch"] == batches[-1]), None)
    fp16 = next((r["samples_per_s"] for r in rows if r["engine"] == "fp16"), None)
    summary = {"fp8_over_fp16": fp8 / fp16 if fp8 and fp16 else None, "modelopt_fp8_over_fp16": MODELOPT_FP8_SPEEDUP,
               "nvidia_offline_per_gpu": anchor,
               "fp8_offline_vs_nvidia": {name: fp8 / value for name, value in anchor.items()} if fp8 else None}
    print(format_table(
        ["engine", "scenario", "batch", "validity", "samples/s", "p99 s", "engine build s", "engine MiB", "GPU MiB"],
        [[r["engine"], r["scenario"], r["batch"], r["validity"] or r["error"] or r["status"], _fixed(r["samples_per_s"], 3),
          _fixed(r["p99_latency_s"], 2) if r["scenario"] == "Server" else "", _fixed(r["engine_build_s"], 0),
          _fixed(r["engine_mib"], 0), _fixed(r["gpu_memory_peak_mib"], 0)] for r in rows]))
    print(f"GPU {facts['gpu']}; FP8/FP16 Offline {summary['fp8_over_fp16']} (modelopt {MODELOPT_FP8_SPEEDUP}); "
          f"NVIDIA per GPU {anchor or 'none for this GPU'}")
    path = OUT_DIR / f"trt-{args.profile}-{stamp}.json"
    write_json_atomic(path, {"bench": "trt", "stamp": stamp, "system": facts, "args": vars(args), "rows": rows,
                             "summary": summary, "non_compliant": "--count/--time cap the runs: not submission runs"})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
