"""Parity benchmark (issues 6, 13): how close ONNX Runtime's QDQ model comes to torch fake-quant, and how close it can.

    .venv/bin/python bench/parity.py [--profile tiny|testbed] [--recipes w8a8,w8a8-qlinear,w8a16] [--prompts 8]

On ``tiny`` (random weights), encodings calibrated as the tests do (two random CFG batches), the UNet
fed the pipeline's example inputs; on ``testbed`` (trained weights), encodings from ``calibrate`` on
the testbed's calibration captions (8 prompts, all steps) and the UNet fed a real CFG batch (the
first validation caption at step 10). For each recipe:

* UNet-output SQNR of ORT vs fake-quant, fake-quant vs FP32 and ORT vs FP32, with ORT's
  ``MatMulNBits`` computing in fp32 (the backend's setting) and at ORT's default level 4, which
  quantizes activations to int8 on the fly;
* the floor: fake-quant against itself with every Conv/Linear output moved one ulp
  (:func:`calibration.sqnr.one_ulp_nudge`), next to what the nudge and ORT each do to the FP32 UNet;
* end to end: ``--prompts`` captions (tiny: one built-in caption), 20 steps, mean PSNR of ORT's images
  against fake-quant's and FP32's;
* TensorRT's explicit-quantization rules on the same QDQ graph (:mod:`backends.trt_graph`): the graph
  ``--backend trt`` builds; use FP8 recipes and ``w8a8-sym`` for it.

The issue's bounds: ORT~fake-quant at least 10 dB above the quantization error (UNet), 6 dB (PSNR).
Prints a table and writes JSON under ``results/bench/`` with the CPU model and ISA.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT_DIR = ROOT / "results" / "bench"

from accuracy.fidelity import psnr_ssim  # noqa: E402
from backends import BackendOptions, create_backend  # noqa: E402
from backends.onnx_export import unet_signature  # noqa: E402
from backends.ort_backend import create_session  # noqa: E402
from backends.trt_graph import check_trt_qdq  # noqa: E402
from bench.backends import calibrate_unet  # noqa: E402
from calibration.commands import calibrate_to_file  # noqa: E402
from calibration.sqnr import one_ulp_nudge  # noqa: E402
from quant.quantizers import sqnr_db  # noqa: E402
from sdxl.io import format_table, write_json_atomic  # noqa: E402
from sdxl.system_info import isa_summary, system_description  # noqa: E402

DEFAULT_RECIPES = {"tiny": "w8a8-mha,w8a16", "testbed": "w8a8,w8a8-qlinear,w8a16"}


def main() -> int:
    import argparse

    from sdxl.dataset import load_captions
    from sdxl.latents import draw_latent
    from sdxl.models import load_tokenizers, model_spec, profile_default
    from sdxl.pipeline import SDXLPipeline
    from sdxl.tokenizers import tokenize

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="tiny", choices=sorted(DEFAULT_RECIPES))
    parser.add_argument("--recipes", help="comma-separated (default: tiny w8a8-mha,w8a16; testbed w8a8,w8a8-qlinear,w8a16)")
    parser.add_argument("--prompts", type=int, default=8, help="captions for the end-to-end PSNR (testbed)")
    opts = parser.parse_args()
    recipes = (opts.recipes or DEFAULT_RECIPES[opts.profile]).split(",")
    trained = opts.profile != "tiny"
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    spec = model_spec(opts.profile)
    tokenizers = load_tokenizers(spec)
    # tiny: the caption the tests' one-image LoadGen runs generate; testbed: the first validation captions
    prompts = (load_captions(profile_default(opts.profile, "default_captions")).captions[:opts.prompts] if trained
               else load_captions(None).captions[:1])
    ids = [tokenize(t, prompts) for t in tokenizers]
    latent = draw_latent(spec.latent_size)
    work = Path(tempfile.mkdtemp(prefix="parity-"))

    def backend(name: str, encodings: Path | None = None):
        options = BackendOptions(show_progress=False, encodings=str(encodings) if encodings else None,
                                 extra={"cache_dir": str(work / "cache")})
        return create_backend(name, spec, options)

    def images(b) -> np.ndarray:
        return SDXLPipeline(b, spec, tokenizers).generate(*ids, latent)

    def mean_psnr(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.mean([psnr_ssim(x, y)[0] for x, y in zip(a, b)]))

    fp32 = backend("torch")
    args = real_unet_input(SDXLPipeline(fp32, spec, tokenizers), ids, latent) if trained else \
        _example_args(unet_signature(fp32.unet, batch=2).example_inputs)
    with torch.no_grad():
        fp32_out = fp32.predict_noise(*args)
        with one_ulp_nudge(fp32.unet):
            fp32_nudged = fp32.predict_noise(*args)
    fp32_row = {"ort_vs_torch_db": sqnr_db(fp32_out, backend("ort").predict_noise(*args)),
                "one_ulp_nudge_db": sqnr_db(fp32_out, fp32_nudged)}
    fp32_images = images(fp32)

    rows = {}
    for recipe in recipes:
        if trained:
            path = work / f"{recipe}.json"
            calibrate_to_file(opts.profile, None, recipe, path, num_prompts=8, cache_dir=str(work / "cache"),
                              sqnr_samples=0, show_progress=False)
        else:
            encodings = calibrate_unet(copy.deepcopy(fp32.unet), recipe, args, scales=(1.0, 0.5))  # as the tests
            path = encodings.save(work / f"{recipe}.json")
        fake_quant, ort = backend("torch", path), backend("ort", path)
        with torch.no_grad():
            simulated = fake_quant.predict_noise(*args)
            with one_ulp_nudge(fake_quant.unet):
                floor = sqnr_db(simulated, fake_quant.predict_noise(*args))
        out = ort.predict_noise(*args)
        row = {"recipe": recipe, "ort_vs_fq_db": sqnr_db(simulated, out), "fq_vs_fp32_db": sqnr_db(fp32_out, simulated),
               "ort_vs_fp32_db": sqnr_db(fp32_out, out), "one_ulp_floor_db": floor}
        ort_images, fq_images = images(ort), images(fake_quant)
        row["e2e_psnr_ort_vs_fq_db"] = mean_psnr(ort_images, fq_images)
        row["e2e_psnr_ort_vs_fp32_db"] = mean_psnr(ort_images, fp32_images)
        row["e2e_psnr_fq_vs_fp32_db"] = mean_psnr(fq_images, fp32_images)
        ort.session = create_session(ort.model_path, threads=torch.get_num_threads(), matmul_nbits_accuracy_level=4,
                                     qdq_fusion=ort.int8_kernels["fused"])
        row["ort_vs_fq_db_ort_default_level"] = sqnr_db(simulated, ort.predict_noise(*args))
        # the same QDQ graph is what --backend trt would build: TensorRT's explicit-quantization rules on it
        tensor_map = json.loads((ort.model_dir / "unet.tensor_map.json").read_text())["tensor_map"]
        report = check_trt_qdq(onnx.load(str(ort.model_path), load_external_data=False), tensor_map,
                               mha=any(".bmm_" in k for k in tensor_map), base_dir=ort.model_dir)
        row["trt_graph"] = report.to_json()
        fp16_out, fp16_figures = fp16_graph(spec, path, args, work / f"{recipe}-fp16")
        row["fp16_graph"] = {"vs_fq_db": sqnr_db(simulated, fp16_out), "vs_fp32_db": sqnr_db(fp32_out, fp16_out),
                             **fp16_figures}
        rows[recipe] = row

    print(f"CPU: {system_description()['cpu_model']} ({isa_summary()}), torch threads {torch.get_num_threads()}\n")
    print(f"{opts.profile} UNet, one CFG call: output SQNR (dB); end to end: mean PSNR of {len(prompts)} 20-step "
          "image(s) (dB)")
    print(format_table(
        ["recipe", "ORT~fq", "fq~FP32", "ORT~FP32", "one-ulp floor", "ORT~fq, ORT's default level",
         "e2e ORT~fq", "e2e ORT~FP32", "e2e fq~FP32", "TensorRT rules broken", "FP8 MHA patterns"],
        [[recipe] + [f"{r[k]:.1f}" for k in (
            "ort_vs_fq_db", "fq_vs_fp32_db", "ort_vs_fp32_db", "one_ulp_floor_db", "ort_vs_fq_db_ort_default_level",
            "e2e_psnr_ort_vs_fq_db", "e2e_psnr_ort_vs_fp32_db", "e2e_psnr_fq_vs_fp32_db")]
         + [len(r["trt_graph"]["violations"]), r["trt_graph"]["mha_patterns"]] for recipe, r in rows.items()]))
    print("\nThe FP8-FP16 graph --backend trt --dtype fp16 builds, on ORT with FP16 inputs (UNet output SQNR, dB)")
    print(format_table(
        ["recipe", "FP16 graph~fq", "FP16 graph~FP32", "fq~FP32", "TensorRT rules broken", "FP32 nodes",
         "scales subnormal in FP16", "max scale rounding"],
        [[recipe, f"{r['fp16_graph']['vs_fq_db']:.1f}", f"{r['fp16_graph']['vs_fp32_db']:.1f}",
          f"{r['fq_vs_fp32_db']:.1f}", r["fp16_graph"]["trt_rules_broken"], r["fp16_graph"]["conversion"]["fp32_nodes"],
          f"{r['fp16_graph']['conversion']['subnormal_scales']} of {r['fp16_graph']['conversion']['scales']}",
          f"{r['fp16_graph']['conversion']['max_scale_rel_error']:.1e}"] for recipe, r in rows.items()]))
    print(f"FP32 UNet: ORT~torch {fp32_row['ort_vs_torch_db']:.1f} dB; torch~torch with the one-ulp nudge "
          f"{fp32_row['one_ulp_nudge_db']:.1f} dB")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"parity-{opts.profile}-{stamp}.json"
    write_json_atomic(path, {"benchmark": "parity", "profile": opts.profile, "system": system_description(),
                             "prompts": prompts, "recipes": rows, "fp32": fp32_row})
    print(f"\nwritten {path}")
    return 0


def fp16_graph(spec, encodings_path: Path, args: tuple, directory: Path) -> tuple[torch.Tensor, dict]:
    """The FP8-FP16 graph ``--backend trt --dtype fp16`` builds from the same encodings (FP16 scales and
    unquantized ops, :mod:`backends.onnx_fp16`), run on ORT's CPU provider with FP16 inputs: its output;
    TensorRT's rules on it and what the conversion reports."""
    from backends.qdq_model import build_unet_model
    from quant.fake_quant import load_encodings_for
    from sdxl.models import load_components

    components = load_components(spec, show_progress=False)
    encodings = load_encodings_for(components, str(encodings_path), False)  # with the weights the encodings describe
    path = build_unet_model(components.unet, encodings.components["unet"], directory, encodings, show_progress=False,
                            precision="fp16")
    sidecar = json.loads((directory / "unet.tensor_map.json").read_text())
    report = check_trt_qdq(onnx.load(str(path), load_external_data=False), sidecar["tensor_map"],
                           mha=any(".bmm_" in k for k in sidecar["tensor_map"]), base_dir=directory)
    sample, timestep, states, text_embeds, time_ids = args
    feeds = {"sample": sample.half(), "timestep": torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(
        sample.shape[0]), "encoder_hidden_states": states.half(), "text_embeds": text_embeds.half(),
        "time_ids": time_ids.half()}
    session = create_session(path, threads=torch.get_num_threads())
    out = torch.from_numpy(session.run(None, {k: v.contiguous().numpy() for k, v in feeds.items()})[0].astype(np.float32))
    return out, {"trt_rules_broken": len(report.violations), "mha_patterns": report.mha_patterns,
                 "conversion": sidecar["fp16"]}


def _example_args(inputs: tuple) -> tuple:
    sample, timestep, states, text_embeds, time_ids = inputs
    return sample, timestep[0], states, text_embeds, time_ids


def real_unet_input(pipeline, ids, latent, step: int = 10) -> tuple:
    """The UNet's CFG batch for the first prompt at ``step`` of the real 20-step loop."""
    captured = {}

    def keep(s, t, latent_input, conditioning):
        if s == step:
            n = latent_input.shape[0] // 2
            rows = [0, n]  # the first prompt's unconditional and conditional rows
            captured["args"] = (latent_input[rows].clone(), t, conditioning["prompt_embeds"][rows].clone(),
                                conditioning["text_embeds"][rows].clone(), conditioning["time_ids"][rows].clone())

    with torch.inference_mode():
        conditioning = pipeline.conditioning(*[i[:1] for i in ids])
        pipeline.denoise(latent, conditioning, 1, step_callback=keep, max_steps=step + 1)
    return captured["args"]


if __name__ == "__main__":
    raise SystemExit(main())
