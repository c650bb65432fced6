"""Building the two evaluation networks once per command, from real weights or, on request, random ones.

Missing weights are handled in one of two ways: the stand-alone commands stop with the one-line
how-to (``missing="error"``), while the end of ``run --accuracy`` must still finish and reports the
metric as unavailable with the same how-to (``missing="na"``). ``random_weights=True`` builds seeded
random networks so the mechanics can be exercised anywhere; every output then says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from .clip_score import ClipScorer
from .fid import InceptionFeatures
from .weights import WeightFile, WeightsUnavailable, resolve_clip, resolve_inception

RANDOM_WEIGHTS_REASON = ("computed with RANDOM Inception/CLIP weights (--random-weights); these numbers only "
                         "exercise the mechanics")
RANDOM_WEIGHTS_WARNING = "NOT COMPARABLE: " + RANDOM_WEIGHTS_REASON


@dataclass
class Evaluators:
    inception: InceptionFeatures | None = None
    clip: ClipScorer | None = None
    fid_note: str | None = None    # why FID is unavailable
    clip_note: str | None = None   # why CLIP is unavailable
    random_weights: bool = False

    def describe_weights(self) -> dict[str, Any]:
        """``{"inception": ..., "clip": ...}`` for the JSON outputs (path, sha256, official or random)."""
        def one(net, note):
            if net is None:
                return {"available": False, "note": note}
            if net.weights is None:
                return {"available": True, "random": True}
            return {"available": True, "random": False, **net.weights.describe()}
        return {"inception": one(self.inception, self.fid_note), "clip": one(self.clip, self.clip_note)}

    def unofficial_weights(self) -> list[str]:
        """Weight files whose sha256 is known and differs from the official file's."""
        return [f"{net.weights.kind} weights {net.weights.path} (sha256 {net.weights.sha256[:12]}...) are not the official file"
                for net in (self.inception, self.clip) if net is not None and net.weights is not None
                and net.weights.official is False]


def build_evaluators(*, fid: bool, clip: bool, random_weights: bool = False, inception_weights: str | None = None,
                     clip_weights: str | None = None, device: str = "cpu", missing: str = "error") -> Evaluators:
    """The networks asked for (``fid``/``clip``); see the module doc for ``missing`` and ``random_weights``."""
    result = Evaluators(random_weights=random_weights)
    for wanted, resolve, path, attr, note in ((fid, resolve_inception, inception_weights, "inception", "fid_note"),
                                              (clip, resolve_clip, clip_weights, "clip", "clip_note")):
        if not wanted:
            continue
        try:
            weights = None if random_weights else resolve(path)
        except WeightsUnavailable as exc:
            if missing == "error":
                raise
            setattr(result, note, str(exc))
            continue
        setattr(result, attr, _network(attr, weights, device))
    return result


@lru_cache(maxsize=4)
def _network(kind: str, weights: WeightFile | None, device: str) -> InceptionFeatures | ClipScorer:
    """Networks are stateless at inference: one per (kind, file, device) per process, so a run's
    audit and its comparison (or a test session) build each only once (seconds to tens of seconds)."""
    return InceptionFeatures(weights, device) if kind == "inception" else ClipScorer(weights, device)
