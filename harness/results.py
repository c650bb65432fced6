"""The run directory's ``run.json`` (the contract later tools read) and the printed results table.

``run.json`` is rewritten atomically (temp file + rename) at the start of a run (``status:
"running"``), after each LoadGen test, and at the end (``completed``, ``failed`` or ``interrupted``),
so it is never half-written and a crash leaves an honest status behind. Fields: see README.md.
"""

from __future__ import annotations

import datetime as _dt
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from sdxl.io import format_table, write_json_atomic

RUN_JSON_VERSION = 1


@dataclass
class RunRecord:
    run_dir: Path
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.run_dir / "run.json"

    @property
    def status(self) -> str:
        return self.data.get("status", "unknown")

    @property
    def tests(self) -> list[dict[str, Any]]:
        return self.data.setdefault("tests", [])

    @classmethod
    def start(cls, run_dir: Path, config, spec, captions, latent, non_compliance: list[str]) -> "RunRecord":
        from sdxl.system_info import system_description

        data = {
            "run_json_version": RUN_JSON_VERSION,
            "status": "running",
            "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "finished": None,
            "error": None,
            "benchmark": "stable-diffusion-xl",
            "scenario": config.scenario,
            "modes": list(config.modes),
            "profile": spec.profile,
            "model": {"description": spec.description, "path": str(spec.model_path) if spec.model_path else None,
                      "fingerprint": spec.fingerprint()},
            "random_weights": spec.random_weights,
            "image_size": spec.image_size,
            "backend": {"name": config.backend, "dtype": config.dtype, "device": config.device,
                        "encodings": config.encodings, "recipe": config.recipe},
            "dataset": captions.describe(),
            "max_samples": config.max_samples,
            "latent": latent.describe(),
            "loadgen": {"user_conf": str(Path(config.user_conf).resolve()),
                        "audit_conf": str(Path(config.audit_conf).resolve()) if config.audit_conf else None,
                        "count": config.count, "time_s": config.time_s, "qps": config.qps},
            "sut": {"max_batchsize": config.max_batchsize, "threads": config.threads, "warmup": config.warmup},
            "executor": {"executor": config.executor},  # --executor ray: the cluster and its actors (ray_cluster)
            "compliant": not non_compliance,
            "non_compliance_reasons": non_compliance,
            "system": system_description(),
            "config": config.to_dict(),
            "tests": [],
        }
        record = cls(run_dir, data)
        record.save()
        return record

    def add_test(self, result: dict[str, Any]) -> None:
        self.tests.append(result)
        if result.get("nonfinite_images"):  # counted over the run, flagged in the table
            self.data["nonfinite_images"] = self.data.get("nonfinite_images", 0) + result["nonfinite_images"]
        self.save()

    def finish(self, status: str, error: str | None = None) -> None:
        self.data.update(status=status, error=error,
                         finished=_dt.datetime.now().astimezone().isoformat(timespec="seconds"))
        self.save()

    def save(self) -> None:
        write_json_atomic(self.path, self.data)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-2 else f"{value:.{digits}f}"
    return str(value)


def result_rows(record: RunRecord) -> list[list[str]]:
    rows = []
    for test in record.tests:
        if test.get("error"):
            perf = f"ERROR: {test['error']}"
        elif test.get("qps") is not None:
            perf = f"{_fmt(test['qps'])} samples/s"
            if test.get("p99_latency_s") is not None and test["scenario"] == "Server":
                perf += f", p99 {_fmt(test['p99_latency_s'])} s"
        elif test.get("p90_latency_s") is not None:
            perf = f"p90 {_fmt(test['p90_latency_s'])} s"
            if test.get("early_stopping_latency_s") is not None:
                perf += f", early-stop {_fmt(test['early_stopping_latency_s'])} s"
        else:
            perf = "-"
        validity = test.get("validity", "-")
        if test.get("invalid_reasons"):
            validity += " (" + "; ".join(test["invalid_reasons"]) + ")"
        rows.append([test["scenario"], test["mode"], _fmt(test.get("samples")), perf, validity, test["dir"]])
    return rows


def worker_rows(record: RunRecord) -> list[list[str]]:
    """One row per test and Ray actor: where it ran, its share of the samples, service vs its own compute time."""
    executor = record.data.get("executor") or {}
    if executor.get("executor") != "ray":
        return []
    actors = {a["name"]: a for a in executor.get("actors", [])}
    rows = []
    for test in record.tests:
        for name, stats in (test.get("sut") or {}).get("workers", {}).items():
            actor = actors.get(name, {})
            timing = stats["timing_ms"]
            lost = "" if actor.get("alive_at_end", True) else " (lost)"
            rows.append([test["mode"], name + lost, actor.get("node_ip", "-"), actor.get("device", "-"),
                         str(stats["samples"]), str(stats["batches"]), str(stats["reissued_batches"]),
                         _fmt(timing["service_per_batch"]["p50"]), _fmt(timing["compute_per_batch"]["p50"])])
    return rows


def print_results_table(records: list[RunRecord], stream: TextIO | None = None) -> None:
    """The table a person reads after a run: one row per LoadGen test, then the caveats that apply.

    ``stream`` defaults to ``sys.stdout`` as it is *at call time*: a default bound at import would keep
    writing to a stream that a test runner (or a redirect) has since closed.
    """
    stream = stream or sys.stdout
    header = ["scenario", "mode", "samples", "performance", "result", "logs"]
    rows = [row for record in records for row in result_rows(record)]
    print(format_table(header, rows), file=stream)
    workers = [row for record in records for row in worker_rows(record)]
    if workers:
        print("\n" + format_table(["test", "ray actor", "node", "device", "samples", "batches", "re-issued",
                                   "service p50 ms", "compute p50 ms"], workers), file=stream)
    for record in records:
        data = record.data
        system = data.get("system", {})
        print(f"\nrun {record.run_dir}  [{record.status}]  profile={data['profile']} backend={data['backend']['name']} "
              f"{data['backend']['dtype']} on {data['backend']['device']}; CPU {system.get('cpu_model')} "
              f"({system.get('isa')})", file=stream)
        if data.get("random_weights"):
            print("  !!! RANDOM WEIGHTS: this model was not trained; images are noise and accuracy is meaningless !!!",
                  file=stream)
        if data.get("nonfinite_images"):
            print(f"  !!! {data['nonfinite_images']} image(s) decoded with NaN/Inf pixels (logged as black): a broken "
                  "quantization recipe or input !!!", file=stream)
        executor = data.get("executor") or {}
        if executor.get("executor") == "ray":
            owner = " (started by this run)" if executor.get("started_local_cluster") else ""
            print(f"  executor: ray {executor.get('ray_version')}, {len(executor.get('actors', []))} actor(s) x "
                  f"{executor.get('threads_per_actor')} thread(s) on {len(executor.get('nodes', []))} node(s), cluster "
                  f"{executor.get('address')}{owner}", file=stream)
        if data.get("compliant"):
            print("  compliant with MLPerf's closed-division settings", file=stream)
        else:
            print("  NOT COMPLIANT: " + "; ".join(data.get("non_compliance_reasons", [])), file=stream)
        if data.get("error"):
            print(f"  error: {data['error']}", file=stream)
