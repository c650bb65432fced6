"""``run``: one LoadGen run (performance and/or accuracy) of one scenario, with ``run.json`` and a table.

Each LoadGen test runs in a fresh child process (LoadGen applies its built-in ``mlperf.conf`` only
once per process; a crash or Ctrl-C in the model cannot leave the parent's results half-written).
Children are forked from a ``forkserver`` that imported torch, diffusers and LoadGen once: importing
the CUDA build of torch reads ~1 GB of libraries, which costs tens of seconds on a cold page cache,
and forking from a process that never ran a parallel op is safe where forking this one may not be.
The parent validates every input first, so a bad captions file or model path fails in a second,
before a model is built.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import multiprocessing
import os
import shutil
import signal
import traceback
from pathlib import Path
from typing import Any

from backends.registry import add_backend_arguments, backend_extra_from_args
from sdxl.arg_types import int_at_least, positive_float
from sdxl.benchmark_spec import (
    OFFICIAL_CAPTIONS_SHA256,
    OFFICIAL_IMAGE_SIZE,
    OFFICIAL_LATENT_TENSOR_SHA256,
    PERFORMANCE_SAMPLE_COUNT,
)
from sdxl.interrupts import Interrupted

from .loadgen_settings import MODES, SCENARIOS, Overrides, user_conf_non_compliant_keys
from .results import RunRecord, print_results_table
from .run_config import DEFAULT_USER_CONF, RunConfig


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by every command that builds a model (``run``, ``calibrate``, ...)."""
    from sdxl.backend import DTYPES
    from sdxl.models import PROFILES

    parser.add_argument("--profile", default="testbed", choices=PROFILES,
                        help="testbed: small SDXL-architecture model trained on generated scenes, weights shipped "
                             "(default); tiny: the same architecture with random weights (harness checks); sdxl: "
                             "real weights from --model-path; sdxl-random: full-size architecture, random weights")
    parser.add_argument("--model-path", help="SDXL checkpoint directory (diffusers or MLPerf reference layout)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--cache-dir", default="build/cache", help="root of caches (calibration data, exports)")


def register(subparsers) -> None:
    parser = subparsers.add_parser("run", help="one LoadGen run (MLPerf SDXL) of one scenario",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--backend", default="torch", help="null, torch (alias pytorch), ... (default torch)")
    parser.add_argument("--encodings", help="quantization encodings JSON (fake-quant / quantized backends)")
    parser.add_argument("--recipe", help="quantization recipe name or file: calibrated once before the LoadGen tests "
                                         "(capture cached under --cache-dir) into <run>/encodings.json")
    parser.add_argument("--calibration-captions", help="with --recipe: calibration captions (MLPerf's train2014 list "
                                                       "or TSV; tiny defaults to its built-in captions)")
    parser.add_argument("--num-prompts", type=int_at_least(1), help="with --recipe: calibrate on the first N captions")
    parser.add_argument("--timesteps", help="with --recipe: all | single | uniform:K | list:951,901,... "
                                            "(default: the recipe's, else all)")
    parser.add_argument("--scenario", default="Offline", choices=SCENARIOS)
    parser.add_argument("--accuracy", action="store_true", help="accuracy mode only (as the reference's flag)")
    parser.add_argument("--mode", choices=("performance", "accuracy", "both"),
                        help="performance (default), accuracy, or both in one run directory")
    parser.add_argument("--dataset-path", help="captions TSV, or a reference-layout directory "
                                               "(captions/captions.tsv, latents/latents.pt); default: built-in captions")
    parser.add_argument("--max-samples", type=int_at_least(1), help="use the first N captions only (not compliant)")
    parser.add_argument("--latents", help="latents.pt (MLPerf's fixed latent) or a dataset directory holding it")
    parser.add_argument("--user-conf", "--user_conf", dest="user_conf", default=str(DEFAULT_USER_CONF),
                        help="LoadGen user.conf (default: the harness's short development settings)")
    parser.add_argument("--audit-conf", "--audit_conf", dest="audit_conf",
                        help="compliance audit.config (TEST01/TEST04); never read implicitly from the cwd")
    parser.add_argument("--count", type=int_at_least(1), help="cap the number of queries (min = max query count)")
    parser.add_argument("--time", dest="time_s", type=positive_float, help="min = max duration in seconds")
    parser.add_argument("--qps", type=positive_float, help="Server target QPS / Offline expected QPS")
    parser.add_argument("--max-batchsize", type=int_at_least(1), default=1, help="largest batch the SUT forms (default 1)")
    parser.add_argument("--threads", type=int_at_least(1), default=1,
                        help="batches run at once (default 1): SUT worker threads; with --executor ray, per actor")
    parser.add_argument("--executor", default="threads", choices=("threads", "ray"),
                        help="where batches run: threads of this process (default), or Ray actors (one per GPU, "
                             "or per CPU node) anywhere in a Ray cluster")
    parser.add_argument("--ray-address", help="with --executor ray: the cluster to attach to (default RAY_ADDRESS, "
                                              "else a local Ray started with this machine's resources)")
    parser.add_argument("--ray-actors", type=int_at_least(1),
                        help="with --executor ray: number of actors (default: one per GPU with --device cuda, one "
                             "per node with --device cpu; CPU actors share the cluster's CPUs equally)")
    parser.add_argument("--output", help="run directory (default results/<timestamp>-<profile>-<backend>-<scenario>)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run already in --output (a directory holding a run.json); without it a "
                             "non-empty --output is refused, so two runs never mix in one directory")
    parser.add_argument("--save-images", action="store_true", help="write the accuracy run's images as PNGs + a grid")
    parser.add_argument("--statistics-path", help="FID statistics (MLPerf's val2014.npz) for the accuracy audit")
    parser.add_argument("--reference-run", help="after an accuracy run, compare its images with this run "
                                                "directory or accuracy log (PSNR, SSIM, FID between sets)")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the untimed warm-up of performance tests (2 steps per batch size)")
    add_backend_arguments(parser)  # each backend's own flags (--ep, --ort-threads, ...), checked by that backend
    parser.set_defaults(func=run_from_args)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    from sdxl.errors import UserError

    modes = {"performance": ("performance",), "accuracy": ("accuracy",), "both": MODES, None: ("performance",)}[args.mode]
    if args.accuracy:
        if args.mode not in (None, "accuracy"):
            raise UserError("--accuracy conflicts with --mode " + args.mode)
        modes = ("accuracy",)
    backend_extra = backend_extra_from_args(args)
    calibration = {k: getattr(args, k) for k in ("calibration_captions", "num_prompts", "timesteps")
                   if getattr(args, k) is not None}
    if calibration and not args.recipe:
        raise UserError("--" + next(iter(calibration)).replace("_", "-") + " applies to --recipe only")
    if args.recipe and args.encodings:
        raise UserError("give --encodings (calibrated already) or --recipe (calibrate now), not both")
    if args.recipe and args.backend == "null":
        raise UserError("--recipe needs a model backend (torch or ort), not null")
    _check_executor_flags(args)
    timestamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    output = args.output or f"results/{timestamp}-{args.profile}-{args.backend}-{args.scenario}"
    return RunConfig(profile=args.profile, model_path=args.model_path, backend=args.backend, dtype=args.dtype,
                     device=args.device, encodings=args.encodings, recipe=args.recipe, scenario=args.scenario,
                     modes=modes, dataset_path=args.dataset_path, max_samples=args.max_samples, latents=args.latents,
                     user_conf=args.user_conf, audit_conf=args.audit_conf, count=args.count, time_s=args.time_s,
                     qps=args.qps, max_batchsize=args.max_batchsize, threads=args.threads, executor=args.executor,
                     ray_address=args.ray_address, ray_actors=args.ray_actors, output=output,
                     overwrite=args.overwrite,
                     save_images=args.save_images, warmup=args.warmup, cache_dir=args.cache_dir,
                     statistics_path=args.statistics_path, reference_run=args.reference_run,
                     calibration=calibration, backend_extra=backend_extra)


def _check_executor_flags(args: argparse.Namespace) -> None:
    from sdxl.errors import UserError

    if args.executor != "ray":
        for flag in ("ray_address", "ray_actors"):
            if getattr(args, flag) is not None:
                raise UserError(f"--{flag.replace('_', '-')} applies to --executor ray only")
        return
    if args.device.startswith("cuda:"):
        raise UserError(f"--device {args.device} with --executor ray: Ray gives each actor its own GPU; "
                        "use --device cuda")
    from .ray_cluster import check_address, import_ray

    import_ray()  # installed, or one line saying how
    check_address(args.ray_address or os.environ.get("RAY_ADDRESS"))  # before the run directory is made


#: RunConfig fields spelled differently on the command line
_FLAG_NAMES = {"time_s": "time"}
#: RunConfig fields that are not flags of their own (or are the run's output, not its input)
_NOT_FLAGS = ("modes", "output", "overwrite", "warmup", "calibration", "backend_extra", "ray_session")


def run_flags(config: dict[str, Any]) -> list[str]:
    """The ``run`` command line that reproduces a ``run.json`` ``config`` (inverse of :func:`config_from_args`)."""
    modes = tuple(config.get("modes") or ("performance",))
    flags = ["--mode", "both" if len(modes) > 1 else modes[0]]
    if not config.get("warmup", True):
        flags.append("--no-warmup")
    settings = {k: v for k, v in config.items() if k not in _NOT_FLAGS}
    settings.update(config.get("calibration") or {}, **(config.get("backend_extra") or {}))
    for key, value in sorted(settings.items()):
        if value is None or value is False or value in ("", [], {}):
            continue
        flag = "--" + _FLAG_NAMES.get(key, key).replace("_", "-")
        flags += [flag] if value is True else [flag, str(value)]
    return flags


def run_from_args(args: argparse.Namespace) -> int:
    record = execute_run(config_from_args(args))
    print_results_table([record])
    return 0 if record.status == "completed" else 1


def non_compliance_reasons(config: RunConfig, spec, captions, latent) -> list[str]:
    """Why this run is not an MLPerf closed-division run (empty list: it is)."""
    reasons = []
    if spec.random_weights:
        reasons.append(f"RANDOM WEIGHTS ({spec.profile} profile): images and accuracy are meaningless")
    if spec.image_size != OFFICIAL_IMAGE_SIZE:
        reasons.append(f"image size {spec.image_size} (MLPerf: {OFFICIAL_IMAGE_SIZE})")
    if captions.sha256 != OFFICIAL_CAPTIONS_SHA256:
        reasons.append("captions are not MLPerf's captions_source.tsv")
    if config.max_samples is not None and config.max_samples < PERFORMANCE_SAMPLE_COUNT:
        reasons.append(f"--max-samples {config.max_samples}")
    if latent.sha256 != OFFICIAL_LATENT_TENSOR_SHA256:
        reasons.append(f"latent is not MLPerf's latents.pt ({latent.source})")
    bad_keys = user_conf_non_compliant_keys(Path(config.user_conf), config.scenario)
    if bad_keys:
        reasons.append(f"user.conf overrides {'; '.join(bad_keys)}")
    reasons += Overrides(config.time_s, config.count, config.qps).non_compliant_reasons()
    if config.backend == "null":
        reasons.append("null backend (black images)")
    if config.encodings:
        from .loadgen_run import noise_correction_of

        if noise_correction_of(config) is not None:
            reasons.append("sampler changed: the encodings' runtime noise correction (QNCD) adds UNet calls")
    return reasons


def execute_run(config: RunConfig) -> RunRecord:
    """Validate inputs, run each requested LoadGen test in its own process, write ``run.json``."""
    from backends.registry import canonical_backend_name
    from sdxl.dataset import load_captions
    from sdxl.devices import check_device
    from sdxl.errors import UserError
    from sdxl.interrupts import describe
    from sdxl.latents import resolve_latent, save_latent
    from sdxl.models import model_spec, profile_default

    from .loadgen_settings import user_conf_keys

    config.backend = canonical_backend_name(config.backend)
    if config.executor != "ray":  # Ray actors check their own devices: the driver's node may have no GPU
        check_device(config.device)
    spec = model_spec(config.profile, config.model_path)
    if config.dataset_path is None and (default := profile_default(config.profile, "default_captions")) is not None:
        config.dataset_path = str(default)  # the profile's own validation set (the testbed's); run.json records it
    captions = load_captions(config.dataset_path, config.max_samples)
    try:
        latent = resolve_latent(spec.latent_size, config.latents, config.dataset_path)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    for flag, path in (("--user-conf", config.user_conf), ("--audit-conf", config.audit_conf)):
        if path is not None and not Path(path).is_file():
            raise UserError(f"{flag} {path} not found")
    try:
        user_conf_keys(Path(config.user_conf))
    except ValueError as exc:
        raise UserError(str(exc)) from None

    if config.recipe and not config.encodings:
        _check_calibration_inputs(config, spec)
    if config.encodings:
        _check_encodings(config, spec)
    run_dir = Path(config.output)
    claim_run_dir(run_dir, config.overwrite)
    if latent.source.startswith("drawn"):
        save_latent(latent, run_dir / "latents.pt")
        config.latents = str(run_dir / "latents.pt")  # children load the saved tensor: the same bytes
    else:
        config.latents = latent.source.removeprefix("file:")
    config.dataset_path = str(captions.path)
    record = RunRecord.start(run_dir, config, spec, captions, latent, non_compliance_reasons(config, spec, captions, latent))
    try:
        if config.recipe and not config.encodings:
            result = _calibrate_in_child(config, run_dir / "encodings.json")
            record.data["calibration"] = result
            if result.get("error"):
                record.finish("failed", f"calibration: {result['error']}")
                return record
            config.encodings = record.data["backend"]["encodings"] = result["encodings"]
            reasons = non_compliance_reasons(config, spec, captions, latent)  # the encodings may change the sampler
            record.data.update(compliant=not reasons, non_compliance_reasons=reasons)
        with _workers(config, record):
            for mode in config.modes:
                result = _run_test_in_child(config, mode, run_dir / mode)
                record.add_test(result)
                if result.get("error"):
                    record.finish("failed", result["error"])
                    return record
        if "accuracy" in config.modes:
            from accuracy.report import evaluate_run

            # FID/CLIP (N/A with a how-to line when their weights are absent), MLPerf verdict, fidelity
            record.data["accuracy"] = evaluate_run(run_dir, statistics_path=config.statistics_path,
                                                   reference_run=config.reference_run)
            record.save()
            if config.save_images:
                from .images import save_run_images

                record.data["images"] = save_run_images(run_dir / "accuracy", spec.image_size, captions)
    except KeyboardInterrupt as exc:
        record.finish("interrupted", describe(exc))
        raise
    except UserError as exc:  # found once the run began (a Ray actor that cannot start): the record says so
        record.finish("failed", str(exc))
        raise
    record.finish("completed")
    return record


def _workers(config: RunConfig, record: RunRecord):
    """What the tests' executor needs to exist for the whole run: the Ray actors, or nothing (threads)."""
    if config.executor != "ray":
        return contextlib.nullcontext()
    from .ray_cluster import ray_workers

    _start_child_server()  # its imports (torch, diffusers) overlap the actors' model builds
    return ray_workers(config, record)


def claim_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Make ``run_dir`` an empty, writable run directory, or fail in one line before any work.

    A run directory holds one run: a second run into it would keep the first one's files (its
    ``accuracy/`` log, say) beside the new ``run.json``, and later tools would mix the two. So a
    non-empty directory is refused, and ``--overwrite`` clears only what is recognisably a run
    directory (it holds a ``run.json``), never an arbitrary path given by mistake.
    """
    from sdxl.errors import UserError
    from sdxl.io import check_writable_dir

    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not overwrite:
            raise UserError(f"--output {run_dir} is not empty (a run directory holds one run): pass --overwrite to "
                            "replace the run there, or a new --output")
        if not (run_dir / "run.json").is_file():
            raise UserError(f"--output {run_dir} holds no run.json: --overwrite replaces a run directory only; "
                            "not clearing it")
        shutil.rmtree(run_dir)
    check_writable_dir(run_dir, "--output")


def _check_encodings(config: RunConfig, spec) -> None:
    """``--encodings``: read, validated and matched to this model here, not in each test process after the build."""
    from quant.encodings import Encodings, EncodingsError
    from quant.fake_quant import check_fingerprint
    from sdxl.errors import UserError

    if config.backend == "null":
        raise UserError("--encodings applies to model backends (torch, ort); the null backend runs no model")
    try:
        check_fingerprint(Encodings.load(config.encodings), spec, config.encodings,
                          bool(config.backend_extra.get("allow_fingerprint_mismatch")))
    except EncodingsError as exc:
        raise UserError(str(exc)) from None


def _check_calibration_inputs(config: RunConfig, spec) -> None:
    """``--recipe``: the recipe, captions and timesteps are read here, in a second, not after the model loads."""
    from calibration.capture import CalibrationDataError, parse_timesteps, read_calibration_captions
    from calibration.recipes import load_recipe
    from quant.encodings import EncodingsError
    from sdxl.errors import UserError
    from sdxl.pipeline import make_scheduler

    try:
        recipe = load_recipe(config.recipe)
        read_calibration_captions(config.calibration.get("calibration_captions"), spec.profile,
                                  config.calibration.get("num_prompts") or recipe.calibration.get("num_prompts"))
        schedule = [int(t) for t in make_scheduler(spec.scheduler_config).timesteps]
        parse_timesteps(config.calibration.get("timesteps") or recipe.calibration.get("timesteps", "all"), schedule)
    except (EncodingsError, CalibrationDataError) as exc:
        raise UserError(str(exc)) from None


def _run_test_in_child(config: RunConfig, mode: str, test_dir: Path) -> dict[str, Any]:
    """Run one LoadGen test in a child process; its result dict, or one with ``error``."""
    from .loadgen_run import run_loadgen_test

    test_dir.mkdir(parents=True, exist_ok=True)
    result = _call_in_child(f"loadgen-{mode}", run_loadgen_test, config, mode, test_dir)
    return {"scenario": config.scenario, "mode": mode, "dir": str(test_dir), **result} if "error" in result else result


def _calibrate_in_child(config: RunConfig, output: Path) -> dict[str, Any]:
    """``--recipe``: calibrate once, before the tests, so every test process loads the same encodings file."""
    return _call_in_child("calibrate", calibrate_for_run, config, output)


def calibrate_for_run(config: RunConfig, output: Path) -> dict[str, Any]:
    """Child side of ``--recipe``: encodings + AIMET export in the run directory; a summary for ``run.json``."""
    from calibration.commands import calibrate_to_file
    from sdxl.progress import progress_enabled

    encodings, _, _ = calibrate_to_file(config.profile, config.model_path, config.recipe, output, sqnr_samples=0,
                                        cache_dir=config.cache_dir, show_progress=progress_enabled(),
                                        **config.calibration)
    return {"recipe": config.recipe, "encodings": str(output), "quantizers": encodings.num_quantizers(),
            "seconds": encodings.calibration.get("seconds"), "size": encodings.size.get("total"),
            "mlperf_calibration_set": encodings.calibration.get("mlperf_calibration_set"),
            "methods": encodings.methods, **config.calibration}


def _call_in_child(name: str, function, *args) -> dict[str, Any]:
    """``function(*args)`` in a process forked from the forkserver; its dict result, or ``{"error": ...}``."""
    context = _child_context()
    parent_end, child_end = context.Pipe(duplex=False)
    process = context.Process(target=_child_main, args=(function, args, child_end), name=name)
    process.start()
    child_end.close()
    try:
        result = parent_end.recv() if parent_end.poll(None) else None
    except EOFError:
        result = None
    except KeyboardInterrupt as exc:
        # Ctrl-C reaches the whole process group; a SIGTERM (timeout, a scheduler) only this process:
        # pass it on, so the child aborts its SUT and LoadGen finishes its logs before we record the end
        if isinstance(exc, Interrupted) and process.is_alive():
            os.kill(process.pid, signal.SIGTERM)
        process.join(timeout=60)
        raise
    process.join()
    if result is None:
        result = {"error": f"the {name} process died (exit code {process.exitcode})"}
    return result


_PRELOAD = ["torch", "mlperf_loadgen", "diffusers.models.unets.unet_2d_condition",
            "diffusers.models.autoencoders.autoencoder_kl", "transformers.models.clip.modeling_clip",
            "sdxl.pipeline", "harness.loadgen_run",
            "backends.torch_backend"]


def _child_context():
    """A ``forkserver`` context whose server has the heavy modules imported (``spawn`` where unavailable)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    return context


def _start_child_server() -> None:
    """Start the forkserver now, in the background, instead of at the first test's start."""
    if _child_context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


def _child_main(function, args: tuple, conn) -> None:
    from sdxl import progress  # noqa: F401 -- tqdm's lock, before any bar (see sdxl.progress)
    from sdxl.interrupts import describe, handle_termination, signal_name

    handle_termination()
    try:
        result = function(*args)
    except KeyboardInterrupt as exc:
        result = {"error": describe(exc), "interrupted": signal_name(exc)}
    except BaseException as exc:  # noqa: BLE001 -- reported to the parent, which fails the run
        from sdxl.errors import UserError

        if isinstance(exc, UserError):  # a bad input found late (e.g. a recipe's key): its one line is the report
            result = {"error": str(exc)}
        else:
            traceback.print_exc()
            result = {"error": f"{type(exc).__name__}: {exc}"}
    try:
        conn.send(result)
    finally:
        conn.close()
        os._exit(0 if "error" not in result else 1)  # LoadGen's threads must not keep the child alive
