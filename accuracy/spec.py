"""The MLPerf SDXL accuracy rules, read from one data file (``accuracy/data/mlperf_sdxl_accuracy.json``).

The windows and weight hashes are facts about MLPerf, not tunables; keeping them in one data file
means a new MLPerf round that changes them is a one-file edit with a visible diff.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).parent / "data"
SPEC_FILE = DATA_DIR / "mlperf_sdxl_accuracy.json"


@dataclass(frozen=True)
class Window:
    """An inclusive MLPerf accuracy window ``[low, high]`` (the checker's target and upper limit)."""

    low: float
    high: float

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def as_list(self) -> list[float]:
        return [self.low, self.high]


@lru_cache(maxsize=1)
def _data() -> dict[str, Any]:
    return json.loads(SPEC_FILE.read_text())


def window(metric: str) -> Window:
    """The window of ``"fid"`` or ``"clip_score"``."""
    entry = _data()["windows"][metric]
    return Window(float(entry["low"]), float(entry["high"]))


def official_image_size() -> int:
    return int(_data()["official_image_size"])


def official_sample_count() -> int:
    return int(_data()["official_sample_count"])


def weight_info(name: str) -> dict[str, Any]:
    """Facts about an accepted weight file: ``inception``, ``clip_openai_torchscript`` or ``clip_hf``."""
    return dict(_data()["weights"][name])


def statistics_info() -> dict[str, str]:
    return dict(_data()["fid_statistics"])
