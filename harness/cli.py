"""``python -m harness`` / ``./run.sh``: one entry point, one sub-command per task.

Each command module exposes ``register(subparsers)``, which adds its sub-command(s) and sets
``func(args) -> int`` as the handler; adding a command is adding a module to :data:`COMMAND_MODULES`.
Errors the user can fix (:class:`sdxl.errors.UserError` and the domain errors derived from it: a missing
file, a bad flag value) are printed as one line, exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from sdxl.errors import UserError
from sdxl.interrupts import describe, exit_code, handle_termination

COMMAND_MODULES = ("harness.run_command", "harness.compliance", "harness.submission", "harness.study",
                   "testbed.commands", "calibration.commands", "calibration.mixed_precision.commands",
                   "accuracy.commands")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are the project's one-line errors (exit code 2, no usage dump)."""

    def error(self, message: str):
        raise UserError(f"{message} (see: {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="run.sh", description="MLPerf-style SDXL benchmark for quantized models.")
    parser.add_argument("--log-level", default="WARNING", help="Python logging level (default WARNING)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(subparsers)
    return parser


def quiet_openmp_waits() -> None:
    """Let idle OpenMP threads sleep instead of spin, unless the user chose (``OMP_WAIT_POLICY``).

    GNU OpenMP's default spin-wait assumes every thread owns a core. Here it does not: the SUT runs
    several workers that each open a torch thread team, ONNX Runtime keeps its own pool, and shared
    machines have other load. A spinning team then waits on descheduled threads at every barrier:
    on this project's 2-core machines a tiny-UNet call took 11-16 s instead of 0.5-2 s under load.
    Set before the child processes (and their libgomp) start, so every LoadGen test inherits it.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: list[str] | None = None) -> int:
    quiet_openmp_waits()
    handle_termination()  # SIGTERM/SIGHUP end a command as Ctrl-C does: cleanly, and recorded as such
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(describe(exc), file=sys.stderr)
        return exit_code(exc)
