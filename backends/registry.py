"""Backends by name: ``--backend`` looks a backend up here; each backend module registers itself.

A backend is one module of this package that subclasses :class:`sdxl.backend.Backend` (the interface
the pipeline calls) and calls :func:`register_backend` at import time; it is listed in
``_BACKEND_MODULES`` so that optional backends' dependencies load only when used.
"""

from __future__ import annotations

import importlib
from typing import Callable

from sdxl.backend import Backend, BackendOptions
from sdxl.models import ModelSpec

BackendFactory = Callable[[ModelSpec, BackendOptions], Backend]
_REGISTRY: dict[str, BackendFactory] = {}
_ALIASES: dict[str, str] = {}
#: modules imported on first lookup, so that optional backends' dependencies load only when used
_BACKEND_MODULES = ("backends.null_backend", "backends.torch_backend", "backends.ort_backend")


def register_backend(name: str, factory: BackendFactory, aliases: tuple[str, ...] = ()) -> None:
    _REGISTRY[name] = factory
    for alias in aliases:
        _ALIASES[alias] = name


def _load_registry() -> None:
    for module in _BACKEND_MODULES:
        importlib.import_module(module)


def available_backends() -> list[str]:
    _load_registry()
    return sorted(_REGISTRY) + sorted(_ALIASES)


def canonical_backend_name(name: str) -> str:
    _load_registry()
    name = _ALIASES.get(name, name)
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(available_backends())}")
    return name


def create_backend(name: str, spec: ModelSpec, options: BackendOptions) -> Backend:
    """Instantiate backend ``name`` (aliases allowed) for ``spec``."""
    return _REGISTRY[canonical_backend_name(name)](spec, options)
