"""Real SDXL weights from a local directory, in either layout MLPerf users have on disk.

* diffusers layout: ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``text_encoder_2/``,
  ``tokenizer/``, ``tokenizer_2/``, ``scheduler/`` (what ``huggingface-cli download`` gives);
* MLPerf reference layout: the same under ``checkpoint_pipe/``, plus the scheduler the reference
  actually uses under ``checkpoint_scheduler/scheduler/``.

Only safetensors are loaded (pickled ``.bin`` weights can execute code). Nothing is downloaded: a
missing piece is a one-line error naming it and saying how to get the checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .models import COMPONENT_NAMES, HOW_TO_GET_SDXL, ModelComponents, ModelLoadError, ModelSpec
from .tokenizers import save_tokenizer

_WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
                 "text_encoder": "model", "text_encoder_2": "model"}
_TOKENIZER_FILES = ("vocab.json", "merges.txt")


@dataclass(frozen=True)
class CheckpointLayout:
    root: Path
    kind: str  # "diffusers" or "mlperf"
    pipe_dir: Path
    scheduler_dir: Path


def resolve_checkpoint(model_path: str | Path | None) -> CheckpointLayout:
    """Find the layout of ``model_path`` and check every file the harness will read is there."""
    if not model_path:
        raise ModelLoadError(f"--profile sdxl needs --model-path DIR: {HOW_TO_GET_SDXL}")
    root = Path(model_path)
    if not root.is_dir():
        raise ModelLoadError(f"--model-path {root} is not a directory: {HOW_TO_GET_SDXL}")
    if (root / "checkpoint_pipe").is_dir():
        layout = CheckpointLayout(root, "mlperf", root / "checkpoint_pipe", root / "checkpoint_scheduler" / "scheduler")
    elif (root / "model_index.json").is_file():
        layout = CheckpointLayout(root, "diffusers", root, root / "scheduler")
    else:
        raise ModelLoadError(f"{root} is neither a diffusers SDXL directory (model_index.json) nor MLPerf's layout "
                             f"(checkpoint_pipe/): {HOW_TO_GET_SDXL}")
    missing = [str(p.relative_to(root)) for p in _required_files(layout) if not p.is_file()]
    for name in COMPONENT_NAMES:
        if _weight_variant(layout.pipe_dir / name, name) is False:
            missing.append(f"{(layout.pipe_dir / name).relative_to(root)}/{_WEIGHT_STEMS[name]}[.fp16].safetensors")
    if missing:
        raise ModelLoadError(f"{root} ({layout.kind} layout) lacks {', '.join(missing)}: {HOW_TO_GET_SDXL}")
    for name in COMPONENT_NAMES:
        _check_safetensors_header(layout.pipe_dir / name, name)
    return layout


def _check_safetensors_header(directory: Path, component: str) -> None:
    """Parse each weight file's header (a few KB, no tensor data): a corrupt or truncated file fails here, in the
    parent, naming the file and safetensors' reason, instead of after the other components have loaded."""
    from safetensors import safe_open

    suffix = ".fp16" if _weight_variant(directory, component) == "fp16" else ""
    single = directory / f"{_WEIGHT_STEMS[component]}{suffix}.safetensors"
    if single.is_file():
        files = [single]
    else:  # sharded: the index names its shards
        index = single.with_name(single.name + ".index.json")
        try:
            files = sorted({directory / shard for shard in json.loads(index.read_text())["weight_map"].values()})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{index}: not a readable safetensors index ({exc})") from None
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except Exception as exc:  # noqa: BLE001 -- safetensors raises its own SafetensorError and OSErrors
            raise ModelLoadError(f"{file}: not a readable safetensors file ({exc})") from None


def _required_files(layout: CheckpointLayout) -> list[Path]:
    files = [layout.scheduler_dir / "scheduler_config.json"]
    files += [layout.pipe_dir / name / "config.json" for name in COMPONENT_NAMES]
    files += [layout.pipe_dir / tok / f for tok in ("tokenizer", "tokenizer_2") for f in _TOKENIZER_FILES]
    return files


def _weight_variant(directory: Path, component: str) -> str | None | bool:
    """``None`` for the default weights, ``"fp16"`` when only the fp16 variant exists, ``False`` when none."""
    stem = _WEIGHT_STEMS[component]
    for variant, suffix in ((None, ""), ("fp16", ".fp16")):
        if (directory / f"{stem}{suffix}.safetensors").is_file() or \
                (directory / f"{stem}{suffix}.safetensors.index.json").is_file():
            return variant
    return False


def load_checkpoint_tokenizers(spec: ModelSpec) -> tuple[Any, Any]:
    from transformers import CLIPTokenizer

    layout = resolve_checkpoint(spec.model_path)
    return tuple(CLIPTokenizer.from_pretrained(layout.pipe_dir / name) for name in ("tokenizer", "tokenizer_2"))


def load_checkpoint_components(spec: ModelSpec, dtype: torch.dtype, show_progress: bool = True) -> ModelComponents:
    """Load the four modules directly in ``dtype`` from safetensors (no fp32 detour for fp16 runs)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from .progress import progress

    layout = resolve_checkpoint(spec.model_path)
    classes = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection,
               "unet": UNet2DConditionModel, "vae": AutoencoderKL}
    modules = {}
    for name in progress(COMPONENT_NAMES, desc=f"loading SDXL from {layout.root}", disable=not show_progress):
        directory = layout.pipe_dir / name
        kwargs = {"use_safetensors": True, "variant": _weight_variant(directory, name)}
        if name in ("unet", "vae"):  # diffusers warns on every load when its accelerate default cannot apply
            kwargs["low_cpu_mem_usage"] = importlib.util.find_spec("accelerate") is not None
        dtype_key = "torch_dtype" if name in ("unet", "vae") else "dtype"
        try:
            module = classes[name].from_pretrained(directory, **{dtype_key: dtype}, **kwargs)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"cannot load {directory}: {_root_cause(exc)}") from None
        modules[name] = module.eval().requires_grad_(False)
    return ModelComponents(spec, **modules)


def _root_cause(exc: BaseException) -> str:
    """The innermost error's message: diffusers wraps a bad file's reason in a generic 'Unable to load' one."""
    while exc.__cause__ is not None or (exc.__context__ is not None and not exc.__suppress_context__):
        exc = exc.__cause__ or exc.__context__
    return f"{type(exc).__name__}: {exc}"


def save_checkpoint(components: ModelComponents, tokenizers: tuple, scheduler_config: dict, directory: Path,
                    layout: str = "diffusers") -> Path:
    """Write ``components`` as a safetensors SDXL checkpoint in the diffusers or MLPerf layout."""
    directory = Path(directory)
    pipe_dir = directory / "checkpoint_pipe" if layout == "mlperf" else directory
    for name, module in components.modules().items():
        module.save_pretrained(pipe_dir / name, safe_serialization=True)
    for name, tokenizer in zip(("tokenizer", "tokenizer_2"), tokenizers):
        save_tokenizer(tokenizer, pipe_dir / name)
    scheduler_dirs = [pipe_dir / "scheduler"] + ([directory / "checkpoint_scheduler" / "scheduler"] if layout == "mlperf" else [])
    for scheduler_dir in scheduler_dirs:
        scheduler_dir.mkdir(parents=True, exist_ok=True)
        (scheduler_dir / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2))
    index = {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
             "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "tokenizer_2": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    (pipe_dir / "model_index.json").write_text(json.dumps(index, indent=2))
    return directory


def checkpoint_fingerprint(root: Path | None) -> str:
    """sha256 over the checkpoint's weight and config files (file hashes cached by size and mtime)."""
    assert root is not None
    files = sorted(p for p in Path(root).rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json", ".txt"))
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(root)}\0{_cached_file_sha256(path)}\n".encode())
    return "sdxl-" + digest.hexdigest()[:16]


def _hash_cache_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sdxl-ptq-bench" / "file-sha256.json"


def _cached_file_sha256(path: Path) -> str:
    from .dataset import file_sha256

    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_path = _hash_cache_path()
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, json.JSONDecodeError):
        cache = {}
    if key not in cache:
        cache[key] = file_sha256(path)
        from sdxl.io import write_json_atomic

        write_json_atomic(cache_path, cache)
    return cache[key]
