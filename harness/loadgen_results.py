"""Reading LoadGen's logs back: the detail log's ``:::MLLOG`` records and the summary's verdict."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_NS = 1e-9


def read_detail_log(path: Path) -> dict[str, Any]:
    """``key -> value`` of every ``:::MLLOG`` record in ``mlperf_log_detail.txt`` (last one wins)."""
    records: dict[str, Any] = {}
    errors: list[str] = []
    for line in path.read_text(errors="replace").splitlines():
        if not line.startswith(":::MLLOG"):
            continue
        try:
            record = json.loads(line[len(":::MLLOG"):])
        except json.JSONDecodeError:
            continue
        if record.get("key") == "error_invalid_config" or record.get("metadata", {}).get("is_error"):
            errors.append(str(record.get("value")))
        records[record["key"]] = record.get("value")
    records["_errors"] = errors
    return records


def summarize(test_dir: Path, scenario: str, mode: str) -> dict[str, Any]:
    """The figures the results table shows for one test, from LoadGen's own logs."""
    detail = read_detail_log(test_dir / "mlperf_log_detail.txt")
    summary: dict[str, Any] = {"scenario": scenario, "mode": mode, "dir": str(test_dir),
                               "loadgen_errors": detail["_errors"]}
    if mode == "accuracy":
        summary.update(samples=_count_accuracy_samples(test_dir), validity="N/A")
        return summary
    summary["validity"] = detail.get("result_validity", "UNKNOWN")
    if scenario == "Offline":
        summary["samples"] = _int(detail.get("generated_samples_per_query"))
        summary["qps"] = detail.get("result_samples_per_second")
    else:
        summary["samples"] = _int(detail.get("result_query_count"))
    if scenario == "Server":
        summary["qps"] = detail.get("result_completed_samples_per_sec")
        summary["target_qps"] = detail.get("effective_target_qps")
    if detail.get("result_mean_latency_ns") is not None:
        summary["mean_latency_s"] = detail["result_mean_latency_ns"] * _NS
    for pct in ("50.00", "90.00", "99.00"):
        value = detail.get(f"result_{pct}_percentile_latency_ns")
        if value is not None:
            summary[f"p{pct[:2]}_latency_s"] = value * _NS
    if detail.get("early_stopping_latency_ss") is not None:
        summary["early_stopping_latency_s"] = detail["early_stopping_latency_ss"] * _NS
    summary["min_duration_met"] = detail.get("result_min_duration_met")
    summary["min_queries_met"] = detail.get("result_min_queries_met")
    summary["early_stopping_met"] = detail.get("early_stopping_met")
    if summary["validity"] == "INVALID":
        summary["invalid_reasons"] = invalid_reasons(detail, test_dir / "mlperf_log_summary.txt")
    return summary


#: detail-log keys of LoadGen's validity checks, and what a failed one means
_CHECKS = (("result_perf_constraints_met", "latency constraint not met"),
           ("result_min_duration_met", "min duration not met"),
           ("result_min_queries_met", "min query count not met"),
           ("early_stopping_met", "early stopping not met"))


def invalid_reasons(detail: dict[str, Any], summary_path: Path) -> list[str]:
    """Why LoadGen judged a test INVALID: its failed checks, then its own recommendations."""
    reasons = [text for key, text in _CHECKS if detail.get(key) is False]
    if summary_path.is_file():
        lines = summary_path.read_text(errors="replace").splitlines()
        if "Recommendations:" in lines:
            for line in lines[lines.index("Recommendations:") + 1:]:
                if not line.strip():
                    break
                text = line.strip().removeprefix("* ").rstrip(".,")
                if line.strip().startswith("*") and not text.startswith(("Run unsuccessful", "Processed")):
                    reasons.append(text)
    return reasons


def _count_accuracy_samples(test_dir: Path) -> int | None:
    """Distinct responses logged in accuracy mode, without loading the (possibly huge) JSON."""
    path = test_dir / "mlperf_log_accuracy.json"
    if not path.is_file():
        return None
    count = 0
    with open(path, "rb") as handle:
        for line in handle:
            count += line.count(b'"qsl_idx"')
    return count


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
