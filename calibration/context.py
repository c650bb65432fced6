"""The calibration context: which denoising timestep the current forward pass belongs to.

Algorithms never see the pipeline, but timestep-keyed observers (and timestep-ranged encodings at
inference) must know the step. The forward loop -- or a pre-hook on the UNet -- sets it here; a
``ContextVar`` keeps concurrent threads (LoadGen's server scenario) apart.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Iterator

_TIMESTEP: ContextVar[int | None] = ContextVar("calibration_timestep", default=None)


def current_timestep() -> int | None:
    return _TIMESTEP.get()


def set_timestep(t: int | None) -> None:
    _TIMESTEP.set(None if t is None else int(t))


@contextlib.contextmanager
def timestep(t: int | None) -> Iterator[None]:
    """``with timestep(951): unet(...)`` marks every observer update inside as step 951."""
    token = _TIMESTEP.set(None if t is None else int(t))
    try:
        yield
    finally:
        _TIMESTEP.reset(token)
