"""Termination signals handled as Ctrl-C is: the work stops cleanly and the record says which signal.

SIGTERM is how ``timeout``, batch schedulers and container runtimes end a job; by default it kills
Python on the spot, so a run directory would keep ``status: running`` and LoadGen's logs would stay
empty. :func:`handle_termination` turns SIGTERM (and SIGHUP, a closed terminal) into
:class:`Interrupted`, a ``KeyboardInterrupt``, so every ``except KeyboardInterrupt`` path (abort the
SUT, let LoadGen finish its logs, mark ``run.json`` interrupted) serves both.
"""

from __future__ import annotations

import signal
import threading

#: the signals that end a job politely; SIGINT keeps Python's own KeyboardInterrupt
TERMINATION_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """A termination signal, raised in the main thread; ``signal_name`` says which."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


def signal_name(exc: BaseException) -> str:
    """``SIGTERM``/``SIGHUP`` for :class:`Interrupted`, ``SIGINT`` for a plain Ctrl-C."""
    return exc.signal_name if isinstance(exc, Interrupted) else "SIGINT"


def exit_code(exc: BaseException) -> int:
    """The shell's convention, 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + signal.Signals[signal_name(exc)].value


def describe(exc: BaseException) -> str:
    name = signal_name(exc)
    return "interrupted by the user (Ctrl-C)" if name == "SIGINT" else f"interrupted by {name}"


def handle_termination() -> None:
    """From now on, the first SIGTERM/SIGHUP raises :class:`Interrupted` in the main thread.

    Later ones are ignored while the clean-up runs (a parent forwards SIGTERM to its children, and a
    ``kill`` of the whole process group delivers it to them a second time). Main thread only.
    """

    def raise_interrupted(signum: int, _frame) -> None:
        for sig in TERMINATION_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        raise Interrupted(signal.Signals(signum).name)

    if threading.current_thread() is not threading.main_thread():
        return  # Python delivers signals to the main thread only; a caller on another thread keeps the default
    for sig in TERMINATION_SIGNALS:
        signal.signal(sig, raise_interrupted)
