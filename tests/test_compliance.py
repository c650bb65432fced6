"""Compliance audits: TEST01/TEST04 audit.config runs through LoadGen, and ``verify-compliance`` on them."""

import json
import shutil
from pathlib import Path

import pytest

from harness.cli import main
from harness.compliance import verify, verify_performance

NULL_CONF = Path(__file__).parent / "data" / "null_valid_user.conf"
# compliance/TEST01/stable-diffusion-xl/audit.config and compliance/TEST04/audit.config (mlcommons/inference)
TEST01_AUDIT = ("*.*.mode = 2\n*.*.accuracy_log_rng_seed = 720381539243781796\n"
                "*.*.accuracy_log_sampling_target = 128\n")
TEST04_AUDIT = ("*.*.mode = 2\n*.*.performance_issue_unique = 0\n*.*.performance_issue_same = 1\n"
                "*.*.performance_issue_same_index = 3\nstable-diffusion-xl.Offline.min_query_count = 500\n")


def _run(out: Path, *flags) -> dict:
    assert main(["run", "--profile", "tiny", "--output", str(out), "--backend", "null", "--user-conf", str(NULL_CONF),
                 "--max-batchsize", "8", *flags]) == 0
    return json.loads((out / "run.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A submission-style run (performance + accuracy) and its TEST01 audit run, null backend at 256^2."""
    root = tmp_path_factory.mktemp("compliance")
    audit = root / "TEST01.config"
    audit.write_text(TEST01_AUDIT)
    return root / "run", _run(root / "run", "--mode", "both"), root / "test01", _run(root / "test01", "--audit-conf",
                                                                                      str(audit))


def test_test01_audit_logs_sampled_responses_during_a_performance_run(runs):
    _, _, audit_dir, record = runs
    (test,) = record["tests"]
    assert test["mode"] == "performance" and test["validity"] == "VALID"
    entries = json.loads((Path(test["dir"]) / "mlperf_log_accuracy.json").read_text())
    assert 0 < len(entries) <= test["samples"] and all(len(e["data"]) == 256 * 256 * 3 * 2 for e in entries)
    assert record["loadgen"]["audit_conf"].endswith("TEST01.config")


def test_verify_test01_passes_identical_responses_and_catches_a_changed_byte(runs, tmp_path, capsys):
    run_dir, _, audit_dir, record = runs
    result = verify("TEST01", run_dir, audit_dir)
    accuracy = result["checks"]["accuracy"]
    assert accuracy["passed"], accuracy  # the null backend's black images: every logged response is equal
    assert "first-byte mismatches (MLPerf's python mode): 0" in accuracy["details"]
    assert (audit_dir / "TEST01" / "verify_accuracy.txt").read_text().endswith("TEST PASS\n")
    assert (audit_dir / "TEST01" / "verify_performance.txt").is_file()

    # the same audit with one response's first byte changed: MLPerf's check must fail, naming one mismatch
    log = Path(record["tests"][0]["dir"]) / "mlperf_log_accuracy.json"
    entries = json.loads(log.read_text())
    entries[0]["data"] = "01" + entries[0]["data"][2:]
    tampered = tmp_path / "mlperf_log_accuracy.json"
    tampered.write_text(json.dumps(entries))
    from harness.compliance import verify_test01_accuracy

    verdict = verify_test01_accuracy(Path(runs[1]["tests"][1]["dir"]) / "mlperf_log_accuracy.json", tampered, 256)
    assert not verdict.passed and "first-byte mismatches (MLPerf's python mode): 1" in verdict.lines
    assert verdict.text().endswith("TEST FAIL\n")

    # the command: one line per check, exit code 0/1 by the verdict
    assert main(["verify-compliance", "--test", "TEST01", "--run", str(run_dir), "--audit-run", str(audit_dir),
                 "--output", str(tmp_path / "out")]) in (0, 1)
    assert "TEST01 accuracy: PASS" in capsys.readouterr().out
    assert main(["verify-compliance", "--test", "TEST01", "--run", str(run_dir), "--audit-run", str(run_dir)]) == 2
    assert "was not run with --audit-conf" in capsys.readouterr().err


@pytest.fixture(scope="module")
def test04_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("test04")
    audit = root / "TEST04.config"
    audit.write_text(TEST04_AUDIT)
    return root / "run", _run(root / "run", "--audit-conf", str(audit))


def test_test04_audit_applies_its_model_specific_min_query_count(test04_run):
    """TEST04's ``stable-diffusion-xl.Offline.min_query_count = 500`` only takes effect when the SUT loads
    audit.config for the model (LoadGen re-reads it for model ``*``): the samples issued show it did."""
    (test,) = test04_run[1]["tests"]
    assert test["validity"] == "VALID" and test["samples"] >= 500, test


#: what no host tells: a submitter's --system-json (the to-do list names these fields)
SYSTEM_JSON = {"host_memory_configuration": "8x 3 GiB", "host_storage_type": "SSD", "host_networking": "Ethernet",
               "host_networking_topology": "N/A", "cooling": "air"}


def test_submission_tree_from_a_run_and_its_audits(runs, test04_run, tmp_path, capsys):
    from harness.submission_rules import ROUNDS, check_tree

    run_dir, _, test01_dir, _ = runs
    ids = tmp_path / "sample_ids.txt"
    ids.write_text("3\n1\n")
    system_json = tmp_path / "system.json"
    system_json.write_text(json.dumps(SYSTEM_JSON))
    flags = ["submission", "--runs", str(run_dir), "--audits", str(test01_dir), str(test04_run[0]),
             "--submitter", "acme", "--system", "epyc2c", "--system-type", "edge", "--ids-path", str(ids),
             "--output", str(tmp_path / "sub")]
    # random weights, 256^2 images, short settings: refused for the closed division, with the reasons
    assert main(flags) == 2
    assert "is not a closed-division run: RANDOM WEIGHTS" in capsys.readouterr().err
    main([*flags, "--division", "open", "--system-json", str(system_json)])  # exit code: the verdicts, noise moves them
    printed = capsys.readouterr().out
    root = tmp_path / "sub" / "open" / "acme"
    # v6.1 (the default round): everything of a scenario under results/, TEST0x/ included; src/ for the code
    scenario = root / "results" / "epyc2c" / "stable-diffusion-xl" / "Offline"
    for path in ("performance/run_1/mlperf_log_summary.txt", "performance/run_1/mlperf_log_detail.txt",
                 "accuracy/mlperf_log_accuracy.json", "accuracy/accuracy.txt", "accuracy/mlperf_log_summary.txt",
                 "accuracy/images/3.png", "accuracy/images/1.png", "measurements.json", "user.conf", "README.md",
                 "TEST01/verify_accuracy.txt", "TEST01/verify_performance.txt", "TEST01/accuracy/accuracy.txt",
                 "TEST01/accuracy/mlperf_log_accuracy.json", "TEST01/performance/run_1/mlperf_log_detail.txt",
                 "TEST04/verify_performance.txt", "TEST04/performance/run_1/mlperf_log_detail.txt"):
        assert (scenario / path).is_file(), path
    assert not (root / "measurements").exists() and not (root / "compliance").exists()
    assert not (scenario / "TEST01" / "verify.json").exists()  # only what the checker reads
    assert (scenario / "accuracy/images/captions.txt").read_text().splitlines()[0].startswith("3  ")
    assert set(json.loads((scenario / "measurements.json").read_text())) == {
        "input_data_types", "retraining", "starting_weights_filename", "weight_data_types", "weight_transformations"}
    assert "./run.sh run --mode both" in (scenario / "README.md").read_text()
    code = (root / "src" / "stable-diffusion-xl" / "README.md").read_text()
    assert "./run.sh run --mode both" in code and "./run.sh verify-compliance --test TEST04" in code
    assert (scenario / "TEST01" / "verify_accuracy.txt").read_text().endswith("TEST PASS\n")
    # the accuracy logs as truncate_accuracy_log.py leaves them; the run directory keeps the whole log
    full = (Path(runs[1]["tests"][1]["dir"]) / "mlperf_log_accuracy.json").read_bytes()
    cut = (scenario / "accuracy" / "mlperf_log_accuracy.json").read_bytes()
    assert cut == full[:4096] + b"\n\n...\n\n" + full[-4096:]
    import hashlib

    assert f"hash={hashlib.sha256(full).hexdigest()}" in (scenario / "accuracy" / "accuracy.txt").read_text()
    assert (scenario / "TEST01" / "accuracy" / "mlperf_log_accuracy.json").stat().st_size < 10 * 1024
    system = json.loads((root / "systems" / "epyc2c.json").read_text())
    assert system["submitter"] == "acme" and system["division"] == "open" and system["system_type"] == "edge"
    assert system["host_processor_model_name"] and system["host_memory_capacity"].endswith("GiB")
    assert system["cooling"] == "air" and system["framework"].startswith("PyTorch ")
    # the checker's rules find nothing in this tree: every file, name and field is where v6.1 wants it
    assert check_tree(root, ROUNDS["v6.1"]) == []
    assert "Offline/TEST01: TEST PASS" in printed or "Offline/TEST01: TEST FAIL (performance:" in printed
    assert "to do" not in printed
    # the tree exists now: a second call refuses instead of mixing two submissions
    assert main([*flags, "--division", "open"]) == 2
    assert "exists: remove it or choose another --output" in capsys.readouterr().err

    # relabelled closed, as a submitter preparing a closed entry checks it: the compliance folders count now,
    # and an edge system needs SingleStream too
    closed = tmp_path / "closed" / "closed" / "acme"
    shutil.copytree(root, closed)
    description = closed / "systems" / "epyc2c.json"
    description.write_text(description.read_text().replace('"division": "open"', '"division": "closed"'))
    problems = check_tree(closed, ROUNDS["v6.1"])
    assert "results/epyc2c/stable-diffusion-xl: SingleStream is required of a edge system" in problems
    assert any(p.startswith("results/epyc2c/stable-diffusion-xl/Offline/accuracy/accuracy.txt has no FID_SCORE") for p in problems)
    assert len(problems) == 3, problems  # + CLIP_SCORE: the null backend's accuracy.txt says N/A


def test_checker_rules_catch_what_the_checker_rejects(runs, test04_run, tmp_path):
    """Each rule, broken once in a copy of a good tree, is reported (and the v5.1 layout is checked as v5.1)."""
    from harness.submission_rules import ROUNDS, check_tree

    run_dir, _, test01_dir, _ = runs
    main(["submission", "--runs", str(run_dir), "--audits", str(test01_dir), str(test04_run[0]), "--submitter", "acme",
          "--system", "s", "--system-type", "edge", "--division", "open", "--output", str(tmp_path / "sub")])
    good = tmp_path / "sub" / "open" / "acme"
    scenario = "results/s/stable-diffusion-xl/Offline"

    def broken(change) -> list[str]:
        tree = tmp_path / "broken" / "open" / "acme"
        shutil.rmtree(tree.parent.parent, ignore_errors=True)
        shutil.copytree(good, tree)
        change(tree)
        return check_tree(tree, ROUNDS["v6.1"])

    base = set(check_tree(good, ROUNDS["v6.1"]))  # the fields the host could not tell
    assert base and all(p.startswith("systems/s.json: ") and p.endswith(" is empty") for p in base)
    assert set(broken(lambda t: (t / scenario / "measurements.json").unlink())) - base == {
        f"{scenario}/measurements.json is missing (measurements)"}
    assert set(broken(lambda t: (t / scenario / "accuracy" / "mlperf_log_accuracy.json").write_text("[" + " " * 20000 + "]"))
               ) - base == {f"{scenario}/accuracy/mlperf_log_accuracy.json is 20002 bytes: not truncated (< 10240)"}
    assert set(broken(lambda t: (t / scenario / "accuracy" / "accuracy.txt").write_text("Accuracy Results: {}\n"))) - base == {
        f"{scenario}/accuracy/accuracy.txt has no hash= line (truncate_accuracy_log.py writes it)"}
    assert set(broken(lambda t: shutil.rmtree(t / "src"))) - base == {"src/ is missing"}

    def seeds(tree):
        detail = tree / scenario / "performance" / "run_1" / "mlperf_log_detail.txt"
        detail.write_text(detail.read_text().replace("2085463073848966840", "1"))
    (problem,) = set(broken(seeds)) - base
    assert "used other seeds, not v6.1's (qsl_rng_seed differ)" in problem
    # the same tree read as v5.1: its measurements/ and compliance/ folders, its seeds and sample images
    v51 = set(check_tree(good, ROUNDS["v5.1"]))
    assert "measurements/s/stable-diffusion-xl/Offline/s_Offline.json is missing (measurements)" in v51
    assert "code/ is missing" in v51 and any("used v6.1 seeds, not v5.1's" in p for p in v51)
    assert any(p.startswith(f"{scenario}/accuracy/images: 10 of v5.1's 10 sample images missing") for p in v51)


def test_truncated_accuracy_log_matches_mlperfs_tool_and_refuses_a_stale_hash(tmp_path):
    import hashlib

    from harness.submission import write_truncated_accuracy

    log = tmp_path / "mlperf_log_accuracy.json"
    log.write_bytes(bytes(range(48, 58)) * 1000)  # 10000 bytes
    write_truncated_accuracy(log, "Accuracy Results: {'FID_SCORE': 23.5, 'CLIP_SCORE': 31.7}\n", tmp_path / "a")
    full = log.read_bytes()
    assert (tmp_path / "a" / "mlperf_log_accuracy.json").read_bytes() == full[:4096] + b"\n\n...\n\n" + full[-4096:]
    assert (tmp_path / "a" / "accuracy.txt").read_text().splitlines()[-1] == f"hash={hashlib.sha256(full).hexdigest()}"
    small = tmp_path / "small.json"
    small.write_text("[]\n")  # under 4 KiB: kept whole, as the tool keeps it
    write_truncated_accuracy(small, "x\nhash=" + hashlib.sha256(b"[]\n").hexdigest() + "\n", tmp_path / "b")
    assert (tmp_path / "b" / "mlperf_log_accuracy.json").read_text() == "[]\n"
    assert (tmp_path / "b" / "accuracy.txt").read_text().count("hash=") == 1  # not appended twice
    with pytest.raises(ValueError, match="is not the sha256 of"):
        write_truncated_accuracy(log, "x\nhash=00\n", tmp_path / "c")


def test_submission_rounds_layouts_and_scenario_sets(runs, test04_run, tmp_path, monkeypatch, capsys):
    """--round v5.1 lays measurements/, compliance/ and code/ out beside results/; seeds of another round, a
    system type the round has no SDXL for, and (closed) a scenario set that is not the type's are refused."""
    import harness.submission as submission
    from harness.submission_rules import ROUNDS, check_tree

    run_dir, _, test01_dir, _ = runs
    flags = ["submission", "--runs", str(run_dir), "--submitter", "acme", "--system", "s", "--division", "open",
             "--output", str(tmp_path / "sub")]
    assert main([*flags, "--system-type", "edge", "--round", "v5.1"]) == 2
    assert "used v6.1 seeds, not v5.1's" in capsys.readouterr().err  # LoadGen 6.0.x: run v5.1 with its LoadGen
    assert main([*flags, "--system-type", "datacenter"]) == 2
    assert "v6.1's checker lists stable-diffusion-xl for edge and datacenter,edge systems only" in capsys.readouterr().err

    monkeypatch.setattr(submission, "_refuse_other_seeds", lambda *args: None)  # to see v5.1's layout with these logs
    submission.write_submission([run_dir], [test01_dir, test04_run[0]], tmp_path / "v51", "acme", "s", "open",
                                system_type="datacenter", round_name="v5.1", system_fields=SYSTEM_JSON)
    root = tmp_path / "v51" / "open" / "acme"
    for path in ("measurements/s/stable-diffusion-xl/Offline/s_Offline.json", "measurements/s/stable-diffusion-xl/Offline/user.conf",
                 "compliance/s/stable-diffusion-xl/Offline/TEST01/verify_accuracy.txt",
                 "compliance/s/stable-diffusion-xl/Offline/TEST01/accuracy/accuracy.txt",
                 "compliance/s/stable-diffusion-xl/Offline/TEST04/performance/run_1/mlperf_log_detail.txt",
                 "code/stable-diffusion-xl/README.md", "results/s/stable-diffusion-xl/Offline/accuracy/accuracy.txt"):
        assert (root / path).is_file(), path
    problems = check_tree(root, ROUNDS["v5.1"])
    assert all("seeds" in p or "sample images" in p for p in problems) and len(problems) == 2, problems

    # closed: the scenario set of the system type, exactly (a run marked compliant to get that far)
    compliant = tmp_path / "compliant"
    shutil.copytree(run_dir, compliant)
    record = json.loads((compliant / "run.json").read_text())
    record.update(compliant=True, non_compliance_reasons=[])
    (compliant / "run.json").write_text(json.dumps(record))
    closed = ["submission", "--runs", str(compliant), "--submitter", "acme", "--system", "s", "--output", str(tmp_path / "c")]
    assert main([*closed, "--system-type", "edge"]) == 2
    assert ("a closed edge submission of stable-diffusion-xl in v6.1 has exactly SingleStream, Offline: no run of "
            "SingleStream") in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_submission_with_a_bad_input_writes_nothing(runs, tmp_path, capsys):
    run_dir, _, test01_dir, _ = runs
    ids = tmp_path / "ids.txt"
    ids.write_text("0\n999\n")  # 999 is no row of the run's captions
    assert main(["submission", "--runs", str(run_dir), "--audits", str(test01_dir), "--submitter", "acme",
                 "--system", "s", "--system-type", "edge", "--division", "open", "--ids-path", str(ids),
                 "--output", str(tmp_path / "sub")]) == 2
    assert "are not rows of the" in capsys.readouterr().err
    assert not (tmp_path / "sub" / "open" / "acme").exists()
    assert not (tmp_path / "sub" / "open" / "acme.partial").exists()


@pytest.mark.parametrize("test, scenario, reference, audit, passed", [
    ("TEST01", "Offline", 10.0, 10.9, True), ("TEST01", "Offline", 10.0, 8.9, False),
    ("TEST04", "Offline", 10.0, 10.9, True), ("TEST04", "Offline", 10.0, 11.2, False),
    ("TEST04", "Offline", 10.0, 5.0, True),  # slower is fine: only a cache makes repeated samples faster
    ("TEST04", "SingleStream", 2.0, 1.9, True), ("TEST04", "SingleStream", 2.0, 1.7, False),
    ("TEST01", "SingleStream", 2.0, 2.3, False),
])
def test_performance_rules(test, scenario, reference, audit, passed):
    key = "qps" if scenario != "SingleStream" else "early_stopping_latency_s"
    verdict = verify_performance({"scenario": scenario, key: reference}, {"scenario": scenario, key: audit}, test)
    assert verdict.passed is passed, verdict.lines


def test_test01_fallback_audits_both_image_sets_when_bytes_differ(runs, tmp_path):
    """A 1-LSB difference (what batch-dependent kernels cause) fails the byte check; the fallback then
    writes baseline/compliance accuracy.txt and compares their CLIP scores (random CLIP weights here);
    without FID statistics it cannot pass, and says why."""
    import shutil

    from accuracy.report import AuditOptions

    run_dir, _, audit_dir, _ = runs
    copy = tmp_path / "test01"
    shutil.copytree(audit_dir, copy, ignore=shutil.ignore_patterns("TEST01"))
    record = json.loads((copy / "run.json").read_text())
    record["tests"][0]["dir"] = str(copy / "performance")
    (copy / "run.json").write_text(json.dumps(record))
    log = copy / "performance" / "mlperf_log_accuracy.json"
    entries = json.loads(log.read_text())
    entries[0]["data"] = "01" + entries[0]["data"][2:]
    log.write_text(json.dumps(entries))

    result = verify("TEST01", run_dir, copy, tmp_path / "out", AuditOptions(random_weights=True, missing="na"))
    assert not result["checks"]["accuracy"]["passed"]
    fallback = result["checks"]["accuracy_fallback"]
    clip = next(line for line in fallback["details"] if line.startswith("clip_score:"))
    assert float(clip.split("delta ")[1].split("%")[0]) <= 1.0, clip  # one byte in one image moves CLIP by ~0
    assert any(line.startswith("fid: not computable") for line in fallback["details"]) and not fallback["passed"]
    assert "NOT COMPARABLE: random or unofficial evaluation weights" in fallback["details"]
    for name in ("baseline", "compliance"):
        assert "CLIP_SCORE" in (tmp_path / "out" / "accuracy" / f"{name}_accuracy.txt").read_text()
    baseline = json.loads((tmp_path / "out" / "accuracy" / "baseline" / "mlperf_log_accuracy.json").read_text())
    assert sorted(e["qsl_idx"] for e in baseline) == sorted({e["qsl_idx"] for e in entries})
    assert not result["passed"]

    # through submission --fallback: TEST01/accuracy holds exactly the four files the checker wants after a
    # failed byte check, the audit log truncated, the fallback's working folders gone
    from harness.submission import write_submission
    from harness.submission_rules import ROUNDS, check_tree

    written = write_submission([run_dir], [copy], tmp_path / "sub", "acme", "s", "open", system_type="edge",
                               fallback_options=AuditOptions(random_weights=True, missing="na"))
    assert "Offline/TEST01: TEST FAIL (accuracy: " in written["failures"]["Offline/TEST01"]
    test01 = Path(written["root"]) / "results" / "s" / "stable-diffusion-xl" / "Offline" / "TEST01"
    assert sorted(p.name for p in (test01 / "accuracy").iterdir()) == [
        "accuracy.txt", "baseline_accuracy.txt", "compliance_accuracy.txt", "mlperf_log_accuracy.json"]
    assert (test01 / "accuracy" / "mlperf_log_accuracy.json").stat().st_size < 10 * 1024
    closed = tmp_path / "closed" / "closed" / "acme"
    shutil.copytree(written["root"], closed)
    assert not any("TEST01/accuracy" in p for p in check_tree(closed, ROUNDS["v6.1"], "closed", "acme"))


def test_submission_documents_calibration_and_refuses_non_mlperf_calibration(runs, tmp_path, capsys):
    """A quantized run's encodings provenance becomes documentation/calibration.md; the closed division
    refuses captions other than MLPerf's calibration set and methods that change the sampler."""
    import shutil

    from harness.submission import _calibration, _closed_division_calibration_problems

    run_dir, record, _, _ = runs
    quantized = tmp_path / "quantized"
    shutil.copytree(run_dir, quantized)
    encodings = tmp_path / "enc.json"
    methods = [{"kind": "weight_balance", "component": "unet", "phase": "pre_ranges", "settings": {"strength": 1.0},
                "changes_sampler": False, "seconds": 0.1}]
    encodings.write_text(json.dumps({"format": "sdxl-ptq-bench/encodings", "version": "1.1.0",
                                     "recipe": {"name": "w8a8", "source": "w8a8"}, "methods": methods,
                                     "calibration": {"captions": "builtin:tiny", "num_prompts": 16,
                                                     "mlperf_calibration_set": False, "timesteps": [951, 1]}}))
    data = json.loads((quantized / "run.json").read_text())
    data["backend"]["encodings"] = str(encodings)
    (quantized / "run.json").write_text(json.dumps(data))
    calibration = _calibration(data)
    assert _closed_division_calibration_problems(calibration) == [
        "calibrated on builtin:tiny, not MLPerf's whole calibration set (prepare-dataset's calibration/captions.tsv "
        "of coco_cal_captions_list.txt)"]
    calibration["calibration"]["mlperf_calibration_set"] = True
    calibration["methods"][0]["changes_sampler"] = True
    assert _closed_division_calibration_problems(calibration) == ["method weight_balance changes the sampler"]
    assert _closed_division_calibration_problems(_calibration(record)) == []  # not quantized: nothing to check

    flags = ["submission", "--runs", str(quantized), "--submitter", "acme", "--system", "s", "--system-type", "edge",
             "--output", str(tmp_path / "sub")]
    assert main(flags) == 2
    assert "not MLPerf's whole calibration set" in capsys.readouterr().err
    main([*flags, "--division", "open"])
    doc = (tmp_path / "sub" / "open" / "acme" / "documentation" / "calibration.md").read_text()
    assert "Recipe: `w8a8`" in doc and "MLPerf's calibration set: no" in doc
    assert 'Method `weight_balance` on unet (pre_ranges), settings {"strength": 1.0}' in doc
