"""From encodings keys to the tensors they name: one walker, and one rule for "input *i* of a call".

Every consumer of encodings -- observers, fake quantization, pre-scales, the ONNX export's marks, the
SQNR report -- resolves ``<module>:<input|weight|output>[i]`` the same way here, so a layer cannot be
calibrated under one reading of its inputs and quantized or exported under another.

Input *i* of a call is positional argument *i*, or, when the caller passed it by keyword, the keyword
of the *i*-th parameter of the module's ``forward`` (``input`` for ``nn.Linear``/``nn.Conv2d``,
``hidden_states`` for diffusers blocks, ``a``/``b`` for :class:`quant.attention.MatMul`).
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterable

import torch

from .encodings import EncodingsError, parse_key


@lru_cache(maxsize=None)
def _parameter_names(cls: type) -> tuple[str, ...]:
    params = list(inspect.signature(cls.forward).parameters.values())[1:]  # drop self
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def call_input(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], index: int) -> torch.Tensor | None:
    """Input ``index`` of a call of ``module`` (a forward pre-hook's ``args``/``kwargs``); None if not a tensor."""
    if len(args) > index:
        value = args[index]
    else:
        names = _parameter_names(type(module))
        value = kwargs.get(names[index]) if index < len(names) else None
    return value if isinstance(value, torch.Tensor) else None


def replace_call_input(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], index: int,
                       value: torch.Tensor) -> tuple[tuple, dict[str, Any]]:
    """``(args, kwargs)`` with input ``index`` replaced, where the caller put it (position or keyword)."""
    if len(args) > index:
        return args[:index] + (value,) + args[index + 1:], kwargs
    return args, {**kwargs, _parameter_names(type(module))[index]: value}


def input_pre_hook(index: int, transform):
    """A ``with_kwargs`` forward pre-hook that replaces input ``index`` by ``transform(module, x)``.

    A call without that input (it is optional, or not a tensor) passes unchanged.
    """
    def hook(module, args, kwargs):
        x = call_input(module, args, kwargs, index)
        if x is None:
            return None
        return replace_call_input(module, args, kwargs, index, transform(module, x))
    return hook


@dataclass(frozen=True)
class Slot:
    """One encodings key resolved against a model: the module it names, and which of its tensors."""

    key: str
    name: str
    module: torch.nn.Module
    kind: str  # "input" | "weight" | "output"
    index: int


def resolve_slots(root: torch.nn.Module, keys: Iterable[str], where: str = "encodings") -> list[Slot]:
    """The slots of ``keys`` in ``root`` (sorted by key); an unknown module is an error naming the closest one."""
    modules = dict(root.named_modules())
    slots = []
    for key in sorted(keys):
        name, kind, index = parse_key(key)
        target = modules.get(name)
        if target is None:
            close = difflib.get_close_matches(name, modules.keys(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise EncodingsError(f"{where}: {key}: no module {name!r} in this model{hint}")
        slots.append(Slot(key, name, target, kind, index))
    return slots
