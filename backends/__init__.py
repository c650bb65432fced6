"""Backends run the SDXL components; the pipeline (``harness.pipeline``) runs the denoising loop.

A backend is one file that subclasses :class:`backends.base.Backend` and registers itself with
:func:`backends.base.register_backend`. See ``backends/base.py`` for the interface.
"""

from .base import Backend, BackendOptions, available_backends, create_backend, register_backend

__all__ = ["Backend", "BackendOptions", "available_backends", "create_backend", "register_backend"]
