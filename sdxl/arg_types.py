"""argparse ``type=`` callables for numeric flags: a value out of range is a usage error at parse time.

LoadGen does not refuse bad numbers itself (``--count 0`` crashed its process with SIGSEGV, ``--qps
-5`` ran at 1 QPS while the record kept -5), and a check after the model loads wastes the load; argparse
reports these as ``error: argument --count: ...``, exit code 2, before anything else runs.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable


def int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value
