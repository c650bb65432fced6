"""--profile sdxl: tiny saved as a real checkpoint (both layouts) loads back and gives the same images."""

import json

import numpy as np
import pytest
import torch

from backends import BackendOptions, create_backend
from sdxl.checkpoints import resolve_checkpoint, save_checkpoint
from sdxl.latents import draw_latent
from sdxl.models import ModelLoadError, load_tokenizers, model_spec
from sdxl.pipeline import SDXLPipeline
from sdxl.tokenizers import tokenize

PROMPT = ["a photo of a cat"]


@pytest.fixture(scope="module")
def tiny_image(tiny_pipeline, tiny_tokenizers, tiny_spec):
    ids = [tokenize(t, PROMPT) for t in tiny_tokenizers]
    return tiny_pipeline.generate(*ids, draw_latent(tiny_spec.latent_size))[0]


@pytest.mark.parametrize("layout", ["diffusers", "mlperf"])
def test_saved_tiny_loads_as_sdxl_with_identical_images(tmp_path, layout, tiny_backend, tiny_tokenizers,
                                                        tiny_spec, tiny_image):
    root = save_checkpoint(tiny_backend.components, tiny_tokenizers, tiny_spec.scheduler_config, tmp_path, layout)
    assert resolve_checkpoint(root).kind == layout
    spec = model_spec("sdxl", root)
    assert spec.image_size == tiny_spec.image_size and not spec.random_weights
    assert spec.fingerprint().startswith("sdxl-") and spec.fingerprint() == model_spec("sdxl", root).fingerprint()
    tokenizers = load_tokenizers(spec)
    assert [tokenize(t, PROMPT).tolist() for t in tokenizers] == [tokenize(t, PROMPT).tolist() for t in tiny_tokenizers]
    backend = create_backend("torch", spec, BackendOptions(show_progress=False))
    for name, module in tiny_backend.components.modules().items():
        loaded = backend.components.modules()[name].state_dict()
        for key, value in module.state_dict().items():
            assert torch.equal(loaded[key], value), f"{layout}: {name}.{key}"
    if layout == "mlperf":  # equal weights give equal images; generate once to show the whole path
        pipeline = SDXLPipeline(backend, spec, tokenizers)
        ids = [tokenize(t, PROMPT) for t in tokenizers]
        np.testing.assert_array_equal(pipeline.generate(*ids, draw_latent(spec.latent_size))[0], tiny_image)


def test_missing_pieces_are_named(tmp_path, tiny_backend, tiny_tokenizers, tiny_spec):
    with pytest.raises(ModelLoadError, match="not a directory"):
        resolve_checkpoint(tmp_path / "absent")
    with pytest.raises(ModelLoadError, match="neither a diffusers SDXL directory"):
        resolve_checkpoint(tmp_path)
    root = save_checkpoint(tiny_backend.components, tiny_tokenizers, tiny_spec.scheduler_config, tmp_path / "m", "mlperf")
    (root / "checkpoint_pipe" / "unet" / "diffusion_pytorch_model.safetensors").rename(root / "moved")
    (root / "checkpoint_scheduler" / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(ModelLoadError) as error:
        resolve_checkpoint(root)
    message = str(error.value)
    assert "checkpoint_scheduler/scheduler/scheduler_config.json" in message
    assert "checkpoint_pipe/unet/diffusion_pytorch_model[.fp16].safetensors" in message
    assert "huggingface-cli download" in message and "\n" not in message


def test_pickle_weights_are_refused(tmp_path, tiny_backend, tiny_tokenizers, tiny_spec):
    root = save_checkpoint(tiny_backend.components, tiny_tokenizers, tiny_spec.scheduler_config, tmp_path, "diffusers")
    weights = root / "vae" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))  # only a pickle left: must not be loaded
    with pytest.raises(ModelLoadError, match="vae/diffusion_pytorch_model"):
        model_spec("sdxl", root)
    assert json.loads((root / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
