"""The SDXL loop: equal to diffusers' StableDiffusionXLPipeline, deterministic, batch-independent."""

import numpy as np
import pytest
import torch

from harness.benchmark_spec import GUIDANCE_SCALE, NEGATIVE_PROMPT, NUM_INFERENCE_STEPS
from harness.latents import draw_latent
from harness.pipeline import images_to_uint8, make_scheduler
from harness.tokenizers import tokenize

# two prompts: each tiny image costs 20-40 s on the 2-core CI machines, and batch 2 already takes the
# batched GEMM kernels that make TEST01's bytes differ
PROMPTS = ["a photo of a cat", "A red bicycle leaning against a brick wall."]


def _ids(tokenizers, prompts):
    return [tokenize(t, prompts) for t in tokenizers]


@pytest.fixture(scope="module")
def latent(tiny_spec):
    return draw_latent(tiny_spec.latent_size)


@pytest.fixture(scope="module")
def single_images(tiny_pipeline, tiny_tokenizers, latent):
    """Each prompt generated alone (batch of 1)."""
    return [tiny_pipeline.generate(*_ids(tiny_tokenizers, [p]), latent)[0] for p in PROMPTS]


def test_images_equal_diffusers_pipeline(tiny_backend, tiny_spec, tiny_tokenizers, latent, single_images):
    from diffusers import StableDiffusionXLPipeline

    c = tiny_backend.components
    reference = StableDiffusionXLPipeline(
        vae=c.vae, text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2, tokenizer=tiny_tokenizers[0],
        tokenizer_2=tiny_tokenizers[1], unet=c.unet, scheduler=make_scheduler(tiny_spec.scheduler_config),
        add_watermarker=False)
    reference.set_progress_bar_config(disable=True)
    size = tiny_spec.image_size
    for prompt, ours in zip(PROMPTS, single_images):
        out = reference(prompt=prompt, negative_prompt=NEGATIVE_PROMPT, num_inference_steps=NUM_INFERENCE_STEPS,
                        guidance_scale=GUIDANCE_SCALE, latents=latent, height=size, width=size, output_type="pt").images
        # MLPerf's PostProcessCoco: (x.permute(1,2,0).float().numpy() * 255).round().astype(uint8)
        expected = (out[0].permute(1, 2, 0).float().numpy() * 255).round().astype(np.uint8)
        assert ours.shape == (size, size, 3) and ours.dtype == np.uint8
        np.testing.assert_array_equal(ours, expected)
    assert single_images[0].std() > 5, "a degenerate (flat) image would make the comparison meaningless"


def test_two_runs_are_bit_identical(tiny_pipeline, tiny_tokenizers, latent, single_images):
    again = tiny_pipeline.generate(*_ids(tiny_tokenizers, [PROMPTS[0]]), latent)[0]
    np.testing.assert_array_equal(again, single_images[0])


def test_sample_bytes_do_not_depend_on_batch(tiny_pipeline, tiny_tokenizers, latent, single_images):
    """TEST01 compares logged bytes of the same sample across runs with different batching.

    Measured here (torch 2.14.1 CPU, AMX Xeon) with four prompts: batch 4 vs batch 1 differed in 57 of
    196,608 bytes of one image, by 1 LSB (batch-size-dependent GEMM kernels); the test now runs two
    prompts (batch 2) under the same bound. So bytes are not batch-independent;
    the bound is at most 1 LSB on at most 0.1% of the bytes. TEST01 must then fall back to MLPerf's
    accuracy-baseline comparison.
    """
    batched = tiny_pipeline.generate(*_ids(tiny_tokenizers, PROMPTS), latent)
    for alone, in_batch in zip(single_images, batched):
        diff = np.abs(in_batch.astype(np.int16) - alone.astype(np.int16))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_uint8_conversion_matches_reference_rounding():
    x = torch.tensor([0.0, 0.5 / 255, 1.5 / 255, 2.5 / 255, 0.999, 1.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    out = images_to_uint8(x)
    expected = (x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert out.shape == (1, 1, 6, 3)
    np.testing.assert_array_equal(out[0], expected)
    assert out[0, 0, :, 0].tolist() == [0, 0, 2, 2, 255, 255]  # round half to even, as numpy
