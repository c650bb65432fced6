"""Calibration benchmarks (issue 5): memory flatness, fake-quant overhead, full-size calibration.

* ``rss``   -- peak RSS of calibrating tiny w8a8 with 2, 4 and 16 prompts, each in a fresh process,
  minus the RSS after the model is loaded. Streaming observers + chunked capture should keep the
  growth flat: goal < 50 MB from 2 to 16 prompts. The capture runs prompts in chunks of 4, so 2
  prompts also run a smaller batch than 4 or 16; the 4 -> 16 step isolates growth with the set.
  The growth at 2 prompts is the fixed cost of calibrating (tokenizers, the first forward passes'
  kernel caches), the same whatever the set's size.
* ``slice`` -- forward time of an SDXL-width UNet slice (320/640/1280 channels, SDXL attention
  widths, one layer per block) FP32 vs fake-quantized w8a8. Tiny is dominated by per-op overhead, so
  it would not show the q/dq cost. Goal <= 1.3x.
* ``--full`` -- calibrate the sdxl-random UNet at 1024^2 on one prompt and one step; goal peak RSS <= 16 GB.

Usage: ``.venv/bin/python bench/calibration.py [rss|slice|all|full] [--full]``; prints one JSON line per result.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdxl.system_info import peak_rss_mb, rss_mb  # noqa: E402


def child_calibrate(profile: str, prompts: int, timesteps: str) -> dict:
    """Runs in a subprocess: load, calibrate with the capture, report RSS levels."""
    from calibration.pipeline_calibration import calibrate_components
    from sdxl.models import load_components, model_spec

    spec = model_spec(profile)
    components = load_components(spec, show_progress=False)
    after_load = rss_mb()
    started = time.time()
    with tempfile.TemporaryDirectory() as cache:
        captions = None  # tiny: its built-in set; real-size profiles need a file (never the validation TSV)
        if profile != "tiny":
            captions = Path(cache) / "captions.txt"
            captions.write_text("A red bicycle leaning against a brick wall.\n" * prompts)
        enc = calibrate_components(components, "w8a8", calibration_captions=captions, num_prompts=prompts,
                                   timesteps=timesteps, cache_dir=cache, apply=False, free_text_encoders=True,
                                   show_progress=False)
    peak = peak_rss_mb()
    return {"bench": "calibrate-rss", "profile": profile, "prompts": prompts, "timesteps": timesteps,
            "after_load_mb": round(after_load, 1), "peak_mb": round(peak, 1), "growth_mb": round(peak - after_load, 1),
            "seconds": round(time.time() - started, 1), "quantizers": enc.num_quantizers()}


def _in_child(profile: str, prompts: int, timesteps: str) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); from bench.calibration import child_calibrate; "
            f"print('RESULT' + json.dumps(child_calibrate({profile!r}, {prompts}, {timesteps!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT"))[6:])


def bench_rss() -> list[dict]:
    results = [_in_child("tiny", n, "all") for n in (2, 4, 16)]
    growth = {r["prompts"]: r["growth_mb"] for r in results}
    results.append({"bench": "calibrate-rss-summary", **{f"growth_{n}_mb": g for n, g in growth.items()},
                    "from_2_to_16_mb": round(growth[16] - growth[2], 1),
                    "from_4_to_16_mb": round(growth[16] - growth[4], 1), "goal_mb": 50,
                    "pass": growth[16] - growth[2] < 50})
    return results


def sdxl_width_slice():
    """SDXL's channel widths and attention shapes with one layer per block (fast enough for a CPU)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 1), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816).eval().requires_grad_(False)


def bench_slice(repeats: int = 3) -> list[dict]:
    import torch

    from calibration.quantize import quantize

    unet = sdxl_width_slice()
    inputs = (torch.randn(2, 4, 32, 32), torch.tensor(951))
    kwargs = {"encoder_hidden_states": torch.randn(2, 77, 2048),
              "added_cond_kwargs": {"text_embeds": torch.randn(2, 1280), "time_ids": torch.randn(2, 6)}}

    def timed() -> float:
        best = float("inf")
        with torch.inference_mode():
            unet(*inputs, **kwargs)
            for _ in range(repeats):
                start = time.perf_counter()
                unet(*inputs, **kwargs)
                best = min(best, time.perf_counter() - start)
        return best

    fp32 = timed()
    quantize(unet, "w8a8", lambda m: m(*inputs, **kwargs), component="unet", apply=True)
    fq = timed()
    return [{"bench": "fake-quant-overhead", "slice": "sdxl-width 320/640/1280, 1 layer/block, 32x32 latent, batch 2",
             "fp32_s": round(fp32, 4), "fake_quant_s": round(fq, 4), "ratio": round(fq / fp32, 3), "goal": 1.3,
             "pass": fq / fp32 <= 1.3, "threads": torch.get_num_threads()}]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="?", default="all", choices=("rss", "slice", "all", "full"),
                        help="full: only the sdxl-random calibration (as --full)")
    parser.add_argument("--full", action="store_true", help="also calibrate sdxl-random at 1024^2 (1 prompt, 1 step)")
    args = parser.parse_args()
    results = []
    if args.what in ("rss", "all"):
        results += bench_rss()
    if args.what in ("slice", "all"):
        results += bench_slice()
    if args.full or args.what == "full":
        full = _in_child("sdxl-random", 1, "single")
        full.update(goal_peak_mb=16 * 1024, **{"pass": full["peak_mb"] <= 16 * 1024})
        results.append(full)
    for result in results:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
