"""Weights the project ships in git: one safetensors file per model, fp16, token embeddings stored sparsely.

The testbed's text towers use SDXL's real 49,408-token vocabulary, but its captions (and MLPerf's
negative prompt) touch fewer than a hundred tokens; the full embedding tables would be a third of the
file. :func:`pack` keeps only the rows of ``token_ids`` (every other row is zero in the trained model:
the trainer zeroes them before export), :func:`unpack` expands them back, so a loaded model equals the
exported one exactly. Everything is stored in fp16; the trainer rounds the weights to fp16 before it
exports and measures, so the shipped model *is* the fp16 values (loaded as fp32, nothing is lost).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import UserError

TOKEN_IDS_KEY = "__token_ids__"
_EMBEDDING_SUFFIX = "token_embedding.weight"
_ROWS_SUFFIX = "token_embedding.rows"


class ShippedWeightsError(UserError, RuntimeError):
    """A shipped weights file that is missing, altered, or does not fit its model."""


def used_rows_only(state: dict[str, torch.Tensor], token_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """``state`` with every token embedding table zeroed outside ``token_ids`` (what :func:`pack` can store)."""
    out = dict(state)
    for key, value in state.items():
        if key.endswith(_EMBEDDING_SUFFIX):
            kept = torch.zeros_like(value)
            kept[token_ids] = value[token_ids]
            out[key] = kept
    return out


def pack(models: dict[str, dict[str, torch.Tensor]], token_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{model: state_dict}`` -> one flat fp16 dict ``"model.param"``, embedding tables as their used rows."""
    token_ids = torch.as_tensor(token_ids, dtype=torch.int64).unique(sorted=True)
    flat: dict[str, torch.Tensor] = {TOKEN_IDS_KEY: token_ids.to(torch.int32)}
    for model, state in models.items():
        for key, value in state.items():
            if key.endswith(_EMBEDDING_SUFFIX):
                unused = torch.ones(value.shape[0], dtype=torch.bool)
                unused[token_ids] = False
                if value[unused].abs().max() > 0:
                    raise ShippedWeightsError(f"{model}.{key} has non-zero rows outside the used tokens: "
                                              "zero them (used_rows_only) before packing")
                flat[f"{model}.{key[: -len(_EMBEDDING_SUFFIX)]}{_ROWS_SUFFIX}"] = value[token_ids].half().contiguous()
            else:
                flat[f"{model}.{key}"] = value.half().contiguous() if value.is_floating_point() else value.contiguous()
    return flat


def unpack(flat: dict[str, torch.Tensor], model: str, vocab_size: int) -> dict[str, torch.Tensor]:
    """The fp32 state dict of ``model`` from a :func:`pack` dict, embedding tables expanded to ``vocab_size`` rows."""
    token_ids = flat[TOKEN_IDS_KEY].to(torch.int64)
    prefix = f"{model}."
    state: dict[str, torch.Tensor] = {}
    for key, value in flat.items():
        if not key.startswith(prefix):
            continue
        key = key[len(prefix):]
        if key.endswith(_ROWS_SUFFIX):
            table = torch.zeros(vocab_size, value.shape[1], dtype=torch.float32)
            table[token_ids] = value.float()
            state[key[: -len(_ROWS_SUFFIX)] + _EMBEDDING_SUFFIX] = table
        else:
            state[key] = value.float() if value.is_floating_point() else value
    if not state:
        raise ShippedWeightsError(f"no weights for {model!r} in the shipped file")
    return state


def load_shipped(path: Path, expected_sha256: str | None, how_to_get: str) -> dict[str, torch.Tensor]:
    """Read a shipped file after checking its sha256 (a mismatch is an altered or half-written file)."""
    from safetensors.torch import load_file

    from .dataset import file_sha256

    if not path.is_file():
        raise ShippedWeightsError(f"{path} is missing: {how_to_get}")
    if expected_sha256 is None:
        raise ShippedWeightsError(f"{path} has no recorded sha256 in its profile: {how_to_get}")
    actual = file_sha256(path)
    if actual != expected_sha256:
        raise ShippedWeightsError(f"{path} has sha256 {actual[:16]}..., its profile records {expected_sha256[:16]}...: "
                                  f"the file was altered or half-written; {how_to_get}")
    return load_file(str(path))


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], name: str) -> torch.nn.Module:
    """Load ``state`` strictly (every parameter and buffer present, nothing extra) into ``module``."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]  # a buffer transformers rebuilds
    if missing or unexpected:
        raise ShippedWeightsError(f"shipped {name} weights do not fit the profile's architecture: "
                                  f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    return module
