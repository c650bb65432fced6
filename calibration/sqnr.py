"""Per-layer SQNR of a quantized component vs FP32: local and accumulated (seed 003's analysis).

* **local**: each quantized layer run on its FP32 input with its input and weight quantizers applied
  (q/dq computed on the fly, so no second model copy) -- how much noise the layer itself adds;
* **accumulated**: the layer's output in the fully quantized model vs the FP32 model on the same
  sample -- how much noise has built up by that point (end to end at the last row, ``<output>``).

Accumulated SQNR needs the FP32 outputs of a few samples in memory; for full-size models only the
top-level blocks are kept (``block_level``), which bounds that memory to a few hundred MB per sample.
SQNR = ``10 log10(sum x^2 / sum (x - x_hat)^2)`` over all samples (AIMET AMP's metric).
"""

from __future__ import annotations

import contextlib
import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F

from quant.encodings import Encoding
from quant.quantizers import fake_quantize
from quant.slots import call_input, resolve_slots

OUTPUT_ROW = "<output>"


@contextlib.contextmanager
def one_ulp_nudge(module: torch.nn.Module) -> Iterator[None]:
    """Inside the block, every Conv/Linear output of ``module`` is moved one ulp up.

    The smallest change another runtime's kernels can make (ONNX Runtime's FP32 UNet differs from
    torch's by about this much), so the SQNR between a quantized model's output with and without the
    nudge is the floor of how close any other runtime can come to it: where values sit on rounding
    boundaries, one ulp flips integer codes, and the flips cascade through the quantizers after them.
    """
    def nudge(layer, inputs, output):
        return torch.nextafter(output, torch.full_like(output, float("inf")))

    handles = [m.register_forward_hook(nudge) for m in module.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _Enough(Exception):
    """Stops a forward loop after the requested number of samples."""


def limited(loop: Callable[[torch.nn.Module], None], samples: int) -> Callable[[torch.nn.Module], None]:
    """Wrap ``forward_loop`` so that it stops after ``samples`` calls of the root module."""
    def run(module: torch.nn.Module) -> None:
        calls = [0]

        def hook(mod, args, output):
            calls[0] += 1
            if calls[0] >= samples:
                raise _Enough

        handle = output_module(module).register_forward_hook(hook)
        try:
            loop(module)
        except _Enough:
            pass
        finally:
            handle.remove()
    return run


def output_module(module: torch.nn.Module) -> torch.nn.Module:
    """The module whose call ends one sample of a component's forward loop: the component itself, or a VAE's
    decoder (the VAE's loop calls ``vae.decode``, which runs no hook of the VAE module itself)."""
    decoder = getattr(module, "decoder", None)
    return decoder if isinstance(decoder, torch.nn.Module) and hasattr(module, "decode") else module


@dataclass
class _Acc:
    signal: float = 0.0
    noise: float = 0.0

    def add(self, ref: torch.Tensor, approx: torch.Tensor) -> None:
        ref = ref.detach().double()
        self.signal += float(ref.pow(2).sum())
        self.noise += float((ref - approx.detach().double()).pow(2).sum())

    @property
    def db(self) -> float:
        if self.noise == 0:
            return math.inf
        return 10 * math.log10(max(self.signal, 1e-300) / self.noise)


@dataclass
class SqnrReport:
    component: str
    order: list[str] = field(default_factory=list)
    local: dict[str, _Acc] = field(default_factory=dict)
    accumulated: dict[str, _Acc] = field(default_factory=dict)
    types: dict[str, str] = field(default_factory=dict)

    def rows(self) -> list[dict]:
        names = self.order + ([OUTPUT_ROW] if OUTPUT_ROW in self.accumulated else [])
        return [{"component": self.component, "layer": n, "type": self.types.get(n, ""),
                 "local_sqnr_db": round(self.local[n].db, 3) if n in self.local else "",
                 "accumulated_sqnr_db": round(self.accumulated[n].db, 3) if n in self.accumulated else ""}
                for n in names]


LAYER_TYPES = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv1d)


def layer_quantizers(module: torch.nn.Module, entries) -> dict[str, dict[str, Encoding]]:
    """Conv/Linear layer name -> its ``input``/``weight``/``output`` encodings (a ranged key: its noisiest step's)."""
    layers: dict[str, dict[str, Encoding]] = {}
    for slot in resolve_slots(module, entries, "sqnr"):
        if slot.index == 0 and isinstance(slot.module, LAYER_TYPES):
            value = entries[slot.key]
            layers.setdefault(slot.name, {})[slot.kind] = value[0] if isinstance(value, list) else value
    return layers


def _qdq(encoding: Encoding | None, x: torch.Tensor) -> torch.Tensor:
    return x if encoding is None else fake_quantize(x, encoding.qparams())


def quantized_layer(module: torch.nn.Module, quantizers: dict[str, Encoding], x: torch.Tensor,
                     weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The layer's output with its own input/weight/output quantizers and its deployed ``weight``/``bias``,
    from its FP32 input."""
    xq = _qdq(quantizers.get("input"), x)
    wq = _qdq(quantizers.get("weight"), weight)
    if isinstance(module, torch.nn.Linear):
        out = F.linear(xq, wq, bias)
    else:
        out = module._conv_forward(xq, wq, bias)
    return _qdq(quantizers.get("output"), out)


@contextlib.contextmanager
def _parameters_set(module: torch.nn.Module, values: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Inside the block, ``module``'s parameters named in ``values`` hold those values; restored after."""
    params = dict(module.named_parameters())
    kept = {name: params[name].detach().clone() for name in values}
    try:
        with torch.no_grad():
            for name, value in values.items():
                params[name].copy_(value)
        yield
    finally:
        with torch.no_grad():
            for name, value in kept.items():
                params[name].copy_(value)


def sqnr_report(module: torch.nn.Module, component: str, entries, forward_loop, apply: Callable[[], None],
                samples: int = 2, block_level: bool = False,
                fp32_values: Mapping[str, torch.Tensor] | None = None) -> SqnrReport:
    """Measure local SQNR on the FP32 model, call ``apply()`` (quantize it in place), measure accumulated.

    ``module`` holds what is deployed (methods' rounded weights, corrected biases); ``fp32_values``
    (parameter name -> value, :attr:`Encodings.fp32_values` of this component) are what they replaced:
    the reference pass runs with them, so both columns include the error of the changed weights.
    Without them a method's rounding would be part of the reference, and its error invisible.
    """
    report = SqnrReport(component)
    fp32_values = dict(fp32_values or {})
    deployed = {name: p.detach().clone() for name, p in module.named_parameters() if name in fp32_values}
    modules = dict(module.named_modules())
    quantizers = layer_quantizers(module, entries)
    layers = sorted(quantizers)
    tracked = [n for n in modules if n and "." not in n] if block_level else layers
    # one dict per sample, opened when the previous sample's output arrives: layers that run before the
    # output module (the VAE's post_quant_conv ahead of its decoder) still land in their sample's dict
    references: list[dict[str, torch.Tensor]] = [{}]
    outputs: list[torch.Tensor] = []
    root = output_module(module)
    handles = []

    def see(name: str) -> None:
        if name not in seen:
            seen.add(name)
            report.order.append(name)

    seen: set[str] = set()

    def local_hook(name):
        def hook(mod, args, kwargs, output):
            see(name)
            if name not in report.local:
                report.local[name] = _Acc()
                report.types[name] = type(mod).__name__
            weight = deployed.get(f"{name}.weight", mod.weight)
            bias = deployed.get(f"{name}.bias", mod.bias)
            report.local[name].add(output, quantized_layer(mod, quantizers[name], call_input(mod, args, kwargs, 0),
                                                            weight, bias))
        return hook

    def record_hook(name):
        def hook(mod, args, output):
            if isinstance(output, torch.Tensor):
                see(name)
                references[-1][name] = output.detach().clone()
        return hook

    def root_post(mod, args, output):
        out = root_output(output)
        outputs.append(out.detach().clone())
        references.append({})

    for name in layers:
        handles.append(modules[name].register_forward_hook(local_hook(name), with_kwargs=True))
    for name in tracked:
        handles.append(modules[name].register_forward_hook(record_hook(name)))
    handles.append(root.register_forward_hook(root_post))
    with _parameters_set(module, fp32_values):
        _run_hooked(module, handles, forward_loop, samples)
    apply()
    sample = [0]
    handles = []

    def compare_hook(name):
        def hook(mod, args, output):
            ref = references[sample[0]].get(name)
            if ref is not None and isinstance(output, torch.Tensor):
                report.accumulated.setdefault(name, _Acc()).add(ref, output)
        return hook

    def root_post_q(mod, args, output):
        out = root_output(output)
        report.accumulated.setdefault(OUTPUT_ROW, _Acc()).add(outputs[sample[0]], out)
        sample[0] += 1

    for name in tracked:
        handles.append(modules[name].register_forward_hook(compare_hook(name)))
    handles.append(root.register_forward_hook(root_post_q))
    _run_hooked(module, handles, forward_loop, samples)
    for name in report.order:
        report.types.setdefault(name, type(modules[name]).__name__)
    return report


def root_output(output):
    """The tensor a component returns: first of a tuple, ``.sample`` of a diffusers output, the first field
    of a transformers ``ModelOutput`` (a CLIP text encoder's ``last_hidden_state``)."""
    if isinstance(output, (tuple, list)):
        return output[0]
    if hasattr(output, "sample"):
        return output.sample
    if hasattr(output, "to_tuple"):
        return output.to_tuple()[0]
    return output


def _run_hooked(module: torch.nn.Module, handles: list, forward_loop, samples: int) -> None:
    """Feed ``samples`` calibration batches through ``module``, then take ``handles``' hooks off."""
    try:
        with torch.inference_mode():
            limited(forward_loop, samples)(module)
    finally:
        for h in handles:
            h.remove()


def write_report(reports: list[SqnrReport], csv_path: Path, plot_path: Path | None = None) -> None:
    """CSV of every row, and a plot of local/accumulated SQNR along execution order per component."""
    rows = [row for r in reports for row in r.rows()]
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["component", "layer", "type", "local_sqnr_db", "accumulated_sqnr_db"])
        writer.writeheader()
        writer.writerows(rows)
    if plot_path is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(reports), 1, figsize=(12, 3.5 * len(reports)), squeeze=False)
    for ax, report in zip(axes[:, 0], reports):
        data = report.rows()
        for column, style in (("local_sqnr_db", "o-"), ("accumulated_sqnr_db", "s-")):
            xs = [i for i, r in enumerate(data) if r[column] not in ("", math.inf)]
            ax.plot(xs, [data[i][column] for i in xs], style, markersize=2, linewidth=0.8, label=column.replace("_db", " (dB)"))
        ax.set_title(f"{report.component}: SQNR vs FP32 along execution order")
        ax.set_xlabel("layer (execution order)")
        ax.set_ylabel("dB")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(plot_path, dpi=110)
    plt.close(fig)
