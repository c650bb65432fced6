"""LoadGen settings: MLPerf's built-in ``mlperf.conf`` + ``user.conf`` + ``audit.config`` + CLI overrides.

LoadGen keeps per-process state that makes a second test in one process wrong without an error:
the built-in ``mlperf.conf`` is applied only on the first ``FromConfig(..., conf_type=1)`` call of a
process, and ``StartTest`` reads ``./audit.config`` from the working directory (turning any run into
a compliance run). The harness therefore runs every LoadGen test in a fresh process
(:mod:`harness.run_command`), guards against reuse here, and passes an explicit audit-config path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from sdxl.benchmark_spec import MLPERF_MODEL_NAME

SCENARIOS = ("Offline", "Server", "SingleStream")
MODES = ("performance", "accuracy")
#: user.conf keys a closed-division submitter may set (performance targets); anything else changes the rules.
COMPLIANT_USER_KEYS = frozenset({"target_qps", "target_latency", "server_target_qps", "offline_expected_qps",
                                 "single_stream_expected_latency_ns"})
#: LoadGen reads this from the working directory unless told otherwise; pointing it at a path that does
#: not exist turns compliance mode off deterministically.
NO_AUDIT_CONFIG = "/nonexistent/sdxl-ptq-bench/no-audit.config"

_state = {"user_conf_loaded": False}


@dataclass
class Overrides:
    """Command-line overrides, applied after the conf files, with the reference ``main.py``'s meaning."""

    time_s: float | None = None  # --time: min_duration = max_duration
    count: int | None = None  # --count: min_query_count = max_query_count
    qps: float | None = None  # --qps: server/offline target

    def non_compliant_reasons(self) -> list[str]:
        reasons = []
        if self.time_s is not None:
            reasons.append(f"--time {self.time_s:g} overrides the 600 s minimum duration")
        if self.count is not None:
            reasons.append(f"--count {self.count} caps the number of queries")
        return reasons


def user_conf_keys(path: Path) -> list[tuple[str, str, str, str]]:
    """``(model, scenario, key, value)`` for each setting line of a LoadGen conf file."""
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([^.\s]+)\.([^.\s]+)\.(\w+)\s*=\s*(\S+)", line)
        if not match:
            raise ValueError(f"{path}:{number}: not a LoadGen setting line (model.scenario.key = value): {line!r}")
        entries.append(match.groups())
    return entries


def user_conf_non_compliant_keys(path: Path, scenario: str) -> list[str]:
    """Keys of ``path`` that apply to this model/scenario and are not performance targets."""
    return [f"{m}.{s}.{k} = {v}" for m, s, k, v in user_conf_keys(path)
            if m in ("*", MLPERF_MODEL_NAME) and s in ("*", scenario) and k not in COMPLIANT_USER_KEYS]


def make_test_settings(scenario: str, mode: str, user_conf: Path, audit_conf: Path | None, overrides: Overrides):
    """Build ``lg.TestSettings`` as the reference ``main.py`` does (conf files first, then CLI overrides)."""
    import mlperf_loadgen as lg

    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}")
    if _state["user_conf_loaded"]:
        raise RuntimeError("LoadGen already loaded a user.conf in this process, so MLPerf's built-in mlperf.conf "
                           "would not be applied again: run each LoadGen test in its own process")
    settings = lg.TestSettings()
    # conf_type 1 (user.conf): LoadGen applies its built-in mlperf.conf first, on the first such call.
    settings.FromConfig(str(user_conf), MLPERF_MODEL_NAME, scenario, 1)
    _state["user_conf_loaded"] = True
    if audit_conf is not None:
        # conf_type 2: model-specific audit keys (TEST04's Offline.min_query_count) without counting
        # as a second user.conf; LoadGen itself re-reads the file with model "*" in StartTest.
        settings.FromConfig(str(audit_conf), MLPERF_MODEL_NAME, scenario, 2)
    settings.scenario = getattr(lg.TestScenario, scenario)
    settings.mode = lg.TestMode.AccuracyOnly if mode == "accuracy" else lg.TestMode.PerformanceOnly
    if overrides.time_s is not None:
        settings.min_duration_ms = settings.max_duration_ms = int(overrides.time_s * 1000)
    if overrides.qps is not None:
        settings.server_target_qps = settings.offline_expected_qps = float(overrides.qps)
    if overrides.count is not None:
        settings.min_query_count = settings.max_query_count = int(overrides.count)
    return settings


def make_log_settings(output_dir: Path, trace: bool = False):
    import mlperf_loadgen as lg

    log_output = lg.LogOutputSettings()
    log_output.outdir = str(output_dir)
    log_output.copy_summary_to_stdout = False
    log_settings = lg.LogSettings()
    log_settings.log_output = log_output
    log_settings.enable_trace = trace
    return log_settings
