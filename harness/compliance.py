"""``verify-compliance``: MLPerf's TEST01 and TEST04 checks on our run directories.

A compliance audit is a ``run`` with ``--audit-conf`` (the TEST's ``audit.config``); this command then
does what ``compliance/TEST0x/run_verification.py`` does for the reference, from the two runs'
``run.json`` and LoadGen logs, and writes ``verify_accuracy.txt`` / ``verify_performance.txt`` in the
place the submission layout expects them (``TEST0x/`` beside the audit's logs):

* TEST01 accuracy: every response the audit run logged (about 128, sampled during a performance
  run) must equal the accuracy run's bytes for the same ``qsl_idx``. MLPerf's python mode compares
  only the first byte of each decoded buffer; both verdicts are written (the whole-bytes one is the
  stricter). With batch-size-dependent kernels the bytes differ (tests/test_pipeline.py measured 1 LSB);
  ``--fallback`` then runs MLPerf's fallback (compliance README part III): the accuracy run's entries
  for the audit's ids become a baseline log, both are audited (FID/CLIP as ``accuracy``), and the
  audit passes when FID is within 2% and CLIP within 1% of the baseline's
  (``TEST01/accuracy/{baseline,compliance}_accuracy.txt``, as the checker reads them).
* TEST01 performance: the audit's score within 10% of the performance run's.
* TEST04 performance: the audit (one sample issued over and over) no more than 10% *faster* than the
  performance run, which would betray caching of repeated samples.

Logs are streamed (an SDXL accuracy log is ~31 GB): the audit's few entries are hashed first, then the
accuracy log is read once, comparing only those entries.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TESTS = ("TEST01", "TEST04")
#: both tests accept the audit's score within 10% of the performance run's (in the faster direction for TEST04)
TOLERANCE = 0.10
THROUGHPUT_SCENARIOS = ("Offline", "Server")


@dataclass
class Verdict:
    name: str
    passed: bool
    lines: list[str] = field(default_factory=list)
    ids: set[int] = field(default_factory=set)  # TEST01: the qsl indices the audit logged

    def text(self) -> str:
        return "\n".join([*self.lines, "TEST PASS" if self.passed else "TEST FAIL"]) + "\n"


def score(test: dict[str, Any]) -> tuple[float, str]:
    """A performance test's MLPerf score and its kind: samples/s (Offline, Server) or latency in s (SingleStream)."""
    if test["scenario"] in THROUGHPUT_SCENARIOS:
        if not test.get("qps"):
            raise ValueError(f"the {test['scenario']} test in {test.get('dir')} reports no samples/s to score")
        return float(test["qps"]), "throughput"
    value = test.get("early_stopping_latency_s") or test.get("p90_latency_s")
    if not value:
        raise ValueError(f"the {test['scenario']} test in {test.get('dir')} reports no latency to score")
    return float(value), "latency"


def verify_performance(reference: dict[str, Any], audit: dict[str, Any], test: str) -> Verdict:
    """TEST01: within ±10%; TEST04: not more than 10% faster. ``reference``/``audit`` are run.json test entries."""
    ref, kind = score(reference)
    got, _ = score(audit)
    # "faster" is a higher throughput or a lower latency; ratio > 1 means the audit was faster
    ratio = got / ref if kind == "throughput" else ref / got
    passed = ratio <= 1 + TOLERANCE if test == "TEST04" else abs(ratio - 1) <= TOLERANCE
    unit = "samples/s" if kind == "throughput" else "s latency"
    rule = "not more than 10% faster" if test == "TEST04" else "within 10%"
    return Verdict("performance", passed, [f"reference score = {ref:.6g} {unit}", f"audit score = {got:.6g} {unit}",
                                           f"audit/reference speed = {ratio:.4f} (must be {rule})"])


def _entry_digests(log: Path, image_size: int, wanted: set[int] | None = None) -> dict[int, tuple[str, int]]:
    """``qsl_idx -> (sha256 of the bytes, first byte)`` for the log's entries (only ``wanted`` ones if given)."""
    from accuracy.log_reader import iter_accuracy_log

    out = {}
    for qsl_idx, image in iter_accuracy_log(log, image_size):
        if wanted is None or qsl_idx in wanted:
            out[qsl_idx] = (hashlib.sha256(image.tobytes()).hexdigest(), int(image.reshape(-1)[0]))
    return out


def verify_test01_accuracy(accuracy_log: Path, audit_log: Path, image_size: int) -> Verdict:
    """The audit's logged responses against the accuracy run's, per ``qsl_idx``."""
    audit = _entry_digests(audit_log, image_size)
    if not audit:
        return Verdict("accuracy", False, [f"{audit_log} holds no responses: was the run made with TEST01's "
                                           "audit.config (accuracy_log_sampling_target)?"])
    reference = _entry_digests(accuracy_log, image_size, set(audit))
    common = sorted(set(audit) & set(reference))
    first_byte = sum(audit[i][1] != reference[i][1] for i in common)
    whole = sum(audit[i][0] != reference[i][0] for i in common)
    passed = bool(common) and first_byte == 0
    lines = [f"audit responses: {len(audit)}, found in the accuracy log: {len(common)}",
             f"first-byte mismatches (MLPerf's python mode): {first_byte}",
             f"whole-response mismatches: {whole}"]
    if passed and whole:
        lines.append("the first bytes match but whole responses differ: MLPerf's check passes, bytes are not identical")
    if not passed and common:
        lines.append("MLPerf's fallback (compliance README, part III) compares FID/CLIP of the audit's images with "
                     "the accuracy run's, within 2% / 1%: verify-compliance --fallback")
    return Verdict("accuracy", passed, lines, set(audit))


#: MLPerf's accepted |1 - baseline/compliance| x 100 per metric for TEST01's fallback (compliance_check.py)
FALLBACK_DELTA_PERCENT = {"fid": 2.0, "clip_score": 1.0}


def _write_baseline_log(accuracy_log: Path, ids: set[int], path: Path) -> None:
    """The accuracy log's first entry for each of ``ids``, as MLPerf's ``create_accuracy_baseline.sh`` makes it."""
    import ijson

    path.parent.mkdir(parents=True, exist_ok=True)
    seen: set[int] = set()
    partial = path.with_name(path.name + ".partial")  # renamed when complete: a crash leaves no log that loads
    with open(accuracy_log, "rb") as source, open(partial, "w") as out:
        out.write("[")
        for entry in ijson.items(source, "item", buf_size=8 << 20):
            if entry.get("qsl_idx") in ids and entry["qsl_idx"] not in seen:
                out.write(("," if seen else "") + "\n" + json.dumps(entry))
                seen.add(entry["qsl_idx"])
        out.write("\n]\n")
    partial.replace(path)


def test01_fallback(accuracy_log: Path, audit_log: Path, ids: set[int], run_json: Path, output: Path,
                    options) -> Verdict:
    """FID/CLIP of the audit's images (``ids``) against the same ids from the accuracy run (MLPerf's TEST01 fallback)."""
    from accuracy.report import audit_log as audit

    baseline_dir = output / "accuracy" / "baseline"
    _write_baseline_log(accuracy_log, ids, baseline_dir / "mlperf_log_accuracy.json")
    shutil.copy2(run_json, baseline_dir / "run.json")  # image size and captions for the audit of the subset
    results = {"baseline": audit(baseline_dir / "mlperf_log_accuracy.json", output_dir=baseline_dir, options=options),
               "compliance": audit(audit_log, output_dir=output / "accuracy" / "compliance", options=options)}
    for name in results:
        shutil.copy2(output / "accuracy" / name / "accuracy.txt", output / "accuracy" / f"{name}_accuracy.txt")
    lines, passed = [f"fallback on {len(ids)} images (FID within 2%, CLIP within 1% of the baseline)"], True
    for metric, limit in FALLBACK_DELTA_PERCENT.items():
        base, got = results["baseline"].get(metric), results["compliance"].get(metric)
        if base is None or got is None:
            passed = False
            lines.append(f"{metric}: not computable ({results['compliance'].get(metric + '_note') or 'see accuracy.json'})")
            continue
        delta = abs(1 - base / got) * 100
        passed &= delta <= limit
        lines.append(f"{metric}: baseline {base:.4f}, compliance {got:.4f}, delta {delta:.3f}% (limit {limit}%)")
    if not all(r.get("comparable", True) for r in results.values()):
        lines.append("NOT COMPARABLE: random or unofficial evaluation weights")
    return Verdict("accuracy_fallback", passed, lines)


def read_run(directory: Path) -> dict[str, Any]:
    """A completed run's ``run.json``; a clear error for anything else."""
    path = directory / "run.json"
    if not path.is_file():
        raise ValueError(f"{path} not found: give run directories written by ./run.sh run")
    record = json.loads(path.read_text())
    if record.get("status") != "completed":
        raise ValueError(f"{directory} did not complete (status {record.get('status')!r})")
    return record


def completed_test(record: dict[str, Any], mode: str, where: Path) -> dict[str, Any]:
    """The run's completed test of ``mode`` (``performance`` / ``accuracy``)."""
    for test in record.get("tests", []):
        if test.get("mode") == mode and "error" not in test:
            return test
    raise ValueError(f"{where} has no completed {mode} test" +
                     (" (TEST01 compares against the accuracy run's log: run with --mode both)" if mode == "accuracy" else ""))


def verify(test: str, run_dir: Path, audit_dir: Path, output: Path | None = None, fallback_options=None) -> dict[str, Any]:
    """Both checks of ``test``; writes ``verify_*.txt`` under ``output`` (default ``<audit_dir>/<test>``).

    ``fallback_options`` (:class:`accuracy.report.AuditOptions`): when TEST01's byte check fails, run
    MLPerf's FID/CLIP fallback with these evaluation settings; the audit passes if the fallback does.
    """
    if test not in TESTS:
        raise ValueError(f"unknown compliance test {test!r}; choose {', '.join(TESTS)}")
    run, audit = read_run(run_dir), read_run(audit_dir)
    if not (audit.get("loadgen") or {}).get("audit_conf"):
        raise ValueError(f"{audit_dir} was not run with --audit-conf (the {test} audit.config)")
    for key in ("scenario", "profile", "image_size"):
        if run.get(key) != audit.get(key):
            raise ValueError(f"the runs differ in {key}: {run.get(key)!r} vs {audit.get(key)!r}")
    reference_test, audit_test = completed_test(run, "performance", run_dir), completed_test(audit, "performance", audit_dir)
    verdicts = [verify_performance(reference_test, audit_test, test)]
    if test == "TEST01":
        accuracy_log = Path(completed_test(run, "accuracy", run_dir)["dir"]) / "mlperf_log_accuracy.json"
        audit_log = Path(audit_test["dir"]) / "mlperf_log_accuracy.json"
        verdicts.insert(0, verify_test01_accuracy(accuracy_log, audit_log, int(run["image_size"])))
    output = output or audit_dir / test
    output.mkdir(parents=True, exist_ok=True)
    if test == "TEST01" and not verdicts[0].passed and fallback_options is not None:
        verdicts.insert(1, test01_fallback(accuracy_log, audit_log, verdicts[0].ids, run_dir / "run.json", output,
                                           fallback_options))
    byte_check, fallback = verdicts[0], next((v for v in verdicts if v.name == "accuracy_fallback"), None)
    accuracy_ok = byte_check.passed or (fallback is not None and fallback.passed)
    passed = all(v.passed for v in verdicts if v.name == "performance") and (test != "TEST01" or accuracy_ok)
    result = {"test": test, "run": str(run_dir), "audit_run": str(audit_dir), "passed": passed,
              "checks": {v.name: {"passed": v.passed, "details": v.lines} for v in verdicts}}
    for verdict in verdicts:
        (output / f"verify_{verdict.name}.txt").write_text(verdict.text())
    (output / "verify.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def register(subparsers) -> None:
    parser = subparsers.add_parser("verify-compliance", help="MLPerf TEST01/TEST04 checks of an audit run",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--test", required=True, choices=TESTS)
    parser.add_argument("--run", required=True, help="the run directory of the submission run (performance + accuracy)")
    parser.add_argument("--audit-run", required=True, help="the run directory made with --audit-conf <TEST>/audit.config")
    parser.add_argument("--output", help="where verify_*.txt go (default <audit-run>/<TEST>)")
    add_fallback_arguments(parser)
    parser.set_defaults(func=_main)


def add_fallback_arguments(parser: argparse.ArgumentParser) -> None:
    """``--fallback`` and the evaluation settings it needs (``verify-compliance``, ``submission``)."""
    from accuracy.commands import add_weight_arguments

    parser.add_argument("--fallback", action="store_true",
                        help="TEST01: when the bytes differ, MLPerf's FID/CLIP fallback (needs the evaluation weights)")
    parser.add_argument("--statistics-path", help="--fallback: FID statistics (MLPerf's val2014.npz)")
    add_weight_arguments(parser)


def _main(args: argparse.Namespace) -> int:
    from accuracy.commands import audit_options
    from accuracy.report import INPUT_ERRORS
    from accuracy.weights import WeightsUnavailable
    from sdxl.errors import UserError

    try:
        result = verify(args.test, Path(args.run), Path(args.audit_run), Path(args.output) if args.output else None,
                        audit_options(args) if args.fallback else None)
    except (ValueError, WeightsUnavailable, *INPUT_ERRORS) as exc:
        raise UserError(str(exc).splitlines()[0]) from None
    for name, check in result["checks"].items():
        print(f"{args.test} {name}: {'PASS' if check['passed'] else 'FAIL'}")
        for line in check["details"]:
            print(f"  {line}")
    print(f"{args.test}: {'TEST PASS' if result['passed'] else 'TEST FAIL'}")
    return 0 if result["passed"] else 1
