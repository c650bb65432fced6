"""Shortcut splitting (Q-Diffusion): a layer reading ``cat([h, skip])`` quantized per concatenated tensor.

Known answers: the boundaries found from the UNet's modules are where its up blocks really concatenate;
the split computation is exact without quantization; on a concat of two ranges 100x apart the split
quantizers cut the layer's error; the ONNX QDQ export (Slice -> per-group Q/DQ -> Conv per group -> Add)
runs the numbers fake quantization runs, also when the export streamed its weights (no constant folding).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from calibration.quantize import quantize
from calibration.recipes import RecipeError, load_recipe
from quant.encodings import Encoding, Encodings, EncodingsError
from quant.fake_quant import apply_encodings, validate_encodings
from quant.quantizers import sqnr_db
from quant.shortcut_split import concat_boundaries


class _Res(torch.nn.Module):
    """What shortcut splitting needs of a diffusers up-block resnet: channels, and a conv_shortcut."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.in_channels, self.out_channels = cin, cout
        self.conv_shortcut = torch.nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        return self.conv_shortcut(x)


class _Toy(torch.nn.Module):
    """A one-resnet "up block" reading cat([h (16 ch), skip (8 ch)]); the skip path weights 1/100."""

    def __init__(self):
        super().__init__()
        self.mid_block = torch.nn.Module()
        self.mid_block.resnets = torch.nn.ModuleList([_Res(16, 16)])
        block = torch.nn.Module()
        block.resnets = torch.nn.ModuleList([_Res(24, 12)])
        self.up_blocks = torch.nn.ModuleList([block])
        torch.manual_seed(0)
        with torch.no_grad():
            block.resnets[0].conv_shortcut.weight[:, 16:] /= 100.0

    def forward(self, h, skip):
        return self.up_blocks[0].resnets[0](torch.cat([h, skip], dim=1))


def _toy_data(n: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 16, 6, 6, generator=g), 100.0 * torch.randn(2, 8, 6, 6, generator=g)) for _ in range(n)]


def _loop(model):
    for h, skip in _toy_data():
        model(h, skip)


def _recipe(split: bool) -> dict:
    return {"name": f"split-{split}", "weights": {"dtype": "int8", "symmetric": True, "axis": 0},
            "inputs": {"dtype": "uint8", "symmetric": False, "axis": None}, "exclude": ["mid_block"],
            "shortcut_split": split}


def test_boundaries_are_where_the_tiny_unets_up_blocks_concatenate(tiny_backend, monkeypatch):
    from tiny_encodings import unet_example_args

    unet = tiny_backend.unet
    boundaries = concat_boundaries(unet)
    assert len(boundaries) == 9 and all(".conv_shortcut" in n and n.startswith("up_blocks.") for n in boundaries)
    first_of_cat: dict[int, int] = {}
    real_cat = torch.cat

    def recording_cat(tensors, dim=0, **kw):
        out = real_cat(tensors, dim=dim, **kw)
        if dim == 1 and len(tensors) == 2:
            first_of_cat[out.data_ptr()] = tensors[0].shape[1]
        return out

    seen: dict[str, int] = {}
    handles = [unet.get_submodule(name).register_forward_pre_hook(
        lambda m, a, name=name: seen.__setitem__(name, first_of_cat.get(a[0].data_ptr(), -1))) for name in boundaries]
    monkeypatch.setattr(torch, "cat", recording_cat)
    sample, timestep, states, text_embeds, time_ids = unet_example_args(tiny_backend)
    try:
        with torch.no_grad():
            unet(sample, timestep, encoder_hidden_states=states,
                 added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids})
    finally:
        for handle in handles:
            handle.remove()
    assert seen == boundaries
    assert concat_boundaries(tiny_backend.text_encoder) == {}


def test_the_split_computation_is_exact_without_quantization():
    from backends.onnx_export import marked

    toy = _Toy()
    enc = quantize(copy.deepcopy(toy), _recipe(True), _loop, component="unet", apply=False).components["unet"]
    keys = [k for k in enc if "up_blocks" in k]
    h, skip = _toy_data(1)[0]
    with torch.no_grad():
        plain = toy(h, skip)
        with marked(toy, keys, {k: enc[k].channel_groups for k in keys}):
            split = toy(h, skip)
    assert torch.allclose(split, plain, atol=1e-5, rtol=1e-5)


def test_split_quantizers_cut_the_error_of_a_concat_of_ranges_100x_apart():
    toy = _Toy()
    h, skip = _toy_data(1, seed=7)[0]
    with torch.no_grad():
        reference = toy(h, skip)
    sqnr = {}
    for split in (False, True):
        model = copy.deepcopy(toy)
        encodings = quantize(model, _recipe(split), _loop, component="unet")
        entry = encodings.components["unet"]["up_blocks.0.resnets.0.conv_shortcut:input[0]"]
        assert (entry.channel_groups == [[0, 16], [16, 24]]) == split
        with torch.no_grad():
            sqnr[split] = sqnr_db(reference, model(h, skip))
    assert sqnr[True] >= sqnr[False] + 15, sqnr


def test_grouped_entries_round_trip_and_are_checked_against_the_model(tmp_path):
    toy = _Toy()
    encodings = quantize(copy.deepcopy(toy), _recipe(True), _loop, component="unet", apply=False)
    weight = encodings.components["unet"]["up_blocks.0.resnets.0.conv_shortcut:weight[0]"]
    assert weight.channel_groups == [[0, 16], [16, 24]] and weight.channels == 24 and weight.group_channels == 12
    # each group's own per-channel absmax over its slice of the input channels
    w = toy.up_blocks[0].resnets[0].conv_shortcut.weight.detach()
    assert np.allclose(weight.groups()[1].scale, (w[:, 16:].abs().amax(dim=(1, 2, 3)) / 127).numpy(), rtol=1e-6)
    loaded = Encodings.load(encodings.save(tmp_path / "split.json")).components["unet"]
    assert loaded["up_blocks.0.resnets.0.conv_shortcut:weight[0]"].to_json() == weight.to_json()
    bad = {"up_blocks.0.resnets.0.conv_shortcut:input[0]": Encoding.grouped(
        loaded["up_blocks.0.resnets.0.conv_shortcut:input[0]"].groups(), [(0, 16), (16, 20)], 1)}
    with pytest.raises(EncodingsError, match="do not cover the 24 input channels"):
        validate_encodings(toy, bad)
    data = loaded["up_blocks.0.resnets.0.conv_shortcut:input[0]"].to_json()
    for change, message in (({"channel_groups": [[0, 16], [17, 24]]}, "not contiguous"),
                            ({"group_axis": None}, "integer group_axis"),
                            ({"scale": [0.1, 0.2, 0.3], "offset": [0, 0, 0]}, "do not split")):
        with pytest.raises(EncodingsError, match=message):
            Encoding.from_json({**data, **change}, "e.json")
    with pytest.raises(RecipeError, match="shortcut_split: expected true or false"):
        load_recipe({**_recipe(True), "shortcut_split": "yes"})
    per_channel = {**_recipe(True), "inputs": {"dtype": "uint8", "symmetric": False, "axis": 1}}
    with pytest.raises(RecipeError, match="per tensor .* use inputs axis: null"):
        load_recipe(per_channel)


def _export_toy(toy, entries, path, stream: bool):
    import onnx

    from backends.onnx_export import GraphSignature, export_onnx
    from backends.qdq import apply_marks, check_no_marks

    h, skip = _toy_data(1)[0]
    signature = GraphSignature(("h", "skip"), ("y",), (h, skip), {})
    groups = {k: v.channel_groups for k, v in entries.items() if v.channel_groups}
    export_onnx(toy, signature, path, marks=entries.keys(), stream_weights=stream, channel_groups=groups)
    model = onnx.load(str(path))
    result = apply_marks(model, entries)
    check_no_marks(model)
    return model, result


@pytest.mark.parametrize("stream", [False, True], ids=["folded", "streamed"])
def test_the_qdq_export_runs_one_quantizer_per_group_as_fake_quant_does(tmp_path, stream):
    import onnxruntime

    toy = _Toy()
    entries = quantize(copy.deepcopy(toy), _recipe(True), _loop, component="unet", apply=False).components["unet"]
    entries = {k: v for k, v in entries.items() if k.startswith("up_blocks")}
    model, result = _export_toy(copy.deepcopy(toy), entries, tmp_path / "toy.onnx", stream)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") == 2 and ops.count("DequantizeLinear") == 4 and ops.count("Conv") == 2
    assert ops.count("Add") == 1 and ops.count("Slice") == 2 and result.activations == 2 and result.weights == 2
    assert not [t.name for t in model.graph.initializer if t.name.endswith("conv_shortcut.weight")]  # float copy gone
    assert sorted(result.tensor_map) == [f"up_blocks.0.resnets.0.conv_shortcut:{kind}[0]@{g}"
                                         for kind in ("input", "weight") for g in (0, 1)]
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    fake = copy.deepcopy(toy)
    apply_encodings(fake, entries, "unet")
    h, skip = _toy_data(1, seed=3)[0]
    out = torch.from_numpy(session.run(None, {"h": h.numpy(), "skip": skip.numpy()})[0])
    with torch.no_grad():
        simulated = fake(h, skip)
    assert sqnr_db(simulated, out) > 60


def test_the_aimet_export_names_one_encoding_per_group():
    from quant.aimet_export import to_aimet

    encodings = quantize(copy.deepcopy(_Toy()), _recipe(True), _loop, component="unet", apply=False)
    doc, lost = to_aimet(encodings, "unet")
    names = [e["name"] for e in doc["activation_encodings"] + doc["param_encodings"] if "up_blocks" in e["name"]]
    assert sorted(names) == ["up_blocks.0.resnets.0.conv_shortcut.weight@0", "up_blocks.0.resnets.0.conv_shortcut.weight@1",
                             "up_blocks.0.resnets.0.conv_shortcut:input[0]@0",
                             "up_blocks.0.resnets.0.conv_shortcut:input[0]@1"] and not lost
