"""The one prepared script for a lent GPU (issue 19): what a CUDA machine without TensorRT can check.

    python bench/gpu_check.py [--device cuda] [--profiles tiny,testbed] [--iterations 50] [--skip-loadgen]

1. **Fake-quant FP8 numerics on the device against the CPU**: each profile's UNet with ``fp8-mha``
   encodings calibrated on the CPU (tiny: two random CFG batches, as the tests; testbed: the same),
   one CFG call on both devices in FP32: output SQNR device~CPU, next to the quantization error
   (fake-quant~FP32) and the one-ulp floor on the CPU (how far any other kernels can come); and the FP8
   quantizer itself (:func:`quant.quantizers.quantize_tensor`) on the same tensor on both: bit-identical?
2. **FP8 GEMM speed the engines would get**: ``torch._scaled_mm`` with e4m3 operands (per-tensor
   scales, FP16 out) against FP16 ``torch.matmul`` at SDXL's Linear shapes (self-attention and
   feed-forward at 64x64 and 32x32 latents, CFG batch 2 x 1; the cross-attention K/V of 77 tokens),
   median of ``--iterations`` CUDA-event timings after a warm-up; modelopt's SDXL anchors are 1.14-1.45x
   for whole FP8 vs FP16 engines.
3. **The harness under LoadGen with ``--device cuda``** (the reliability issue's CUDA-before-fork fix:
   the parent must not initialise CUDA before forking the LoadGen child): tiny, Offline, 4 samples,
   torch backend, FP32 and with the ``fp8-mha`` encodings; exit code, validity, samples/s.

On a CPU (``--device cpu``) every step runs (the timings then mean nothing): the script is checked
here before a GPU is lent. Writes ``gpu-check-<stamp>.json`` to ``$OUT`` if set (the device machine's
output folder), else ``results/bench/``, and prints the tables; a failed step is recorded, not fatal.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from sdxl.io import format_table, write_json_atomic  # noqa: E402

#: (name, tokens per image, in features, out features) of SDXL UNet Linears (latent 128x128: the
#: transformer levels run at 64x64 = 4096 and 32x32 = 1024 tokens)
SDXL_LINEARS = (
    ("attn1.to_q @64x64", 4096, 640, 640), ("ff.proj (GEGLU) @64x64", 4096, 640, 5120),
    ("ff.net.2 @64x64", 4096, 2560, 640), ("attn1.to_q @32x32", 1024, 1280, 1280),
    ("ff.proj (GEGLU) @32x32", 1024, 1280, 10240), ("ff.net.2 @32x32", 1024, 5120, 1280),
    ("attn2.to_k (text) @32x32", 77, 2048, 1280),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--profiles", default="tiny,testbed")
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--skip-loadgen", action="store_true")
    opts = parser.parse_args()
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {opts.device}: no CUDA device here (--device cpu rehearses the script)")
    result: dict = {"benchmark": "gpu_check", "device": opts.device, "torch": torch.__version__,
                    "cuda": torch.version.cuda, "steps": {}}
    if opts.device.startswith("cuda"):
        result["gpu"] = {"name": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability())}
    for name, step in (("fp8_numerics", lambda: fp8_numerics(opts.device, opts.profiles.split(","))),
                       ("fp8_gemm", lambda: fp8_gemm(opts.device, opts.iterations)),
                       ("loadgen", (lambda: {"skipped": True}) if opts.skip_loadgen else (lambda: loadgen(opts.device)))):
        started = time.time()
        try:
            result["steps"][name] = {"ok": True, **step()}
        except Exception as exc:  # recorded: one failed step must not lose the others' results
            result["steps"][name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                                     "traceback": traceback.format_exc()[-4000:]}
            print(f"{name}: FAILED {type(exc).__name__}: {exc}", flush=True)
        result["steps"][name]["seconds"] = round(time.time() - started, 1)
    out_dir = Path(os.environ.get("OUT") or ROOT / "results" / "bench")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"gpu-check-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    write_json_atomic(path, result)
    print(f"\nwritten {path}")
    return 0 if all(s["ok"] for s in result["steps"].values()) else 1


def fp8_numerics(device: str, profiles: list[str]) -> dict:
    rows = {}
    for profile in profiles:
        try:
            rows[profile] = _fp8_profile(profile, device)
        except Exception as exc:  # one profile failing (a missing package) keeps the other's row
            rows[profile] = {"error": f"{type(exc).__name__}: {exc}"}
    print(format_table(["profile", f"UNet {device}~cpu dB", "one-ulp floor dB", "fq~FP32 dB", "FP8 quantizer identical"],
                       [[p, f"{r['unet_device_vs_cpu_db']:.1f}", f"{r['one_ulp_floor_db']:.1f}",
                         f"{r['fake_quant_vs_fp32_db']:.1f}", r["quantizer_bit_identical"]] if "error" not in r else
                        [p, r["error"], "", "", ""] for p, r in rows.items()]), flush=True)
    if all("error" in r for r in rows.values()):
        raise RuntimeError("; ".join(f"{p}: {r['error']}" for p, r in rows.items()))
    return {"profiles": rows}


def _fp8_profile(profile: str, device: str) -> dict:
    from tiny_encodings import calibrate_tiny_unet, unet_example_args

    from backends import BackendOptions, create_backend
    from calibration.sqnr import one_ulp_nudge
    from quant.quantizers import quantize_tensor, sqnr_db
    from sdxl.models import model_spec

    spec = model_spec(profile)
    cpu = create_backend("torch", spec, BackendOptions(show_progress=False))
    args = unet_example_args(cpu)
    encodings, path = calibrate_tiny_unet(cpu, args, "fp8-mha", Path(tempfile.mkdtemp()))
    on = {d: create_backend("torch", spec, BackendOptions(show_progress=False, encodings=str(path), device=d))
          for d in ("cpu", device)}
    with torch.no_grad():
        fp32 = cpu.predict_noise(*args)
        outs = {d: b.predict_noise(*(a.to(d) if torch.is_tensor(a) else a for a in args)).float().cpu()
                for d, b in on.items()}
        with one_ulp_nudge(on["cpu"].unet):
            nudged = on["cpu"].predict_noise(*args)
    key, enc = next((k, e) for k, e in encodings.components["unet"].items() if k.endswith(":input[0]"))
    x = torch.randn(4096, 640, generator=torch.Generator().manual_seed(0)) * 3
    q_cpu, q_dev = quantize_tensor(x, enc.qparams()), quantize_tensor(x.to(device), enc.qparams()).cpu()
    return {"unet_device_vs_cpu_db": sqnr_db(outs["cpu"], outs[device]),
            "one_ulp_floor_db": sqnr_db(outs["cpu"], nudged.float()),
            "fake_quant_vs_fp32_db": sqnr_db(fp32, outs["cpu"]),
            "quantizer": key, "quantizer_bit_identical": bool(torch.equal(q_cpu, q_dev)),
            "quantizer_max_abs_diff": float((q_cpu - q_dev).abs().max())}


def fp8_gemm(device: str, iterations: int) -> dict:
    """FP16 matmul against FP8 (e4m3) ``torch._scaled_mm`` at SDXL's Linear shapes, CFG batch 2."""
    cuda = device.startswith("cuda")
    rows = []
    for name, tokens, k, n in SDXL_LINEARS:
        m = 2 * tokens
        a16 = torch.randn(m, k, device=device, dtype=torch.float16)
        w16 = torch.randn(n, k, device=device, dtype=torch.float16) / k ** 0.5
        scale_a = (a16.abs().max().float() / 448.0).reshape(())
        scale_w = (w16.abs().max().float() / 448.0).reshape(())
        a8 = (a16.float() / scale_a).to(torch.float8_e4m3fn)
        w8 = (w16.float() / scale_w).to(torch.float8_e4m3fn)

        def fp16():
            return a16 @ w16.t()

        def fp8():  # the second operand column-major, as cuBLASLt's FP8 GEMM needs
            return torch._scaled_mm(a8, w8.t(), scale_a=scale_a, scale_b=scale_w, out_dtype=torch.float16)

        error = float((fp8().float() - fp16().float()).norm() / fp16().float().norm())
        times = {label: _median_ms(fn, iterations, cuda) for label, fn in (("fp16", fp16), ("fp8", fp8))}
        rows.append({"linear": name, "m": m, "k": k, "n": n, "fp16_ms": times["fp16"], "fp8_ms": times["fp8"],
                     "speedup": times["fp16"] / times["fp8"], "fp8_relative_error": error,
                     "fp8_tflops": 2 * m * k * n / times["fp8"] / 1e9})
    print(format_table(["linear", "M x K x N", "FP16 ms", "FP8 ms", "FP8/FP16 speed-up", "FP8 TFLOP/s", "rel. error"],
                       [[r["linear"], f"{r['m']}x{r['k']}x{r['n']}", f"{r['fp16_ms']:.3f}", f"{r['fp8_ms']:.3f}",
                         f"{r['speedup']:.2f}x", f"{r['fp8_tflops']:.0f}", f"{r['fp8_relative_error']:.3f}"]
                        for r in rows]), flush=True)
    return {"linears": rows, "iterations": iterations}


def _median_ms(fn, iterations: int, cuda: bool) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iterations):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn()
            times.append((time.perf_counter() - began) * 1e3)
    return sorted(times)[len(times) // 2]


def loadgen(device: str) -> dict:
    """``run`` on tiny, Offline, under the real LoadGen, with ``--device``: FP32 and fake-quant FP8."""
    from tiny_encodings import calibrate_tiny_unet, unet_example_args

    from backends import BackendOptions, create_backend
    from sdxl.models import model_spec

    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    cpu = create_backend("torch", model_spec("tiny"), BackendOptions(show_progress=False))
    _, encodings = calibrate_tiny_unet(cpu, unet_example_args(cpu), "fp8-mha", work)
    runs = {}
    for label, extra in (("fp32", []), ("fp8-mha", ["--encodings", str(encodings)])):
        out = work / label
        command = [sys.executable, "-m", "harness", "run", "--profile", "tiny", "--backend", "torch", "--device", device,
                   "--scenario", "Offline", "--max-samples", "4", "--count", "4", "--max-batchsize", "4",
                   "--output", str(out), *extra]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
        record = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else {}
        test = (record.get("tests") or [{}])[0]
        runs[label] = {"returncode": done.returncode, "status": record.get("status"), "validity": test.get("validity"),
                       "samples_per_s": test.get("qps"), "stderr_tail": done.stderr[-2000:]}
        print(f"loadgen {label} on {device}: rc {done.returncode}, {record.get('status')}, {test.get('validity')}, "
              f"{test.get('qps')} samples/s", flush=True)
    return {"runs": runs}


if __name__ == "__main__":
    raise SystemExit(main())
