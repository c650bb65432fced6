"""``null``: black images at once, to measure the harness's own per-query overhead.

``--null-batch-ms MS`` makes each batch take that long (a sleep in decode, which holds no core), so a
scheduler can be exercised with a known service time: a Server run above capacity, an actor killed
while it holds a batch, dispatch over many simulated devices on a 2-core machine.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from sdxl.backend import Backend, BackendOptions
from sdxl.benchmark_spec import VAE_SCALE_FACTOR
from sdxl.models import ModelSpec

from .registry import BackendFlags, BackendOptionsError, register_backend


class NullBackend(Backend):
    """Every model call returns zeros of the right shape; decode yields -1 (black after postprocessing).

    Decode returns one shared, read-only buffer per shape (the pipeline only reads it), so that what
    ``bench/harness.py`` measures is the harness, not the allocation of 12 MB of model output per query.
    """

    name = "null"
    runs_model = False
    _EMBED_DIM = 8

    def __init__(self, spec: ModelSpec, options: BackendOptions):
        super().__init__(spec, options)
        self._decoded: dict[tuple[int, ...], torch.Tensor] = {}
        self.batch_s = float(options.extra.get("null_batch_ms") or 0.0) / 1e3

    def encode_prompts(self, ids_1, ids_2):
        n = ids_1.shape[0]
        return (torch.zeros(n, ids_1.shape[1], self._EMBED_DIM, dtype=self.dtype),
                torch.zeros(n, self._EMBED_DIM, dtype=self.dtype))

    def predict_noise(self, latent_input, timestep, prompt_embeds, text_embeds, time_ids):
        return torch.zeros_like(latent_input)

    def decode(self, latents):
        if self.batch_s:
            time.sleep(self.batch_s)
        n, _, h, w = latents.shape
        shape = (n, 3, h * VAE_SCALE_FACTOR, w * VAE_SCALE_FACTOR)
        if shape not in self._decoded:  # a race here only builds the same buffer twice
            self._decoded[shape] = torch.full(shape, -1.0, dtype=torch.float32)
        return self._decoded[shape]


    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "batch_ms": self.batch_s * 1e3}


def add_flags(group) -> None:
    group.add_argument("--null-batch-ms", type=float, help="simulated service time of each batch, in ms (default 0)")


def parse_flags(args) -> dict[str, Any]:
    if args.null_batch_ms is None:
        return {}
    if args.null_batch_ms < 0:
        raise BackendOptionsError(f"--null-batch-ms {args.null_batch_ms:g}: a time, >= 0")
    return {"null_batch_ms": args.null_batch_ms}


register_backend("null", NullBackend, flags=BackendFlags(add_flags, parse_flags))
