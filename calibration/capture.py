"""Calibration data from the real pipeline: timestep-aware UNet inputs, cached on disk, resumable.

This is the only module that touches the pipeline. It runs the harness's own denoising loop (20
EulerDiscrete steps, guidance 8, both CFG branches, MLPerf's fixed latent) over the calibration
captions and keeps the UNet's inputs at the chosen timesteps. Everything is written in chunks of
prompts as safetensors under ``<cache>/calib/<key>/``:

* ``negative.safetensors`` -- the negative prompt's embeddings and the ``time_ids`` row (stored once);
* ``embeds-NNNNN.safetensors`` -- per chunk, the positive prompt embeddings and pooled embeddings;
* ``latents-NNNNN.safetensors`` -- per chunk, ``latent.<step>`` CFG batches and, when asked, ``final``;
* ``manifest.json`` -- which chunks are complete (rewritten atomically after each one).

The key hashes the model fingerprint, the selected captions, the timesteps and the loop settings, so a
killed calibration resumes at the first incomplete chunk and a changed input never reuses stale data.
Text encoders run first for every prompt, so they can be freed before the (large) UNet loop.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from quant.context import timestep
from sdxl.errors import UserError

log = logging.getLogger(__name__)
CACHE_VERSION = 1


class CalibrationDataError(UserError, ValueError):
    """Bad calibration inputs (captions file, timesteps spec); the message says how to fix it."""


#: NDTC's defaults as PTQ4DM's shipped script runs it (quant_sample_ddim_in_backward_DNTC.sh): mean 0.4, std 0.4
NDTC_DEFAULTS = (0.4, 0.4)
TIMESTEP_SPECS = "all, single, uniform:K, qdiff:K, ndtc[:MEAN,STD], psnr:K or list:T1,T2,..."


def plan_timesteps(spec: str, schedule: list[int], chunks: int) -> list[list[int]]:
    """The step indices (into ``schedule``, 0 = noisiest) each chunk of calibration prompts contributes.

    * ``all``, ``single`` (the maximum-noise step: seed 003's single-step calibration), ``uniform:K`` (K
      steps spread evenly, first and last included), ``list:T1,...`` (those timesteps): the same steps
      for every chunk;
    * ``qdiff:K``: Q-Diffusion's ``get_train_samples``: ``range(0, n, n // K)``, a uniform stride from the
      noisiest step (its SD recipe, 25 of 50 PLMS steps, is ``qdiff:10`` on MLPerf's 20);
    * ``ndtc[:MEAN,STD]``: PTQ4DM's normally distributed time-step calibration: each chunk's one step
      index drawn from N(MEAN*n, STD*n), rounded down as ``int()`` does and clipped to the schedule, the
      index counted from the noisiest step as PTQ4DM's reverse loop does (default 0.4, 0.4, its script's
      values). Draws are seeded by the chunk's index: the same plan every time.
    """
    spec = (spec or "all").strip()
    n = len(schedule)
    kind, _, arg = spec.partition(":")
    if kind == "psnr":
        raise ValueError("psnr:K plans from the FP32 trajectory: use importance_plan")
    if kind == "qdiff":
        k = _count(spec, arg, n)
        return [list(range(0, n, max(1, n // k)))] * chunks  # as the reference: qdiff:3 on 20 steps gives 4
    if kind == "ndtc":
        try:
            mean, std = (float(v) for v in arg.split(",")) if arg else NDTC_DEFAULTS
        except ValueError:
            raise CalibrationDataError(f"--timesteps {spec}: use ndtc or ndtc:MEAN,STD (fractions of the schedule)") from None
        if not (0.0 <= mean <= 1.0 and std > 0.0):
            raise CalibrationDataError(f"--timesteps {spec}: MEAN must be in [0, 1] and STD > 0")
        plan = []
        for chunk in range(chunks):
            draw = np.random.default_rng([20231202, chunk]).normal(mean * n, std * n)
            plan.append([min(max(int(draw), 0), n - 1)])
        return plan
    return [parse_timesteps(spec, schedule)] * chunks


def step_importance(latents: list[torch.Tensor], sigmas: list[float], final: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-step weights from the PSNR of the FP32 trajectory (seed 002's timestep importance).

    ``latents[t]`` is the sample before step ``t`` (sample space), ``final`` the loop's result. Each
    step's denoised estimate ``x0_t = x_t - sigma_t * eps_t`` (``eps_t`` from the Euler update between
    consecutive samples) is compared with the final latent: ``PSNR_t`` (peak: the final latent's range),
    ``MSE_t = peak^2 10^(-PSNR_t / 10)``. A step's weight is how much of the remaining error it removes,
    ``max(MSE_t - MSE_{t+1}, 0)`` (``MSE_n = 0``): the weights share out ``MSE_0``, the steps that decide
    most of the image weighing most. The seed names PSNR as the measure and gives no formula: this is
    this project's reading (docs/calibration.md). Returns ``(weights, psnr_db)``.
    """
    samples = latents + [final]
    peak = float(final.max() - final.min()) or 1.0
    mse, psnr = [], []
    for t in range(len(latents)):
        eps = (samples[t + 1] - samples[t]) / (sigmas[t + 1] - sigmas[t])
        error = float(((samples[t] - sigmas[t] * eps - final).double() ** 2).mean())
        mse.append(error)
        psnr.append(float("inf") if error == 0 else 10 * float(np.log10(peak ** 2 / error)))
    mse.append(0.0)
    return [max(mse[t] - mse[t + 1], 0.0) for t in range(len(latents))], psnr


def importance_plan(weights: list[float], chunks: int, per_chunk: int) -> list[list[int]]:
    """``chunks * per_chunk`` samples shared out over the steps in proportion to ``weights`` (largest
    remainder; a step at most once per chunk, its excess going to the others), dealt to the chunks in turn."""
    n = len(weights)
    total = min(chunks * per_chunk, chunks * n)
    counts = [0] * n
    while sum(counts) < total:
        open_steps = [t for t in range(n) if counts[t] < chunks]
        w = {t: weights[t] for t in open_steps}
        if not any(w.values()):  # every weighted step is full (or nothing was weighted): the rest evenly
            w = {t: 1.0 for t in open_steps}
        left, mass = total - sum(counts), sum(w.values())
        share = {t: left * w[t] / mass for t in open_steps}
        for t in open_steps:
            counts[t] += min(int(share[t]), chunks - counts[t])
        left = total - sum(counts)
        for t in sorted((t for t in open_steps if w[t] > 0), key=lambda t: (int(share[t]) - share[t], t)):
            if left and counts[t] < chunks:
                counts[t] += 1
                left -= 1
    plan: list[list[int]] = [[] for _ in range(chunks)]
    deal = 0
    for t in range(n):
        for _ in range(counts[t]):
            plan[deal % chunks].append(t)
            deal += 1
    return [sorted(steps) for steps in plan]


def _count(spec: str, arg: str, n: int) -> int:
    try:
        k = int(arg)
    except ValueError:
        k = 0
    if not 1 <= k <= n:
        raise CalibrationDataError(f"--timesteps {spec}: K must be an integer in 1..{n}")
    return k


def parse_timesteps(spec: str, schedule: list[int]) -> list[int]:
    """Every step index a spec can use (for ``ndtc``, the whole schedule; see :func:`plan_timesteps`).

    Also the check of a spec's syntax, run in the parent before any model loads.
    """
    spec = (spec or "all").strip()
    n = len(schedule)
    if spec == "all":
        return list(range(n))
    if spec == "single":
        return [0]
    kind, _, arg = spec.partition(":")
    if kind == "uniform":
        k = _count(spec, arg, n)
        return sorted({int(round(i)) for i in np.linspace(0, n - 1, k)})
    if kind == "qdiff":
        return plan_timesteps(spec, schedule, 1)[0]
    if kind == "ndtc":
        plan_timesteps(spec, schedule, 0)  # checks MEAN,STD; any step may be drawn
        return list(range(n))
    if kind == "psnr":
        _count(spec, arg, n)
        return list(range(n))
    if kind == "list":
        wanted = [v.strip() for v in arg.split(",") if v.strip()]
        steps = []
        for value in wanted:
            if not value.lstrip("-").isdigit() or int(value) not in schedule:
                raise CalibrationDataError(f"--timesteps {spec}: {value} is not one of this schedule's timesteps "
                                           f"({', '.join(map(str, schedule))})")
            steps.append(schedule.index(int(value)))
        return sorted(set(steps))
    raise CalibrationDataError(f"--timesteps {spec!r}: use {TIMESTEP_SPECS}")


def read_calibration_captions(path: str | Path | None, profile: str, num_prompts: int | None = None) -> tuple[list[str], str]:
    """Calibration prompts and a description of their source.

    ``path`` is MLPerf's calibration captions (``coco_cal_captions_list.txt``, one per line, or a TSV
    with a ``caption`` column as ``prepare-dataset`` writes it). A COCO *val2014* TSV -- the set the
    benchmark scores on -- is refused: calibrating on the test set would inflate accuracy. Without a
    path, a profile's own calibration set (the testbed's) or, for ``tiny``, the built-in captions.
    """
    if path is None:
        from sdxl.models import profile_default

        path = profile_default(profile, "default_calibration_captions")
    if path is None:
        if profile != "tiny":
            raise CalibrationDataError(f"profile {profile} needs --calibration-captions (MLPerf's 500 COCO train2014 "
                                       "captions, coco_cal_captions_list.txt, as prepare-dataset writes them)")
        from sdxl.dataset import load_captions

        captions = load_captions().captions
        source = "builtin:tiny"
    else:
        path = Path(path)
        if not path.is_file():
            raise CalibrationDataError(f"calibration captions file {path} not found")
        text = path.read_text(encoding="utf-8")
        lines = [line for line in text.splitlines() if line.strip()]
        header = lines[0].split("\t") if lines else []
        if "caption" in header:
            from sdxl.dataset import read_captions_tsv

            frame = read_captions_tsv(path, columns=("caption",))
            for column in ("file_name", "coco_url"):
                if column in frame and frame[column].str.contains("val2014").any():
                    raise CalibrationDataError(f"{path} holds COCO val2014 captions -- the validation set the benchmark "
                                               "scores on; calibrate on MLPerf's train2014 calibration captions instead")
            captions = frame["caption"].tolist()
        else:
            captions = [line.strip() for line in lines]
        source = f"file:{path}"
    if not captions:
        raise CalibrationDataError(f"no captions in {source}")
    if num_prompts is not None:
        if num_prompts < 1:
            raise CalibrationDataError(f"--num-prompts must be >= 1 (got {num_prompts})")
        captions = captions[:num_prompts]
    return captions, source


def is_mlperf_calibration_set(path: str | Path | None, num_prompts: int | None = None) -> bool:
    """Whether these calibration captions are MLPerf's whole set: a TSV whose ``id`` column is exactly the
    500 annotation ids of ``coco_cal_captions_list.txt`` (what ``prepare-dataset`` writes), none left out."""
    from sdxl.dataset import DatasetError, read_calibration_ids, read_captions_tsv

    if path is None or not Path(path).is_file():
        return False
    try:
        ids = sorted(int(i) for i in read_captions_tsv(Path(path), columns=("id", "caption"))["id"])
    except (DatasetError, ValueError):  # a plain caption list, or ids that are not numbers
        return False
    official = sorted(read_calibration_ids())
    return ids == official and (num_prompts is None or num_prompts >= len(official))


def _captions_hash(captions: list[str]) -> str:
    return hashlib.sha256("\n".join(captions).encode()).hexdigest()


@dataclass
class CalibrationData:
    """A completed capture on disk; iterators load one chunk at a time (memory flat in the set size)."""

    directory: Path
    manifest: dict
    #: the captions are MLPerf's calibration set, whole (``submission``'s closed division requires it)
    mlperf_set: bool = False

    @property
    def timesteps(self) -> list[int]:
        return self.manifest["timesteps"]

    @property
    def steps(self) -> list[int]:
        return self.manifest["steps"]

    def _load(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.directory / name))

    def chunks(self) -> range:
        return range(len(self.manifest["chunks"]))

    def conditioning(self, chunk: int) -> dict[str, torch.Tensor]:
        """The UNet conditioning of one chunk's CFG batch (negative rows first, as the pipeline)."""
        from sdxl.pipeline import cfg_conditioning

        neg, pos = self._load("negative.safetensors"), self._load(f"embeds-{chunk:05d}.safetensors")
        return cfg_conditioning(neg, pos["prompt_embeds"], pos["text_embeds"])

    def chunk_steps(self, chunk: int) -> list[int]:
        """The step indices chunk ``chunk`` contributes (every chunk the same, except for NDTC's draws)."""
        return self.manifest["chunk_steps"][chunk] if "chunk_steps" in self.manifest else self.steps

    def unet_samples(self) -> Iterator[tuple[int, torch.Tensor, dict[str, torch.Tensor]]]:
        """``(t, latent_input (2n,4,h,w), conditioning)`` for every chunk and captured step."""
        timestep = dict(zip(self.steps, self.timesteps))
        for chunk in self.chunks():
            cond = self.conditioning(chunk)
            latents = self._load(f"latents-{chunk:05d}.safetensors")
            for step in self.chunk_steps(chunk):
                yield timestep[step], latents[f"latent.{step}"], cond

    def num_unet_samples(self) -> int:
        return sum(len(self.chunk_steps(chunk)) for chunk in self.chunks())

    def final_latents(self) -> Iterator[torch.Tensor]:
        for chunk in self.chunks():
            latents = self._load(f"latents-{chunk:05d}.safetensors")
            if "final" not in latents:
                raise CalibrationDataError(f"{self.directory} was captured without final latents (VAE calibration "
                                           "needs them): delete it or capture with VAE calibration")
            yield latents["final"]

    def token_ids(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for chunk in self.chunks():
            ids = self._load(f"embeds-{chunk:05d}.safetensors")
            yield ids["ids_1"], ids["ids_2"]

    def unet_forward_loop(self, show_progress: bool = False):
        """A ``forward_loop(unet)`` replaying the captured inputs, each under its timestep."""
        def loop(unet: torch.nn.Module) -> None:
            from sdxl.progress import progress

            total = self.num_unet_samples()
            for t, latent_input, cond in progress(self.unet_samples(), total=total, desc="calibrating unet",
                                                  disable=not show_progress):
                dtype = next(unet.parameters()).dtype
                with timestep(t):
                    unet(latent_input.to(dtype), torch.tensor(t), encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                         added_cond_kwargs={"text_embeds": cond["text_embeds"].to(dtype),
                                            "time_ids": cond["time_ids"].to(dtype)}, return_dict=False)
        return loop

    def text_encoder_forward_loop(self, which: int):
        def loop(encoder: torch.nn.Module) -> None:
            for ids_1, ids_2 in self.token_ids():
                encoder(ids_1 if which == 1 else ids_2, output_hidden_states=True)
        return loop

    def vae_forward_loop(self, scaling_factor: float):
        def loop(vae: torch.nn.Module) -> None:
            for final in self.final_latents():
                vae.decode(final.to(next(vae.parameters()).dtype) / scaling_factor, return_dict=False)
        return loop


@dataclass
class CaptureRequest:
    captions: list[str]
    captions_source: str
    timesteps_spec: str = "all"
    chunk_prompts: int = 4
    need_final: bool = False
    extra_key: dict = field(default_factory=dict)


class _StopDenoise(Exception):
    """Raised from the step callback once every wanted step is captured (skips the remaining UNet calls)."""


def cache_key(fingerprint: str, request: CaptureRequest, steps: list, latent: torch.Tensor) -> str:
    from sdxl.latents import latent_sha256

    blob = json.dumps({"version": CACHE_VERSION, "model": fingerprint, "captions": _captions_hash(request.captions),
                       "steps": steps, "chunk": request.chunk_prompts, "final": request.need_final,
                       "latent": latent_sha256(latent), **request.extra_key}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _save(tensors: dict[str, torch.Tensor], path: Path, manifest: dict) -> None:
    """Write one cache file atomically and record its size and sha256 in the manifest (checked on reuse)."""
    from safetensors.torch import save_file

    from sdxl.dataset import file_sha256

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    manifest.setdefault("files", {})[path.name] = {"size": tmp.stat().st_size, "sha256": file_sha256(tmp)}
    tmp.replace(path)


def _discard_damaged_files(directory: Path, manifest: dict) -> None:
    """Forget every cached file whose size or sha256 is not what was written, so it is captured again.

    Files are written atomically, so damage comes from outside (a disk error, a partial copy of the
    cache): without this check every later calibration would fail in the middle with a traceback.
    """
    from sdxl.dataset import file_sha256

    for name, recorded in list(manifest.get("files", {}).items()):
        path = directory / name
        if path.is_file() and path.stat().st_size == recorded["size"] and file_sha256(path) == recorded["sha256"]:
            continue
        log.warning("calibration cache %s is damaged (size or sha256 differs from when it was written): "
                    "capturing it again", path)
        path.unlink(missing_ok=True)
        del manifest["files"][name]
        stem, _, number = path.stem.partition("-")
        kind = {"embeds": "encoded", "latents": "chunks"}.get(stem)
        if kind is not None and int(number) in manifest[kind]:
            manifest[kind].remove(int(number))
        manifest["complete"] = False


def _plan_by_importance(pipeline, latent, data: "CalibrationData", request: CaptureRequest, chunks: int,
                        manifest: dict) -> None:
    """``psnr:K``: one FP32 generation of the first chunk's prompts gives the step weights; the plan follows."""
    samples: list[torch.Tensor] = []
    scheduler_sigmas = [float(s) for s in pipeline.scheduler_sigmas]

    def on_step(step, t, latent_input, conditioning):
        n = latent_input.shape[0] // 2
        samples.append(latent_input[:n].double() * (scheduler_sigmas[step] ** 2 + 1) ** 0.5)

    cond = data.conditioning(0)
    with torch.inference_mode():
        final = pipeline.denoise(latent, {k: v.to(pipeline.backend.dtype) for k, v in cond.items()},
                                 cond["text_embeds"].shape[0] // 2, step_callback=on_step).double()
    weights, psnr = step_importance(samples, scheduler_sigmas, final)
    per_chunk = _count(request.timesteps_spec, request.timesteps_spec.partition(":")[2], len(samples))
    manifest["chunk_steps"] = importance_plan(weights, chunks, per_chunk)
    manifest["importance"] = {"psnr_db": [round(v, 3) for v in psnr], "weights": [w / (sum(weights) or 1) for w in weights],
                              "from": "the FP32 trajectory of the first chunk of calibration prompts"}
    manifest["steps"] = sorted({s for steps in manifest["chunk_steps"] for s in steps})
    schedule = [int(t) for t in pipeline.timesteps]
    manifest["timesteps"] = [schedule[s] for s in manifest["steps"]]


def _write_manifest(directory: Path, manifest: dict) -> None:
    tmp = directory / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(directory / "manifest.json")


def capture(pipeline, spec, tokenizers, request: CaptureRequest, cache_dir: str | Path,
            free_text_encoders=None, show_progress: bool = True) -> CalibrationData:
    """Run (or resume) the capture for ``request``; return the data on disk.

    ``pipeline`` is a :class:`sdxl.pipeline.SDXLPipeline` over FP32 modules. ``free_text_encoders``,
    when given, is called once every prompt is encoded (the caller drops its references).
    """
    from sdxl.latents import draw_latent
    from sdxl.progress import progress
    from sdxl.tokenizers import tokenize

    schedule = [int(t) for t in pipeline.timesteps]
    chunks = [request.captions[i:i + request.chunk_prompts] for i in range(0, len(request.captions), request.chunk_prompts)]
    importance = request.timesteps_spec.strip().startswith("psnr")
    # psnr:K plans from the FP32 trajectory (below): the spec, with the model, captions and latent, fixes it
    plan = [list(range(len(schedule)))] * len(chunks) if importance else \
        plan_timesteps(request.timesteps_spec, schedule, len(chunks))
    steps = sorted({s for chunk_steps in plan for s in chunk_steps})
    per_chunk = importance or any(chunk_steps != steps for chunk_steps in plan)
    latent = draw_latent(spec.latent_size)
    key = cache_key(spec.fingerprint(), request, request.timesteps_spec if importance else plan if per_chunk else steps,
                    latent)
    directory = Path(cache_dir) / "calib" / f"{spec.profile}-{key}"
    directory.mkdir(parents=True, exist_ok=True)
    manifest_path = directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if manifest.get("key") != key:
        manifest = {"key": key, "model": spec.fingerprint(), "profile": spec.profile, "captions": request.captions_source,
                    "captions_sha256": _captions_hash(request.captions), "num_prompts": len(request.captions),
                    "timesteps_spec": request.timesteps_spec, "steps": steps,
                    "timesteps": [schedule[s] for s in steps], "encoded": [], "chunks": [], "complete": False}
        if per_chunk:  # a sampler that draws each chunk's steps (NDTC)
            manifest["chunk_steps"] = plan
    _discard_damaged_files(directory, manifest)
    if manifest.get("complete"):
        log.info("calibration data cached at %s", directory)
        return CalibrationData(directory, manifest)

    # phase 1: text encoders for every prompt (cheap), so they can be freed before the UNet loop
    with torch.inference_mode():
        if not (directory / "negative.safetensors").is_file():
            _save(pipeline.negative_conditioning(), directory / "negative.safetensors", manifest)
        for index in progress(range(len(chunks)), desc="encoding calibration prompts", disable=not show_progress):
            if index in manifest["encoded"]:
                continue
            ids_1, ids_2 = (tokenize(tok, chunks[index]) for tok in tokenizers)
            embeds, pooled = pipeline.backend.encode_prompts(ids_1, ids_2)
            _save({"prompt_embeds": embeds, "text_embeds": pooled, "ids_1": ids_1, "ids_2": ids_2},
                  directory / f"embeds-{index:05d}.safetensors", manifest)
            manifest["encoded"].append(index)
            _write_manifest(directory, manifest)
    if free_text_encoders is not None:
        free_text_encoders()

    if importance and "importance" not in manifest:
        _plan_by_importance(pipeline, latent, CalibrationData(directory, manifest), request, len(chunks), manifest)
        _write_manifest(directory, manifest)

    # phase 2: the denoising loop, one chunk of prompts at a time
    data = CalibrationData(directory, manifest)
    for index in progress(range(len(chunks)), desc="capturing unet inputs", disable=not show_progress):
        if index in manifest["chunks"]:
            continue
        captured: dict[str, torch.Tensor] = {}
        wanted = data.chunk_steps(index)

        def on_step(step, t, latent_input, conditioning, wanted=wanted):
            if step in wanted:
                captured[f"latent.{step}"] = latent_input.detach().float().clone()
            if step == max(wanted) and not request.need_final:
                raise _StopDenoise

        cond = data.conditioning(index)
        n = cond["text_embeds"].shape[0] // 2
        with torch.inference_mode():
            try:
                captured["final"] = pipeline.denoise(latent, {k: v.to(pipeline.backend.dtype) for k, v in cond.items()},
                                                     n, step_callback=on_step).float()
            except _StopDenoise:
                pass
        _save(captured, directory / f"latents-{index:05d}.safetensors", manifest)
        manifest["chunks"].append(index)
        _write_manifest(directory, manifest)
    manifest["complete"] = True
    _write_manifest(directory, manifest)
    return CalibrationData(directory, manifest)
