"""Skip the part of the forward pass a sensitivity measurement cannot change: FP32 outputs reused.

Quantizing one group changes nothing that runs before it. For each measurement the component's
top-level units (its direct children, a ``ModuleList``'s elements counted one by one: a UNet's
``conv_in``, ``time_embedding``, ``down_blocks.0``, ..., ``mid_block``, ``up_blocks.0``, ...) that
finish before the unit holding the group's first layer return their FP32 outputs, recorded once on
the reference pass, instead of computing them. The result is bit-identical to running them (the same
inputs, the same kernels), and a group in the up blocks skips the down and mid blocks' compute.

A unit is reusable only if the data reaches it exactly once per component call (the UNet's blocks),
and only while the recording fits ``limit_bytes``; otherwise the measurement runs the whole forward.
Cached outputs are handed out as clones, so a consumer that writes into its input cannot corrupt them.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Iterator

import torch

log = logging.getLogger(__name__)


def top_level_units(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The direct children of ``module``, with each ``ModuleList``/``ModuleDict`` replaced by its elements."""
    units = {}
    for name, child in module.named_children():
        if isinstance(child, (torch.nn.ModuleList, torch.nn.ModuleDict)):
            units.update({f"{name}.{sub}": grandchild for sub, grandchild in child.named_children()})
        else:
            units[name] = child
    return units


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def _bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_bytes(v) for v in value.values())
    return 0


class PrefixReuse:
    """Records the units' FP32 outputs on the reference pass; replays those before a given layer."""

    def __init__(self, module: torch.nn.Module, limit_bytes: int):
        self.module, self.limit_bytes = module, limit_bytes
        self.units = top_level_units(module)
        self.order: list[str] = []
        self.outputs: dict[str, list[Any]] = {}
        self.bytes = 0
        self.enabled = True

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Around the reference pass: every unit's output of every component call, in first-call order."""
        calls = {"root": 0}
        per_call: dict[str, int] = {}

        def root_pre(_module, _args):
            calls["root"] += 1
            per_call.clear()

        def keep(name: str):
            def hook(_module, _args, output):
                per_call[name] = per_call.get(name, 0) + 1
                if per_call[name] > 1:  # reached twice in one call: not a unit that runs once
                    self.outputs.pop(name, None)
                    self.units.pop(name, None)
                    return
                if name not in self.units:
                    return
                if name not in self.order:
                    self.order.append(name)
                self.bytes += _bytes(output)
                if self.bytes > self.limit_bytes:
                    self.enabled = False
                    self.outputs.clear()
                if self.enabled:
                    self.outputs.setdefault(name, []).append(_clone(output))
            return hook

        handles = [self.module.register_forward_pre_hook(root_pre)]
        handles += [unit.register_forward_hook(keep(name)) for name, unit in list(self.units.items())]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        if not self.enabled:
            log.info("sensitivity: FP32 unit outputs exceed %.1f GiB; every measurement runs the whole forward",
                     self.limit_bytes / 2 ** 30)
        counts = {len(v) for v in self.outputs.values()}
        if len(counts) > 1 or (counts and counts.pop() != calls["root"]):  # a unit some calls skip: keep it simple
            self.enabled = False
            self.outputs.clear()

    def unit_of(self, layer: str) -> str | None:
        return next((name for name in self.units if layer == name or layer.startswith(f"{name}.")), None)

    def reusable_before(self, layers: list[str]) -> list[str]:
        """The recorded units that finish before the first of ``layers`` can run."""
        if not self.enabled:
            return []
        positions = [self.order.index(unit) for unit in (self.unit_of(layer) for layer in layers)
                     if unit in self.order]
        first = min(positions) if positions else 0
        return [name for name in self.order[:first] if name in self.outputs]

    @contextmanager
    def replaying(self, units: list[str]) -> Iterator[None]:
        """While active, ``units`` return their recorded outputs (call by call) instead of computing."""
        saved = {}
        for name in units:
            unit, outputs, served = self.units[name], self.outputs[name], [0]

            def replay(*_args, outputs=outputs, served=served, **_kwargs):
                value = outputs[served[0] % len(outputs)]
                served[0] += 1
                return _clone(value)

            saved[name] = unit.__dict__.get("forward")
            unit.forward = replay
        try:
            yield
        finally:
            for name, original in saved.items():
                if original is None:
                    del self.units[name].forward
                else:
                    self.units[name].forward = original
