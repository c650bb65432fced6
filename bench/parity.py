"""Parity benchmark (issue 6): how close ONNX Runtime's QDQ model comes to torch fake-quant, and how close it can.

    .venv/bin/python bench/parity.py

On tiny, for A8W8 (``w8a8-mha``) and A16W8 (``w8a16``), encodings calibrated as the tests do (two
random CFG batches):

* UNet-output SQNR of ORT vs fake-quant, fake-quant vs FP32 and ORT vs FP32, with ORT's
  ``MatMulNBits`` computing in fp32 (the backend's setting) and at ORT's default level 4, which
  quantizes activations to int8 on the fly;
* the floor: fake-quant against itself with every Conv/Linear output moved one ulp
  (:func:`calibration.sqnr.one_ulp_nudge`), next to what the nudge and ORT each do to the FP32 UNet;
* end to end: one built-in caption, 20 steps, PSNR of ORT's image against fake-quant's and FP32's.

The issue's bounds: ORT~fake-quant at least 10 dB above the quantization error (UNet), 6 dB (PSNR).
Prints a table and writes JSON under ``results/bench/`` with the CPU model and ISA.
"""

from __future__ import annotations

import copy
import datetime as dt
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT_DIR = ROOT / "results" / "bench"

from accuracy.fidelity import psnr_ssim  # noqa: E402
from backends import BackendOptions, create_backend  # noqa: E402
from backends.onnx_export import unet_signature  # noqa: E402
from backends.ort_backend import create_session  # noqa: E402
from bench.backends import calibrate_unet  # noqa: E402
from calibration.sqnr import one_ulp_nudge  # noqa: E402
from quant.quantizers import sqnr_db  # noqa: E402
from sdxl.io import format_table, write_json_atomic  # noqa: E402
from sdxl.system_info import isa_summary, system_description  # noqa: E402

RECIPES = {"A8W8": "w8a8-mha", "A16W8": "w8a16"}


def main() -> int:
    from sdxl.dataset import load_captions
    from sdxl.latents import draw_latent
    from sdxl.models import load_tokenizers, model_spec
    from sdxl.pipeline import SDXLPipeline
    from sdxl.tokenizers import tokenize

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    spec = model_spec("tiny")
    tokenizers = load_tokenizers(spec)
    prompt = load_captions(None).captions[0]  # what the tests' one-image LoadGen runs generate
    ids = [tokenize(t, [prompt]) for t in tokenizers]
    latent = draw_latent(spec.latent_size)
    work = Path(tempfile.mkdtemp(prefix="parity-"))

    def backend(name: str, encodings: Path | None = None):
        options = BackendOptions(show_progress=False, encodings=str(encodings) if encodings else None,
                                 extra={"cache_dir": str(work / "cache")})
        return create_backend(name, spec, options)

    def image(b) -> np.ndarray:
        return SDXLPipeline(b, spec, tokenizers).generate(*ids, latent)[0]

    fp32 = backend("torch")
    sig = unet_signature(fp32.unet, batch=2)
    sample, timestep, states, text_embeds, time_ids = sig.example_inputs
    args = (sample, timestep[0], states, text_embeds, time_ids)
    with torch.no_grad():
        fp32_out = fp32.predict_noise(*args)
        with one_ulp_nudge(fp32.unet):
            fp32_nudged = fp32.predict_noise(*args)
    fp32_row = {"ort_vs_torch_db": sqnr_db(fp32_out, backend("ort").predict_noise(*args)),
                "one_ulp_nudge_db": sqnr_db(fp32_out, fp32_nudged)}
    fp32_image = image(fp32)

    rows = {}
    for scheme, recipe in RECIPES.items():
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
        ort_image, fq_image = image(ort), image(fake_quant)
        row["e2e_psnr_ort_vs_fq_db"] = psnr_ssim(ort_image, fq_image)[0]
        row["e2e_psnr_ort_vs_fp32_db"] = psnr_ssim(ort_image, fp32_image)[0]
        ort.session = create_session(ort.model_path, threads=torch.get_num_threads(), matmul_nbits_accuracy_level=4)
        row["ort_vs_fq_db_ort_default_level"] = sqnr_db(simulated, ort.predict_noise(*args))
        rows[scheme] = row

    print(f"CPU: {system_description()['cpu_model']} ({isa_summary()}), torch threads {torch.get_num_threads()}\n")
    print("tiny UNet, one CFG call: output SQNR (dB); end to end: PSNR of one 20-step image (dB)")
    print(format_table(
        ["scheme", "ORT~fq", "fq~FP32", "ORT~FP32", "one-ulp floor", "ORT~fq, ORT's default level",
         "e2e ORT~fq", "e2e ORT~FP32"],
        [[f"{scheme} ({r['recipe']})"] + [f"{r[k]:.1f}" for k in (
            "ort_vs_fq_db", "fq_vs_fp32_db", "ort_vs_fp32_db", "one_ulp_floor_db", "ort_vs_fq_db_ort_default_level",
            "e2e_psnr_ort_vs_fq_db", "e2e_psnr_ort_vs_fp32_db")] for scheme, r in rows.items()]))
    print(f"FP32 UNet: ORT~torch {fp32_row['ort_vs_torch_db']:.1f} dB; torch~torch with the one-ulp nudge "
          f"{fp32_row['one_ulp_nudge_db']:.1f} dB")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"parity-{stamp}.json"
    write_json_atomic(path, {"benchmark": "parity", "system": system_description(), "prompt": prompt,
                             "schemes": rows, "fp32": fp32_row})
    print(f"\nwritten {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
