"""Calibration from the tiny pipeline: timesteps parsing, captions rules, cache resume, calibrate command."""

from __future__ import annotations

import json

import pytest

from calibration.capture import CalibrationDataError, parse_timesteps, read_calibration_captions

SCHEDULE = list(range(951, 0, -50))  # SDXL leading spacing, 20 steps: 951, 901, ..., 1


def test_timesteps_specs():
    assert SCHEDULE[0] == 951 and SCHEDULE[-1] == 1 and len(SCHEDULE) == 20
    assert parse_timesteps("all", SCHEDULE) == list(range(20))
    assert parse_timesteps("single", SCHEDULE) == [0]
    assert parse_timesteps("uniform:3", SCHEDULE) == [0, 10, 19]
    assert parse_timesteps("list:951,501,1", SCHEDULE) == [0, 9, 19]
    for bad, message in (("list:950", "950 is not one of"), ("uniform:0", "K must be"), ("every", "use all, single")):
        with pytest.raises(CalibrationDataError, match=message):
            parse_timesteps(bad, SCHEDULE)


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


@pytest.fixture(scope="module")
def tiny_components():
    from harness.models import load_components, model_spec

    return load_components(model_spec("tiny"), show_progress=False)


def test_cache_resume_gives_identical_encodings(tiny_components, tmp_path):
    """Kill the capture after its first chunk (by deleting the rest), resume, and compare encodings."""
    import copy

    from calibration.pipeline_calibration import calibrate_components

    # the first two steps only: the capture stops denoising after the last captured step
    kwargs = dict(num_prompts=5, timesteps="list:951,901", cache_dir=tmp_path, apply=False, show_progress=False)
    full = calibrate_components(copy.deepcopy(tiny_components), "w8a8", **kwargs)
    (directory,) = (tmp_path / "calib").iterdir()
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["complete"] and manifest["timesteps"] == [951, 901] and len(manifest["chunks"]) == 2
    # simulate a kill after chunk 0: second chunk's latents gone, manifest says incomplete
    (directory / "latents-00001.safetensors").unlink()
    manifest.update(complete=False, chunks=[0])
    (directory / "manifest.json").write_text(json.dumps(manifest))
    resumed = calibrate_components(copy.deepcopy(tiny_components), "w8a8", **kwargs)
    assert (directory / "latents-00001.safetensors").is_file()
    assert resumed.to_json() == full.to_json()
    entries = full.components["unet"]
    assert any(k.endswith(":input[0]") for k in entries) and not any(k.startswith("conv_in:") for k in entries)
