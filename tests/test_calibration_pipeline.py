"""Calibration from the tiny pipeline: timesteps parsing, captions rules, the calibrate command and its resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from calibration.capture import CalibrationDataError, parse_timesteps, read_calibration_captions
from harness.cli import main

SCHEDULE = list(range(951, 0, -50))  # SDXL leading spacing, 20 steps: 951, 901, ..., 1


def test_timesteps_specs():
    assert SCHEDULE[0] == 951 and SCHEDULE[-1] == 1 and len(SCHEDULE) == 20
    assert parse_timesteps("all", SCHEDULE) == list(range(20))
    assert parse_timesteps("single", SCHEDULE) == [0]
    assert parse_timesteps("uniform:3", SCHEDULE) == [0, 10, 19]
    assert parse_timesteps("list:951,501,1", SCHEDULE) == [0, 9, 19]
    assert parse_timesteps("qdiff:10", SCHEDULE) == list(range(0, 20, 2))  # Q-Diffusion's SD recipe, 25 of 50
    assert parse_timesteps("qdiff:3", SCHEDULE) == [0, 6, 12, 18]  # its range(0, n, n // K), not K steps
    assert parse_timesteps("ndtc", SCHEDULE) == list(range(20))
    for bad, message in (("list:950", "950 is not one of"), ("uniform:0", "K must be"), ("every", "use all, single"),
                         ("ndtc:2,0.4", "MEAN must be in"), ("ndtc:x", "use ndtc or ndtc:MEAN,STD"),
                         ("qdiff:0", "K must be")):
        with pytest.raises(CalibrationDataError, match=message):
            parse_timesteps(bad, SCHEDULE)


def test_ndtc_draws_one_step_per_chunk_around_forty_percent_of_the_schedule():
    """PTQ4DM's shipped setting: index ~ N(0.4 n, 0.4 n) from the noisiest step, clipped; seeded per chunk."""
    from calibration.capture import plan_timesteps

    plan = plan_timesteps("ndtc", SCHEDULE, 2000)
    assert all(len(steps) == 1 and 0 <= steps[0] <= 19 for steps in plan)
    drawn = np.array([steps[0] for steps in plan])
    clipped = np.clip(np.floor(np.random.default_rng(0).normal(8, 8, 200000)), 0, 19)  # the same law, sampled
    assert abs(drawn.mean() - clipped.mean()) < 0.4 and (drawn == 0).mean() == pytest.approx((clipped == 0).mean(), abs=0.03)
    assert plan_timesteps("ndtc", SCHEDULE, 5) == plan[:5]  # a chunk's draw does not depend on how many there are
    assert plan_timesteps("qdiff:10", SCHEDULE, 3) == [list(range(0, 20, 2))] * 3


def test_captions_rules(tmp_path):
    plain = tmp_path / "coco_cal_captions_list.txt"
    plain.write_text("a cat\n\na dog on a sofa\nthree birds\n")
    assert read_calibration_captions(plain, "sdxl", 2)[0] == ["a cat", "a dog on a sofa"]
    val = tmp_path / "captions_source.tsv"
    val.write_text("id\timage_id\tcaption\theight\twidth\tfile_name\tcoco_url\n"
                   "1\t2\ta cat\t640\t480\tCOCO_val2014_000000000002.jpg\thttp://images.cocodataset.org/val2014/x.jpg\n")
    with pytest.raises(CalibrationDataError, match="val2014"):
        read_calibration_captions(val, "sdxl")
    with pytest.raises(CalibrationDataError, match="needs --calibration-captions"):
        read_calibration_captions(None, "sdxl-random")
    captions, source = read_calibration_captions(None, "tiny", 3)
    assert len(captions) == 3 and source == "builtin:tiny"


#: tiny w8a8 UNet-output SQNR vs FP32 from ``calibrate`` (5 prompts in 2 chunks, steps 951 and 901, 1 SQNR sample),
#: measured once at 30.9 dB; the floor leaves 3 dB for BLAS differences between machines
TINY_W8A8_SQNR_FLOOR_DB = 28.0


def test_calibrate_command_resumes_a_killed_capture_and_reports_sqnr(tmp_path, capsys):
    """``calibrate`` end to end; then kill its capture after the first chunk, resume, get the same encodings."""
    import csv

    from quant.encodings import Encodings

    out, cache = tmp_path / "w8a8.json", tmp_path / "cache"
    # the first two steps only: the capture stops denoising after the last captured step
    flags = ["calibrate", "--profile", "tiny", "--recipe", "w8a8", "--num-prompts", "5", "--timesteps", "list:951,901",
             "--cache-dir", str(cache)]
    assert main([*flags, "--output", str(out), "--sqnr-samples", "1"]) == 0
    printed = capsys.readouterr().out
    full = Encodings.load(out)
    entries = full.components["unet"]
    assert any(k.endswith(":input[0]") for k in entries) and not any(k.startswith("conv_in:") for k in entries)
    aimet = json.loads((tmp_path / "w8a8.aimet.unet.json").read_text())
    assert len(aimet["activation_encodings"]) + len(aimet["param_encodings"]) == len(entries)
    rows = list(csv.DictReader(open(tmp_path / "w8a8.sqnr.csv")))
    output_sqnr = float(next(r for r in rows if r["layer"] == "<output>")["accumulated_sqnr_db"])
    assert (tmp_path / "w8a8.sqnr.png").stat().st_size > 10_000 and "output SQNR" in printed
    print(f"tiny w8a8 UNet-output SQNR {output_sqnr:.2f} dB")
    assert output_sqnr >= TINY_W8A8_SQNR_FLOOR_DB, output_sqnr

    (directory,) = (cache / "calib").iterdir()
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["complete"] and manifest["timesteps"] == [951, 901] and len(manifest["chunks"]) == 2
    # simulate a kill after chunk 0: second chunk's latents gone, manifest says incomplete
    (directory / "latents-00001.safetensors").unlink()
    manifest.update(complete=False, chunks=[0])
    (directory / "manifest.json").write_text(json.dumps(manifest))
    assert main([*flags, "--output", str(tmp_path / "resumed.json"), "--sqnr-samples", "0"]) == 0
    assert (directory / "latents-00001.safetensors").is_file()
    resumed = Encodings.load(tmp_path / "resumed.json")
    assert resumed.to_json()["components"] == full.to_json()["components"]


def test_run_with_a_recipe_calibrates_once_into_the_run_directory(tmp_path):
    """``run --recipe`` with timestep-ranged activations: one calibration, then LoadGen serves the fake-quant model."""
    from quant.encodings import Encodings

    out = tmp_path / "run"
    assert main(["run", "--profile", "tiny", "--recipe", "w8a8-per-step", "--num-prompts", "1", "--timesteps", "list:951,901",
                 "--cache-dir", str(tmp_path / "cache"), "--mode", "accuracy", "--max-samples", "1",
                 "--output", str(out)]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "completed" and record["tests"][0]["samples"] == 1
    calibration = record["calibration"]
    assert calibration["recipe"] == "w8a8-per-step" and calibration["num_prompts"] == 1 and calibration["quantizers"] > 0
    assert record["backend"]["encodings"] == str(out / "encodings.json") == calibration["encodings"]
    assert (out / "encodings.aimet.unet.json").is_file()
    entries = Encodings.load(out / "encodings.json").components["unet"]
    ranged = [v for k, v in entries.items() if k.endswith(":input[0]")]
    # 2 calibrated steps, 4 groups asked: one group per step, the last reaching down to t = 0
    assert ranged and all([e.timesteps for e in v] == [(951, 951), (0, 950)] for v in ranged)
    assert all(not isinstance(v, list) for k, v in entries.items() if k.endswith(":weight"))
    assert [p.name for p in (tmp_path / "cache" / "calib").iterdir()], "the capture is cached for the next run"


def test_an_ndtc_calibration_captures_each_chunk_at_its_drawn_step(tmp_path):
    """Near-noisiest draws (mean 0.05) keep the capture short; the encodings record the per-step counts."""
    from calibration.capture import plan_timesteps

    out = tmp_path / "ndtc.json"
    assert main(["calibrate", "--profile", "tiny", "--recipe", "w8a8", "--num-prompts", "8", "--timesteps",
                 "ndtc:0.05,0.05", "--sqnr-samples", "0", "--cache-dir", str(tmp_path / "cache"),
                 "--output", str(out)]) == 0
    calibration = json.loads(out.read_text())["calibration"]
    plan = plan_timesteps("ndtc:0.05,0.05", SCHEDULE, 2)
    expected: dict[str, int] = {}
    for (step,) in plan:
        expected[str(SCHEDULE[step])] = expected.get(str(SCHEDULE[step]), 0) + 1
    assert calibration["timesteps_spec"] == "ndtc:0.05,0.05" and calibration["chunks_per_timestep"] == expected


def test_psnr_importance_weights_share_out_the_remaining_error_of_the_fp32_trajectory():
    """A trajectory built so each step's x0 estimate is ``final + a_t d``: weights a_t^2 - a_{t+1}^2, PSNR exact."""
    import torch

    from calibration.capture import importance_plan, step_importance

    sigmas = [14.6 * 0.75 ** t for t in range(6)] + [0.0]
    g = torch.Generator().manual_seed(0)
    final, d = torch.rand(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    a = [1.0, 0.9, 0.5, 0.45, 0.2, 0.0]  # the estimate's distance to the final latent, step by step
    x = [final + sigmas[0] * torch.randn(1, 4, 8, 8, generator=g)]
    for t in range(5):  # x_{t+1} = x_t + (sigma_{t+1} - sigma_t) eps_t with eps_t = (x_t - x0_t) / sigma_t
        x.append(x[t] + (sigmas[t + 1] - sigmas[t]) * (x[t] - (final + a[t] * d)) / sigmas[t])
    last = x[5] + (sigmas[6] - sigmas[5]) * (x[5] - final) / sigmas[5]  # a_5 = 0: the last estimate is final
    weights, psnr = step_importance([v.double() for v in x], sigmas, last.double())
    scale = float((d.double() ** 2).mean())
    expected = [(a[t] ** 2 - (a[t + 1] if t < 5 else 0.0) ** 2) * scale for t in range(6)]
    assert np.allclose(weights, expected, rtol=1e-6, atol=1e-12)
    peak = float(last.max() - last.min())
    assert psnr[1] == pytest.approx(10 * np.log10(peak ** 2 / (0.81 * scale)), abs=1e-4) and psnr[5] > 100
    # sample counts follow the weights: 12 samples over 6 steps, at most once per chunk of 4
    plan = importance_plan(expected, chunks=4, per_chunk=3)
    counts = [sum(t in steps for steps in plan) for t in range(6)]
    assert sum(counts) == 12 and all(len(set(steps)) == len(steps) for steps in plan) and counts[5] == 0
    # shares 2.28, 6.72, 0.57, 1.95, 0.48, 0: step 1 capped at one per chunk, its excess to the others by weight
    assert counts == [4, 4, 1, 2, 1, 0]
    assert importance_plan([0.0] * 4, chunks=2, per_chunk=2) == [[0, 2], [1, 3]]  # nothing weighted: even


def test_a_psnr_calibration_plans_its_steps_from_the_fp32_trajectory(tmp_path):
    out = tmp_path / "psnr.json"
    assert main(["calibrate", "--profile", "tiny", "--recipe", "w8a8", "--num-prompts", "8", "--timesteps",
                 "psnr:2", "--sqnr-samples", "0", "--cache-dir", str(tmp_path / "cache"), "--output", str(out)]) == 0
    calibration = json.loads(out.read_text())["calibration"]
    importance = calibration["importance"]
    assert calibration["timesteps_spec"] == "psnr:2" and len(importance["weights"]) == 20
    assert sum(calibration["chunks_per_timestep"].values()) == 4  # 2 chunks x 2 steps
    heaviest = sorted(range(20), key=lambda t: -importance["weights"][t])[:1]
    assert str(SCHEDULE[heaviest[0]]) in calibration["chunks_per_timestep"]
    with pytest.raises(CalibrationDataError, match="K must be"):
        parse_timesteps("psnr:0", SCHEDULE)
