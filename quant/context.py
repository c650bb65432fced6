"""The calibration context: which denoising timestep the current forward pass belongs to.

Algorithms never see the pipeline, but timestep-keyed observers (and timestep-ranged encodings at
inference) must know the step. The forward loop -- or a pre-hook on the UNet -- sets it here; a
``ContextVar`` keeps concurrent threads (LoadGen's server scenario) apart.
"""

from __future__ import annotations

import contextlib
import threading
from contextvars import ContextVar
from typing import Any, Iterator

import torch

_TIMESTEP: ContextVar[int | None] = ContextVar("calibration_timestep", default=None)


def current_timestep() -> int | None:
    return _TIMESTEP.get()


@contextlib.contextmanager
def timestep(t: int | None) -> Iterator[None]:
    """``with timestep(951): unet(...)`` marks every observer update inside as step 951."""
    token = _TIMESTEP.set(None if t is None else int(t))
    try:
        yield
    finally:
        _TIMESTEP.reset(token)


class TimestepFromArgument:
    """Forward hooks that scope the context to one call of a module taking ``timestep`` (a UNet).

    The pre-hook sets the step from the call's ``timestep`` argument (a tensor's first value, or a
    number; unknown: left as it is), the post-hook restores what was there before, so a step never
    leaks into later calls -- a calibration run after a fake-quant run must not file its data under
    the last step denoised. Tokens are kept per thread (SUT workers call concurrently).
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def _tokens(self) -> list:
        if not hasattr(self._local, "tokens"):
            self._local.tokens = []
        return self._local.tokens

    def pre_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        if isinstance(t, torch.Tensor) and t.numel() >= 1:
            t = int(t.reshape(-1)[0])
        elif isinstance(t, (int, float)):
            t = int(t)
        else:
            t = current_timestep()
        self._tokens().append(_TIMESTEP.set(t))

    def post_hook(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        tokens = self._tokens()
        if tokens:
            _TIMESTEP.reset(tokens.pop())

    def register(self, module: torch.nn.Module) -> list:
        """Install both hooks on ``module``; returns their handles."""
        return [module.register_forward_pre_hook(self.pre_hook, with_kwargs=True),
                module.register_forward_hook(self.post_hook, always_call=True)]
