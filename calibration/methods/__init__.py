"""Calibration methods: each one module, registered under the name a recipe's ``methods:`` list gives.

A recipe names methods as data -- ``methods: [{kind: weight_balance, components: [unet], strength: 0.5}]``
-- in the order they run. Each kind is a :class:`~calibration.methods.base.Method` subclass in a module
of this package, registered with :func:`register_method` (as modelopt's ``CalibrateModeRegistry`` and
the observers' ``OBSERVERS``); its settings are a dataclass checked when the recipe loads. A method
sees a component's modules and a callback feeding calibration data (:class:`MethodTarget`), never
the pipeline, and returns data (:class:`MethodResult`) that ``quantize()`` applies and writes into
the encodings, so every backend runs what it produced.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from typing import Any

from .base import PHASES, Method, MethodError, MethodResult, MethodTarget

#: modules holding the built-in methods, imported on first lookup
_METHOD_MODULES = ("calibration.methods.weight_balance", "calibration.methods.smoothquant",
                   "calibration.methods.bias_correction", "calibration.methods.cross_layer_equalization",
                   "calibration.methods.adaround", "calibration.methods.qncd_smoothing",
                   "calibration.methods.qncd_correction", "calibration.methods.block_reconstruction")
_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available to recipes as ``kind: cls.kind``."""
    if cls.phase not in PHASES:
        raise ValueError(f"method {cls.kind}: phase {cls.phase!r} is not one of {', '.join(PHASES)}")
    _REGISTRY[cls.kind] = cls
    return cls


def method_class(kind: str) -> type[Method]:
    for module in _METHOD_MODULES:
        importlib.import_module(module)
    if kind not in _REGISTRY:
        raise MethodError(f"unknown method kind {kind!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[kind]


def parse_settings(cls: type[Method], values: dict[str, Any], where: str) -> Any:
    """``cls.Settings`` from a recipe mapping: unknown keys, wrong types and bad values are errors naming ``where``."""
    fields = {f.name: f for f in dataclasses.fields(cls.Settings)}
    unknown = set(values) - set(fields)
    if unknown:
        raise MethodError(f"{where}: unknown setting(s) {', '.join(sorted(unknown))} for {cls.kind}; "
                          f"allowed: {', '.join(sorted(fields)) or 'none'}")
    hints = typing.get_type_hints(cls.Settings)
    for name, value in values.items():
        expected = hints[name]
        accepted = (int, float) if expected is float else expected
        if not isinstance(value, accepted) or (expected is not bool and isinstance(value, bool)):
            raise MethodError(f"{where}.{name}: expected {expected.__name__}, got {value!r}")
    settings = cls.Settings(**{k: float(v) if hints[k] is float else v for k, v in values.items()})
    problem = cls.check_settings(settings)
    if problem:
        raise MethodError(f"{where}: {problem}")
    return settings


__all__ = ["PHASES", "Method", "MethodError", "MethodResult", "MethodTarget", "method_class", "parse_settings",
           "register_method"]
