"""``brecq_weights`` and ``brecq_activations``: block reconstruction (BRECQ) as Q-Diffusion runs it.

Q-Diffusion (``txt2img.py``, ``qdiff/block_recon.py``) reconstructs the UNet one *block* at a time --
each ``ResnetBlock2D``, each ``BasicTransformerBlock``, every other quantized layer alone -- in
execution order, in two passes:

* weights (``brecq_weights``, ``post_weight_ranges``): AdaRound on all the block's weights at once,
  activations unquantized, loss ``||block_q(x_q) - block_fp(x_fp)||^2`` (Lp with p 2 summed over
  channels, averaged over the rest, as ``lp_loss``) plus the rounding regulariser (weight 0.01, beta
  20 -> 2 linearly after a 20% warm start), Adam lr 1e-3; ``x_q`` comes from the model whose earlier
  blocks are already rounded (``asym=True``). The reference runs 20,000 iterations per block.
* activations (``brecq_activations``, ``post_ranges``): the block's activation step sizes learned
  LSQ-style (round with a straight-through gradient, zero points fixed), weights quantized, inputs
  from the model with every earlier quantizer on; loss Lp with p 2.4, Adam lr 4e-4 with cosine
  annealing to 0, 5,000 iterations in the reference. The targets are the FP32 model's, with the
  weights as they were before ``post_weight_ranges`` methods rounded them (``MethodTarget.fp_weights``),
  as Q-Diffusion's ``org_weight``.

BRECQ's Fisher-weighted loss is not used by Q-Diffusion's diffusion scripts (``opt_mode='mse'``);
neither is it here. The results are data every backend runs: integer weights on the frozen grid (the
weights delta) and activation encodings with learned scales.

Resumable: with a work directory (``calibrate`` gives the capture's), each finished block's result is
written to ``<work>/<kind>-<key>/<index>.safetensors`` (the key covers the settings and the encodings
and weights it starts from); a killed run reloads finished blocks instead of optimising them again.
A progress bar over blocks shows the time left; the stats record seconds per block (a resumed
block's from when it was computed) and ``compute_seconds``, the method's cost over all its blocks.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from quant.encodings import Encoding, tensor_key
from quant.fake_quant import apply_encodings, set_parameters
from quant.quantizers import _broadcast
from quant.slots import input_pre_hook
from sdxl.io import write_json_atomic

from . import register_method
from .adaround import SoftRounding, annealed_beta, layer_output, lp_loss
from .base import Method, MethodError, MethodResult, MethodTarget, execution_order, run_data

#: module classes reconstructed as one block (diffusers' names), as Q-Diffusion's QuantResBlock /
#: QuantBasicTransformerBlock
BLOCK_TYPES = ("ResnetBlock2D", "BasicTransformerBlock")


def partition(module: torch.nn.Module, layers: list[str]) -> dict[str, list[str]]:
    """Block name -> the planned layers inside it; a planned layer in no block is its own block."""
    blocks = [name for name, sub in module.named_modules() if type(sub).__name__ in BLOCK_TYPES]
    out: dict[str, list[str]] = {}
    for layer in layers:
        owner = next((b for b in blocks if layer.startswith(b + ".")), layer)
        out.setdefault(owner, []).append(layer)
    return out


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value


def block_data(quantized: torch.nn.Module, q_block: torch.nn.Module, fp_model: torch.nn.Module,
               fp_block: torch.nn.Module, loop, samples: int) -> tuple[list[tuple[tuple, dict]], list[torch.Tensor]]:
    """The block's calls in the quantized model (args, kwargs) and its FP32 outputs in the FP32 model."""
    calls: list[tuple[tuple, dict]] = []
    targets: list[torch.Tensor] = []

    def keep_call(m, args, kwargs):
        calls.append((_clone(args), _clone(kwargs)))

    def keep_output(m, args, output):
        if not isinstance(output, torch.Tensor):
            raise MethodError(f"block reconstruction: {type(m).__name__} returns {type(output).__name__}, not a tensor")
        targets.append(output.detach().clone())

    run_data(quantized, loop, samples, [q_block.register_forward_pre_hook(keep_call, with_kwargs=True, prepend=True)])
    run_data(fp_model, loop, samples, [fp_block.register_forward_hook(keep_output)])
    return calls, targets


class _Resume:
    """Finished blocks on disk: ``<work>/<kind>-<key>/<index>.safetensors`` (+ ``.json`` stats)."""

    def __init__(self, work_dir: Path | None, kind: str, parts: list[Any]):
        digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.directory = Path(work_dir) / f"{kind}-{digest}" if work_dir is not None else None

    def load(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        if self.directory is None or not (self.directory / f"{index:04d}.json").is_file():
            return None
        from safetensors.torch import load_file

        return load_file(str(self.directory / f"{index:04d}.safetensors")), json.loads(
            (self.directory / f"{index:04d}.json").read_text())

    def save(self, index: int, tensors: dict[str, torch.Tensor], stats: dict[str, Any]) -> None:
        if self.directory is None:
            return
        from safetensors.torch import save_file

        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".{index:04d}.safetensors.tmp"
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp))
        tmp.replace(self.directory / f"{index:04d}.safetensors")
        write_json_atomic(self.directory / f"{index:04d}.json", stats)  # last: the block is done


def _weights_digest(module: torch.nn.Module, layers: list[str]) -> str:
    digest = hashlib.sha256()
    for name in layers:
        weight = module.get_submodule(name).weight.detach().contiguous()
        digest.update(name.encode())
        digest.update(weight.float().numpy().tobytes())
    return digest.hexdigest()


def _entries_json(entries) -> dict[str, Any]:
    return {k: [e.to_json() for e in v] if isinstance(v, list) else v.to_json() for k, v in sorted(entries.items())}


def _blocks_in_order(target: MethodTarget, layers: list[str], samples: int) -> list[tuple[str, list[str]]]:
    blocks = partition(target.module, layers)
    order = execution_order(target.module, set(blocks), target.forward_loop, samples)
    missing = [b for b in blocks if b not in order]
    return [(b, blocks[b]) for b in order + missing]


@dataclass(frozen=True)
class BlockSettings:
    """What both passes share: iterations per block, the cached calls, calls per step, the Lp exponent."""

    iterations: int = 20000
    #: component calls whose block inputs are cached (each call is a CFG batch)
    samples: int = 8
    #: calls per optimisation step (Q-Diffusion's ``cali_batch_size`` draws, here whole calls)
    batch: int = 1
    lr: float = 1e-3
    p: float = 2.0
    seed: int = 0


def _check_block_settings(settings: BlockSettings) -> str | None:
    if min(settings.iterations, settings.samples, settings.batch) < 1:
        return "iterations, samples and batch must be >= 1"
    if settings.lr <= 0 or settings.p <= 0:
        return "lr and p must be > 0"
    return None


def _progress(blocks, kind: str):
    from sdxl.progress import progress

    return progress(blocks, desc=kind, total=len(blocks), unit="block")


@register_method
class BrecqWeights(Method):
    kind = "brecq_weights"
    phase = "post_weight_ranges"

    @dataclass(frozen=True)
    class Settings(BlockSettings):
        #: per block: Q-Diffusion's ``cali_iters``, 20,000 (a recipe sets fewer to fit a CPU)
        iterations: int = 20000
        reg: float = 0.01
        beta_start: float = 20.0
        beta_end: float = 2.0
        warm_start: float = 0.2
        schedule: str = "linear"

    @classmethod
    def check_settings(cls, settings) -> str | None:
        if settings.schedule not in ("cosine", "linear"):
            return f"schedule {settings.schedule!r} is not cosine or linear"
        if not 0.0 <= settings.warm_start < 1.0:
            return "warm_start must be in [0, 1)"
        return _check_block_settings(settings)

    def run(self, target: MethodTarget) -> MethodResult:
        if target.forward_loop is None:
            raise MethodError(f"{self.kind} needs calibration data (a forward loop)")
        layers = [p.name for p in target.plans if isinstance(p.module, (torch.nn.Linear, torch.nn.Conv2d))
                  and tensor_key(p.name, "weight") in target.entries]
        for name in layers:
            if target.entries[tensor_key(name, "weight")].qparams().fmt.is_float:
                raise MethodError(f"{self.kind}: {name}'s weights are a float format with no rounding grid")
        settings = self.settings
        blocks = _blocks_in_order(target, layers, settings.samples)
        resume = _Resume(target.work_dir, self.kind, [asdict(settings), target.component,
                                                      _entries_json({k: v for k, v in target.entries.items()
                                                                     if k.endswith(":weight[0]")}),
                                                      _weights_digest(target.module, layers)])
        rounded = copy.deepcopy(target.module)  # earlier blocks rounded: where each block's inputs come from
        result, per_block = MethodResult(), []
        for index, (block, members) in enumerate(_progress(blocks, self.kind)):
            started = time.perf_counter()
            done = resume.load(index)
            if done is None:
                weights, stats = self._reconstruct(target, rounded, block, members, index)
                stats["seconds"] = round(time.perf_counter() - started, 3)
                resume.save(index, weights, stats)
            else:
                weights, stats = done
            with torch.no_grad():
                for name, value in weights.items():
                    rounded.get_submodule(name.rpartition(".")[0]).weight.copy_(value)
            for name, value in weights.items():
                result.weights[name] = value.to(target.module.get_submodule(name.rpartition(".")[0]).weight.dtype)
            per_block.append({**stats, "resumed": done is not None})
        result.stats = _summary(per_block, settings)
        return result

    def _reconstruct(self, target, rounded, block, members, index) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        settings = self.settings
        q_block, fp_block = rounded.get_submodule(block), target.module.get_submodule(block)
        calls, targets = block_data(rounded, q_block, target.module, fp_block, target.forward_loop, settings.samples)
        roundings = {name: SoftRounding(target.module.get_submodule(name).weight,
                                        target.entries[tensor_key(name, "weight")].qparams()) for name in members}
        optimiser = torch.optim.Adam([r.v for r in roundings.values()], lr=settings.lr)
        draw = random.Random(settings.seed + index)

        def loss_with(which: str) -> float:
            with _weights_as(rounded, {n: getattr(r, which)() for n, r in roundings.items()}), torch.no_grad():
                return float(sum(lp_loss(q_block(*a, **k), y, settings.p) for (a, k), y in zip(calls, targets))
                             / len(calls))

        nearest = loss_with("nearest")
        for step in range(settings.iterations):
            picks = [draw.randrange(len(calls)) for _ in range(settings.batch)]
            with _weights_as(rounded, {n: r.soft() for n, r in roundings.items()}):
                loss = sum(lp_loss(q_block(*calls[i][0], **calls[i][1]), targets[i], settings.p) for i in picks) / len(picks)
            beta = annealed_beta(step, settings)
            if beta is not None:
                loss = loss + settings.reg * sum(r.regulariser(beta) for r in roundings.values())
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        learned = loss_with("hard")
        weights = {f"{n}.weight": r.hard() for n, r in roundings.items()}
        return weights, {"block": block, "layers": len(members), "nearest_loss": nearest, "loss": learned}


@register_method
class BrecqActivations(Method):
    kind = "brecq_activations"
    phase = "post_ranges"

    @dataclass(frozen=True)
    class Settings(BlockSettings):
        #: per block: Q-Diffusion's ``cali_iters_a``, 5,000; its ``cali_lr`` 4e-4 and ``cali_p`` 2.4
        iterations: int = 5000
        lr: float = 4e-4
        p: float = 2.4

    @classmethod
    def check_settings(cls, settings) -> str | None:
        return _check_block_settings(settings)

    def run(self, target: MethodTarget) -> MethodResult:
        if target.forward_loop is None:
            raise MethodError(f"{self.kind} needs calibration data (a forward loop)")
        acts = {k: v for k, v in target.entries.items() if not k.endswith(":weight[0]")}
        for key, value in acts.items():
            if isinstance(value, list):
                raise MethodError(f"{self.kind}: {key} has timestep-ranged encodings; learn step sizes of static ones")
            if value.qparams().fmt.is_float:
                raise MethodError(f"{self.kind}: {key} is a float format; LSQ learns integer step sizes")
        settings = self.settings
        layers = sorted({k.partition(":")[0] for k in acts})
        blocks = _blocks_in_order(target, layers, settings.samples)
        resume = _Resume(target.work_dir, self.kind, [asdict(settings), target.component, _entries_json(target.entries),
                                                      _weights_digest(target.module, [
                                                          k.partition(":")[0] for k in target.entries
                                                          if k.endswith(":weight[0]")])])
        quantized = copy.deepcopy(target.module)
        apply_encodings(quantized, {k: v for k, v in target.entries.items() if k.endswith(":weight[0]")})
        reference = copy.deepcopy(target.module)  # the FP32 model: weights as before post_weight_ranges rounded them
        if target.fp_weights:
            set_parameters(reference, target.fp_weights, self.kind)
        quantizers = {key: _StepSize(enc) for key, enc in acts.items()}
        handles = _install(quantized, quantizers)
        result, per_block = MethodResult(), []
        try:
            for index, (block, members) in enumerate(_progress(blocks, self.kind)):
                started = time.perf_counter()
                mine = {k: q for k, q in quantizers.items() if k.partition(":")[0] in members}
                done = resume.load(index)
                if done is None:
                    stats = self._reconstruct(target, quantized, reference, block, mine, index)
                    stats["seconds"] = round(time.perf_counter() - started, 3)
                    resume.save(index, {k: q.scale.detach() for k, q in mine.items()}, stats)
                else:
                    tensors, stats = done
                    for key, scale in tensors.items():
                        mine[key].scale.data.copy_(scale)
                per_block.append({**stats, "resumed": done is not None})
        finally:
            for handle in handles:
                handle.remove()
        result.encodings = {key: q.encoding() for key, q in quantizers.items()}
        result.stats = _summary(per_block, settings)
        return result

    def _reconstruct(self, target, quantized, reference, block, mine, index) -> dict[str, Any]:
        settings = self.settings
        q_block, fp_block = quantized.get_submodule(block), reference.get_submodule(block)
        calls, targets = block_data(quantized, q_block, reference, fp_block, target.forward_loop, settings.samples)
        if not mine:
            return {"block": block, "quantizers": 0}

        def loss_now() -> float:
            with torch.no_grad():
                return float(sum(lp_loss(q_block(*a, **k), y, settings.p) for (a, k), y in zip(calls, targets))
                             / len(calls))

        before = loss_now()
        params = [q.scale for q in mine.values()]
        for q in mine.values():
            q.scale.requires_grad_(True)
        optimiser = torch.optim.Adam(params, lr=settings.lr)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=settings.iterations, eta_min=0.0)
        draw = random.Random(settings.seed + index)
        for _ in range(settings.iterations):
            picks = [draw.randrange(len(calls)) for _ in range(settings.batch)]
            loss = sum(lp_loss(q_block(*calls[i][0], **calls[i][1]), targets[i], settings.p) for i in picks) / len(picks)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            scheduler.step()
            with torch.no_grad():
                for q in mine.values():
                    q.scale.clamp_(min=1e-10)
        for q in mine.values():
            q.scale.requires_grad_(False)
        return {"block": block, "quantizers": len(mine), "initial_loss": before, "loss": loss_now()}


class _StepSize(torch.nn.Module):
    """One activation quantizer with a learnable step size (its encoding's scale vector; zero points fixed).

    ``round`` passes the gradient straight through (LSQ / BRECQ's ``round_ste``), so ``d out / d scale``
    is ``round(x/s) - x/s`` inside the grid and ``q - z`` at its ends.
    """

    def __init__(self, enc: Encoding):
        super().__init__()
        self.enc = enc
        qp = enc.qparams()
        self.fmt, self.axis = qp.fmt, qp.axis
        self.scale = torch.nn.Parameter(torch.tensor(enc.scale, dtype=torch.float32), requires_grad=False)
        self.offset = qp.offset
        if enc.channel_groups:  # per-tensor per group: channel c of group g reads scale[g] (Encoding.qparams)
            widths = torch.tensor([hi - lo for lo, hi in enc.channel_groups])
            self.index = torch.arange(len(enc.channel_groups)).repeat_interleave(widths)
        else:
            self.index = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale if self.index is None else self.scale[self.index]
        scale = _broadcast(scale, x, self.axis)
        offset = _broadcast(self.offset, x, self.axis)
        y = x.float() / scale
        y = y + (torch.round(y) - y).detach()  # straight-through round
        q = (y + offset).clamp(self.fmt.qmin, self.fmt.qmax)
        return ((q - offset) * scale).to(x.dtype)

    def encoding(self) -> Encoding:
        data = {**self.enc.to_json(), "scale": [float(v) for v in self.scale.detach()], "min": [], "max": []}
        data["observer"] = {**(self.enc.observer or {}), "learned": "brecq_activations (LSQ step size)"}
        return Encoding.from_json(data, "brecq_activations")


def _install(module: torch.nn.Module, quantizers: dict[str, _StepSize]) -> list:
    from quant.encodings import parse_key

    handles = []
    for key, quantizer in quantizers.items():
        name, kind, index = parse_key(key)
        sub = module.get_submodule(name)
        if kind == "input":
            hook = input_pre_hook(index, lambda m, x, q=quantizer: q(x))
            handles.append(sub.register_forward_pre_hook(hook, with_kwargs=True))
        else:
            handles.append(sub.register_forward_hook(
                lambda m, a, out, q=quantizer: q(out) if isinstance(out, torch.Tensor) else None))
    return handles


class _weights_as:
    """Within the block, each named Conv/Linear computes with the given weight tensor (differentiable)."""

    def __init__(self, model: torch.nn.Module, weights: dict[str, torch.Tensor]):
        self.layers = {n: (model.get_submodule(n), w) for n, w in weights.items()}

    def __enter__(self):
        for layer, weight in self.layers.values():
            layer.forward = lambda input, layer=layer, weight=weight: layer_output(layer, weight, input)
        return self

    def __exit__(self, *exc):
        for layer, _ in self.layers.values():
            del layer.forward


def _summary(per_block: list[dict[str, Any]], settings) -> dict[str, Any]:
    """What the method reports; ``seconds`` of a resumed block are those it took when it was computed."""
    seconds = [b.get("seconds", 0.0) for b in per_block]
    return {"blocks": len(per_block), "iterations": settings.iterations, "samples": settings.samples,
            "seconds_per_block": round(sum(seconds) / len(seconds), 3) if seconds else None,
            "compute_seconds": round(sum(seconds), 1),
            "resumed_blocks": sum(1 for b in per_block if b.get("resumed")),
            "per_block": [{k: (round(v, 8) if isinstance(v, float) and math.isfinite(v) else v) for k, v in b.items()}
                          for b in per_block]}
