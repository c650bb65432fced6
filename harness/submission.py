"""``submission``: lay run directories out as an MLPerf Inference submission for ``stable-diffusion-xl``.

From the runs (one per scenario, performance + accuracy) and their compliance audits this writes the
tree the submission checker reads (``tools/submission/submission_structure.md``)::

    <output>/<division>/<submitter>/
      systems/<system>.json                                   host facts filled in, the rest to fill
      results/<system>/stable-diffusion-xl/<Scenario>/
        performance/run_1/mlperf_log_{summary,detail}.txt
        accuracy/mlperf_log_{summary,detail}.txt, mlperf_log_accuracy.json, accuracy.txt
        accuracy/images/<id>.png, captions.txt               with --ids-path (the round's sample ids)
      measurements/<system>/stable-diffusion-xl/<Scenario>/measurements.json, user.conf, README.md
      documentation/calibration.md                            each run's recipe, calibration set and methods
      compliance/<system>/stable-diffusion-xl/<Scenario>/TEST01/verify_{accuracy,performance}.txt,
                                                          accuracy/, performance/run_1/
                                                        /TEST04/verify_performance.txt, performance/run_1/

A closed-division submission refuses any run ``run.json`` marks not compliant (random weights, a
subset of the captions, another latent, short settings...) or whose encodings were calibrated on
other captions than MLPerf's whole calibration set or with a method that changes the sampler, and the verdicts of ``verify-compliance``
are written, not assumed. What the harness cannot know (submitter details, accelerator, software
stack) is left empty in ``systems/<system>.json`` and listed at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from .compliance import TESTS, completed_test, read_run, verify

BENCHMARK = "stable-diffusion-xl"
SUMMARY_FILES = ("mlperf_log_summary.txt", "mlperf_log_detail.txt")
#: systems/<system>.json keys the checker requires; the ones filled from this machine are in _system_description
SYSTEM_FIELDS = ("division", "submitter", "status", "system_name", "number_of_nodes", "host_processor_model_name",
                 "host_processors_per_node", "host_processor_core_count", "host_memory_capacity",
                 "host_storage_capacity", "host_storage_type", "accelerators_per_node", "accelerator_model_name",
                 "accelerator_memory_capacity", "framework", "operating_system", "system_type",
                 "other_software_stack", "host_networking", "host_networking_topology", "cooling", "hw_notes",
                 "sw_notes")


def _audit_test(record: dict[str, Any], where: Path) -> str:
    """TEST01 or TEST04, from the keys of the audit.config the run was made with."""
    conf = (record.get("loadgen") or {}).get("audit_conf")
    if not conf or not Path(conf).is_file():
        raise ValueError(f"{where} was not run with --audit-conf (or its audit.config is gone)")
    text = Path(conf).read_text()
    if "accuracy_log_sampling_target" in text:
        return "TEST01"
    if "performance_issue_same" in text:
        return "TEST04"
    raise ValueError(f"{conf}: neither TEST01's nor TEST04's audit.config")


def _measurements(record: dict[str, Any]) -> dict[str, Any]:
    backend = record.get("backend") or {}
    model = record.get("model") or {}
    quantized = bool(backend.get("encodings") or backend.get("recipe"))
    recipe = (record.get("calibration") or {}).get("recipe") or backend.get("recipe")
    return {"input_data_types": backend.get("dtype", "fp32"), "retraining": "No",
            "starting_weights_filename": model.get("path") or f"{record.get('profile')} profile",
            "weight_data_types": f"{recipe or 'quantized'} ({backend.get('dtype', 'fp32')} compute)" if quantized
            else backend.get("dtype", "fp32"),
            "weight_transformations": "quantization (post-training)" if quantized else "none"}


def _calibration(record: dict[str, Any]) -> dict[str, Any] | None:
    """The quantization provenance of a run: its encodings file's recipe, calibration set and methods."""
    path = (record.get("backend") or {}).get("encodings")
    if not path:
        return None
    if not Path(path).is_file():
        raise ValueError(f"the run's encodings {path} are gone: the submission documents its calibration")
    data = json.loads(Path(path).read_text())
    return {"encodings": path, "recipe": data.get("recipe") or {}, "calibration": data.get("calibration") or {},
            "methods": data.get("methods") or []}


def _closed_division_calibration_problems(calibration: dict[str, Any] | None) -> list[str]:
    """MLPerf's closed division calibrates on its own calibration set and keeps the reference sampler."""
    if calibration is None:
        return []
    problems = []
    if not calibration["calibration"].get("mlperf_calibration_set"):
        problems.append(f"calibrated on {calibration['calibration'].get('captions')}, not MLPerf's whole calibration "
                        "set (prepare-dataset's calibration/captions.tsv of coco_cal_captions_list.txt)")
    problems += [f"method {m['kind']} changes the sampler" for m in calibration["methods"] if m.get("changes_sampler")]
    return problems


def _calibration_doc(runs: dict[str, dict[str, Any] | None]) -> str:
    """``documentation/calibration.md``: how each scenario's model was quantized, from its encodings."""
    lines = [f"# Calibration ({BENCHMARK})", "", "Written by sdxl-ptq-bench from each run's encodings file.", ""]
    for scenario, calibration in sorted(runs.items()):
        lines += [f"## {scenario}", ""]
        if calibration is None:
            lines += ["Not quantized: no calibration.", ""]
            continue
        recipe, data = calibration["recipe"], calibration["calibration"]
        lines += [f"- Encodings: `{calibration['encodings']}`",
                  f"- Recipe: `{recipe.get('name')}` ({recipe.get('source')}): {recipe.get('description', '')}".rstrip(": "),
                  f"- Calibration captions: {data.get('captions')} ({data.get('num_prompts')} prompts, sha256 "
                  f"{data.get('captions_sha256')}); MLPerf's calibration set: "
                  f"{'yes' if data.get('mlperf_calibration_set') else 'no'}",
                  f"- Timesteps: {', '.join(str(t) for t in data.get('timesteps') or [])}"]
        for m in calibration["methods"]:
            lines.append(f"- Method `{m['kind']}` on {m.get('component')} ({m.get('phase')}), settings "
                         f"{json.dumps(m.get('settings'))}, {m.get('seconds')} s")
        if not calibration["methods"]:
            lines.append("- Methods: none (ranges from the recipe's observers only)")
        lines.append("")
    return "\n".join(lines)


def _readme(record: dict[str, Any]) -> str:
    from .run_command import run_flags

    command = " ".join(["./run.sh", "run", *run_flags(record.get("config") or {})])
    return (f"# {BENCHMARK} {record.get('scenario')}\n\nMade with sdxl-ptq-bench (git "
            f"{(record.get('system') or {}).get('git_commit')}):\n\n```\n{command}\n```\n\n"
            f"Backend: {json.dumps(record.get('backend'))}\n")


def _system_description(record: dict[str, Any], division: str, submitter: str, system: str) -> dict[str, Any]:
    info = record.get("system") or {}
    described = {"division": division, "submitter": submitter, "status": "available", "system_name": system,
                 "number_of_nodes": "1", "host_processor_model_name": info.get("cpu_model", ""),
                 "host_processors_per_node": "1", "host_processor_core_count": str(info.get("cpu_count", "")),
                 "framework": " ".join(f"{k} {v}" for k, v in (info.get("versions") or {}).items() if v),
                 "operating_system": info.get("platform", ""), "system_type": "edge",
                 "accelerators_per_node": "0" if not info.get("gpu") else "", "accelerator_model_name": info.get("gpu") or ""}
    return {field: described.get(field, "") for field in SYSTEM_FIELDS}


def _required(files: list[Path]) -> list[Path]:
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"{missing[0]} is missing" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return files


def _copy(files: list[Path], directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for file in files:
        shutil.copy2(file, directory / file.name)


def write_submission(runs: list[Path], audits: list[Path], output: Path, submitter: str, system: str,
                     division: str = "closed", ids_path: Path | None = None) -> dict[str, Any]:
    """Lay the runs and audits out; returns what was written, the compliance verdicts and what is left to do.

    Every input is checked before anything is written, and the tree is built beside its place and
    renamed into it at the end, so a failure leaves no half submission.
    """
    if division not in ("closed", "open"):
        raise ValueError(f"--division {division}: closed or open")
    root = output / division / submitter
    if root.exists():
        raise ValueError(f"{root} exists: remove it or choose another --output")
    scenarios: dict[str, tuple[Path, dict[str, Any], list[Path], list[Path]]] = {}
    calibrations: dict[str, dict[str, Any] | None] = {}
    for run_dir in runs:
        record = read_run(run_dir)
        problems = [] if record.get("compliant") else list(record.get("non_compliance_reasons", []))
        calibration = _calibration(record)
        problems += _closed_division_calibration_problems(calibration)
        if division == "closed" and problems:
            raise ValueError(f"{run_dir} is not a closed-division run: {'; '.join(problems)}"
                             " (--division open to submit it there)")
        scenario = record["scenario"]
        if scenario in scenarios:
            raise ValueError(f"two runs of {scenario}: {scenarios[scenario][0]} and {run_dir}")
        perf = Path(completed_test(record, "performance", run_dir)["dir"])
        acc = Path(completed_test(record, "accuracy", run_dir)["dir"])
        scenarios[scenario] = (run_dir, record, _required([perf / f for f in SUMMARY_FILES]),
                               _required([acc / f for f in (*SUMMARY_FILES, "mlperf_log_accuracy.json", "accuracy.txt")]))
        calibrations[scenario] = calibration
    checked_audits: dict[str, tuple[Path, str, list[Path]]] = {}
    for audit_dir in audits:
        record = read_run(audit_dir)
        test, scenario = _audit_test(record, audit_dir), record["scenario"]
        if scenario not in scenarios:
            raise ValueError(f"audit {audit_dir} is of {scenario}, but no run of {scenario} was given")
        if f"{scenario}/{test}" in checked_audits:
            raise ValueError(f"two {test} audits of {scenario}: {checked_audits[f'{scenario}/{test}'][0]} and {audit_dir}")
        perf = Path(completed_test(record, "performance", audit_dir)["dir"])
        logs = [perf / f for f in SUMMARY_FILES] + ([perf / "mlperf_log_accuracy.json"] if test == "TEST01" else [])
        checked_audits[f"{scenario}/{test}"] = (audit_dir, test, _required(logs))
    ids = None
    if ids_path is not None:
        from accuracy.compliance_images import read_ids

        ids = read_ids(ids_path)

    staging = root.with_name(root.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        written, verdicts, todo = [], {}, []
        for scenario, (run_dir, record, perf_logs, acc_logs) in sorted(scenarios.items()):
            where = f"{system}/{BENCHMARK}/{scenario}"
            results = staging / "results" / where
            _copy(perf_logs, results / "performance" / "run_1")
            _copy(acc_logs, results / "accuracy")
            if ids is not None:
                _sample_images(record, acc_logs[2], ids, results / "accuracy" / "images")
            else:
                todo.append(f"{scenario}: accuracy/images/<id>.png for this round's sample ids (--ids-path)")
            measurements = staging / "measurements" / where
            measurements.mkdir(parents=True, exist_ok=True)
            (measurements / "measurements.json").write_text(json.dumps(_measurements(record), indent=1) + "\n")
            shutil.copy2(record["loadgen"]["user_conf"], measurements / "user.conf")
            (measurements / "README.md").write_text(_readme(record))
            written += [f"results/{where}", f"measurements/{where}"]
        for name, (audit_dir, test, logs) in sorted(checked_audits.items()):
            scenario = name.split("/")[0]
            target = staging / "compliance" / system / BENCHMARK / scenario / test
            verdicts[name] = verify(test, scenarios[scenario][0], audit_dir, target)["passed"]
            _copy(logs[:2], target / "performance" / "run_1")
            if test == "TEST01":
                _copy(logs[2:], target / "accuracy")
            written.append(f"compliance/{system}/{BENCHMARK}/{scenario}/{test}")
        for scenario in sorted(scenarios):
            todo += [f"{scenario}: {test} audit run (./run.sh run --audit-conf ...)" for test in TESTS
                     if f"{scenario}/{test}" not in verdicts]
        (staging / "documentation").mkdir(parents=True, exist_ok=True)
        (staging / "documentation" / "calibration.md").write_text(_calibration_doc(calibrations))
        written.append("documentation/calibration.md")
        description = _system_description(next(iter(scenarios.values()))[1], division, submitter, system)
        (staging / "systems").mkdir(parents=True, exist_ok=True)
        (staging / "systems" / f"{system}.json").write_text(json.dumps(description, indent=1) + "\n")
        todo += [f"systems/{system}.json: fill {', '.join(k for k, v in description.items() if v == '')}"]
        staging.replace(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # nothing half-written is left behind
        raise
    return {"root": str(root), "written": written, "compliance": verdicts, "todo": todo}


def _sample_images(record: dict[str, Any], log: Path, ids: list[int], directory: Path) -> None:
    """The round's sample images (``<id>.png`` + ``captions.txt``), streamed from the accuracy log."""
    from accuracy.compliance_images import ComplianceImageWriter
    from accuracy.log_reader import iter_accuracy_log
    from sdxl.dataset import load_captions

    captions = load_captions(record["dataset"]["path"], record.get("max_samples")).captions
    writer = ComplianceImageWriter(directory, ids, captions)
    for qsl_idx, image in iter_accuracy_log(log, int(record["image_size"])):
        writer(qsl_idx, image)
    missing = writer.describe()["missing"]
    if missing:
        raise ValueError(f"the accuracy log has no image for sample ids {missing[:5]}")


def register(subparsers) -> None:
    parser = subparsers.add_parser("submission", help="lay runs and audits out as an MLPerf submission tree",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="run directories (--mode both), one per scenario")
    parser.add_argument("--audits", nargs="*", default=[], help="TEST01/TEST04 audit run directories")
    parser.add_argument("--submitter", required=True)
    parser.add_argument("--system", required=True, help="system description id (systems/<system>.json)")
    parser.add_argument("--division", default="closed", choices=("closed", "open"))
    parser.add_argument("--ids-path", help="this round's sample ids (tools/sample_ids.txt) for accuracy/images/")
    parser.add_argument("--output", required=True, help="directory to write <division>/<submitter>/ under")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from sdxl.errors import UserError

    try:
        result = write_submission([Path(r) for r in args.runs], [Path(a) for a in args.audits], Path(args.output),
                                  args.submitter, args.system, args.division,
                                  Path(args.ids_path) if args.ids_path else None)
    except (ValueError, FileNotFoundError) as exc:
        raise UserError(str(exc)) from None
    print(f"submission tree: {result['root']}")
    for name, passed in sorted(result["compliance"].items()):
        print(f"  {name}: {'TEST PASS' if passed else 'TEST FAIL'}")
    for item in result["todo"]:
        print(f"  to do: {item}")
    return 0 if all(result["compliance"].values()) else 1
