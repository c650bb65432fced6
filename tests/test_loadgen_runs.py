"""Real LoadGen runs through the CLI: null backend VALID in every scenario, tiny end to end."""

import json
from pathlib import Path

import pytest

from harness.cli import main

NULL_CONF = Path(__file__).parent / "data" / "null_valid_user.conf"


def _run(tmp_path, *flags) -> dict:
    out = tmp_path / "run"
    assert main(["run", "--profile", "tiny", "--output", str(out), *flags]) == 0
    return json.loads((out / "run.json").read_text())


@pytest.mark.parametrize("scenario, extra", [
    ("Offline", ["--max-batchsize", "8"]),
    ("Server", ["--max-batchsize", "4", "--threads", "2"]),
    ("SingleStream", []),
])
def test_null_backend_is_valid(tmp_path, scenario, extra):
    record = _run(tmp_path, "--backend", "null", "--scenario", scenario,
                  "--user-conf", str(NULL_CONF), *extra)
    (test,) = record["tests"]
    assert record["status"] == "completed" and test["validity"] == "VALID", test
    assert test["loadgen_errors"] == [] and test["sut"]["failed_samples"] == 0
    assert record["image_size"] == 256 and record["random_weights"] is True and record["compliant"] is False
    minimum = {"Offline": 64, "Server": 500, "SingleStream": 100}[scenario]
    assert test["samples"] >= minimum and test["sut"]["samples"] >= minimum
    if scenario == "Offline":
        assert max(int(k) for k in test["sut"]["batch_sizes"]) == 8  # the one query is cut into full batches
    timing = test["sut"]["timing_ms"]
    if scenario == "SingleStream":
        assert test["sut"]["batch_sizes"].keys() == {"1"} and test["early_stopping_latency_s"] > 0
        # one query at a time: LoadGen's latency holds the SUT's wait and work, and little else
        sut_ms = timing["queue_wait_per_sample"]["mean"] + timing["service_per_batch"]["mean"]
        assert 0 < sut_ms <= test["mean_latency_s"] * 1e3 <= sut_ms + 5, (timing, test["mean_latency_s"])
    else:
        assert test["qps"] > 0


def test_tiny_offline_performance_and_accuracy(tmp_path, capsys):
    # two samples, one batch of 2 per mode: each 256^2 image costs 20-40 s on the 2-core CI machines
    record = _run(tmp_path, "--mode", "both", "--max-samples", "2", "--count", "2", "--max-batchsize", "2",
                  "--save-images")
    perf, acc = record["tests"]
    assert perf["mode"] == "performance" and perf["qps"] > 0 and perf["samples"] >= 2
    assert acc["mode"] == "accuracy" and acc["samples"] == 2
    log = Path(acc["dir"]) / "mlperf_log_accuracy.json"
    entries = json.loads(log.read_text())
    assert sorted(e["qsl_idx"] for e in entries) == [0, 1]
    assert all(len(e["data"]) == 256 * 256 * 3 * 2 for e in entries)  # raw HWC uint8 bytes, hex
    # drawn here (no --latents), saved in the run directory so the children and a rerun use the same bytes
    assert record["latent"]["source"].startswith("drawn:") and (tmp_path / "run" / "latents.pt").is_file()
    assert record["dataset"]["rows"] == 2 and record["max_samples"] == 2
    assert "RANDOM WEIGHTS" in " ".join(record["non_compliance_reasons"])
    assert (Path(acc["dir"]) / "images" / "grid.png").is_file()
    table = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in table and "NOT COMPLIANT" in table and "samples/s" in table


@pytest.mark.parametrize("flags, message", [
    (["--dataset-path", "/nonexistent.tsv"], "captions file /nonexistent.tsv not found"),
    (["--profile", "sdxl"], "--profile sdxl needs --model-path"),
    (["--backend", "nope"], "unknown backend 'nope'"),
    (["--user-conf", "/nonexistent.conf"], "--user-conf /nonexistent.conf not found"),
    (["--latents", "/nonexistent.pt"], "latent file /nonexistent.pt not found"),
    (["--max-batchsize", "0"], "--max-batchsize: must be >= 1, got 0"),
    (["--count", "0"], "--count: must be >= 1, got 0"),
    (["--count", "-1"], "--count: must be >= 1, got -1"),
    (["--qps", "0"], "--qps: must be a positive number, got 0"),
    (["--qps", "-5"], "--qps: must be a positive number, got -5"),
    (["--time", "nan"], "--time: must be a positive number, got nan"),
    (["--max-samples", "0"], "--max-samples: must be >= 1, got 0"),
    (["--device", "tpu"], "--device tpu: use cpu, cuda or cuda:N"),
    (["--device", "cuda"], "--device cuda: no CUDA device"),
    (["--ep", "qnn"], "--ep qnn applies to --backend ort only"),
    (["--backend", "ort", "--dtype", "fp16"], "--backend ort runs fp32 ONNX graphs on the CPU"),
    (["--timesteps", "single"], "--timesteps applies to --recipe only"),
    (["--ort-threads", "2"], "--ort-threads applies to --backend ort only"),
    (["--backend", "ort", "--ort-threads", "0"], "--ort-threads must be >= 1"),
    (["--recipe", "w8a8", "--encodings", "e.json"], "not both"),
    (["--recipe", "w8a8", "--num-prompts", "0"], "--num-prompts: must be >= 1, got 0"),
    (["--recipe", "nope"], "recipe 'nope' is neither a file nor a built-in recipe"),
    (["--recipe", "w8a8", "--timesteps", "every"], "use all, single, uniform:K, qdiff:K, ndtc[:MEAN,STD], psnr:K or list:T1,T2,..."),
    (["--recipe", "w8a8", "--profile", "sdxl-random"], "profile sdxl-random needs --calibration-captions"),
])
def test_bad_input_is_one_line_error(tmp_path, capsys, flags, message):
    assert main(["run", "--output", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "run" / "run.json").exists()


def test_run_flags_reproduce_the_config():
    """``run_flags`` (the command line the submission README records) parses back to the same RunConfig."""
    from harness.cli import build_parser
    from harness.run_command import config_from_args, run_flags

    given = ["run", "--recipe", "w8a8", "--num-prompts", "2", "--timesteps", "single", "--backend", "ort",
             "--ort-threads", "1", "--time", "5", "--save-images", "--mode", "both", "--no-warmup",
             "--max-batchsize", "4", "--output", "x"]
    config = config_from_args(build_parser().parse_args(given)).to_dict()
    again = config_from_args(build_parser().parse_args(["run", *run_flags(config)])).to_dict()
    assert again.pop("output") != config.pop("output")  # the run directory is the one thing left out
    assert again == config
    assert "--time" in run_flags(config) and "--save-images" in run_flags(config)
