"""Write a trained testbed as the files a fresh clone loads: weights, scorer, profile, report.

The profile JSON (``sdxl/data/profiles/testbed.json``) records each file's sha256 and the VAE's
latent scaling factor measured in training; loading checks the hashes (:mod:`sdxl.shipped_weights`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from sdxl.benchmark_spec import NEGATIVE_PROMPT
from sdxl.dataset import file_sha256
from sdxl.io import atomic_path
from sdxl.shipped_weights import pack, used_rows_only
from sdxl.tokenizers import tokenize

from .scenes import all_scenes

WEIGHTS_FILE = "testbed.safetensors"
SCORER_FILE = "scorer.safetensors"
SCORER_CONFIG_FILE = "scorer.json"


def used_token_ids(tokenizers) -> torch.Tensor:
    """Every token id the grammar's captions and MLPerf's negative prompt produce, padding included."""
    captions = [s.caption() for s in all_scenes()] + [NEGATIVE_PROMPT]
    return torch.cat([tokenize(tok, captions).flatten() for tok in tokenizers]).unique(sorted=True)


def fp16_rounded(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights as fp16 values (in fp32 tensors): what the shipped file stores, exactly."""
    return {k: v.half().float() if v.is_floating_point() else v for k, v in state.items()}


def shippable(state: dict[str, torch.Tensor], token_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    return used_rows_only(fp16_rounded(state), token_ids)


def _save(flat: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> str:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:  # the umask's mode: safetensors alone writes 0600
        save_file(flat, str(tmp), metadata=metadata)
    return file_sha256(path)


def export(results: dict, tokenizers, profile_path: Path, report: dict, workdir: Path) -> dict:
    """Write weights + scorer next to ``profile_path`` and record their hashes in it; returns the new profile."""
    profile_path = Path(profile_path)
    config = json.loads(profile_path.read_text())
    target = profile_path.parent / Path(config["weights"]).parent
    target.mkdir(parents=True, exist_ok=True)
    token_ids = used_token_ids(tokenizers)
    models = {"text_encoder": results["text_encoder"].state_dict(), "text_encoder_2": results["text_encoder_2"].state_dict(),
              "unet": results["unet"]["state"], "vae": results["vae"]["state"]}
    metadata = {"seed": str(report["seed"]), "command": report["command"]}
    config["weights_sha256"] = _save(pack({k: shippable(v, token_ids) for k, v in models.items()}, token_ids),
                                     target / WEIGHTS_FILE, metadata)
    scorer = results["scorer"]
    config["scorer"] = {"weights": f"{target.name}/{SCORER_FILE}", "config": f"{target.name}/{SCORER_CONFIG_FILE}",
                        "sha256": _save(pack({"scorer": shippable(scorer["state"], token_ids)}, token_ids),
                                        target / SCORER_FILE, metadata)}
    (target / SCORER_CONFIG_FILE).write_text(json.dumps(scorer["config"], indent=1, sort_keys=True, default=str))
    config["vae"]["scaling_factor"] = round(float(results["unet"]["scaling_factor"]), 6)
    for name in ("training_report.json", "loss_curves.png"):
        shutil.copyfile(Path(workdir) / name, target / name)
    tmp = profile_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    tmp.replace(profile_path)
    return config
