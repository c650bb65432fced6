"""Run MLCommons' own submission checker on a tree ``./run.sh submission`` writes, open and closed-relabelled.

The suite checks trees against the rules taken from the checker (``harness/submission_rules.py``); this
script is the check against the checker itself, for a developer with a copy of mlcommons/inference
(a checkout, or a bare git directory: ``tools/submission`` is read from its HEAD). It makes short
null-backend tiny runs (Offline and SingleStream, ``--mode both``, their TEST01 and TEST04 audits),
writes the open-division tree, runs ``truncate_accuracy_log.py`` on it and then
``submission_checker/main.py --version ROUND`` on it and on a copy relabelled closed (the checker
skips compliance in the open division). Every distinct ERROR line is printed, marked as explained
by the short runs or not; the exit code is 1 when any is not::

    .venv/bin/python tools/official_checker.py --inference ~/src/inference [--work /tmp/checker]

Explained, and only these: the 600 s minimum duration, 16 of 5000 samples in the accuracy run,
Offline's 5000 samples per query, and compliance performance verdicts that our own
``verify_performance.txt`` also failed (null-backend queries take about a millisecond, so two runs'
timings differ by more than the 10% the audits allow), plus the checker's summary lines ("Some ...
checks Checks failed", "NoResults", "SUMMARY"): every failing check also logs its own line, which is
judged on its own.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXPLAINED = (re.compile(r"Test duration less than 600s"), re.compile(r"accurcy run does not cover all dataset"),
             re.compile(r"Required minimum samples per query not met"),
             re.compile(r"^(Some .* Checks failed for|NoResults|SUMMARY: submission has errors)"))
COMPLIANCE_PERF = re.compile(r"Compliance test performance check in (\S+) failed")
#: fields no host tells, as a submitter fills them (the to-do list of ./run.sh submission names them)
SYSTEM_JSON = {"host_memory_configuration": "not known (virtual machine)", "host_storage_type": "virtual disk",
               "host_networking": "virtual Ethernet", "host_networking_topology": "N/A (single node)",
               "cooling": "N/A (virtual machine)"}


def checker_tools(inference: Path, into: Path) -> Path:
    """``tools/submission`` of the checkout (or of a bare git directory's HEAD) and ``compliance/``'s audit.configs."""
    if (inference / "tools" / "submission" / "submission_checker").is_dir():
        return inference
    files = subprocess.run(["git", "--git-dir", str(inference), "ls-tree", "-r", "--name-only", "HEAD",
                            "tools/submission/submission_checker", "tools/submission/truncate_accuracy_log.py",
                            "compliance/TEST01/stable-diffusion-xl/audit.config", "compliance/TEST04/audit.config"],
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        target = into / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(subprocess.run(["git", "--git-dir", str(inference), "show", f"HEAD:{name}"],
                                          capture_output=True, check=True).stdout)
    return into


def make_runs(work: Path, root: Path) -> tuple[list[Path], list[Path]]:
    runs, audits = [], []
    for scenario in ("Offline", "SingleStream"):
        common = ["./run.sh", "run", "--profile", "tiny", "--backend", "null", "--user-conf",
                  "tests/data/null_valid_user.conf", "--max-batchsize", "8", "--scenario", scenario]
        runs.append(work / scenario)
        subprocess.run([*common, "--mode", "both", "--output", str(runs[-1])], cwd=REPO, check=True,
                       stdout=subprocess.DEVNULL)
        for test, conf in (("TEST01", "compliance/TEST01/stable-diffusion-xl/audit.config"),
                           ("TEST04", "compliance/TEST04/audit.config")):
            audits.append(work / f"{scenario}-{test}")
            subprocess.run([*common, "--audit-conf", str(root / conf), "--output", str(audits[-1])], cwd=REPO,
                           check=True, stdout=subprocess.DEVNULL)
    return runs, audits


def checker_errors(tools: Path, tree: Path, round_name: str) -> tuple[int, list[str]]:
    result = subprocess.run([sys.executable, "-m", "submission_checker.main", "--input", str(tree), "--version",
                             round_name, "--csv", str(tree.parent / f"{tree.name}.csv")],
                            cwd=tools / "tools" / "submission", capture_output=True, text=True)
    lines = (result.stdout + result.stderr).splitlines()
    errors = {re.sub(r"^\[[^]]*\] ", "", line).replace(f"{tree}/", "") for line in lines if "ERROR" in line}
    return result.returncode, sorted(re.sub(r"^(closed|open)/acme/", "", e) for e in errors)


def explained(error: str, tree: Path) -> bool:
    if any(pattern.search(error) for pattern in EXPLAINED):
        return True
    match = COMPLIANCE_PERF.search(error)
    if match:  # ours failed it too: the null backend's millisecond timings
        verdict = next(tree.glob(f"*/acme/{match.group(1).split('acme/')[-1]}/verify_performance.txt"))
        return verdict.read_text().rstrip().endswith("TEST FAIL")
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inference", required=True, type=Path, help="mlcommons/inference checkout or bare git dir")
    parser.add_argument("--round", default="v6.1")
    parser.add_argument("--work", type=Path, help="where runs and trees go (default: a temporary directory)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="official-checker-"))
    if work.exists() and any(work.iterdir()):
        parser.error(f"--work {work} is not empty")
    work.mkdir(parents=True, exist_ok=True)
    tools = checker_tools(args.inference.resolve(), work / "inference")
    runs, audits = make_runs(work, tools)
    (work / "system.json").write_text(json.dumps(SYSTEM_JSON))
    subprocess.run(["./run.sh", "submission", "--runs", *map(str, runs), "--audits", *map(str, audits),
                    "--submitter", "acme", "--system", "tiny-null", "--system-type", "edge", "--division", "open",
                    "--round", args.round, "--system-json", str(work / "system.json"), "--output",
                    str(work / "written")], cwd=REPO)
    opened = work / "open-tree"
    subprocess.run([sys.executable, "truncate_accuracy_log.py", "--input", str(work / "written"), "--output",
                    str(opened), "--submitter", "acme"], cwd=tools / "tools" / "submission", check=True,
                   capture_output=True)
    closed = work / "closed-tree"
    shutil.copytree(opened / "open", closed / "closed")
    for description in (closed / "closed" / "acme" / "systems").glob("*.json"):
        description.write_text(description.read_text().replace('"division": "open"', '"division": "closed"'))
    commit = subprocess.run(["git", "--git-dir", str(args.inference), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "a checkout"
    print(f"\nmlcommons/inference {commit}, checker --version {args.round}; trees under {work}")
    unexplained = 0
    for name, tree in (("open", opened), ("closed (relabelled)", closed)):
        code, errors = checker_errors(tools, tree, args.round)
        print(f"\n{name}: checker exit {code}, {len(errors)} distinct ERROR lines")
        for error in errors:
            ok = explained(error, tree)
            unexplained += not ok
            print(f"  {'short run' if ok else 'REAL     '}  {error[:200]}")
    print(f"\n{unexplained} error(s) not explained by the short runs")
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
