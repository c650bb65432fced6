"""Block reconstruction (BRECQ as Q-Diffusion runs it): known answers on a small diffusers block.

At W4A8 the reconstructed block beats min-max round-to-nearest on held-out data, the weights stay on
the frozen grid, learned step sizes lower the block's loss, and a killed run resumes from its
finished blocks with the same result.
"""

from __future__ import annotations

import copy

import pytest
import torch

from calibration.methods.block_reconstruction import lp_loss, partition
from calibration.quantize import quantize
from calibration.recipes import RecipeError, load_recipe
from quant.encodings import tensor_key
from quant.quantizers import quantize_tensor, sqnr_db


class _TwoBlocks(torch.nn.Module):
    """conv_in -> ResnetBlock2D (temb) -> Linear head over channels: one block and two single layers."""

    def __init__(self):
        super().__init__()
        from diffusers.models.resnet import ResnetBlock2D

        torch.manual_seed(3)
        self.conv_in = torch.nn.Conv2d(4, 16, 3, padding=1)
        self.block = ResnetBlock2D(in_channels=16, out_channels=16, temb_channels=8, groups=4).eval()
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x, temb):
        return self.head(self.block(self.conv_in(x), temb).permute(0, 2, 3, 1))


def _data(seed: int, n: int = 4):
    """Inputs with correlated channels (two latent factors): where rounding errors can cancel, as in real
    activations -- and where learned rounding beats round-to-nearest (Nagel et al.'s argument)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(4, 2, generator=torch.Generator().manual_seed(42))
    out = []
    for _ in range(n):
        z = torch.randn(2, 2, 8, 8, generator=g)
        x = torch.einsum("cd,bdhw->bchw", mix, z) + 0.05 * torch.randn(2, 4, 8, 8, generator=g)
        out.append((x, torch.randn(2, 8, generator=g)))
    return out


def _loop(model):
    for x, temb in _data(0):
        model(x, temb)


def _recipe(methods=(), name="w4a8"):
    return {"name": name, "weights": {"dtype": "int4", "symmetric": True, "axis": 0},
            "inputs": {"dtype": "uint8", "symmetric": False, "axis": None}, "methods": list(methods)}


BRECQ_W = {"kind": "brecq_weights", "iterations": 1000, "samples": 4}


def _held_out_sqnr(recipe, work_dir=None) -> tuple[float, torch.nn.Module, object]:
    model = _TwoBlocks()
    reference = copy.deepcopy(model)
    encodings = quantize(model, recipe, _loop, component="unet", work_dir=work_dir)
    with torch.no_grad():
        pairs = [(reference(x, t), model(x, t)) for x, t in _data(9)]
    return sqnr_db(torch.cat([a for a, _ in pairs]), torch.cat([b for _, b in pairs])), model, encodings


def test_blocks_are_resnets_and_transformer_blocks_and_the_rest_alone():
    model = _TwoBlocks()
    layers = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    blocks = partition(model, layers)
    assert list(blocks) == ["conv_in", "block", "head"]
    assert blocks["block"] == ["block.conv1", "block.time_emb_proj", "block.conv2"]
    assert lp_loss(torch.ones(2, 3), torch.zeros(2, 3), 2.4) == pytest.approx(3.0)


def test_brecq_beats_min_max_at_w4a8_and_keeps_weights_on_the_grid():
    minmax, _, _ = _held_out_sqnr(_recipe())
    learned, _, encodings = _held_out_sqnr(_recipe([BRECQ_W], "brecq-w"))
    assert learned >= minmax + 2.0, (minmax, learned)  # measured: 19.4 -> 22.5 dB
    delta = encodings.delta
    assert sorted(delta) == sorted(f"unet.{n}.weight" for n in ("conv_in", "block.conv1", "block.time_emb_proj",
                                                                "block.conv2", "head"))
    for name, value in delta.items():
        key = tensor_key(name[len("unet."):].rpartition(".")[0], "weight")
        qp = encodings.components["unet"][key].qparams()
        shape = (-1, *[1] * (value.dim() - 1))
        assert torch.allclose(value, (quantize_tensor(value, qp) - qp.offset.reshape(shape)) * qp.scale.reshape(shape),
                              atol=1e-6)
    stats = encodings.methods[0]["stats"]
    assert stats["blocks"] == 3 and stats["seconds_per_block"] > 0
    assert all(b["loss"] < b["nearest_loss"] for b in stats["per_block"])


def _laplace(seed: int, n: int = 4):
    """Heavy-tailed inputs: min-max spends 4-bit levels on rare tails that clipping would give up."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        u = torch.rand(2, 4, 8, 8, generator=g) - 0.5
        out.append((-torch.sign(u) * torch.log1p(-2 * u.abs()), torch.randn(2, 8, generator=g)))
    return out


def test_learned_step_sizes_beat_min_max_ranges_on_heavy_tailed_4_bit_activations():
    def run(methods):
        model, reference = _TwoBlocks(), _TwoBlocks()
        recipe = {**_recipe(methods, "w8a4"), "weights": {"dtype": "int8", "symmetric": True, "axis": 0},
                  "inputs": {"dtype": "uint4", "symmetric": False, "axis": None}}
        encodings = quantize(model, recipe, lambda m: [m(x, t) for x, t in _laplace(0)], component="unet")
        with torch.no_grad():
            pairs = [(reference(x, t), model(x, t)) for x, t in _laplace(9)]
        return sqnr_db(torch.cat([a for a, _ in pairs]), torch.cat([b for _, b in pairs])), encodings

    minmax, _ = run([])
    learned, encodings = run([{"kind": "brecq_activations", "iterations": 200, "samples": 4, "batch": 4, "lr": 4e-3}])
    assert learned >= minmax + 2.0, (minmax, learned)  # measured: 10.8 -> 14.1 dB
    stats = encodings.methods[0]["stats"]
    assert all(b["loss"] < b["initial_loss"] for b in stats["per_block"]), stats["per_block"]
    assert all(e.observer.get("learned") for k, e in encodings.components["unet"].items() if ":input" in k)


def test_a_killed_run_resumes_from_its_finished_blocks(tmp_path):
    short = {**BRECQ_W, "iterations": 50}
    _, first, encodings = _held_out_sqnr(_recipe([short], "brecq-w"), tmp_path)
    (directory,) = list(tmp_path.glob("brecq_weights-*"))
    (directory / "0002.json").unlink()  # as if killed while optimising the last block
    _, second, again = _held_out_sqnr(_recipe([short], "brecq-w"), tmp_path)
    stats = again.methods[0]["stats"]
    assert stats["resumed_blocks"] == 2 and [b["resumed"] for b in stats["per_block"]] == [True, True, False]
    assert all(torch.equal(encodings.delta[k], again.delta[k]) for k in encodings.delta)


def test_brecq_settings_and_formats_are_checked():
    with pytest.raises(RecipeError, match="iterations, samples and batch must be >= 1"):
        load_recipe(_recipe([{**BRECQ_W, "iterations": 0}]))
    fp8 = {**_recipe([BRECQ_W]), "weights": {"dtype": "float8e4m3fn", "axis": 0}}
    with pytest.raises(RecipeError, match="no rounding grid"):
        quantize(_TwoBlocks(), fp8, _loop, component="unet")
