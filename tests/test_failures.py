"""Failures a user meets in a real job: signals, reused folders, bad files, broken numerics (issue 14).

Each bad input must fail in one line with exit code 2 before any model is built: the tests replace
the function that starts a LoadGen/calibration child with one that fails the test, so "no model was
built" is asserted, not inferred from a time.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import harness.run_command as run_command
from harness.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_child(monkeypatch):
    """Any attempt to start a model process fails the test."""

    def refuse(name, *_args):
        raise AssertionError(f"a {name} process was started: the input should have been refused before")

    monkeypatch.setattr(run_command, "_call_in_child", refuse)


def _one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


# -- signals -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig, message, code", [
    (signal.SIGTERM, "interrupted by SIGTERM", 143),  # timeout(1), a scheduler: to the parent only
    (signal.SIGINT, "interrupted by the user (Ctrl-C)", 130),  # a terminal's Ctrl-C: to the whole process group
])
def test_a_signal_marks_the_run_interrupted_and_loadgen_finishes_its_logs(tmp_path, sig, message, code):
    """The job is ended mid-test: run.json says how, LoadGen's logs are whole, the exit code is the shell's."""
    out = tmp_path / "run"
    env = dict(os.environ, SDXL_BENCH_NO_PROGRESS="1")
    process = subprocess.Popen([sys.executable, "-m", "harness", "run", "--profile", "tiny", "--count", "64",
                                "--no-warmup", "--output", str(out)], cwd=ROOT, env=env, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               # a background job of a non-interactive shell (CI, nohup ... &) inherits SIGINT
                               # ignored, and Python then keeps ignoring Ctrl-C: give the run a terminal's default
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    detail = out / "performance" / "mlperf_log_detail.txt"
    deadline = time.time() + 240
    while not (detail.is_file() and detail.stat().st_size > 0) and process.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert process.poll() is None, process.communicate()
    time.sleep(2)  # the test is under way: LoadGen has issued its query
    if sig == signal.SIGINT:
        os.killpg(process.pid, sig)
    else:
        process.send_signal(sig)
    _, err = process.communicate(timeout=180)
    assert process.returncode == code, err
    assert message in err
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "interrupted" and record["error"] == message
    assert record["finished"] is not None
    assert (out / "performance" / "mlperf_log_summary.txt").stat().st_size > 100  # the child passed it on


def test_termination_signal_names_and_exit_codes():
    from sdxl.interrupts import Interrupted, describe, exit_code

    assert (exit_code(KeyboardInterrupt()), describe(KeyboardInterrupt())) == (130, "interrupted by the user (Ctrl-C)")
    assert (exit_code(Interrupted("SIGTERM")), describe(Interrupted("SIGTERM"))) == (143, "interrupted by SIGTERM")


# -- reused and unwritable output folders ---------------------------------------------------------------

def test_a_non_empty_output_is_refused_and_overwrite_replaces_only_a_run_directory(tmp_path, capsys, no_child):
    run_dir = tmp_path / "run"
    (run_dir / "accuracy").mkdir(parents=True)
    (run_dir / "run.json").write_text("{}")
    (run_dir / "accuracy" / "mlperf_log_accuracy.json").write_text("[]")
    base = ["run", "--profile", "tiny", "--backend", "null", "--output", str(run_dir)]
    err = _one_line_error(capsys, main(base))
    assert "is not empty" in err and "--overwrite" in err
    assert (run_dir / "accuracy" / "mlperf_log_accuracy.json").is_file()  # nothing was touched

    with pytest.raises(AssertionError, match="process was started"):  # accepted: the old run is cleared first
        main(base + ["--overwrite"])
    assert not (run_dir / "accuracy").exists()

    other = tmp_path / "not-a-run"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    err = _one_line_error(capsys, main(["run", "--profile", "tiny", "--output", str(other), "--overwrite"]))
    assert "holds no run.json" in err and (other / "thesis.tex").read_text() == "precious"


def test_an_output_that_is_a_file_or_unwritable_fails_before_any_work(tmp_path, capsys, no_child):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    err = _one_line_error(capsys, main(["run", "--profile", "tiny", "--output", str(a_file)]))
    assert "is a file" in err
    # /proc takes no new directories, even from root (a read-only mount behaves the same)
    unwritable = "/proc/sdxl-bench-unwritable/out"
    for command in (["run", "--profile", "tiny", "--output", unwritable],
                    ["calibrate", "--profile", "tiny", "--recipe", "w8a8", "--output", unwritable + "/e.json"],
                    ["accuracy", "--log", str(tmp_path / "log.json"), "--output", unwritable],
                    ["compare", "--log", "q", "--reference-log", "r", "--output", unwritable],
                    ["study", "--profile", "tiny", "--output", unwritable]):
        (tmp_path / "log.json").write_text("[]")
        err = _one_line_error(capsys, main(command))
        assert "cannot write there" in err, command


def test_outputs_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    from sdxl.io import write_json_atomic

    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644


# -- run.sh never deletes a venv -------------------------------------------------------------------------

def test_run_sh_reports_a_broken_venv_and_keeps_it(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("#!/bin/sh\nexit 1\n")  # a base interpreter that moved away
    (venv / "bin" / "python").chmod(0o755)
    (venv / "lib-that-took-an-hour").write_text("x")
    done = subprocess.run([str(ROOT / "run.sh"), "help"], env=dict(os.environ, SDXL_BENCH_VENV=str(venv)),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "--rebuild-venv" in done.stderr and "does not start" in done.stderr
    assert (venv / "lib-that-took-an-hour").is_file()


# -- bad files: one line, before the build ------------------------------------------------------------

def _latent_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = torch.randn(1, 4, 32, 32)
    torch.save(good, tmp_path / "good.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((tmp_path / "good.pt").read_bytes()[:300])
    (tmp_path / "text.pt").write_text("not a tensor\n")
    (tmp_path / "empty.pt").write_bytes(b"")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps(Evil()))
    nan = good.clone()
    nan[0, 0, 0, 0] = float("nan")
    torch.save(nan, tmp_path / "nan.pt")
    return {"truncated": (truncated, "not a tensor file torch can load safely"),
            "text": (tmp_path / "text.pt", "not a tensor file torch can load safely"),
            "empty": (tmp_path / "empty.pt", "not a tensor file torch can load safely"),
            "evil": (tmp_path / "evil.pt", "not a tensor file torch can load safely"),
            "nan": (tmp_path / "nan.pt", "holds NaN or Inf values")}


@pytest.mark.parametrize("kind", ["truncated", "text", "empty", "evil", "nan"])
def test_unreadable_or_non_finite_latents_are_one_line(tmp_path, capsys, no_child, kind):
    path, message = _latent_files(tmp_path)[kind]
    err = _one_line_error(capsys, main(["run", "--profile", "tiny", "--latents", str(path),
                                        "--output", str(tmp_path / "run")]))
    assert message in err and "weights_only" not in err


def _encodings_file(tmp_path: Path) -> Path:
    from quant.encodings import Encodings

    encodings = Encodings(model={"profile": "tiny", "fingerprint": "f" * 16})
    return encodings.save(tmp_path / "enc.json")


def test_bad_encodings_are_one_line_before_the_build(tmp_path, capsys, no_child):
    wrong_model = _encodings_file(tmp_path)
    truncated = tmp_path / "truncated.json"
    truncated.write_text(wrong_model.read_text()[:40])
    cases = [(tmp_path / "missing.json", "not found"), (truncated, "is not valid JSON"),
             (wrong_model, "was calibrated for model ffffffffffffffff")]
    for path, message in cases:
        err = _one_line_error(capsys, main(["run", "--profile", "tiny", "--encodings", str(path),
                                            "--output", str(tmp_path / "run")]))
        assert message in err and "allow_fingerprint_mismatch" not in err, err
    err = _one_line_error(capsys, main(["run", "--profile", "tiny", "--backend", "null", "--encodings",
                                        str(wrong_model), "--output", str(tmp_path / "run")]))
    assert "the null backend runs no model" in err


# -- broken numerics are counted and flagged -------------------------------------------------------------

def test_nan_images_are_counted_and_flagged_in_the_table(tmp_path, monkeypatch):
    from backends import BackendOptions, create_backend
    from harness.results import RunRecord, print_results_table
    from sdxl.models import load_tokenizers, model_spec
    from sdxl.pipeline import SDXLPipeline
    from sdxl.tokenizers import tokenize

    spec = model_spec("tiny")
    backend = create_backend("null", spec, BackendOptions())
    monkeypatch.setattr(backend, "decode", lambda latents: torch.full((latents.shape[0], 3, 256, 256), float("nan")))
    tokenizers = load_tokenizers(spec)
    pipeline = SDXLPipeline(backend, spec, tokenizers, steps=2)
    ids = [tokenize(t, ["a red circle", "a blue square"]) for t in tokenizers]
    images = pipeline.generate(*ids, torch.randn(1, 4, spec.latent_size, spec.latent_size))
    assert pipeline.nonfinite_images == 2 and not images.any()  # NaN converts to black

    record = RunRecord(tmp_path, {"profile": "tiny", "backend": {"name": "torch", "dtype": "fp32", "device": "cpu"},
                                  "status": "completed"})
    record.add_test({"scenario": "Offline", "mode": "accuracy", "dir": "x", "nonfinite_images": 2})
    assert json.loads((tmp_path / "run.json").read_text())["nonfinite_images"] == 2
    import io

    stream = io.StringIO()
    print_results_table([record], stream)
    assert "2 image(s) decoded with NaN/Inf pixels" in stream.getvalue()


# -- compare writes whole files or none ------------------------------------------------------------------

def test_compare_with_a_truncated_log_leaves_no_partial_per_image_csv(tmp_path, capsys):
    from accuracy_helpers import random_images, write_accuracy_log, write_captions_tsv, write_run_json

    captions = write_captions_tsv(tmp_path / "captions.tsv", 10)
    images = random_images(3, 64, seed=1)
    for name in ("q", "r"):
        write_run_json(tmp_path / name, 64, dataset_path=str(captions))
        write_accuracy_log(tmp_path / name / "accuracy" / "mlperf_log_accuracy.json", enumerate(images))
    log = tmp_path / "q" / "accuracy" / "mlperf_log_accuracy.json"
    log.write_text(log.read_text()[: len(log.read_text()) * 2 // 3])  # cut mid-entry
    out = tmp_path / "cmp"
    code = main(["compare", "--log", str(tmp_path / "q"), "--reference-log", str(tmp_path / "r"),
                 "--output", str(out)])
    assert code == 2, capsys.readouterr().err
    assert not (out / "per_image.csv").exists() and not list(out.glob(".per_image*"))
    assert not (out / "compare.json").exists()


def test_a_corrupt_safetensors_in_model_path_is_one_line_naming_the_file_and_cause(tmp_path, capsys, no_child,
                                                                                   tiny_backend, tiny_tokenizers,
                                                                                   tiny_spec):
    from sdxl.checkpoints import save_checkpoint

    root = save_checkpoint(tiny_backend.components, tiny_tokenizers, tiny_spec.scheduler_config, tmp_path / "m",
                           "diffusers")
    weights = root / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])  # a download cut short
    capsys.readouterr()  # save_pretrained's own bars
    err = _one_line_error(capsys, main(["run", "--profile", "sdxl", "--model-path", str(root),
                                        "--output", str(tmp_path / "run")]))
    assert f"{weights}: not a readable safetensors file (" in err and "Error while deserializing" in err


# -- captions files ----------------------------------------------------------------------------------

def test_an_unbalanced_quote_that_merges_rows_is_one_line_naming_the_line(tmp_path):
    from sdxl.dataset import DatasetError, load_captions

    tsv = tmp_path / "c.tsv"
    tsv.write_text("id\tfile_name\tcaption\n1\ta.jpg\ta cat\n2\tb.jpg\t\"a dog\n3\tc.jpg\ta bird\n"
                   "4\td.jpg\ta fish\n5\te.jpg\ta cow\"\n")
    with pytest.raises(DatasetError, match=r"2 rows parsed from 5 data lines; the caption of row 1 \(line 3\) opens a quote"):
        load_captions(tsv)


def test_every_mlperf_caption_parses_unchanged():
    """MLPerf's 5000 captions, 8 of them CSV-quoted, pass the row-count check with pandas' default quoting."""
    from sdxl.dataset import load_captions

    path = ROOT.parent / "shared" / "mlperf" / "captions_source.tsv"
    if not path.is_file():
        pytest.skip("MLPerf's captions_source.tsv is not in ../shared/mlperf")
    frame = load_captions(path).frame
    raw = [line.split("\t") for line in path.read_text().splitlines()[1:]]
    assert len(frame) == len(raw) == 5000
    assert frame["id"].tolist() == [int(r[0]) for r in raw]
    expected = [r[2][1:-1].replace('""', '"') if r[2].startswith('"') else r[2] for r in raw]  # CSV unquoting
    assert sum(r[2].startswith('"') for r in raw) == 8
    assert frame["caption"].tolist() == expected


def test_a_non_utf8_captions_file_names_line_and_column(tmp_path):
    from sdxl.dataset import DatasetError, load_captions

    tsv = tmp_path / "c.tsv"
    tsv.write_bytes(b"id\tfile_name\tcaption\n1\ta.jpg\ta cat\n2\tb.jpg\ta caf\xe9 table\n")
    with pytest.raises(DatasetError, match=r"not UTF-8 at line 3 \(row 1, column caption\), byte 14 of the line \(0xe9\)"):
        load_captions(tsv)


# -- reports -----------------------------------------------------------------------------------------

def test_an_invalid_server_test_says_why():
    """LoadGen's own summary of an INVALID Server run (null SUT, 16 queries): its failed check and advice."""
    from harness.loadgen_results import invalid_reasons
    from harness.results import result_rows

    summary = Path(__file__).parent / "data" / "loadgen_server_invalid_summary.txt"
    reasons = invalid_reasons({"result_perf_constraints_met": True, "early_stopping_met": False}, summary)
    assert reasons == ["early stopping not met", "Would need to run at least 443 more queries"]
    record = run_command.RunRecord(Path("."), {"tests": [{"scenario": "Server", "mode": "performance", "dir": "d",
                                                          "validity": "INVALID", "invalid_reasons": reasons}]})
    assert result_rows(record)[0][4] == "INVALID (early stopping not met; Would need to run at least 443 more queries)"


def test_fp16_and_emulated_bf16_on_the_cpu_are_warned(monkeypatch):
    from sdxl import system_info

    monkeypatch.setattr(system_info, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert "~3x slower than fp32" in system_info.slow_dtype_warning("fp16", "cpu")
    assert "emulates bf16" in system_info.slow_dtype_warning("bf16", "cpu")
    assert system_info.slow_dtype_warning("fp16", "cuda") is None and system_info.slow_dtype_warning("fp32", "cpu") is None


def test_a_damaged_calibration_cache_chunk_is_captured_again(tmp_path, caplog):
    """A chunk damaged on disk is detected by its recorded sha256 and recaptured: the same encodings, no traceback."""
    flags = ["calibrate", "--profile", "tiny", "--recipe", "w8a8", "--num-prompts", "1", "--timesteps", "list:951",
             "--sqnr-samples", "0", "--cache-dir", str(tmp_path / "cache")]
    assert main([*flags, "--output", str(tmp_path / "first.json")]) == 0
    (chunk,) = (tmp_path / "cache").rglob("latents-00000.safetensors")
    data = bytearray(chunk.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in the tensor data: the file still parses
    chunk.write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        assert main([*flags, "--output", str(tmp_path / "again.json")]) == 0
    assert "latents-00000.safetensors is damaged" in caplog.text
    first, again = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("first", "again"))
    assert first["components"] == again["components"]


def test_image_size_flag_reads_a_log_copied_away_from_its_run_json(tmp_path, capsys):
    from accuracy_helpers import random_images, write_accuracy_log

    images = random_images(3, 64, seed=2)
    for name in ("q", "r"):
        write_accuracy_log(tmp_path / name / "mlperf_log_accuracy.json", enumerate(images))  # no run.json
    base = ["compare", "--log", str(tmp_path / "q" / "mlperf_log_accuracy.json"), "--reference-log",
            str(tmp_path / "r" / "mlperf_log_accuracy.json"), "--output", str(tmp_path / "cmp")]
    err = _one_line_error(capsys, main(base))
    assert "expected 3145728 (1024x1024x3 uint8)" in err and "--image-size N" in err
    assert main([*base, "--image-size", "64"]) == 0
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["psnr_db"]["identical_images"] == 3


def test_loading_an_sdxl_checkpoint_without_accelerate_prints_no_install_accelerate_warning(
        tmp_path, tiny_backend, tiny_tokenizers, tiny_spec):
    import importlib.util

    from sdxl.checkpoints import load_checkpoint_components, save_checkpoint
    from sdxl.models import model_spec

    if importlib.util.find_spec("accelerate") is not None:
        pytest.skip("accelerate is installed: diffusers' low-memory path applies and never warns")
    root = save_checkpoint(tiny_backend.components, tiny_tokenizers, tiny_spec.scheduler_config, tmp_path / "m",
                           "diffusers")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("diffusers").addHandler(handler)  # diffusers' own handler does not propagate
    try:
        load_checkpoint_components(model_spec("sdxl", root), torch.float32, show_progress=False)
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert not [m for m in records if "accelerate" in m], records
