"""AutoQuantize-style sensitivity (NVIDIA modelopt): every group's cost under every scheme from backward passes.

modelopt's AutoQuantize scores a layer's format by a second-order Taylor expansion of the loss with
the Fisher information standing in for the Hessian: ``score = Σ (∂L/∂Y)² (Q(Y) − Y)²``, ``Y`` the
layer's output, ``Q(Y)`` its output with the format's quantizers applied, on the same input. Its ``L``
is the model's training loss. What this search minimises is the component's output MSE against FP32,
whose gradient at FP32 is zero; so ``L = <v, f(x)>`` with ``v ~ N(0, 1)`` drawn per call: then
``E_v[(∂L/∂Y_i)²] = Σ_k J_ki²`` (``J`` the output's Jacobian in ``Y``), and the score is, to first
order and neglecting cross terms between elements, the output squared error that the layer's noise
causes. Divided by the output's element count it is on the measured MSE's scale, so the same solver
(DP, greedy) runs on it; it has no pair terms (AutoQuantize's objective is separable, solved there by
an LP).

Cost: ``samples × probes`` backward passes for every group and scheme at once, where
:func:`.sensitivity.measure_sensitivity` runs ``groups × schemes × samples`` forwards. Memory: the
autograd graph of one call plus each layer's ``(Q(Y) − Y)²`` per scheme until its gradient arrives.
"""

from __future__ import annotations

import time
from typing import Mapping

import numpy as np
import torch

from quant.slots import call_input

from ..sqnr import layer_quantizers, quantized_layer, root_output
from .sensitivity import Entries, ExecutionOrder, ForwardLoop, Sensitivity, candidate_groups, option_costs


class _Enough(Exception):
    pass


def gradient_sensitivity(module: torch.nn.Module, schemes: Mapping[str, Entries], forward_loop: ForwardLoop, *,
                         samples: int = 8, probes: int = 1, seed: int = 0) -> Sensitivity:
    """AutoQuantize's scores of each candidate group under each scheme, as a :class:`Sensitivity`.

    ``unary[group][scheme]["mse"]`` is the group's summed score over ``samples`` calls (``probes``
    random projections each) divided by the output elements, ``sqnr_db`` the output SQNR it implies.
    Groups, execution order, bits and BitOps are as :func:`measure_sensitivity` has them.
    """
    if samples < 1 or probes < 1:
        raise ValueError(f"samples ({samples}) and probes ({probes}) must be >= 1")
    started = time.time()
    layers, grouped = candidate_groups(schemes)
    quantizers = {name: layer_quantizers(module, entries) for name, entries in schemes.items()}
    modules = dict(module.named_modules())
    scored = sorted(n for n in layers if isinstance(modules.get(n), (torch.nn.Linear, torch.nn.Conv2d)))
    scores = {layer: dict.fromkeys(schemes, 0.0) for layer in scored}
    pending: list[tuple[str, torch.Tensor, dict[str, torch.Tensor]]] = []  # this call's layer outputs and noise
    generator = torch.Generator().manual_seed(seed)
    totals = {"power": 0.0, "elements": 0, "calls": 0, "graded": 0}

    def layer_hook(name: str):
        def hook(layer, args, kwargs, output):
            if not (isinstance(output, torch.Tensor) and output.requires_grad):
                return
            totals["graded"] += 1
            x = call_input(layer, args, kwargs, 0).detach()
            with torch.no_grad():
                noise = {s: (quantized_layer(layer, q[name], x, layer.weight, layer.bias) - output).pow(2)
                         for s, q in quantizers.items() if name in q}
            pending.append((name, output, noise))
        return hook

    def root_hook(_module, _args, output):
        out = root_output(output)
        outputs = [y for _, y, _ in pending]
        for _ in range(probes if outputs else 0):
            v = torch.randn(out.shape, generator=generator, dtype=out.dtype)
            grads = torch.autograd.grad((out * v).sum(), outputs, retain_graph=True, allow_unused=True)
            for (name, _, noise), g in zip(pending, grads):
                if g is not None:
                    g2 = g.detach().pow(2)
                    for scheme, n in noise.items():
                        scores[name][scheme] += float((g2 * n).sum()) / probes
        totals["power"] += float(out.detach().double().pow(2).sum())
        totals["elements"] += out.numel()
        totals["calls"] += 1
        pending.clear()
        if totals["calls"] >= samples:
            raise _Enough

    flags = {name: p.requires_grad for name, p in module.named_parameters()}
    handles = [modules[n].register_forward_hook(layer_hook(n), with_kwargs=True) for n in scored]
    handles.append(module.register_forward_hook(root_hook))
    order = ExecutionOrder(module, layers)
    try:
        for p in module.parameters():  # the graph from each layer's output to the component's output
            p.requires_grad_(True)
        with torch.enable_grad():
            forward_loop(module)
    except _Enough:
        pass
    finally:
        for handle in handles:
            handle.remove()
        executed = order.close()
        for name, p in module.named_parameters():
            p.requires_grad_(flags[name])
        pending.clear()
    if not totals["calls"]:
        raise ValueError("the forward loop fed no data to the module")
    if not totals["graded"]:
        raise ValueError("no layer output carried a gradient: gradient scores need a forward loop that runs "
                         "outside torch.no_grad / inference_mode")
    macs = {layer: m / totals["calls"] for layer, m in order.macs.items()}
    first_seen = {layer: i for i, layer in enumerate(executed)}
    names = sorted(grouped, key=lambda g: min(first_seen.get(layer, len(executed)) for layer in grouped[g]))
    state = Sensitivity(names, list(schemes), {g: grouped[g] for g in names},
                        reference_power=totals["power"] / totals["elements"])
    state.bits, state.bitops = option_costs(module, schemes, state.layers, macs)
    for group in names:
        state.unary[group] = {}
        for scheme in schemes:
            mse = sum(scores.get(layer, {}).get(scheme, 0.0) for layer in grouped[group]) / totals["elements"]
            sqnr = float("inf") if mse == 0 else float(10 * np.log10(state.reference_power / mse))
            state.unary[group][scheme] = {"mse": mse, "sqnr_db": sqnr}
    state.seconds, state.forward_passes = time.time() - started, totals["calls"]
    return state
