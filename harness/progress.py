"""Progress bars that stay quiet when nobody watches (CI, pipes) unless asked for."""

from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

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
