"""``qncd_noise_correction``: QNCD's runtime noise correction (seed 004, inter noise) as a recipe method.

It calibrates nothing: it records, in the encodings' ``runtime.noise_correction``, that the sampling
loop must run :class:`sdxl.noise_correction.QncdNoiseCorrection` with these settings. The pipeline
reads it from the encodings, so every run of the encodings samples the same way; the extra UNet
calls are counted in ``run.json``; the run is not MLPerf closed-division compliant (``changes_sampler``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from . import register_method
from .base import Method, MethodResult, MethodTarget


@register_method
class QncdNoiseCorrection(Method):
    kind = "qncd_noise_correction"
    phase = "post_ranges"
    changes_sampler = True

    @dataclass(frozen=True)
    class Settings:
        #: steps between estimates (QNCD's reverse_interval, default 10)
        interval: int = 10
        seed: int = 0

    @classmethod
    def check_settings(cls, settings: "QncdNoiseCorrection.Settings") -> str | None:
        return None if settings.interval >= 1 else f"interval {settings.interval} must be >= 1"

    def run(self, target: MethodTarget) -> MethodResult:
        return MethodResult(runtime={"noise_correction": {"kind": "qncd", **asdict(self.settings)}},
                            stats={"note": "applied by the sampling loop at run time"})
