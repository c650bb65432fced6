"""``submission``: lay run directories out as an MLPerf Inference submission for ``stable-diffusion-xl``.

From the runs (one per scenario, performance + accuracy) and their compliance audits this writes the
tree that the submission checker of ``--round`` reads (:mod:`harness.submission_rules`, taken from
the checker's constants), v6.x shown::

    <output>/<division>/<submitter>/
      systems/<system>.json                         host facts from run.json, --system-json, the rest to do
      results/<system>/stable-diffusion-xl/<Scenario>/
        performance/run_1/mlperf_log_{summary,detail}.txt
        accuracy/mlperf_log_{summary,detail}.txt, accuracy.txt (scores + hash=), mlperf_log_accuracy.json (truncated)
        accuracy/images/<id>.png, captions.txt      the round's sample ids (v5.1, v6.0), or --ids-path
        measurements.json, user.conf, README.md     the README holds the exact run command
        TEST01/verify_{accuracy,performance}.txt, performance/run_1/, accuracy/{mlperf_log_accuracy.json,accuracy.txt}
        TEST04/verify_performance.txt, performance/run_1/
      src/stable-diffusion-xl/README.md             harness commit, every command, encodings provenance
      documentation/calibration.md                  each run's recipe, calibration set and methods

v5.1 keeps ``measurements/<system>/stable-diffusion-xl/<Scenario>/<system>_<Scenario>.json`` (with
user.conf and README.md) and ``compliance/<system>/...`` beside ``results/``, and ``code/`` for
``src/``. The accuracy logs are truncated as ``truncate_accuracy_log.py`` does (first and last 4 KiB,
the full log's sha256 in ``accuracy.txt``), written straight from the run directories, which keep the
full logs: the tree that comes out is the one to upload.

Refused before anything is written: a closed-division run that ``run.json`` marks not compliant, or
whose encodings were calibrated on other captions than MLPerf's calibration set or with a method that
changes the sampler; runs whose LoadGen seeds are not the round's; in the closed division a set of
scenarios that is not the one ``--system-type`` requires in that round. A failing compliance verdict
does not stop the tree (the submitter reads its verify files, reruns the audit and writes the tree
again), but each is printed in one line with its reason and the exit code is 1.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from .compliance import add_fallback_arguments, completed_test, read_run, verify
from .submission_rules import (
    BENCHMARK,
    DEFAULT_ROUND,
    HASH_LINE,
    PERFORMANCE_FILES,
    ROUNDS,
    SYSTEM_FIELDS,
    SYSTEM_TYPES,
    VIEWABLE_SIZE,
    Round,
    check_tree,
    get_round,
    required_scenarios,
    seed_problems,
)


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
    command = _run_command(record)
    return (f"# {BENCHMARK} {record.get('scenario')}\n\nMade with sdxl-ptq-bench (git "
            f"{(record.get('system') or {}).get('git_commit')}):\n\n```\n{command}\n```\n\n"
            f"Backend: {json.dumps(record.get('backend'))}\n")


def _run_command(record: dict[str, Any]) -> str:
    from .run_command import run_flags

    return " ".join(["./run.sh", "run", *run_flags(record.get("config") or {})])


def _code_readme(scenarios: dict[str, tuple], audits: dict[str, tuple], calibrations: dict[str, Any]) -> str:
    """``src/stable-diffusion-xl/README.md`` (``code/`` in v5.1): what made every result, to rerun it."""
    from sdxl.dataset import file_sha256

    commits = sorted({str((record.get("system") or {}).get("git_commit")) for _, record, *_ in scenarios.values()})
    lines = [f"# {BENCHMARK}: sdxl-ptq-bench", "",
             "The harness is sdxl-ptq-bench (a LoadGen SUT around one SDXL pipeline with swappable backends), "
             f"git commit {', '.join(commits)}. From a clone at that commit, `./run.sh` bootstraps its "
             "environment; these commands made the results:", ""]
    for scenario, (run_dir, record, *_rest) in sorted(scenarios.items()):
        lines += [f"## {scenario}", "", "```", _run_command(record)]
        for name, (audit_dir, test, _logs) in sorted(audits.items()):
            if name.split("/")[0] == scenario:
                audit = read_run(audit_dir)
                lines += [_run_command(audit) + f"   # {test} audit",
                          f"./run.sh verify-compliance --test {test} --run {run_dir} --audit-run {audit_dir}"]
        lines += ["```", ""]
        calibration = calibrations.get(scenario)
        if calibration is not None:
            encodings = Path(calibration["encodings"])
            lines += [f"Quantization: recipe `{calibration['recipe'].get('name')}`, encodings `{encodings.name}` "
                      f"(sha256 {file_sha256(encodings)}); how they were calibrated: documentation/calibration.md.", ""]
    return "\n".join(lines)


_ACCELERATOR_FIELDS = ("accelerator_model_name", "accelerator_memory_capacity", "accelerator_frequency",
                       "accelerator_host_interconnect", "accelerator_interconnect", "accelerator_interconnect_topology",
                       "accelerator_memory_configuration", "accelerator_on-chip_memories")


def _system_description(record: dict[str, Any], division: str, submitter: str, system: str, system_type: str,
                        given: dict[str, Any]) -> dict[str, Any]:
    """``systems/<system>.json``: every field the checker requires; what the run recorded of its host
    (``run.json``'s ``system``) filled in, ``given`` (``--system-json``) over it, the rest empty."""
    info = record.get("system") or {}
    host, versions = info.get("host") or {}, dict(info.get("versions") or {})
    backend = record.get("backend") or {}
    framework = ("onnxruntime", "ONNX Runtime") if backend.get("name") == "ort" else ("torch", "PyTorch")
    described = {"division": division, "submitter": submitter, "status": "available", "system_name": system,
                 "number_of_nodes": "1", "host_processor_model_name": info.get("cpu_model", ""),
                 "host_processors_per_node": str(host.get("cpu_sockets", "")),
                 "host_processor_core_count": str(host.get("cores_per_socket", info.get("cpu_count", ""))),
                 "host_processor_frequency": host.get("cpu_frequency", ""),
                 "host_processor_caches": host.get("cpu_caches", ""), "host_memory_capacity": host.get("memory", ""),
                 "host_storage_capacity": host.get("storage", ""),
                 "host_network_card_count": "" if host.get("network_cards") is None else str(host["network_cards"]),
                 "framework": f"{framework[1]} {versions.pop(framework[0], '')}".strip(),
                 "operating_system": info.get("platform", ""), "system_type": system_type,
                 "other_software_stack": ", ".join(f"{k} {v}" for k, v in versions.items() if v),
                 "sw_notes": f"sdxl-ptq-bench git {info.get('git_commit')}; backend {backend.get('name')} "
                             f"{backend.get('dtype')} on {backend.get('device')}"}
    gpus = host.get("gpus")
    if gpus:
        names = sorted({g["name"] for g in gpus})
        described.update(accelerators_per_node=str(len(gpus)), accelerator_model_name=", ".join(names),
                         accelerator_memory_capacity=gpus[0].get("memory", ""))
    elif gpus is not None or not info.get("gpu"):  # a CPU-only host: MLPerf's CPU systems write N/A
        described.update({"accelerators_per_node": "0", **{field: "N/A" for field in _ACCELERATOR_FIELDS}})
    described.update(given)
    return {**{field: described.get(field, "") for field in SYSTEM_FIELDS}, **described}


def _required(files: list[Path]) -> list[Path]:
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"{missing[0]} is missing" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return files


def _copy(files: list[Path], directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for file in files:
        shutil.copy2(file, directory / file.name)


def write_truncated_accuracy(log: Path, accuracy_text: str, directory: Path) -> None:
    """``accuracy.txt`` and ``mlperf_log_accuracy.json`` as ``truncate_accuracy_log.py`` leaves them: the
    full log's sha256 as ``hash=`` and its first and last 4 KiB. Streamed from ``log`` (an SDXL accuracy
    log is ~31 GB; the run directory keeps it whole), never copied whole into the tree."""
    from sdxl.dataset import file_sha256

    digest = file_sha256(log)
    hashes = [m.group(1) for m in map(HASH_LINE.match, accuracy_text.splitlines()) if m]
    if hashes and hashes[-1] != digest:
        raise ValueError(f"the hash= of {log.parent / 'accuracy.txt'} is not the sha256 of {log}: the log changed "
                         "after it was scored (run ./run.sh accuracy on it again)")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "accuracy.txt").write_text(accuracy_text if hashes else accuracy_text.rstrip("\n") + f"\nhash={digest}\n")
    size = log.stat().st_size
    with open(log, "rb") as src, open(directory / "mlperf_log_accuracy.json", "wb") as dst:
        if size < VIEWABLE_SIZE:
            shutil.copyfileobj(src, dst)
            return
        dst.write(src.read(VIEWABLE_SIZE))
        dst.write(b"\n\n...\n\n")
        src.seek(size - VIEWABLE_SIZE)
        dst.write(src.read(VIEWABLE_SIZE))


def _failure_line(name: str, result: dict[str, Any]) -> str:
    """``Offline/TEST04: TEST FAIL (performance: reference ...; audit ...; ratio ...)``: which check, and why."""
    failing = [f"{check}: {'; '.join(c['details'])}" for check, c in result["checks"].items() if not c["passed"]]
    return f"{name}: TEST FAIL ({' / '.join(failing)})"


def write_submission(runs: list[Path], audits: list[Path], output: Path, submitter: str, system: str,
                     division: str = "closed", ids_path: Path | None = None, *, system_type: str = "edge",
                     round_name: str = DEFAULT_ROUND, system_fields: dict[str, Any] | None = None,
                     fallback_options=None) -> dict[str, Any]:
    """Lay the runs and audits out; returns what was written, the compliance verdicts and what is left to do.

    ``fallback_options`` (:class:`accuracy.report.AuditOptions`): a TEST01 whose bytes differ gets
    MLPerf's FID/CLIP fallback, and its ``TEST01/accuracy/`` the four files the checker then wants.

    Every input is checked before anything is written, and the tree is built beside its place and
    renamed into it at the end, so a failure leaves no half submission.
    """
    if division not in ("closed", "open"):
        raise ValueError(f"--division {division}: closed or open")
    rnd = get_round(round_name)
    required = required_scenarios(rnd, system_type)
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
        scenarios[scenario] = (run_dir, record, _required([perf / f for f in PERFORMANCE_FILES]),
                               _required([acc / f for f in (*PERFORMANCE_FILES, "mlperf_log_accuracy.json", "accuracy.txt")]))
        calibrations[scenario] = calibration
        _refuse_other_seeds(perf / "mlperf_log_detail.txt", rnd, run_dir)
    if division == "closed":
        missing, extra = [s for s in required if s not in scenarios], [s for s in scenarios if s not in required]
        if missing or extra:
            raise ValueError(f"a closed {system_type} submission of {BENCHMARK} in {rnd.name} has exactly "
                             f"{', '.join(required)}: " + "; ".join([f"no run of {s}" for s in missing] +
                                                                    [f"{s} is not one of them" for s in extra]))
    checked_audits: dict[str, tuple[Path, str, list[Path]]] = {}
    for audit_dir in audits:
        record = read_run(audit_dir)
        test, scenario = _audit_test(record, audit_dir), record["scenario"]
        if scenario not in scenarios:
            raise ValueError(f"audit {audit_dir} is of {scenario}, but no run of {scenario} was given")
        if f"{scenario}/{test}" in checked_audits:
            raise ValueError(f"two {test} audits of {scenario}: {checked_audits[f'{scenario}/{test}'][0]} and {audit_dir}")
        perf = Path(completed_test(record, "performance", audit_dir)["dir"])
        logs = [perf / f for f in PERFORMANCE_FILES] + ([perf / "mlperf_log_accuracy.json"] if test == "TEST01" else [])
        checked_audits[f"{scenario}/{test}"] = (audit_dir, test, _required(logs))
        _refuse_other_seeds(perf / "mlperf_log_detail.txt", rnd, audit_dir)
    ids = _sample_ids(ids_path, rnd, scenarios, division)

    staging = root.with_name(root.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        verdicts, failures = {}, {}
        for scenario, (run_dir, record, perf_logs, acc_logs) in sorted(scenarios.items()):
            results = staging / rnd.scenario_dir(system, scenario)
            _copy(perf_logs, results / "performance" / "run_1")
            _copy(acc_logs[:2], results / "accuracy")
            write_truncated_accuracy(acc_logs[2], acc_logs[3].read_text(), results / "accuracy")
            if ids:
                _sample_images(record, acc_logs[2], ids, results / "accuracy" / "images")
            measurements = staging / rnd.measurements_json(system, scenario)
            measurements.parent.mkdir(parents=True, exist_ok=True)
            measurements.write_text(json.dumps(_measurements(record), indent=1) + "\n")
            shutil.copy2(record["loadgen"]["user_conf"], measurements.parent / "user.conf")
            (measurements.parent / "README.md").write_text(_readme(record))
        for name, (audit_dir, test, logs) in sorted(checked_audits.items()):
            scenario = name.split("/")[0]
            target = staging / rnd.compliance_dir(system, scenario, test)
            result = verify(test, scenarios[scenario][0], audit_dir, target, fallback_options if test == "TEST01" else None)
            (target / "verify.json").unlink()  # ours, not the checker's: the tree holds what the checker reads
            for scratch in ("baseline", "compliance"):  # the fallback's working folders; its two accuracy.txt stay
                shutil.rmtree(target / "accuracy" / scratch, ignore_errors=True)
            verdicts[name] = result["passed"]
            if not result["passed"]:
                failures[name] = _failure_line(name, result)
            _copy(logs[:2], target / "performance" / "run_1")
            if test == "TEST01":
                with open(logs[2]) as log:
                    count = sum(1 for line in log if '"qsl_idx"' in line)
                write_truncated_accuracy(logs[2], f"TEST01 audit: {count} responses logged during the performance run; "
                                                  "verify_accuracy.txt compares them with the accuracy run's\n",
                                         target / "accuracy")
        code = staging / rnd.code_dir / BENCHMARK
        code.mkdir(parents=True)
        (code / "README.md").write_text(_code_readme(scenarios, checked_audits, calibrations))
        (staging / "documentation").mkdir(parents=True, exist_ok=True)
        (staging / "documentation" / "calibration.md").write_text(_calibration_doc(calibrations))
        description = _system_description(next(iter(scenarios.values()))[1], division, submitter, system, system_type,
                                          system_fields or {})
        (staging / "systems").mkdir(parents=True, exist_ok=True)
        (staging / "systems" / f"{system}.json").write_text(json.dumps(description, indent=1) + "\n")
        todo = check_tree(staging, rnd, division, submitter)
        staging.replace(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # nothing half-written is left behind
        raise
    return {"root": str(root), "round": rnd.name, "compliance": verdicts, "failures": failures, "todo": todo}


def _refuse_other_seeds(detail: Path, rnd: Round, run_dir: Path) -> None:
    problems = seed_problems(detail, rnd, run_dir)
    if problems:
        raise ValueError(problems[0])


def _sample_ids(ids_path: Path | None, rnd: Round, scenarios: dict[str, tuple], division: str) -> list[int]:
    """The sample ids whose images go in ``accuracy/images`` (``--ids-path``, else the round's); none where an
    open-division run holds too few samples (the to-do list then names the missing images)."""
    from accuracy.compliance_images import read_ids

    ids = read_ids(ids_path) if ids_path is not None else list(rnd.image_ids)
    rows = min(int(completed_test(record, "accuracy", run_dir)["samples"]) for run_dir, record, *_ in scenarios.values())
    if not ids or ids_path is not None or rows > max(ids):
        return ids
    if division == "closed":
        raise ValueError(f"{rnd.name}'s sample ids {list(rnd.image_ids)} are not all among the runs' {rows} samples")
    return []


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


def _system_json(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--system-json {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--system-json {path}: a JSON object of systems/<system>.json fields, e.g. "
                         '{"cooling": "air", "host_storage_type": "NVMe SSD"}')
    return data


def register(subparsers) -> None:
    parser = subparsers.add_parser("submission", help="lay runs and audits out as an MLPerf submission tree",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="run directories (--mode both), one per scenario")
    parser.add_argument("--audits", nargs="*", default=[], help="TEST01/TEST04 audit run directories")
    parser.add_argument("--submitter", required=True)
    parser.add_argument("--system", required=True, help="system description id (systems/<system>.json)")
    parser.add_argument("--system-type", required=True, choices=SYSTEM_TYPES,
                        help="the category the system is submitted in: datacenter (Offline + Server), edge "
                             "(SingleStream + Offline) or datacenter,edge (all three); v6.x has SDXL for edge only")
    parser.add_argument("--system-json", help="a JSON object of systems/<system>.json fields the host cannot tell "
                                              "(cooling, memory configuration, ...): the to-do list names them")
    parser.add_argument("--round", default=DEFAULT_ROUND, choices=tuple(ROUNDS),
                        help=f"the MLPerf round whose checker reads the tree (default {DEFAULT_ROUND})")
    parser.add_argument("--division", default="closed", choices=("closed", "open"))
    parser.add_argument("--ids-path", help="sample ids for accuracy/images/ instead of the round's own list")
    parser.add_argument("--output", required=True, help="directory to write <division>/<submitter>/ under")
    add_fallback_arguments(parser)
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from accuracy.commands import audit_options
    from accuracy.report import INPUT_ERRORS
    from accuracy.weights import WeightsUnavailable
    from sdxl.errors import UserError

    try:
        result = write_submission([Path(r) for r in args.runs], [Path(a) for a in args.audits], Path(args.output),
                                  args.submitter, args.system, args.division,
                                  Path(args.ids_path) if args.ids_path else None, system_type=args.system_type,
                                  round_name=args.round, system_fields=_system_json(args.system_json),
                                  fallback_options=audit_options(args) if args.fallback else None)
    except (ValueError, FileNotFoundError, WeightsUnavailable, *INPUT_ERRORS) as exc:
        raise UserError(str(exc).splitlines()[0]) from None
    print(f"submission tree ({result['round']}): {result['root']}")
    for name in sorted(result["compliance"]):
        print(f"  {result['failures'].get(name, name + ': TEST PASS')}")
    for item in result["todo"]:
        print(f"  to do: {item}")
    return 0 if not result["failures"] else 1
