"""The trained testbed: shipped weights, scene world and checker, scorer, training, and the study command."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from sdxl.models import PROFILE_DIR, load_components, model_spec
from sdxl.shipped_weights import ShippedWeightsError, load_shipped, pack, unpack, used_rows_only
from testbed.checker import judge_scene
from testbed.datasets import caption_sets, write_caption_sets
from testbed.scenes import COLOURS, POSITIONS, RELATIONS, SHAPES, SIZES, all_scenes, parse_caption, render

PROFILE = json.loads((PROFILE_DIR / "testbed.json").read_text())


def test_shipped_weights_match_their_sha256_and_load_strictly(tmp_path):
    components = load_components(model_spec("testbed"), show_progress=False)
    assert components.vae.config.scaling_factor == PROFILE["vae"]["scaling_factor"]
    assert components.unet.config.sample_size * 8 == PROFILE["image_size"] == 64
    altered = tmp_path / "testbed.safetensors"
    data = bytearray((PROFILE_DIR / PROFILE["weights"]).read_bytes())
    data[-1] ^= 1
    altered.write_bytes(bytes(data))
    with pytest.raises(ShippedWeightsError, match="sha256"):
        load_shipped(altered, PROFILE["weights_sha256"], "how")
    with pytest.raises(ShippedWeightsError, match="missing"):
        load_shipped(tmp_path / "absent.safetensors", PROFILE["weights_sha256"], "how")


def test_sparse_token_rows_round_trip_exactly_and_refuse_unused_weights():
    state = {"emb.token_embedding.weight": torch.randn(50, 4).half().float(), "lin.weight": torch.randn(3, 3).half().float()}
    ids = torch.tensor([0, 7, 49])
    with pytest.raises(ShippedWeightsError, match="non-zero rows"):
        pack({"m": state}, ids)
    kept = used_rows_only(state, ids)
    back = unpack(pack({"m": kept}, ids), "m", vocab_size=50)
    assert all(torch.equal(back[k], kept[k]) for k in kept)
    assert torch.equal(back["emb.token_embedding.weight"][ids], state["emb.token_embedding.weight"][ids])


def test_grammar_counts_and_captions_parse_back():
    scenes = all_scenes()
    assert len(scenes) == 1260 and sum(s.kind == "one" for s in scenes) == 180
    assert parse_caption("a small blue square above a green triangle").second.shape == "triangle"
    with pytest.raises(ValueError):
        parse_caption("a purple circle on the left")


def test_shipped_caption_sets_are_the_generator_s_disjoint_500s(tmp_path):
    for path in write_caption_sets(tmp_path):
        assert path.read_bytes() == (PROFILE_DIR / "testbed" / path.name).read_bytes(), path.name
    val, cal = caption_sets()
    assert len(val) == len(cal) == 500 and not set(val) & set(cal)


def _one_attribute_changes(scene):
    used = {scene.first.colour} | ({scene.second.colour} if scene.second else set())
    out = [replace(scene, first=replace(scene.first, colour=c)) for c in COLOURS if c not in used]
    out += [replace(scene, first=replace(scene.first, shape=x)) for x in SHAPES if x != scene.first.shape]
    out += [replace(scene, first=replace(scene.first, size=z)) for z in SIZES if z != scene.first.size]
    if scene.second:
        out += [replace(scene, second=replace(scene.second, shape=x)) for x in SHAPES if x != scene.second.shape]
        out += [replace(scene, relation=r) for r in RELATIONS if r != scene.relation]
    else:
        out += [replace(scene, position=p) for p in POSITIONS if p != scene.position]
    return out


def test_checker_accepts_true_captions_and_rejects_one_attribute_changes():
    scenes = all_scenes()
    val, _ = caption_sets()
    sample = random.Random(0).sample(val, 200)
    accepted = [judge_scene(scenes[i], render(scenes[i], i))["all"] for i in sample]
    assert np.mean(accepted) == 1.0
    wrong = [judge_scene(v, render(scenes[i], i))["all"] for i in sample for v in _one_attribute_changes(scenes[i])]
    assert len(wrong) > 1000 and np.mean(wrong) <= 0.05
    red = parse_caption("a large red circle on the left")
    assert not judge_scene(replace(red, first=replace(red.first, colour="blue")), render(red, 1))["colour"]


def test_testbed_clip_of_real_scenes_beats_shuffled_captions():
    from testbed.scorer import load_scorer

    frame = pd.read_csv(PROFILE_DIR / "testbed" / "captions.tsv", sep="\t").iloc[:100]
    images = [render(parse_caption(c), int(i)) for c, i in zip(frame["caption"], frame["id"])]
    scorer = load_scorer()
    true = scorer.clip_scores(images, frame["caption"].tolist()).mean()
    shuffled = scorer.clip_scores(images, frame["caption"].sample(frac=1, random_state=0).tolist()).mean()
    assert true > shuffled + 5


def test_training_loss_falls_and_a_killed_stage_resumes_exactly(tmp_path):
    from testbed.train import Trainer, TrainingPlan, load_profile_config

    config = load_profile_config(PROFILE_DIR / "testbed.json")
    plan = replace(TrainingPlan(), clip_steps=24, clip_batch=32, checkpoint_every=8)
    straight = Trainer(tmp_path / "a", config, 5, plan, show_progress=False, log=lambda m: None).train_clip("clip_1")
    losses = np.asarray(straight["losses"])
    assert losses[-4:].mean() < losses[:4].mean() - 0.3

    killed = Trainer(tmp_path / "b", config, 5, plan, show_progress=False, log=lambda m: None)
    original = killed._loop

    def dies_at_step_13(stage, total, modules, optimizer, step_fn, lr, extra=None):
        def step(s, gen, rng):
            if s == 13:
                raise KeyboardInterrupt
            return step_fn(s, gen, rng)
        return original(stage, total, modules, optimizer, step, lr, extra)

    killed._loop = dies_at_step_13
    with pytest.raises(KeyboardInterrupt):
        killed.train_clip("clip_1")
    assert (tmp_path / "b" / "clip_1.ckpt.pt").is_file() and not (tmp_path / "b" / "clip_1.pt").exists()
    resumed = Trainer(tmp_path / "b", config, 5, plan, show_progress=False, log=lambda m: None).train_clip("clip_1")
    assert resumed["losses"] == straight["losses"]
    assert all(torch.equal(resumed["state"][k], straight["state"][k]) for k in straight["state"])


@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
    """The default run's study (FP32 + w8a8, performance + accuracy), at 2 captions and 1 calibration prompt."""
    from harness.cli import main

    out = tmp_path_factory.mktemp("study")
    code = main(["study", "--recipes", "fp32,w8a8", "--backends", "torch", "--mode", "both", "--max-samples", "2",
                 "--num-prompts", "1", "--output", str(out), "--cache-dir", str(out / "cache")])
    return code, out


def test_study_writes_every_file_and_a_table_with_numbers(small_study):
    code, out = small_study
    assert code == 0
    for name in ("study.md", "study.csv", "study.json", "quality_vs_size.png", "sqnr_heatmap.png", "grid.png"):
        assert (out / name).is_file(), name
    rows = {(r["recipe"], r["backend"]): r for r in json.loads((out / "study.json").read_text())["rows"]}
    fp32, w8a8 = rows[("fp32", "torch")], rows[("w8a8", "torch")]
    for row in (fp32, w8a8):
        assert row["error"] is None and row["n_images"] == 2 and row["images_per_s"] > 0
        assert isinstance(row["testbed_clip"], float) and 0 <= row["caption_accuracy"] <= 1
    assert 40 < w8a8["unet_percent_of_fp16"] < 60 and w8a8["sqnr_db"]["unet"] > 5 and np.isfinite(w8a8["psnr_db"])
    assert w8a8["delta_vs_fp32"]["caption_accuracy"]["n"] == 2
    table = pd.read_csv(out / "study.csv")
    assert list(table["recipe"]) == ["fp32", "w8a8"] and table["testbed-CLIP"].notna().all()


def test_study_resumes_and_reports_a_pair_that_cannot_run(small_study):
    from harness.cli import main

    _, out = small_study
    copy = out.parent / "study-copy"
    shutil.copytree(out, copy)
    before = (copy / "runs" / "fp32-torch" / "run.json").stat().st_mtime_ns
    code = main(["study", "--recipes", "w8a8-per-step", "--backends", "ort", "--max-samples", "2",
                 "--num-prompts", "1", "--output", str(copy), "--cache-dir", str(out / "cache")])
    assert code == 1
    assert (copy / "runs" / "fp32-torch" / "run.json").stat().st_mtime_ns == before  # the reference is reused
    [row] = json.loads((copy / "study.json").read_text())["rows"]
    assert (row["recipe"], row["backend"]) == ("w8a8-per-step", "ort") and "timestep-ranged" in row["error"]
    assert "timestep-ranged" in (copy / "study.md").read_text()
    assert main(["study", "--recipes", "w8a8", "--backends", "torch", "--max-samples", "3", "--output", str(copy)]) == 2


@pytest.mark.parametrize("flags, message", [
    (["--recipes", "fp32,nope"], "--recipes: recipe 'nope' is neither a file nor a built-in recipe"),
    (["--backends", "tensorrt9"], "tensorrt9"),
    (["--recipes", "w8a8,w8a8"], "--recipes names one twice"),
    (["--max-samples", "1"], "--max-samples: must be >= 2, got 1"),
])
def test_study_bad_input_is_one_line_error_before_anything_runs(tmp_path, capsys, flags, message):
    from harness.cli import main

    assert main(["study", "--output", str(tmp_path / "s"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "s").exists()


def test_the_study_table_gives_mlperf_verdict_off_the_testbed(tmp_path):
    """On real SDXL a study of the mixed-precision recipes is the FID/CLIP target check: the verdict column
    (accuracy.json's) says which configurations sit inside MLPerf's window."""
    from harness.study import StudyRow, table_rows

    rows = [StudyRow("fp32", "torch", tmp_path, metrics={"fid": 23.1, "clip_score": 31.8, "verdict": "PASS"}),
            StudyRow("mixed-precision-dp-51.5", "torch", tmp_path,
                     metrics={"fid": 24.0, "clip_score": 31.5, "verdict": "FAIL"}),
            StudyRow("w4a8", "torch", tmp_path, error="calibration failed")]
    header, cells = table_rows(rows)
    column = header.index("MLPerf verdict")
    assert [c[column] for c in cells] == ["PASS", "FAIL", "-"]
