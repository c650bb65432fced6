"""MLPerf's accuracy verdict: PASS / FAIL inside the closed-division window, or N/A with the reason.

The window (submission checker ``accuracy-target`` .. ``accuracy-upper-limit``, both inclusive) is only
defined for MLPerf's own setting: 1024x1024 images, all 5000 COCO samples, the official evaluation
weights. Anything else (a 256x256 tiny run, ``--max-samples``, random evaluation weights, a metric
that could not be computed) gets N/A and says why, rather than a PASS/FAIL that means nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from .spec import Window, official_image_size, official_sample_count, window

PASS, FAIL, NOT_APPLICABLE = "PASS", "FAIL", "N/A"


@dataclass(frozen=True)
class Verdict:
    status: str  # PASS, FAIL or N/A
    reason: str


def window_check(name: str, value: float, bounds: Window) -> str | None:
    """None when ``value`` lies in ``bounds`` (edges included), else why not."""
    if value < bounds.low:
        return f"{name} {value:.4f} below the window's lower limit {bounds.low}"
    if value > bounds.high:
        return f"{name} {value:.4f} above the window's upper limit {bounds.high}"
    return None


def mlperf_verdict(*, fid: float | None, clip_score: float | None, n_images: int, image_size: int,
                   comparable: bool, fid_note: str | None = None, clip_note: str | None = None,
                   not_comparable_reason: str | None = None) -> Verdict:
    """The verdict and its reason; N/A rules first, in the order a reader would fix them."""
    if not comparable:
        return Verdict(NOT_APPLICABLE, "numbers are not comparable: " + (not_comparable_reason or "see comparable"))
    if image_size != official_image_size():
        return Verdict(NOT_APPLICABLE, f"{image_size}x{image_size} images; MLPerf's window applies to "
                                       f"{official_image_size()}x{official_image_size()}")
    if n_images != official_sample_count():
        return Verdict(NOT_APPLICABLE, f"{n_images} of {official_sample_count()} images; MLPerf's window applies "
                                       f"to all {official_sample_count()}")
    if fid is None:
        return Verdict(NOT_APPLICABLE, f"FID unavailable ({fid_note or 'not computed'})")
    if clip_score is None:
        return Verdict(NOT_APPLICABLE, f"CLIP score unavailable ({clip_note or 'not computed'})")
    failures = [r for r in (window_check("FID", fid, window("fid")),
                            window_check("CLIP", clip_score, window("clip_score"))) if r]
    if failures:
        return Verdict(FAIL, "; ".join(failures))
    return Verdict(PASS, f"FID {fid:.4f} in {window('fid').as_list()} and CLIP {clip_score:.4f} in "
                         f"{window('clip_score').as_list()}")
