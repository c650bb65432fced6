"""Backends by name: ``--backend`` looks a backend up here; each backend module registers itself.

A backend is one module of this package that subclasses :class:`sdxl.backend.Backend` (the interface
the pipeline calls) and calls :func:`register_backend` at import time; it is listed in
``_BACKEND_MODULES`` so that optional backends' dependencies load only when used (registering imports
the module, not its runtime). A backend with options of its own registers its command-line flags too
(:class:`BackendFlags`): the ``run`` command adds every backend's flags without knowing any of them,
and refuses a flag given to another backend than its own.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from typing import Any, Callable

from sdxl.backend import Backend, BackendOptions
from sdxl.errors import UserError
from sdxl.models import ModelSpec

BackendFactory = Callable[[ModelSpec, BackendOptions], Backend]


class BackendOptionsError(UserError, ValueError):
    """Options a backend cannot run with (a flag of another backend, a dtype it has no kernels for)."""


@dataclass(frozen=True)
class BackendFlags:
    """A backend's own flags: ``add(group)`` adds them; ``parse(args)`` checks them, returning ``options.extra``.

    ``parse`` runs in the parent process before any model loads, so a bad value is one line at once;
    it sees the whole namespace (``dtype``, ``device``) and raises :class:`BackendOptionsError`.
    """

    add: Callable[[argparse._ArgumentGroup], None]
    parse: Callable[[argparse.Namespace], dict[str, Any]]


_REGISTRY: dict[str, BackendFactory] = {}
_ALIASES: dict[str, str] = {}
_FLAGS: dict[str, BackendFlags] = {}
#: modules imported on first lookup, so that optional backends' dependencies load only when used
_BACKEND_MODULES = ("backends.null_backend", "backends.torch_backend", "backends.ort_backend", "backends.trt_backend")


def register_backend(name: str, factory: BackendFactory, aliases: tuple[str, ...] = (),
                     flags: BackendFlags | None = None) -> None:
    _REGISTRY[name] = factory
    for alias in aliases:
        _ALIASES[alias] = name
    if flags is not None:
        _FLAGS[name] = flags


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
        raise BackendOptionsError(f"unknown backend {name!r}; available: {', '.join(available_backends())}")
    return name


def create_backend(name: str, spec: ModelSpec, options: BackendOptions) -> Backend:
    """Instantiate backend ``name`` (aliases allowed) for ``spec``."""
    return _REGISTRY[canonical_backend_name(name)](spec, options)


#: backend name -> the (dest, option string) pairs its flags added, filled by :func:`add_backend_arguments`
_FLAG_DESTS: dict[str, list[tuple[str, str]]] = {}


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every registered backend's own flags to ``parser``, one argument group per backend."""
    _load_registry()
    for name, flags in sorted(_FLAGS.items()):
        group = parser.add_argument_group(f"--backend {name}")
        before = len(group._group_actions)
        flags.add(group)
        _FLAG_DESTS[name] = [(a.dest, a.option_strings[0]) for a in group._group_actions[before:]]


def backend_extra_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """``options.extra`` of ``args.backend`` from its own flags; a flag of another backend is an error."""
    backend = canonical_backend_name(args.backend)
    for owner, dests in _FLAG_DESTS.items():
        if owner == backend:
            continue
        for dest, flag in dests:
            value = getattr(args, dest, None)
            if value is not None:
                shown = f"{flag} {value}" if isinstance(value, str) else flag
                raise BackendOptionsError(f"{shown} applies to --backend {owner} only")
    return _FLAGS[backend].parse(args) if backend in _FLAGS else {}
