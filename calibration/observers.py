"""Streaming range observers: min-max, EMA min-max, histogram percentile, MSE search, entropy (KL), fixed.

Every observer keeps a fixed-size state per channel (two numbers, or one histogram of ``bins``
counts), so memory does not grow with the calibration set -- the property that lets full-size SDXL
calibrate on 500 prompts x 20 steps without storing activations. ``update(x)`` folds in one batch;
``compute_range(fmt, symmetric)`` returns the ``(lo, hi)`` clipping range per channel, which
:func:`quant.quantizers.qparams_from_range` turns into scale/offset. Range-searching observers
(MSE, entropy) need the target grid, hence the ``fmt`` argument.

The histogram is signed and centred on 0 with a half-width ``R`` per channel. When a batch exceeds
``R`` the range grows by a power of two, so old bin edges stay bin edges and re-binning is exact (no
interpolation error accumulates, unlike a resample). Resolution is at worst ``4 * amax / bins``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Callable

import numpy as np
import torch

from quant.context import current_timestep
from quant.formats import QFormat
from quant.quantizers import qparams_from_range

Range = tuple[torch.Tensor, torch.Tensor]


def flatten_channels(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """``x`` -> ``(C, N)`` float32 with the channel axis first (``C = 1`` per-tensor)."""
    x = x.detach().float()
    if axis is None:
        return x.reshape(1, -1)
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


class Observer(ABC):
    """Collects statistics of the tensors one quantizer sees; ``axis`` None = per-tensor."""

    kind = ""

    def __init__(self, axis: int | None = None):
        self.axis = axis
        self.count = 0  # batches seen

    def update(self, x: torch.Tensor) -> None:
        self.count += 1
        self._update(flatten_channels(x, self.axis))

    @abstractmethod
    def _update(self, x: torch.Tensor) -> None: ...

    @abstractmethod
    def compute_range(self, fmt: QFormat, symmetric: bool) -> Range: ...

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind}


class MinMaxObserver(Observer):
    """Running min and max (modelopt's ``max`` calibrator, AIMET ``post_training_tf``)."""

    kind = "minmax"

    def __init__(self, axis: int | None = None):
        super().__init__(axis)
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def _update(self, x: torch.Tensor) -> None:
        lo, hi = x.amin(dim=1), x.amax(dim=1)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def compute_range(self, fmt: QFormat, symmetric: bool) -> Range:
        if self.lo is None:
            raise RuntimeError("observer saw no data")
        return self.lo.clone(), self.hi.clone()


class EmaMinMaxObserver(MinMaxObserver):
    """Exponential moving average of per-batch min/max (torch's ``MovingAverageMinMaxObserver``).

    ``momentum`` is the weight of the new batch, 0.01 as in torch and ORT's ``CalibMovingAverageConstant``.
    """

    kind = "ema"

    def __init__(self, axis: int | None = None, momentum: float = 0.01):
        super().__init__(axis)
        self.momentum = momentum

    def _update(self, x: torch.Tensor) -> None:
        lo, hi = x.amin(dim=1), x.amax(dim=1)
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo = self.lo + self.momentum * (lo - self.lo)
            self.hi = self.hi + self.momentum * (hi - self.hi)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "momentum": self.momentum}


class HistogramObserver(Observer):
    """Signed per-channel histogram with power-of-two range growth; subclasses pick the range."""

    kind = "histogram"

    def __init__(self, axis: int | None = None, bins: int = 2048):
        super().__init__(axis)
        if bins % 2:
            raise ValueError("bins must be even (the histogram is centred on 0)")
        self.bins = bins
        self.hist: torch.Tensor | None = None  # (C, bins) float64 counts
        self.half_width: torch.Tensor | None = None  # (C,) R: the histogram covers [-R, R)
        self.minmax = MinMaxObserver(None)

    @property
    def bin_width(self) -> torch.Tensor:
        return 2 * self.half_width / self.bins

    def _grow(self, needed: torch.Tensor) -> None:
        """Widen channels whose ``needed`` half-width exceeds ``R`` by 2**m and re-bin exactly."""
        grow = needed > self.half_width
        if not bool(grow.any()):
            return
        factor = torch.ones_like(self.half_width)
        ratio = needed[grow] / self.half_width[grow]
        factor[grow] = torch.exp2(torch.ceil(torch.log2(ratio)))
        new_half = self.half_width * factor
        old_width, new_width = self.bin_width, 2 * new_half / self.bins
        centres = -self.half_width[:, None] + (torch.arange(self.bins, dtype=torch.float64) + 0.5) * old_width[:, None]
        index = torch.floor((centres + new_half[:, None]) / new_width[:, None]).long().clamp_(0, self.bins - 1)
        self.hist = torch.zeros_like(self.hist).scatter_add_(1, index, self.hist)
        self.half_width = new_half

    def _update(self, x: torch.Tensor) -> None:
        channels = x.shape[0]
        amax = x.abs().amax(dim=1).double()
        self.minmax._update(x.reshape(channels, -1))
        if self.hist is None:
            self.hist = torch.zeros(channels, self.bins, dtype=torch.float64)
            # a tiny floor keeps all-zero channels well defined; the first real value grows it by 2**m
            self.half_width = torch.clamp(amax, min=1e-30)
        else:
            self._grow(amax)
        width = self.bin_width.to(torch.float64)
        index = torch.floor((x.double() + self.half_width[:, None]) / width[:, None]).long().clamp_(0, self.bins - 1)
        index += (torch.arange(channels) * self.bins)[:, None]
        counts = torch.bincount(index.reshape(-1), minlength=channels * self.bins)
        self.hist += counts.reshape(channels, self.bins).double()

    def _edges(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Left edges and centres of the bins, ``(C, bins)`` each."""
        left = -self.half_width[:, None] + torch.arange(self.bins, dtype=torch.float64) * self.bin_width[:, None]
        return left, left + self.bin_width[:, None] / 2

    def percentile(self, q: float) -> torch.Tensor:
        """The ``q``-th percentile (0..100) per channel, linear inside the bin that crosses it."""
        if self.hist is None:
            raise RuntimeError("observer saw no data")
        cdf = self.hist.cumsum(dim=1)
        target = cdf[:, -1:] * (q / 100.0)
        index = torch.searchsorted(cdf, target).clamp_(max=self.bins - 1)
        before = torch.where(index > 0, cdf.gather(1, (index - 1).clamp(min=0)), torch.zeros_like(target))
        inside = self.hist.gather(1, index).clamp(min=1e-300)
        fraction = ((target - before) / inside).clamp(0, 1)
        left, _ = self._edges()
        value = left.gather(1, index) + fraction * self.bin_width[:, None]
        return value.squeeze(1)

    def _clamp_to_seen(self, lo: torch.Tensor, hi: torch.Tensor) -> Range:
        seen_lo, seen_hi = self.minmax.lo.double(), self.minmax.hi.double()
        return torch.maximum(lo, seen_lo).float(), torch.minimum(hi, seen_hi).float()


class PercentileObserver(HistogramObserver):
    """Range ``[P_lo, P_hi]`` from the streaming histogram (seed 001's 1-99 / 5-95 / 10-90 clipping)."""

    kind = "percentile"

    def __init__(self, axis: int | None = None, bins: int = 2048, low: float = 1.0, high: float = 99.0):
        super().__init__(axis, bins)
        if not 0 <= low < high <= 100:
            raise ValueError(f"percentile range must satisfy 0 <= low < high <= 100 (got {low}, {high})")
        self.low, self.high = low, high

    def compute_range(self, fmt: QFormat, symmetric: bool) -> Range:
        return self._clamp_to_seen(self.percentile(self.low), self.percentile(self.high))

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "low": self.low, "high": self.high, "bins": self.bins}


def _expected_error(centres: torch.Tensor, counts: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                    fmt: QFormat, symmetric: bool, saturation_weight: float = 1.0) -> torch.Tensor:
    """Expected squared q/dq error of histogram mass for candidate ranges, by the standard noise model.

    ``centres``/``counts`` are ``(C, 1, bins)``, ``lo``/``hi`` ``(C, K, 1)``; returns ``(C, K)``. Mass
    outside the range costs its squared distance to the bound (clipping); mass inside costs the
    rounding noise ``step**2 / 12`` of a uniform quantizer (``step`` = the scale for integers, the local
    FP8 spacing ``2**(floor(log2|x|) - mantissa)`` for floats). The model, unlike q/dq of bin centres,
    stays right when the grid step is finer than a histogram bin -- the heavy-tail case this search is for.
    """
    qp = qparams_from_range(lo.reshape(-1), hi.reshape(-1), fmt, symmetric)
    rlo, rhi = (r.double().reshape(lo.shape) for r in qp.range())
    scale = qp.scale.double().reshape(lo.shape)
    clipped = torch.clamp(rlo - centres, min=0) + torch.clamp(centres - rhi, min=0)
    if fmt.is_float:
        units = (centres.abs() / scale).clamp(min=2.0 ** fmt.min_exponent)
        step = torch.exp2(torch.floor(torch.log2(units)) - fmt.mantissa_bits) * scale
    else:
        step = scale.expand_as(clipped)
    inside = clipped == 0
    noise = torch.where(inside, step.pow(2) / 12.0, saturation_weight * clipped.pow(2))
    return (counts * noise).sum(dim=-1)


class MseObserver(HistogramObserver):
    """Range that minimises the expected q/dq MSE over the histogram (AIMET ``tf_enhanced``-style search).

    Symmetric/FP8: ``amax`` scanned over ``steps`` fractions of the observed max. Asymmetric: a
    ``grid x grid`` search over shrinking ``lo`` and ``hi`` independently. Vectorised over channels
    in chunks so that per-channel weight searches stay fast.
    """

    kind = "mse"

    def __init__(self, axis: int | None = None, bins: int = 2048, steps: int = 100, grid: int = 24,
                 chunk: int = 8):
        super().__init__(axis, bins)
        self.steps, self.grid, self.chunk = steps, grid, chunk

    def _candidates(self, seen_lo: torch.Tensor, seen_hi: torch.Tensor, fmt: QFormat,
                    symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate ranges ``(C, K)``: shrinking fractions of the observed range."""
        if symmetric or fmt.is_float:
            fractions = torch.linspace(1.0 / self.steps, 1.0, self.steps, dtype=torch.float64)
            amax = torch.maximum(seen_lo.abs(), seen_hi.abs())[:, None]
            return -amax * fractions, amax * fractions
        fractions = torch.linspace(1.0 / self.grid, 1.0, self.grid, dtype=torch.float64)
        lo = seen_lo.clamp(max=0)[:, None] * fractions.repeat_interleave(self.grid)
        hi = seen_hi.clamp(min=0)[:, None] * fractions.repeat(self.grid)
        return lo, hi

    #: weight of clipped (saturated) mass against rounding noise in the cost
    saturation_weight = 1.0

    def compute_range(self, fmt: QFormat, symmetric: bool) -> Range:
        if self.hist is None:
            raise RuntimeError("observer saw no data")
        _, centres = self._edges()
        lo, hi = self._candidates(self.minmax.lo.double(), self.minmax.hi.double(), fmt, symmetric)
        best = torch.empty(lo.shape[0], dtype=torch.long)
        for c in range(0, lo.shape[0], self.chunk):
            sl = slice(c, c + self.chunk)
            errors = _expected_error(centres[sl, None, :], self.hist[sl, None, :], lo[sl, :, None], hi[sl, :, None],
                                     fmt, symmetric, self.saturation_weight)
            best[sl] = errors.argmin(dim=1)
        pick = best[:, None]
        return lo.gather(1, pick).squeeze(1).float(), hi.gather(1, pick).squeeze(1).float()

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "bins": self.bins}


class TfEnhancedObserver(MseObserver):
    """AIMET's default range scheme, ``post_training_tf_enhanced`` (``TfEnhancedEncodingAnalyzer``).

    A 512-bin histogram; candidates as AIMET's: asymmetric, 17 deltas ``f * delta_max`` (f = 1/16 ...
    17/16, ``delta_max`` = the observed range, widened to contain 0, over ``2^b - 1`` steps) times 21
    offsets ``-N + N i / 20`` (the range's position around zero), each clamped to the observed range,
    plus the observed range itself; symmetric, 101 deltas. Cost: quantization noise + 3 x saturation
    (``GAMMA = 3.0``), by the expected-error model :class:`MseObserver` uses.
    """

    kind = "tf_enhanced"
    saturation_weight = 3.0

    def __init__(self, axis: int | None = None, bins: int = 512, chunk: int = 8):
        super().__init__(axis, bins, steps=101, chunk=chunk)

    def _candidates(self, seen_lo: torch.Tensor, seen_hi: torch.Tensor, fmt: QFormat,
                    symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if symmetric or fmt.is_float:
            return super()._candidates(seen_lo, seen_hi, fmt, symmetric)
        lo_seen, hi_seen = seen_lo.clamp(max=0)[:, None], seen_hi.clamp(min=0)[:, None]
        steps = float(fmt.qmax - fmt.qmin)
        delta_max = (hi_seen - lo_seen) / steps
        deltas = torch.arange(1, 18, dtype=torch.float64) / 16.0  # 17
        offsets = -steps + steps * torch.arange(21, dtype=torch.float64) / 20.0  # 21, from -N to 0
        delta = delta_max * deltas.repeat_interleave(21)
        lo = (delta * offsets.repeat(17)).maximum(lo_seen)
        hi = (lo + delta * steps).minimum(hi_seen)
        return torch.cat([lo, lo_seen], dim=1), torch.cat([hi, hi_seen], dim=1)


class EntropyObserver(HistogramObserver):
    """Symmetric threshold minimising KL(P || Q) of the |x| histogram (TensorRT's entropy calibration)."""

    kind = "entropy"

    def __init__(self, axis: int | None = None, bins: int = 2048, candidates: int = 128):
        super().__init__(axis, bins)
        self.candidates = candidates

    @staticmethod
    def _kl_threshold_bins(abs_hist: np.ndarray, levels: int, candidates: int) -> int:
        total_bins = len(abs_hist)
        best_i, best_kl = total_bins, math.inf
        start = min(levels, total_bins)
        stride = max(1, (total_bins - start) // candidates)
        for i in range(start, total_bins + 1, stride):
            p = abs_hist[:i].astype(np.float64).copy()
            p[-1] += abs_hist[i:].sum()
            chunks = np.array_split(np.arange(i), levels)
            q = np.zeros(i)
            for chunk in chunks:
                mass = abs_hist[chunk].sum()
                nonzero = abs_hist[chunk] > 0
                if nonzero.any():
                    q[chunk[nonzero]] = mass / nonzero.sum()
            mask = p > 0
            if p.sum() == 0:
                continue
            pn, qn = p / p.sum(), q / max(q.sum(), 1e-300)
            if np.any(qn[mask] == 0):
                continue
            kl = float(np.sum(pn[mask] * np.log(pn[mask] / qn[mask])))
            if kl < best_kl:
                best_kl, best_i = kl, i
        return best_i

    def compute_range(self, fmt: QFormat, symmetric: bool) -> Range:
        if self.hist is None:
            raise RuntimeError("observer saw no data")
        half = self.bins // 2
        levels = 2 ** (fmt.bits - 1) if not fmt.is_float else 2 ** (fmt.bits - 1)
        lo = torch.empty(self.hist.shape[0], dtype=torch.float64)
        hi = torch.empty_like(lo)
        for c in range(self.hist.shape[0]):
            h = self.hist[c].numpy()
            abs_hist = h[half:] + h[:half][::-1]
            i = self._kl_threshold_bins(abs_hist, levels, self.candidates)
            threshold = i * float(self.bin_width[c])
            lo[c], hi[c] = -threshold, threshold
        return self._clamp_to_seen(lo, hi)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "bins": self.bins}


class FixedRangeObserver(Observer):
    """A range set by the recipe, not the data: AIMET's encoding constraint, as Qualcomm's AI Hub pins
    softmax outputs to ``[0, 0.99609375]`` (``default_per_tensor_config_v69.json``). The data still
    streams through (so a quantizer that saw none is still an error), but moves nothing."""

    kind = "fixed"

    def __init__(self, axis: int | None = None, min: float | None = None, max: float | None = None):  # noqa: A002
        super().__init__(axis)
        if min is None or max is None or not float(min) < float(max):
            raise ValueError(f"observer 'fixed' needs min < max, got min={min} max={max}")
        self.lo, self.hi = float(min), float(max)
        self.channels: int | None = None

    def _update(self, x: torch.Tensor) -> None:
        self.channels = x.shape[0]

    def compute_range(self, fmt: QFormat, symmetric: bool) -> Range:
        if self.channels is None:
            raise RuntimeError("observer saw no data")
        return torch.full((self.channels,), self.lo), torch.full((self.channels,), self.hi)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "min": self.lo, "max": self.hi}


OBSERVERS: dict[str, type[Observer]] = {cls.kind: cls for cls in
                                        (MinMaxObserver, EmaMinMaxObserver, PercentileObserver, MseObserver,
                                         TfEnhancedObserver, EntropyObserver, FixedRangeObserver)}


class TimestepKeyedObserver(Observer):
    """One sub-observer per denoising timestep (Q-Diffusion / QNCD / step-dependent FP8 scales).

    ``combine`` folds the per-step ranges into one: ``union`` (min of lows, max of highs), ``mean``
    (mean over steps; modelopt's ``mean-max``), ``min-mean`` (modelopt's: narrowest absolute range).
    ``ranged`` keeps them apart: :meth:`grouped_ranges` gives one range per group of consecutive
    steps, which ``quantize()`` writes as timestep-ranged encodings (a step-dependent scale, as
    TDQ and Intel's per-step FP8 scales; activation ranges of a diffusion UNet drift by an order of
    magnitude between t = 951 and t = 1).
    """

    kind = "timestep"
    COMBINES = ("union", "mean", "min-mean", "ranged")

    def __init__(self, factory: Callable[[], Observer], combine: str = "union", groups: int | None = None):
        super().__init__(None)
        if combine not in self.COMBINES:
            raise ValueError(f"unknown timestep combine {combine!r}; use {', '.join(self.COMBINES)}")
        if groups is not None and (combine != "ranged" or not isinstance(groups, int) or groups < 1):
            raise ValueError("timestep_groups needs per_timestep: ranged and a positive integer")
        self.factory, self.combine, self.groups = factory, combine, groups
        self.per_step: dict[int, Observer] = {}

    def update(self, x: torch.Tensor) -> None:
        t = current_timestep()
        key = -1 if t is None else int(t)
        if key not in self.per_step:
            self.per_step[key] = self.factory()
        self.count += 1
        self.per_step[key].update(x)

    def _update(self, x: torch.Tensor) -> None:  # pragma: no cover - update() is overridden
        raise NotImplementedError

    def per_step_ranges(self, fmt: QFormat, symmetric: bool) -> dict[int, Range]:
        return {t: obs.compute_range(fmt, symmetric) for t, obs in sorted(self.per_step.items())}

    def compute_range(self, fmt: QFormat, symmetric: bool) -> Range:
        ranges = list(self.per_step_ranges(fmt, symmetric).values())
        if not ranges:
            raise RuntimeError("observer saw no data")
        los, his = torch.stack([r[0] for r in ranges]), torch.stack([r[1] for r in ranges])
        if self.combine in ("union", "ranged"):
            return los.amin(0), his.amax(0)
        if self.combine == "mean":
            return los.mean(0), his.mean(0)
        return los.amax(0), his.amin(0)

    def grouped_ranges(self, fmt: QFormat, symmetric: bool) -> list[tuple[tuple[int, int], Range]]:
        """``[((t_lo, t_hi), (min, max)), ...]``, noisiest group first, the groups tiling [0, max step].

        The observed steps, noisiest first, are cut into ``groups`` runs of consecutive steps (all
        steps apart when ``groups`` is unset); a group's range is the union of its steps' ranges
        (exact for min-max). Each group also owns the unobserved timesteps below it down to the next
        group, and the last one reaches 0, so a schedule with other steps still finds an encoding.
        """
        per_step = self.per_step_ranges(fmt, symmetric)
        if -1 in per_step:
            raise RuntimeError("per_timestep: ranged saw data outside a timestep context: the forward loop must "
                               "run each batch under quant.context.timestep(t)")
        if not per_step:
            raise RuntimeError("observer saw no data")
        steps = sorted(per_step, reverse=True)
        n = min(self.groups or len(steps), len(steps))
        bounds = [round(i * len(steps) / n) for i in range(n + 1)]
        out, upper = [], steps[0]
        for g in range(n):
            members = steps[bounds[g]:bounds[g + 1]]
            lower = 0 if g == n - 1 else members[-1]
            los = torch.stack([per_step[t][0] for t in members])
            his = torch.stack([per_step[t][1] for t in members])
            out.append(((lower, upper), (los.amin(0), his.amax(0))))
            upper = lower - 1
        return out

    def describe(self) -> dict[str, Any]:
        inner = next(iter(self.per_step.values())).describe() if self.per_step else {}
        out = {"kind": self.kind, "combine": self.combine, "steps": len(self.per_step), "observer": inner}
        if self.groups is not None:
            out["groups"] = self.groups
        return out


def make_observer(spec: dict[str, Any] | str, axis: int | None) -> Observer:
    """Build an observer from a recipe entry: ``"minmax"`` or ``{"kind": "percentile", "low": 1, ...}``."""
    if isinstance(spec, str):
        spec = {"kind": spec}
    spec = dict(spec)
    kind = spec.pop("kind", "minmax")
    per_timestep = spec.pop("per_timestep", None)
    groups = spec.pop("timestep_groups", None)
    if kind not in OBSERVERS:
        raise ValueError(f"unknown observer {kind!r}; choose one of {', '.join(OBSERVERS)}")
    cls = OBSERVERS[kind]
    try:
        if per_timestep:
            cls(axis, **spec)  # validate the arguments now, not at the first batch
            return TimestepKeyedObserver(lambda: cls(axis, **spec), combine=per_timestep, groups=groups)
        if groups is not None:
            raise ValueError("timestep_groups needs per_timestep: ranged")
        return cls(axis, **spec)
    except TypeError as exc:
        raise ValueError(f"bad arguments for observer {kind!r}: {exc}") from None
