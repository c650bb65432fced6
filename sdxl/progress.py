"""Progress bars that stay quiet when nobody watches (CI, pipes) unless asked for."""

from __future__ import annotations

import os
import sys
import threading
from typing import Iterable, TypeVar

import tqdm as _tqdm
from tqdm.auto import tqdm

# tqdm guards its bars with a multiprocessing lock by default, a named semaphore that LoadGen's child
# processes (which end with os._exit) would leave behind ("leaked semaphore objects" at exit). Our bars
# only ever share a process between threads, and the class attribute covers diffusers' bars too.
_tqdm.tqdm.set_lock(threading.RLock())

T = TypeVar("T")


def progress_enabled() -> bool:
    """Bars on a terminal; off under CI or with SDXL_BENCH_NO_PROGRESS=1."""
    if os.environ.get("SDXL_BENCH_NO_PROGRESS") == "1":
        return False
    return sys.stderr.isatty()


def progress(iterable: Iterable[T], desc: str, total: int | None = None, disable: bool = False, unit: str = "it") -> Iterable[T]:
    """A tqdm bar on stderr over ``iterable``."""
    return tqdm(iterable, desc=desc, total=total, disable=disable or not progress_enabled(), unit=unit,
                file=sys.stderr, dynamic_ncols=True, leave=False)
