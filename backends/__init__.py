"""Backends run the SDXL components; the pipeline (``sdxl.pipeline``) runs the denoising loop.

A backend is one module that subclasses :class:`sdxl.backend.Backend` (the interface, beside the
pipeline that calls it) and registers itself with :func:`backends.registry.register_backend`.
"""

from sdxl.backend import Backend, BackendOptions

from .registry import available_backends, create_backend, register_backend

__all__ = ["Backend", "BackendOptions", "available_backends", "create_backend", "register_backend"]
