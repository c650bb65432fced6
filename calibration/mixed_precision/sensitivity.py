"""Per-module sensitivity: what quantizing one module group alone, under each scheme, does to the output.

Seed 001 (ANNA) models the output MSE of a mixed configuration as a quadratic function of per-module
choices; its coefficients are measured here, AIMET-AMP phase-1 style: for each candidate group
(a Conv2d, a feed-forward Linear, or an attention module with all its linears) and each scheme
(encodings already calibrated for the whole component by a recipe), quantize that group alone, feed
the calibration samples, and compare the component's output with FP32 (MSE and SQNR). Interaction
terms ``MSE(a and b) - MSE(a) - MSE(b)`` are measured for consecutive groups (execution order), the
terms the chain DP of :mod:`.solver` is exact for.

Where the model is expanded matters. Measured against an FP32 rest (the default, ANNA's and AMP's
phase 1) the table is exact near FP32 and drifts near the all-quantized end, where every budget a
submitter cares about lies: on the testbed the pair terms measured with the rest FP32 are strongly
negative for some FP8 pairs and do not hold with the rest FP8 (``docs/mixed-precision.md``).
``around=<scheme>`` expands the same quadratic model at the all-``scheme`` configuration instead:
every group starts on that scheme, each measurement moves one group (or a consecutive pair) to
another option, FP16 included, and the costs are the changes of the output MSE from the all-scheme
one. The model is then exact at the all-scheme point and at every single move (and measured pair),
the configurations a budget a little above the all-quantized size picks from.

Like every method here it sees a module and a ``forward_loop`` callback, never the pipeline; the
loop must feed the same data on every call (a capture's is deterministic). Each measurement is
``samples`` forward passes, less what runs before the group: the component's top-level units that
finish before it return their recorded FP32 outputs (:mod:`.prefix_reuse`; bit-identical, and the
fraction of multiply-accumulates skipped is recorded). Results are cached in a JSON file after every
group, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from quant.encodings import Encoding, parse_key
from quant.fake_quant import apply_encodings
from quant.sizes import weight_bits
from sdxl.io import write_json_atomic

from ..sqnr import root_output
from .prefix_reuse import PrefixReuse
from .solver import Problem

Entries = Mapping[str, Encoding | list[Encoding]]
ForwardLoop = Callable[[torch.nn.Module], None]
FP16 = "fp16"
_ATTENTION = re.compile(r"^(.*\.attn\d+)\.")

#: which consecutive-pair interactions to measure: none, same scheme on both groups, or every pair
PAIR_MODES = ("none", "same", "all")
#: what a budget constrains: weight size, or BitOps
CONSTRAINTS = ("size", "bitops")


def group_of(layer: str) -> str:
    """ANNA's candidate unit: an attention module with its linears (FP8 attention kernels), else the layer."""
    match = _ATTENTION.match(layer)
    return match.group(1) if match else layer


@dataclass
class Sensitivity:
    """Measured costs: ``unary[group][option]`` and ``pairs["a|b"]["option_a|option_b"]`` in MSE.

    ``unary`` holds the output MSE (and SQNR) of the configuration with that one group moved to that
    option from the expansion point: FP32 (``around`` None; FP16 is the point itself and absent) or
    all-``around`` (``base_mse``; FP16 measured, ``around`` itself the point). ``pairs`` holds the
    interaction ``MSE(both moved) - MSE(a moved) - MSE(b moved) + base_mse``.
    """

    groups: list[str]
    schemes: list[str]
    layers: dict[str, list[str]] = field(default_factory=dict)  # group -> its quantized layers
    unary: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # group -> scheme -> mse, sqnr_db
    pairs: dict[str, dict[str, float]] = field(default_factory=dict)  # "a|b" -> "sa|sb" -> interaction
    bits: dict[str, dict[str, float]] = field(default_factory=dict)  # group -> option -> weight bits
    #: group -> option -> BitOps per component call (MACs x weight bits x activation bits, AIMET AMP's measure)
    bitops: dict[str, dict[str, float]] = field(default_factory=dict)
    reference_power: float = 0.0
    #: the expansion point: None (FP32) or the scheme every group starts on, and its output error
    around: str | None = None
    base_mse: float = 0.0
    base_sqnr_db: float = float("inf")
    seconds: float = 0.0
    forward_passes: int = 0
    #: share of the measurements' layer MACs skipped by reusing FP32 unit outputs (this invocation)
    reused_macs_fraction: float = 0.0

    @property
    def options(self) -> list[str]:
        return [FP16, *self.schemes]

    @property
    def moves(self) -> list[str]:
        """The options a measurement moves a group to: every scheme (around FP32), or every option but ``around``."""
        return [o for o in self.options if o != (self.around or FP16)]

    def change(self, group: str, option: str) -> float:
        """The model's cost of ``group`` on ``option``: its measured MSE less the expansion point's."""
        cell = self.unary[group].get(option)
        if cell is None:
            if option != (self.around or FP16):
                raise KeyError(f"{group}: no measurement for {option}")
            return 0.0
        return cell["mse"] - self.base_mse

    def ranking(self, option: str) -> list[tuple[str, float]]:
        """Groups by how far moving them to ``option`` moves the output MSE, most first: ``(group, MSE)``."""
        return sorted(((g, self.unary[g][option]["mse"]) for g in self.groups),
                      key=lambda item: -abs(item[1] - self.base_mse))

    def problem(self, constraint: str = "size") -> Problem:
        """The solver's instance: options ``[fp16, *schemes]`` per group, in execution order.

        ``constraint``: ``size`` (weight bits: where every option has 8-bit activations, ANNA's case) or
        ``bitops`` (MACs x weight bits x activation bits: where options differ in activation bits,
        W8A16 against W8A8, which weight size alone would price the same).
        """
        if constraint not in CONSTRAINTS:
            raise ValueError(f"constraint must be one of {', '.join(CONSTRAINTS)}, got {constraint!r}")
        options = self.options
        unary = [[self.change(g, o) for o in options] for g in self.groups]
        cost = self.bits if constraint == "size" else self.bitops
        size = [[cost[g][o] for o in options] for g in self.groups]
        pair = []
        for a, b in zip(self.groups, self.groups[1:]):
            measured = self.pairs.get(f"{a}|{b}", {})
            pair.append(np.array([[measured.get(f"{oa}|{ob}", 0.0) for ob in options] for oa in options]))
        return Problem(unary, size, pair, names=list(self.groups), offset=self.base_mse)

    def to_json(self) -> dict[str, Any]:
        return {"groups": self.groups, "schemes": self.schemes, "layers": self.layers, "unary": self.unary, "pairs": self.pairs,
                "bits": self.bits, "bitops": self.bitops, "reference_power": self.reference_power, "around": self.around,
                "base_mse": self.base_mse, "base_sqnr_db": self.base_sqnr_db, "seconds": self.seconds,
                "forward_passes": self.forward_passes, "reused_macs_fraction": self.reused_macs_fraction}


class OutputRecorder:
    """Runs the forward loop and keeps the root module's output of each call (and the call's timestep:
    ``timesteps[i]``, -1 for a module called without one)."""

    def __init__(self, module: torch.nn.Module, forward_loop: ForwardLoop, samples: int):
        self.module, self.forward_loop, self.samples = module, forward_loop, samples
        self.passes = 0
        self.timesteps: list[int] = []

    def __call__(self) -> list[torch.Tensor]:
        outputs: list[torch.Tensor] = []
        self.timesteps = []

        class Enough(Exception):
            pass

        def keep(_module, args, kwargs, output):
            t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            self.timesteps.append(-1 if t is None else int(torch.as_tensor(t).flatten()[0]))
            outputs.append(root_output(output).detach().float().clone())
            if len(outputs) >= self.samples:
                raise Enough

        handle = self.module.register_forward_hook(keep, with_kwargs=True)
        try:
            with torch.inference_mode():
                self.forward_loop(self.module)
        except Enough:
            pass
        finally:
            handle.remove()
        self.passes += len(outputs)
        if not outputs:
            raise ValueError("the forward loop fed no data to the module")
        return outputs


class ExecutionOrder:
    """Records, while active, the order in which the data first reaches each of ``layers``, and each
    layer's multiply-accumulates (summed over the calls; divided by the root's calls for per-call MACs)."""

    def __init__(self, module: torch.nn.Module, layers: set[str]):
        self.layers, self.order = layers, []
        self.macs: dict[str, float] = {}
        modules = [(name, sub) for name, sub in module.named_modules() if name in layers]
        self.handles = [sub.register_forward_pre_hook(self._seen(name)) for name, sub in modules]
        self.handles += [sub.register_forward_hook(self._count(name)) for name, sub in modules]

    def _seen(self, name: str):
        def hook(_module, _args):
            if name not in self.order:
                self.order.append(name)
        return hook

    def _count(self, name: str):
        def hook(layer, _args, output):
            if not isinstance(output, torch.Tensor):
                return
            if isinstance(layer, torch.nn.Linear):
                per_output = layer.in_features
            elif isinstance(layer, torch.nn.Conv2d):
                per_output = layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
            else:
                return
            self.macs[name] = self.macs.get(name, 0.0) + float(output.numel() * per_output)
        return hook

    def close(self) -> list[str]:
        for handle in self.handles:
            handle.remove()
        return self.order + sorted(self.layers - set(self.order))  # layers the data never reaches last


def output_error(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> tuple[float, float]:
    err = sum(float(((o - r) ** 2).sum()) for o, r in zip(outputs, reference))
    power = sum(float((r ** 2).sum()) for r in reference)
    count = sum(r.numel() for r in reference)
    sqnr = float("inf") if err == 0 else 10.0 * np.log10(power / err)
    return err / count, sqnr


class QuantizedLayers:
    """Quantize ``layers`` of ``module`` with ``entries`` for the duration of a ``with`` block, then restore."""

    def __init__(self, module: torch.nn.Module, entries: Entries, layers: list[str]):
        self.module = module
        keep = set(layers)
        self.entries = {k: v for k, v in entries.items() if parse_key(k)[0] in keep}
        self.saved = {name: sub.weight.detach().clone() for name, sub in module.named_modules()
                      if name in keep and isinstance(getattr(sub, "weight", None), torch.Tensor)}

    def __enter__(self):
        self.handle = apply_encodings(self.module, self.entries, where="sensitivity")
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()
        modules = dict(self.module.named_modules())
        with torch.no_grad():
            for name, weight in self.saved.items():
                modules[name].weight.copy_(weight)


def candidate_groups(schemes: Mapping[str, Entries]) -> tuple[set[str], dict[str, list[str]]]:
    """The layers any scheme quantizes, and the candidate groups (:func:`group_of`) they form."""
    layers = {parse_key(k)[0] for entries in schemes.values() for k in entries}
    grouped: dict[str, list[str]] = {}
    for layer in sorted(layers):
        grouped.setdefault(group_of(layer), []).append(layer)
    return layers, grouped


def option_costs(module: torch.nn.Module, schemes: Mapping[str, Entries], grouped: Mapping[str, list[str]],
                 macs: Mapping[str, float]) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Per group and option (FP16 or a scheme): weight bits, and BitOps per call from the layers' ``macs``."""
    layers = {layer for ls in grouped.values() for layer in ls}
    params = {name: sub.weight.numel() for name, sub in module.named_modules()
              if name in layers and isinstance(getattr(sub, "weight", None), torch.Tensor)}

    def width(entries, layer: str, kind: str) -> int:
        value = entries.get(f"{layer}:{kind}[0]")
        return 16 if value is None else (value[0] if isinstance(value, list) else value).bits

    bits: dict[str, dict[str, float]] = {}
    bitops: dict[str, dict[str, float]] = {}
    for group, members in grouped.items():
        bits[group] = {FP16: sum(16.0 * params.get(layer, 0) for layer in members)}
        bitops[group] = {FP16: sum(256.0 * macs.get(layer, 0.0) for layer in members)}
        for scheme, entries in schemes.items():
            bits[group][scheme] = sum(weight_bits(params.get(layer, 0), entries.get(f"{layer}:weight[0]"))
                                      for layer in members)
            bitops[group][scheme] = sum(macs.get(layer, 0.0) * width(entries, layer, "weight")
                                        * width(entries, layer, "input") for layer in members)
    return bits, bitops


def measure_sensitivity(module: torch.nn.Module, schemes: Mapping[str, Entries], forward_loop: ForwardLoop, *,
                        samples: int = 8, pairs: str = "same", cache: str | Path | None = None,
                        groups: Mapping[str, list[str]] | None = None, progress=None,
                        reuse_limit_bytes: int = 2 << 30, around: str | None = None) -> Sensitivity:
    """Measure each group moved alone to each option (and consecutive pairs), the output against FP32.

    ``schemes`` maps a name to the component's entries calibrated by that scheme's recipe (keys
    relative to ``module``); a group is a candidate if any scheme quantizes one of its layers.
    ``around``: None (each group quantized under each scheme with the rest FP32) or a scheme (every
    group on it, each moved to FP16 or another scheme; see the module docstring).
    ``groups`` overrides :func:`group_of` (``{group: [layers]}``). ``progress`` wraps an iterable
    (a bar). ``cache``: JSON file to resume from and write to. ``reuse_limit_bytes``: the most memory the
    recorded unit outputs may take (0: always run the whole forward).
    """
    if pairs not in PAIR_MODES:
        raise ValueError(f"pairs must be one of {', '.join(PAIR_MODES)}, got {pairs!r}")
    if not schemes:
        raise ValueError("no schemes to measure")
    if around is not None and around not in schemes:
        raise ValueError(f"around must be one of the schemes ({', '.join(schemes)}), got {around!r}")
    started = time.time()
    run = OutputRecorder(module, forward_loop, samples)
    layers, grouped = candidate_groups(schemes)
    if groups is not None:
        grouped = {g: list(ls) for g, ls in groups.items()}
    recorder = ExecutionOrder(module, layers)
    reuse = PrefixReuse(module, reuse_limit_bytes)
    try:
        with reuse.recording() if around is None else contextlib.nullcontext():
            reference = run()
    finally:
        order = recorder.close()
    macs = {layer: m / len(reference) for layer, m in recorder.macs.items()}  # per component call
    first_seen = {layer: i for i, layer in enumerate(order)}
    group_names = sorted(grouped, key=lambda g: min(first_seen.get(layer, len(order)) for layer in grouped[g]))
    names = list(schemes)

    key = hashlib.sha256(json.dumps({"groups": grouped, "schemes": names, "samples": samples, "pairs": pairs,
                                     "around": around, "reference": [float(r.double().sum()) for r in reference]},
                                    sort_keys=True).encode()).hexdigest()[:16]
    state = Sensitivity(group_names, names, {g: grouped[g] for g in group_names}, around=around,
                        reference_power=sum(float((r ** 2).mean()) for r in reference) / len(reference))
    cache_path = Path(cache) if cache else None
    before_seconds = before_passes = 0
    if cache_path is not None and cache_path.is_file():
        saved = json.loads(cache_path.read_text())
        if saved.get("key") == key:
            state.unary, state.pairs = saved["unary"], saved["pairs"]
            before_seconds, before_passes = saved.get("seconds", 0.0), saved.get("forward_passes", 0)

    def save() -> None:
        state.seconds = before_seconds + time.time() - started
        state.forward_passes = before_passes + run.passes
        state.reused_macs_fraction = work["skipped"] / work["all"] if work["all"] else 0.0
        if cache_path is not None:
            write_json_atomic(cache_path, {"key": key, **state.to_json()})

    state.bits, state.bitops = option_costs(module, schemes, {g: grouped[g] for g in group_names}, macs)
    unit_macs: dict[str, float] = {}  # per recorded unit, once it is recorded
    work = {"all": 0.0, "skipped": 0.0}
    # around a scheme: every group on it (each group's context restores its FP32 weights on exit)
    base = {g: QuantizedLayers(module, schemes[around], grouped[g]) for g in group_names} if around else {}

    @contextlib.contextmanager
    def moved(group: str, option: str):
        """``group`` on ``option`` (FP16: not quantized) instead of the expansion point's."""
        if group in base:
            base[group].__exit__(None, None, None)
        try:
            with QuantizedLayers(module, schemes[option], grouped[group]) if option != FP16 else contextlib.nullcontext():
                yield
        finally:
            if group in base:
                base[group].__enter__()

    def measure(moves: list[tuple[str, str]]) -> tuple[float, float]:
        """Output MSE and SQNR with each ``(group, option)`` moved, the units before them replayed."""
        skipped = reuse.reusable_before([layer for g, _ in moves for layer in grouped[g]])
        work["all"] += sum(macs.values())
        work["skipped"] += sum(unit_macs.get(unit, 0.0) for unit in skipped)
        with reuse.replaying(skipped), contextlib.ExitStack() as stack:
            for group, option in moves:
                stack.enter_context(moved(group, option))
            return output_error(run(), reference)

    with contextlib.ExitStack() as stack:
        for context in base.values():
            stack.enter_context(context)
        if around is not None:
            with reuse.recording():  # the units replayed before a move are the all-``around`` ones
                state.base_mse, state.base_sqnr_db = output_error(run(), reference)
        unit_macs.update({unit: sum(m for layer, m in macs.items() if reuse.unit_of(layer) == unit)
                          for unit in reuse.order})
        options = state.moves
        iterate = progress or (lambda items, **_: items)
        for index in iterate(range(len(group_names)), desc="sensitivity", total=len(group_names)):
            group = group_names[index]
            measured = state.unary.setdefault(group, {})
            for option in options:
                if option not in measured:
                    mse, sqnr = measure([(group, option)])
                    measured[option] = {"mse": mse, "sqnr_db": sqnr}
            if pairs != "none" and index > 0:
                before = group_names[index - 1]
                pair = state.pairs.setdefault(f"{before}|{group}", {})
                for oa in options:
                    for ob in options:
                        if (pairs == "same" and oa != ob) or f"{oa}|{ob}" in pair:
                            continue
                        both, _ = measure([(before, oa), (group, ob)])
                        pair[f"{oa}|{ob}"] = (both - state.unary[before][oa]["mse"] - measured[ob]["mse"]
                                              + state.base_mse)
            save()
    save()
    return state
