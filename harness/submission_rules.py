"""What MLPerf's submission checker requires of a ``stable-diffusion-xl`` submission, round by round.

Taken from the checker itself, not from memory: mlcommons/inference ``tools/submission/`` at
:data:`CHECKER_COMMIT` (``submission_checker/constants.py``: ``MODEL_CONFIG`` seeds and required
scenarios, ``SYSTEM_DESC_*_FIELDS``, ``SYSTEM_IMP_REQUIRED_FILES``, ``REQUIRED_*_FILES``,
``REQUIRED_ACC_BENCHMARK`` images, the ``*_PATH`` layouts; ``truncate_accuracy_log.py``; the checks in
``checks/*.py``). The suite cannot fetch that repository, so :func:`check_tree` applies these rules to a
tree (paths, file names, required fields, seeds, the accuracy-log size); the README says how to run
the official checker on the same tree.

Where rounds differ: v5.1 keeps ``measurements/<system>/<benchmark>/<Scenario>/<system>_<Scenario>.json``
and ``compliance/<system>/...`` beside ``results/`` and the code in ``code/``; v6.0 and v6.1 put
``measurements.json``, ``user.conf``, ``README.md`` and ``TEST0x/`` in ``results/.../<Scenario>/`` and
the code in ``src/``. v6.x lists SDXL for edge systems (and datacenter,edge) only. Each round has its
own LoadGen seeds (LoadGen 6.0.x writes v6.1's) and v5.1/v6.0 name ten sample ids whose images the
accuracy folder must hold; v6.1 names none.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

CHECKER_COMMIT = "b66003e10e2db4b8c36a448b0545ec90fcc6e9e9"  # mlcommons/inference HEAD of 2026-08-20
BENCHMARK = "stable-diffusion-xl"
SYSTEM_TYPES = ("datacenter", "edge", "datacenter,edge")
STATUSES = ("available", "preview", "rdi")
COMPLIANCE_TESTS = ("TEST01", "TEST04")  # models_TEST01 and models_TEST04 hold SDXL in every round here

#: SYSTEM_DESC_REQUIRED_FIELDS: every key must be present ...
SYSTEM_FIELDS = (
    "division", "submitter", "status", "system_name", "number_of_nodes", "host_processor_model_name",
    "host_processors_per_node", "host_processor_core_count", "host_memory_capacity", "host_storage_capacity",
    "host_storage_type", "accelerators_per_node", "accelerator_model_name", "accelerator_memory_capacity",
    "framework", "operating_system", "system_type", "other_software_stack", "host_processor_frequency",
    "host_processor_caches", "host_memory_configuration", "host_processor_interconnect", "host_networking",
    "host_networking_topology", "accelerator_frequency", "accelerator_host_interconnect", "accelerator_interconnect",
    "accelerator_interconnect_topology", "accelerator_memory_configuration", "accelerator_on-chip_memories",
    "cooling", "hw_notes", "sw_notes", "host_network_card_count", "system_type_detail")
#: ... and these (SYSTEM_DESC_MEANINGFUL_RESPONSE_REQUIRED_FIELDS) must not be empty
MEANINGFUL_FIELDS = (
    "division", "submitter", "system_type", "status", "system_name", "number_of_nodes", "host_processor_model_name",
    "host_processors_per_node", "host_processor_core_count", "host_memory_capacity", "host_memory_configuration",
    "host_storage_capacity", "host_storage_type", "host_networking", "host_network_card_count",
    "host_networking_topology", "accelerators_per_node", "accelerator_model_name", "accelerator_memory_capacity",
    "accelerator_host_interconnect", "accelerator_memory_configuration", "accelerator_interconnect", "cooling",
    "framework", "operating_system", "other_software_stack")
#: SYSTEM_IMP_REQUIRED_FILES: the keys of measurements.json, none empty
MEASUREMENTS_FIELDS = ("input_data_types", "retraining", "starting_weights_filename", "weight_data_types",
                       "weight_transformations")
PERFORMANCE_FILES = ("mlperf_log_summary.txt", "mlperf_log_detail.txt")  # REQUIRED_PERF_FILES
ACCURACY_FILES = ("mlperf_log_summary.txt", "mlperf_log_detail.txt", "accuracy.txt", "mlperf_log_accuracy.json")
MEASURE_FILES = ("user.conf", "README.md")  # REQUIRED_MEASURE_FILES
MAX_ACCURACY_LOG_SIZE = 10 * 1024  # bytes; truncate_accuracy_log.py keeps VIEWABLE_SIZE from each end
VIEWABLE_SIZE = 4096
HASH_LINE = re.compile(r"^hash=([\w\d]+)$")
SCORE_LINES = {"CLIP_SCORE": re.compile(r".*'CLIP_SCORE':\s+'?([\d.]+).*"),
               "FID_SCORE": re.compile(r".*'FID_SCORE':\s+'?([\d.]+).*")}


@dataclass(frozen=True)
class Round:
    name: str
    seeds: dict[str, int]  # effective_<key> in mlperf_log_detail.txt
    scenarios: dict[str, tuple[str, ...]]  # system type -> required scenarios; SDXL is no benchmark of a type absent
    image_ids: tuple[int, ...]  # accuracy/images/<id>.png the checker wants; empty: none
    split_layout: bool  # measurements/ and compliance/ beside results/ (v5.1)

    @property
    def code_dir(self) -> str:
        return "code" if self.split_layout else "src"

    def scenario_dir(self, system: str, scenario: str) -> str:
        return f"results/{system}/{BENCHMARK}/{scenario}"

    def measurements_dir(self, system: str, scenario: str) -> str:
        return f"measurements/{system}/{BENCHMARK}/{scenario}" if self.split_layout else self.scenario_dir(system, scenario)

    def measurements_json(self, system: str, scenario: str) -> str:
        name = f"{system}_{scenario}.json" if self.split_layout else "measurements.json"
        return f"{self.measurements_dir(system, scenario)}/{name}"

    def compliance_dir(self, system: str, scenario: str, test: str) -> str:
        base = f"compliance/{system}/{BENCHMARK}/{scenario}" if self.split_layout else self.scenario_dir(system, scenario)
        return f"{base}/{test}"


_EDGE = {"edge": ("SingleStream", "Offline"), "datacenter,edge": ("SingleStream", "Offline", "Server")}
ROUNDS = {
    "v5.1": Round("v5.1", {"qsl_rng_seed": 1780908523862526354, "sample_index_rng_seed": 14771362308971278857,
                           "schedule_rng_seed": 18209322760996052031},
                  {"datacenter": ("Server", "Offline"), **_EDGE},
                  (2747, 2235, 2165, 1515, 1538, 1367, 2419, 4629, 3657, 4532), split_layout=True),
    "v6.0": Round("v6.0", {"qsl_rng_seed": 2465351861681999779, "sample_index_rng_seed": 14276810075590677512,
                           "schedule_rng_seed": 3936089224930324775},
                  dict(_EDGE), (1311, 2476, 3644, 2188, 4114, 52, 388, 1195, 3427, 2289), split_layout=False),
    "v6.1": Round("v6.1", {"qsl_rng_seed": 2085463073848966840, "sample_index_rng_seed": 2747215439041700203,
                           "schedule_rng_seed": 16159082839903944936}, dict(_EDGE), (), split_layout=False),
}
DEFAULT_ROUND = "v6.1"


def get_round(name: str) -> Round:
    if name not in ROUNDS:
        raise ValueError(f"--round {name}: choose {', '.join(ROUNDS)} (the rounds whose checker lists {BENCHMARK})")
    return ROUNDS[name]


def required_scenarios(rnd: Round, system_type: str) -> tuple[str, ...]:
    """The scenarios a closed submission of ``system_type`` must have in ``rnd``; a clear error where SDXL has none."""
    if system_type not in SYSTEM_TYPES:
        raise ValueError(f"--system-type {system_type}: choose {', '.join(SYSTEM_TYPES)}")
    if system_type not in rnd.scenarios:
        raise ValueError(f"{rnd.name}'s checker lists {BENCHMARK} for {' and '.join(rnd.scenarios)} systems only, "
                         f"not {system_type}")
    return rnd.scenarios[system_type]


def log_values(detail: Path, keys: set[str]) -> dict[str, object]:
    """Values of ``keys`` among the ``:::MLLOG`` records of a LoadGen ``mlperf_log_detail.txt``."""
    found = {}
    with open(detail, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.startswith(":::MLLOG") and any(f'"{key}"' in line for key in keys):
                record = json.loads(line[len(":::MLLOG"):])
                found.setdefault(record["key"], record["value"])
    return found


def seed_problems(detail: Path, rnd: Round, label: object = None) -> list[str]:
    """Where the LoadGen seeds of a run differ from the round's (the checker's ``seeds_check``)."""
    found = log_values(detail, {f"effective_{key}" for key in rnd.seeds} | {"loadgen_version"})
    wrong = [key for key, value in rnd.seeds.items() if found.get(f"effective_{key}") != value]
    if not wrong:
        return []
    matches = [name for name, other in ROUNDS.items() if all(found.get(f"effective_{k}") == v for k, v in other.seeds.items())]
    return [f"{label or detail}: LoadGen {found.get('loadgen_version')} used {'/'.join(matches) or 'other'} seeds, "
            f"not {rnd.name}'s ({', '.join(wrong)} differ): run with that round's LoadGen"]


def check_tree(root: Path, rnd: Round, division: str | None = None, submitter: str | None = None) -> list[str]:
    """The checker's rules applied to ``<output>/<division>/<submitter>`` (``root``; the names default to
    its folders); one line per violation, paths relative to ``root``.

    Covers what the tree's layout decides (files, names, fields, seeds, truncation, scenarios,
    compliance folders); not what only a full-length run can satisfy (600 s, 5000 samples, accuracy).
    """
    division, submitter = division or root.parent.name, submitter or root.name
    problems: list[str] = []

    def need(path: Path, what: str = "") -> bool:
        if not path.is_file() or path.stat().st_size == 0:
            problems.append(f"{path.relative_to(root)} is missing{' (' + what + ')' if what else ''}")
            return False
        return True

    if not (root / rnd.code_dir).is_dir():
        problems.append(f"{rnd.code_dir}/ is missing")
    systems = sorted(p.name for p in (root / "results").iterdir() if p.is_dir()) if (root / "results").is_dir() else []
    if not systems:
        problems.append("results/ holds no system")
    for system in systems:
        description_path = root / "systems" / f"{system}.json"
        if not need(description_path, "the system description"):
            continue
        description = json.loads(description_path.read_text())
        problems += [f"systems/{system}.json: {field} is missing" for field in SYSTEM_FIELDS if field not in description]
        problems += [f"systems/{system}.json: {field} is empty" for field in MEANINGFUL_FIELDS
                     if field in description and not str(description[field]).strip()]
        if description.get("division") != division or str(description.get("submitter", "")).lower() != submitter.lower():
            problems.append(f"systems/{system}.json: division/submitter differ from the folders ({division}/{submitter})")
        if str(description.get("status", "")).lower() not in STATUSES:
            problems.append(f"systems/{system}.json: status {description.get('status')!r} is not one of {STATUSES}")
        system_type = description.get("system_type")
        scenarios = sorted(p.name for p in (root / "results" / system / BENCHMARK).iterdir() if p.is_dir())
        if system_type not in SYSTEM_TYPES:
            problems.append(f"systems/{system}.json: system_type {system_type!r} is not one of {SYSTEM_TYPES}")
        elif division == "closed":
            required = rnd.scenarios.get(system_type, ())
            problems += [f"results/{system}/{BENCHMARK}: {s} is required of a {system_type} system"
                         for s in required if s not in scenarios]
            problems += [f"results/{system}/{BENCHMARK}/{s}: not a scenario of a {system_type} system in {rnd.name}"
                         for s in scenarios if s not in required]
        for scenario in scenarios:
            problems += _scenario_problems(root, rnd, system, scenario, division, need)
    return problems


def _scenario_problems(root: Path, rnd: Round, system: str, scenario: str, division: str, need) -> list[str]:
    problems: list[str] = []
    where = root / rnd.scenario_dir(system, scenario)
    for name in PERFORMANCE_FILES:
        need(where / "performance" / "run_1" / name)
    detail = where / "performance" / "run_1" / "mlperf_log_detail.txt"
    if detail.is_file():
        problems += seed_problems(detail, rnd, detail.relative_to(root))
    for name in ACCURACY_FILES:
        need(where / "accuracy" / name)
    problems += _accuracy_log_problems(root, where / "accuracy", scores=division == "closed")
    images = where / "accuracy" / "images"
    missing = [i for i in rnd.image_ids if not (images / f"{i}.png").is_file()]
    if missing or (rnd.image_ids and not (images / "captions.txt").is_file()):
        problems.append(f"{images.relative_to(root)}: {len(missing)} of {rnd.name}'s {len(rnd.image_ids)} sample images "
                        f"missing ({', '.join(map(str, missing[:3]))}{', ...' if len(missing) > 3 else ''}), or captions.txt")
    measurements = root / rnd.measurements_json(system, scenario)
    if need(measurements, "measurements"):
        data = json.loads(measurements.read_text())
        problems += [f"{measurements.relative_to(root)}: {k} is missing or empty" for k in MEASUREMENTS_FIELDS if not data.get(k)]
    for name in MEASURE_FILES:
        need(root / rnd.measurements_dir(system, scenario) / name)
    if division == "open":  # the checker skips compliance in the open division
        return problems
    for test in COMPLIANCE_TESTS:
        folder = root / rnd.compliance_dir(system, scenario, test)
        need(folder / "verify_performance.txt")
        detail = folder / "performance" / "run_1" / "mlperf_log_detail.txt"
        if need(detail):
            problems += seed_problems(detail, rnd, detail.relative_to(root))
        if test == "TEST01":
            if need(folder / "verify_accuracy.txt"):
                if "TEST PASS" not in (folder / "verify_accuracy.txt").read_text().split("\n"):
                    problems += _fallback_problems(root, folder / "accuracy")
            problems += _accuracy_log_problems(root, folder / "accuracy", scores=False)
    return problems


def _accuracy_log_problems(root: Path, folder: Path, scores: bool) -> list[str]:
    """accuracy.txt holds ``hash=`` (and CLIP/FID lines in the results) and the log is truncated."""
    log, text = folder / "mlperf_log_accuracy.json", folder / "accuracy.txt"
    if not (log.is_file() and text.is_file()):
        return [f"{folder.relative_to(root)}: mlperf_log_accuracy.json and accuracy.txt are both required"]
    lines = text.read_text().splitlines()
    problems = []
    if not any(HASH_LINE.match(line) for line in lines):
        problems.append(f"{text.relative_to(root)} has no hash= line (truncate_accuracy_log.py writes it)")
    if scores:
        problems += [f"{text.relative_to(root)} has no {name} line" for name, pattern in SCORE_LINES.items()
                     if not any(pattern.match(line) for line in lines)]
    if log.stat().st_size >= MAX_ACCURACY_LOG_SIZE:
        problems.append(f"{log.relative_to(root)} is {log.stat().st_size} bytes: not truncated (< {MAX_ACCURACY_LOG_SIZE})")
    return problems


def _fallback_problems(root: Path, folder: Path) -> list[str]:
    """TEST01 without TEST PASS: the checker wants exactly the fallback's four files (REQUIRED_TEST01_ACC_FILES)."""
    wanted = {"mlperf_log_accuracy.json", "accuracy.txt", "baseline_accuracy.txt", "compliance_accuracy.txt"}
    present = {p.name for p in folder.iterdir() if p.is_file()} if folder.is_dir() else set()
    return [] if present == wanted else [f"{folder.relative_to(root)}: TEST01 did not pass byte for byte, so the "
                                         f"checker wants exactly {sorted(wanted)} (the fallback), found {sorted(present)}"]
