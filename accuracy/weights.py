"""Finding the evaluation weights (Inception for FID, CLIP ViT-B/32 ``openai``) without downloading.

Nothing here touches the network: the harness runs on machines without internet, and a silent
download of a different file would change the numbers. Each resolver looks in the same caches the
MLPerf reference's libraries use, so a machine prepared for the reference works unchanged:

* Inception: ``pt_inception-2015-12-05-6726825d.pth`` in torch hub's checkpoint cache
  (``$TORCH_HOME/hub/checkpoints``, where pytorch-fid downloads it), or ``--inception-weights FILE``.
* CLIP: open_clip >= 3's Hugging Face cache entry ``timm/vit_base_patch32_clip_224.openai``
  (``$HF_HOME/hub``), OpenAI's TorchScript ``ViT-B-32.pt`` in ``~/.cache/clip`` (what open_clip
  2.26.1, MLPerf's pin, loads), or ``--clip-weights FILE``.

A missing file is a :class:`WeightsUnavailable` whose one-line message names the file and how to get it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdxl.dataset import file_sha256
from sdxl.errors import UserError

from .spec import weight_info


class WeightsUnavailable(UserError, FileNotFoundError):
    """Evaluation weights are not on this machine; the message says which file and how to get it."""


@dataclass(frozen=True)
class WeightFile:
    """A resolved weight file and whether its sha256 is the official one (None: not pinned)."""

    kind: str       # "inception" or "clip"
    path: Path
    source: str     # where it was found
    format: str     # "state_dict", "safetensors" or "torchscript"
    sha256: str
    official: bool | None

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path), "source": self.source, "format": self.format,
                "sha256": self.sha256, "official": self.official}



def torch_hub_checkpoints_dir() -> Path:
    """``$TORCH_HOME/hub/checkpoints`` as torch resolves it now (env read at call time)."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``), read from the environment now.

    huggingface_hub computes its default at import time; tests and users who set ``HF_HOME`` later
    in the process must still be honoured, so the path is derived here.
    """
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def openai_clip_cache_dir() -> Path:
    """Where open_clip 2.x (and OpenAI's ``clip``) keep ``ViT-B-32.pt``."""
    return Path("~/.cache/clip").expanduser()


def _weight_file(kind: str, path: Path, source: str, known_sha256: str | None) -> WeightFile:
    sha = file_sha256(path)
    if path.suffix == ".safetensors":
        fmt = "safetensors"
    else:
        import zipfile

        fmt = "state_dict"
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                if any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist()):
                    fmt = "torchscript"
    return WeightFile(kind, path, source, fmt, sha, None if known_sha256 is None else sha == known_sha256)


def inception_how_to() -> str:
    info = weight_info("inception")
    return (f"FID weights {info['file_name']} not found in {torch_hub_checkpoints_dir()} (TORCH_HOME's hub cache); "
            f"download {info['url']} into that directory (sha256 {info['sha256'][:12]}...), or pass "
            "--inception-weights FILE")


def clip_how_to() -> str:
    openai = weight_info("clip_openai_torchscript")
    hf = weight_info("clip_hf")
    return (f"CLIP ViT-B-32 'openai' weights not found (looked for {hf['repo_id']} in the Hugging Face cache "
            f"{hf_hub_cache_dir()} and {openai_clip_cache_dir() / openai['file_name']}); download {openai['url']} "
            "and pass --clip-weights FILE, or copy the Hugging Face cache of a machine that ran "
            "open_clip.create_model_and_transforms('ViT-B-32', pretrained='openai')")


def resolve_inception(path: str | Path | None = None) -> WeightFile:
    """The pytorch-fid Inception weights: ``path`` if given, else torch hub's cache; else :class:`WeightsUnavailable`."""
    info = weight_info("inception")
    if path is not None:
        file = Path(path).expanduser()
        if not file.is_file():
            raise WeightsUnavailable(f"--inception-weights {file} not found; " + inception_how_to())
        return _weight_file("inception", file, "flag", info["sha256"])
    file = torch_hub_checkpoints_dir() / info["file_name"]
    if not file.is_file():
        raise WeightsUnavailable(inception_how_to())
    return _weight_file("inception", file, "torch hub cache", info["sha256"])


def resolve_clip(path: str | Path | None = None) -> WeightFile:
    """CLIP ViT-B/32 ``openai`` weights: ``path``, else the HF cache entry, else ``~/.cache/clip/ViT-B-32.pt``."""
    openai = weight_info("clip_openai_torchscript")
    hf = weight_info("clip_hf")
    if path is not None:
        file = Path(path).expanduser()
        if not file.is_file():
            raise WeightsUnavailable(f"--clip-weights {file} not found; " + clip_how_to())
        known = openai["sha256"] if file.name == openai["file_name"] else hf["sha256"]
        return _weight_file("clip", file, "flag", known)
    from huggingface_hub import try_to_load_from_cache

    for name in hf["file_names"]:
        found = try_to_load_from_cache(hf["repo_id"], name, cache_dir=str(hf_hub_cache_dir()))
        if isinstance(found, str) and Path(found).is_file():
            return _weight_file("clip", Path(found), f"hugging face cache ({hf['repo_id']})", hf["sha256"])
    file = openai_clip_cache_dir() / openai["file_name"]
    if file.is_file():
        return _weight_file("clip", file, "openai clip cache", openai["sha256"])
    raise WeightsUnavailable(clip_how_to())
