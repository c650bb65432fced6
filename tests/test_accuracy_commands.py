"""End to end: ``accuracy``, ``fid-stats``, ``compare`` and the spine's ``evaluate_run`` on generated logs.

Networks are random (``--random-weights``) and images 64x64 with 3 per log: on 2 CPU cores each
Inception/CLIP pass costs seconds per image, and the mechanics do not depend on the count. The
tests that compute an FID are marked ``slow``: MLPerf's ``scipy.linalg.sqrtm`` of a 2048x2048
product (twice when it is singular, as it is with few images) takes minutes on a loaded 2-core box.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from accuracy_helpers import random_images, write_accuracy_log, write_captions_tsv, write_run_json
from accuracy_helpers.fixtures import random_clip, random_inception  # noqa: F401 (fixtures)

from accuracy.evaluators import Evaluators
from accuracy.log_reader import AccuracyLogError
from accuracy.report import AuditOptions, audit_log, evaluate_run
from harness.cli import main

SIZE = 64


@pytest.fixture
def runs(tmp_path):
    """A 'quantized' run and a 'reference' run of 3 images (+1 duplicate entry) sharing captions and latent."""
    captions = write_captions_tsv(tmp_path / "captions.tsv", 10)
    images = [np.clip(im, 10, 240) for im in random_images(3, SIZE, seed=5)]
    quantized, reference = tmp_path / "q", tmp_path / "r"
    write_run_json(quantized, SIZE, dataset_path=str(captions))
    write_run_json(reference, SIZE, dataset_path=str(captions))
    write_accuracy_log(quantized / "accuracy" / "mlperf_log_accuracy.json",
                       [(4, images[0]), (1, images[1]), (4, images[2]), (7, images[2])])
    # reference: idx 4 identical, idx 1 offset by 5 (PSNR 20 log10(255/5)), idx 7 differs; other order
    write_accuracy_log(reference / "accuracy" / "mlperf_log_accuracy.json",
                       [(7, images[0]), (1, images[1] + 5), (4, images[0])])
    return {"q": quantized, "r": reference, "captions": captions, "images": images, "tmp": tmp_path}


@pytest.mark.slow
def test_accuracy_command_end_to_end_with_random_weights(runs, no_weights, random_inception, random_clip, capsys):
    tmp = runs["tmp"]
    log = runs["q"] / "accuracy" / "mlperf_log_accuracy.json"
    assert main(["fid-stats", "--log", str(log), "--output", str(tmp / "own.npz"), "--random-weights"]) == 0
    assert "NOT COMPARABLE" in capsys.readouterr().out
    ids = tmp / "ids.txt"
    ids.write_text("7\n2\n4\n")
    assert main(["accuracy", "--log", str(runs["q"]), "--statistics-path", str(tmp / "own.npz"), "--random-weights",
                 "--output", str(tmp / "out"), "--compliance-images-path", str(tmp / "ci"), "--ids-path", str(ids)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp / "out" / "accuracy.json").read_text())
    # FID of a set against its own statistics: 0 up to the 1e-6 diagonal regulariser on a rank-2 covariance
    assert abs(result["fid"]) < 2 * 2048 * 1e-6 + 1e-6
    # CLIP: the mean of per-image 100*cos for the first entry of each qsl_idx, captions by row
    expected_clip = np.mean(random_clip(runs["images"], ["a photo of object 4", "a photo of object 1", "a photo of object 7"]))
    assert result["clip_score"] == pytest.approx(expected_clip, abs=1e-4)
    assert (result["n_images"], result["n_entries"], result["duplicates_skipped"]) == (3, 4, 1)
    assert result["image_size"] == SIZE and "run.json" in result["image_size_source"]
    assert result["verdict"] == "N/A" and result["comparable"] is False and result["random_weights"] is True
    assert result["window"]["fid"] == [23.01085758, 23.95007626]
    assert result["weights"]["inception"]["random"] and result["weights"]["clip"]["random"]
    txt = (tmp / "out" / "accuracy.txt").read_text().splitlines()
    assert txt[0].startswith("# NOT COMPARABLE")
    assert txt[1] == f"Accuracy Results: {{'FID_SCORE': '{result['fid']}', 'CLIP_SCORE': '{result['clip_score']}'}}"
    assert txt[2] == f"hash={result['log']['sha256']}"
    assert "!!! NOT COMPARABLE" in printed and txt[1] in printed
    assert sorted(p.name for p in (tmp / "ci").iterdir()) == ["4.png", "7.png", "captions.txt"]
    assert (tmp / "ci" / "captions.txt").read_text() == "7  a photo of object 7\n2  a photo of object 2\n4  a photo of object 4\n"
    assert result["compliance_images"]["missing"] == [2]


@pytest.mark.slow
def test_compare_command_with_random_weights_writes_fid_and_clip_difference(runs, no_weights, random_inception,
                                                                             random_clip, capsys):
    out = runs["tmp"] / "cmp"
    assert main(["compare", "--log", str(runs["q"]), "--reference-log", str(runs["r"]), "--output", str(out),
                 "--random-weights"]) == 0
    summary = json.loads((out / "compare.json").read_text())
    assert summary["fid_between_sets"] is not None and summary["clip_score_difference"] is not None
    assert summary["comparable"] is False and "NOT COMPARABLE" in capsys.readouterr().out


def test_accuracy_command_clip_and_compliance_images_without_fid(runs, no_weights, random_clip, capsys):
    tmp = runs["tmp"]
    ids = tmp / "ids.txt"
    ids.write_text("7\n2\n4\n")
    assert main(["accuracy", "--log", str(runs["q"]), "--random-weights", "--output", str(tmp / "out"),
                 "--compliance-images-path", str(tmp / "ci"), "--ids-path", str(ids)]) == 0
    result = json.loads((tmp / "out" / "accuracy.json").read_text())
    expected_clip = np.mean(random_clip(runs["images"], ["a photo of object 4", "a photo of object 1", "a photo of object 7"]))
    assert result["clip_score"] == pytest.approx(expected_clip, abs=1e-4)
    assert result["fid"] is None and "val2014.npz" in result["fid_note"]
    assert (result["n_images"], result["n_entries"], result["duplicates_skipped"]) == (3, 4, 1)
    assert result["verdict"] == "N/A" and result["comparable"] is False
    txt = (tmp / "out" / "accuracy.txt").read_text().splitlines()
    assert txt[0].startswith("# NOT COMPARABLE") and txt[2] == f"hash={result['log']['sha256']}"
    assert txt[1] == f"Accuracy Results: {{'FID_SCORE': 'N/A', 'CLIP_SCORE': '{result['clip_score']}'}}"
    assert sorted(p.name for p in (tmp / "ci").iterdir()) == ["4.png", "7.png", "captions.txt"]
    assert (tmp / "ci" / "captions.txt").read_text() == "7  a photo of object 7\n2  a photo of object 2\n4  a photo of object 4\n"


def test_compare_pairs_images_by_qsl_idx_with_known_psnr(runs):
    from accuracy.compare import compare_logs
    out = runs["tmp"] / "cmp"
    compare_logs(runs["q"] / "accuracy" / "mlperf_log_accuracy.json", runs["r"] / "accuracy" / "mlperf_log_accuracy.json",
                 output_dir=out, evaluators=Evaluators(fid_note="no inception", clip_note="no clip"))
    with open(out / "per_image.csv") as handle:
        rows = {int(r["qsl_idx"]): r for r in csv.DictReader(handle)}
    assert set(rows) == {1, 4, 7}
    assert rows[4]["psnr"] == "inf" and float(rows[4]["ssim"]) == pytest.approx(1.0)
    assert float(rows[1]["psnr"]) == pytest.approx(20 * math.log10(255 / 5), abs=1e-4)
    summary = json.loads((out / "compare.json").read_text())
    assert summary["pairs"] == 3 and summary["psnr_db"]["identical_images"] == 1
    assert summary["psnr_db"]["min"] == pytest.approx(float(rows[7]["psnr"]))
    assert summary["psnr_db"]["mean"] == pytest.approx((float(rows[1]["psnr"]) + float(rows[7]["psnr"])) / 2)
    assert summary["ssim"]["mean"] == pytest.approx(np.mean([float(r["ssim"]) for r in rows.values()]))
    assert summary["fid_between_sets"] is None and summary["fid_between_sets_note"] == "no inception"
    assert (summary["unpaired_quantized"], summary["unpaired_reference"]) == (0, 0)
    assert (out / "grid.png").stat().st_size > 0 and (out / "psnr_histogram.png").stat().st_size > 0
    assert not list(out.glob(".reference-images-*"))  # the spill file is removed


def test_compare_refuses_runs_with_different_latents(runs):
    write_run_json(runs["r"], SIZE, dataset_path=str(runs["captions"]), latent_sha256="x" * 64)
    assert main(["compare", "--log", str(runs["q"]), "--reference-log", str(runs["r"]), "--output",
                 str(runs["tmp"] / "cmp")]) == 2


def test_evaluate_run_without_weights_completes_with_na_and_fidelity(runs, no_weights, capsys):
    row = evaluate_run(runs["q"], reference_run=runs["r"])
    printed = capsys.readouterr().out
    assert row["fid"] is None and row["clip_score"] is None and row["verdict"] == "N/A" and "error" not in row
    result = json.loads((runs["q"] / "accuracy" / "accuracy.json").read_text())
    assert "val2014.npz" in result["fid_note"]
    assert "ViT-B-32" in result["clip_score_note"] and "--clip-weights" in result["clip_score_note"]
    assert "FID_SCORE': 'N/A'" in (runs["q"] / "accuracy" / "accuracy.txt").read_text()
    assert row["psnr_mean_db"] is not None and row["ssim_mean"] is not None
    assert (runs["q"] / "compare" / "compare.json").is_file()
    assert "CLIP score unavailable" in printed or "clip score unavailable" in printed


def test_evaluate_run_reports_a_corrupt_log_instead_of_raising(runs, no_weights):
    log = runs["q"] / "accuracy" / "mlperf_log_accuracy.json"
    log.write_bytes(log.read_bytes()[:-100])
    row = evaluate_run(runs["q"], quiet=True)
    assert "truncated or corrupt JSON" in row["error"]


def test_accuracy_command_without_weights_is_a_one_line_error(runs, no_weights, capsys):
    assert main(["accuracy", "--log", str(runs["q"]), "--statistics-path", str(runs["tmp"] / "absent.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and ("not found" in err)


def test_logs_without_run_json_are_taken_as_mlperf_1024(tmp_path):
    log = write_accuracy_log(tmp_path / "mlperf_log_accuracy.json", [(0, random_images(1, SIZE)[0])])
    with pytest.raises(AccuracyLogError, match=r"holds 12288 bytes \(64x64x3.*expected 3145728"):
        audit_log(log, options=AuditOptions(missing="na"), evaluators=Evaluators())


def test_na_when_fewer_than_5000_images_even_at_1024(tmp_path):
    write_run_json(tmp_path, 1024, dataset_path=str(write_captions_tsv(tmp_path / "c.tsv", 3)))
    log = write_accuracy_log(tmp_path / "accuracy" / "mlperf_log_accuracy.json",
                             [(0, np.zeros((1024, 1024, 3), np.uint8))])
    result = audit_log(log, options=AuditOptions(missing="na"), evaluators=Evaluators(fid_note="x", clip_note="y"))
    assert result["verdict"] == "N/A" and result["verdict_reason"].startswith("1 of 5000 images")
