"""``quantize(module, recipe, forward_loop)`` on small modules: known answers, modelopt oracle, application."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from calibration.quantize import quantize
from calibration.recipes import RecipeError, builtin_recipes, load_recipe, name_matches
from quant.encodings import Encoding, EncodingsError
from quant.fake_quant import apply_encodings
from quant.quantizers import fake_quantize


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.block = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.SiLU())
        self.proj = torch.nn.Linear(8, 4)

    def forward(self, x, timestep=None):
        h = self.block(self.conv_in(x))
        return self.proj(h.mean(dim=(2, 3)))


def _model_and_data(seed=0):
    torch.manual_seed(seed)
    model = Toy().eval()
    data = [torch.randn(2, 3, 8, 8) * (1 + i) for i in range(3)]
    return model, data


def _loop(data):
    def forward_loop(module):
        for x in data:
            module(x)
    return forward_loop


W8A8_ALL = {**load_recipe("w8a8").to_json(), "exclude": []}


def test_builtin_recipes_load():
    assert {"w8a8", "w8a16", "fp8", "snpe-w8a8"} <= set(builtin_recipes())
    for name in builtin_recipes():
        assert load_recipe(name).name == name


@pytest.mark.parametrize("patch,message", [
    ({"weigths": {}}, "unknown key\\(s\\) weigths"),
    ({"inputs": {"dtype": "int9"}}, "inputs.dtype: unknown quantized dtype"),
    ({"inputs": {"dtype": "uint8", "observer": "magic"}}, "inputs.observer: unknown observer"),
    ({"inputs": {"dtype": "float8e4m3fn", "symmetric": False}}, "symmetric"),
    ({"components": ["unet", "decoder"]}, "unknown decoder"),
])
def test_bad_recipes_name_the_key(patch, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe({**load_recipe("w8a8").to_json(), **patch})


def test_exclude_patterns_match_whole_segments():
    assert name_matches("down_blocks.1.resnets.0.conv_shortcut", "conv_shortcut")
    assert name_matches("time_embedding.linear_1", "time_embedding")
    assert not name_matches("conv_in_extra", "conv_in")
    assert name_matches("up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q", "*attn1.to_q")


def test_minmax_known_answers():
    model, data = _model_and_data()
    enc = quantize(model, W8A8_ALL, _loop(data), component="toy", apply=False)
    entries = enc.components["toy"]
    w = model.conv_in.weight
    amax = w.abs().amax(dim=(1, 2, 3))
    assert entries["conv_in:weight[0]"].scale == pytest.approx((amax / 127).tolist(), rel=1e-6)
    assert entries["conv_in:weight[0]"].axis == 0 and entries["conv_in:weight[0]"].offset == [0] * 8
    x_all = torch.cat([x.reshape(-1) for x in data])
    e = entries["conv_in:input[0]"]
    assert e.observer["range_min"] == [pytest.approx(float(x_all.min()))]
    assert e.scale[0] == pytest.approx(float(x_all.max() - x_all.min()) / 255, rel=1e-6)
    assert e.dtype == "uint8" and not e.symmetric
    assert set(entries) == {f"{m}:{k}[0]" for m in ("conv_in", "block.0", "proj") for k in ("weight", "input")}
    assert enc.size["toy"]["percent_of_fp16"] < 60


def test_w8a8_ranges_equal_modelopt_max_calibrator():
    """Oracle: NVIDIA modelopt's `max` calibrator (INT8_DEFAULT_CFG) on the same module and data."""
    mtq = pytest.importorskip("modelopt.torch.quantization")
    warnings.filterwarnings("ignore")
    model, data = _model_and_data(1)
    reference = copy.deepcopy(model)
    ours = quantize(model, W8A8_ALL, _loop(data), component="toy", apply=False).components["toy"]
    mtq.quantize(reference, mtq.INT8_DEFAULT_CFG, forward_loop=_loop(data))
    for name in ("conv_in", "block.0", "proj"):
        module = reference.get_submodule(name)
        w = ours[f"{name}:weight[0]"].observer
        ours_w = torch.maximum(torch.tensor(w["range_min"]).abs(), torch.tensor(w["range_max"]).abs())
        torch.testing.assert_close(ours_w, module.weight_quantizer.amax.flatten().float(), rtol=0, atol=0)
        a = ours[f"{name}:input[0]"].observer
        ours_a = max(abs(a["range_min"][0]), abs(a["range_max"][0]))
        assert ours_a == float(module.input_quantizer.amax)


def test_apply_fake_quantizes_weights_in_place_and_hooks_inputs():
    model, data = _model_and_data()
    reference = copy.deepcopy(model)
    enc = quantize(model, W8A8_ALL, _loop(data), component="toy", apply=True)
    entries = enc.components["toy"]
    wq = entries["proj:weight[0]"].qparams()
    assert torch.equal(model.proj.weight, fake_quantize(reference.proj.weight, wq))
    x = data[0]
    # manual simulation of the whole toy network
    q = lambda key, t: fake_quantize(t, entries[key].qparams())
    h = torch.nn.functional.conv2d(q("conv_in:input[0]", x), model.conv_in.weight, model.conv_in.bias, padding=1)
    h = torch.nn.functional.silu(torch.nn.functional.conv2d(q("block.0:input[0]", h), model.block[0].weight,
                                                            model.block[0].bias, padding=1))
    expected = torch.nn.functional.linear(q("proj:input[0]", h.mean(dim=(2, 3))), model.proj.weight, model.proj.bias)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_exclusions_and_fp8_recipe():
    model, data = _model_and_data()
    enc = quantize(model, "fp8", _loop(data), component="toy", apply=False)
    entries = enc.components["toy"]
    assert not any(k.startswith("conv_in:") for k in entries) and enc.excluded["toy"] == ["conv_in"]
    assert entries["proj:input[0]"].dtype == "float8e4m3fn" and entries["proj:input[0]"].observer["kind"] == "percentile"


def test_validation_names_the_key():
    model, _ = _model_and_data()
    good = Encoding("int8", 8, True, 0, [0.1] * 8, [0] * 8, [], [])
    with pytest.raises(EncodingsError, match="conv_inn:weight\\[0\\]: no module 'conv_inn'.*did you mean 'conv_in'"):
        apply_encodings(model, {"conv_inn:weight[0]": good})
    with pytest.raises(EncodingsError, match="proj:weight\\[0\\]: 8 channels on axis 0 but the weight has shape \\(4, 8\\)"):
        apply_encodings(model, {"proj:weight[0]": good})
    bad_input = Encoding("uint8", 8, False, -1, [0.1] * 5, [0] * 5, [], [])
    with pytest.raises(EncodingsError, match="proj:input\\[0\\]: 5 channels on axis -1 but 'proj' has 8"):
        apply_encodings(model, {"proj:input[0]": bad_input})


def test_timestep_ranged_encodings_follow_the_unet_timestep():
    model, data = _model_and_data()
    coarse = Encoding("uint8", 8, False, None, [0.5], [128], [], [], timesteps=(500, 999))
    fine = Encoding("uint8", 8, False, None, [0.001], [128], [], [], timesteps=(0, 499))
    apply_encodings(model, {"proj:output[0]": [coarse, fine]})
    x = data[0]
    high, low = model(x, torch.tensor(951)), model(x, torch.tensor(1))
    assert torch.all(torch.remainder(high / 0.5, 1) == 0)
    assert low.abs().max() <= 0.128 + 1e-6  # saturated at the fine range


def _drifting_data(seed=0):
    """Inputs 8x larger at the noisy steps (951, 901) than at the quiet ones (51, 1), as a UNet's drift."""
    g = torch.Generator().manual_seed(seed)
    return {t: torch.randn(2, 3, 8, 8, generator=g) * (8.0 if t > 500 else 1.0) for t in (951, 901, 51, 1)}


def _calibrated_toy(per_timestep: str, groups: int | None = None):
    from quant.context import timestep

    torch.manual_seed(0)
    model = Toy().eval()
    observer = {"kind": "minmax", "per_timestep": per_timestep}
    if groups is not None:
        observer["timestep_groups"] = groups
    recipe = {"name": "ranged", "weights": None, "exclude": [],
              "inputs": {"dtype": "uint8", "symmetric": False, "observer": observer}}
    data = _drifting_data()

    def forward_loop(module):
        for t, x in data.items():
            with timestep(t):
                module(x)
    reference = copy.deepcopy(model)
    encodings = quantize(model, recipe, forward_loop)
    return model, reference, encodings, data


def test_timestep_ranged_encodings_tile_the_steps_and_beat_one_range_where_activations_drift():
    from quant.context import current_timestep
    from quant.quantizers import sqnr_db

    ranged, reference, encodings, data = _calibrated_toy("ranged", groups=2)
    union, _, union_encodings, _ = _calibrated_toy("union")
    entries = encodings.components["model"]
    groups = entries["conv_in:input[0]"]
    assert isinstance(groups, list) and [e.timesteps for e in groups] == [(901, 951), (0, 900)]
    loud = torch.cat([data[951], data[901]])
    quiet = torch.cat([data[51], data[1]])
    # each group's calibrated range is the min-max of its own steps' data
    for group, x in zip(groups, (loud, quiet)):
        assert group.observer["range_min"] == [float(x.min())] and group.observer["range_max"] == [float(x.max())]

    def out_sqnr(model, t, x=None):
        x = data[t] if x is None else x
        with torch.inference_mode():
            return sqnr_db(reference(x), model(x, torch.tensor([t])))
    # the quiet step quantized with its own range gains ~18 dB (8x finer steps); the loud steps keep the
    # union's range (their data holds its extremes)
    assert out_sqnr(ranged, 1) > out_sqnr(union, 1) + 12
    assert groups[0].scale == union_encodings.components["model"]["conv_in:input[0]"].scale
    # a timestep no group observed (here 500) belongs to the group below the one above it: the quiet one
    assert out_sqnr(ranged, 500, data[1]) == out_sqnr(ranged, 1)
    assert current_timestep() is None  # each call's step is scoped to it: nothing leaks into later calibration

    # the file round-trips with its ranges
    from quant.encodings import Encodings
    again = Encodings.from_json(json.loads(json.dumps(encodings.to_json())))
    assert [e.timesteps for e in again.components["model"]["conv_in:input[0]"]] == [(901, 951), (0, 900)]


def test_timestep_ranged_needs_timesteps_and_groups_need_ranged():
    with pytest.raises(RecipeError, match="timestep_groups needs per_timestep: ranged"):
        load_recipe({"name": "x", "inputs": {"dtype": "uint8", "observer": {"kind": "minmax", "timestep_groups": 2}}})
    torch.manual_seed(0)
    recipe = {"name": "x", "weights": None, "exclude": [],
              "inputs": {"dtype": "uint8", "observer": {"kind": "minmax", "per_timestep": "ranged"}}}
    with pytest.raises(RuntimeError, match="outside a timestep context"):
        quantize(Toy().eval(), recipe, _loop([torch.randn(1, 3, 8, 8)]))


def _tiny_unet_call(tiny_backend):
    from backends.onnx_export import unet_signature

    sample, timestep, states, text_embeds, time_ids = unet_signature(tiny_backend.unet, batch=2).example_inputs

    def call(unet, scale=1.0):
        with torch.inference_mode():
            return unet(sample * scale, timestep[0], encoder_hidden_states=states,
                        added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}, return_dict=False)[0]
    return call


def test_attention_matmuls_equal_diffusers_sdpa(tiny_backend):
    from diffusers.models.attention_processor import Attention

    from quant.attention import add_attention_matmuls

    call = _tiny_unet_call(tiny_backend)
    unet = copy.deepcopy(tiny_backend.unet)
    fused = call(unet)
    attentions = sum(isinstance(m, Attention) for m in unet.modules())
    assert add_attention_matmuls(unet) == attentions > 0 and add_attention_matmuls(unet) == 0  # idempotent
    explicit = call(unet)
    assert torch.allclose(explicit, fused, atol=1e-5, rtol=1e-4), (explicit - fused).abs().max()


def test_mha_recipe_quantizes_both_operands_of_both_attention_matmuls(tiny_backend):
    """``fp8-mha``: Q, Kᵀ, softmax probabilities and V of every attention get an e4m3 quantizer."""
    from diffusers.models.attention_processor import Attention

    from quant.quantizers import sqnr_db

    call = _tiny_unet_call(tiny_backend)
    unet = copy.deepcopy(tiny_backend.unet)
    attentions = [n for n, m in unet.named_modules() if isinstance(m, Attention)]
    encodings = quantize(unet, "fp8-mha", lambda m: [call(m, s) for s in (1.0, 0.5)], component="unet", apply=False)
    entries = encodings.components["unet"]
    for name in attentions:
        for matmul in ("bmm_qk", "bmm_pv"):
            assert {f"{name}.{matmul}:input[0]", f"{name}.{matmul}:input[1]"} <= entries.keys(), name
        # the softmax probabilities: within [0, 1], so their absmax is at most 1 (e4m3: scale = amax / 448)
        probs = entries[f"{name}.bmm_pv:input[0]"]
        assert probs.dtype == "float8e4m3fn" and 0 < probs.scale[0] * 448 <= 1 + 1e-6
    assert not any(k.startswith(tuple(f"{n}.bmm_" for n in attentions)) and ":weight" in k for k in entries)

    # a fresh FP32 model takes the file's keys: the matmul modules are added on the way in
    fresh = copy.deepcopy(tiny_backend.unet)
    apply_encodings(fresh, entries, "unet")
    fp32, quantized = call(tiny_backend.unet), call(fresh)
    without_mha = copy.deepcopy(tiny_backend.unet)
    apply_encodings(without_mha, {k: v for k, v in entries.items() if ".bmm_" not in k}, "unet")
    # e4m3 keeps ~3 mantissa bits: the attention quantizers cost SQNR, but the model still tracks FP32
    assert 10 < sqnr_db(fp32, quantized) < sqnr_db(fp32, call(without_mha)), (sqnr_db(fp32, quantized))


def test_aihub_recipe_pins_the_softmax_operand_to_its_fixed_range(tiny_backend):
    """``aihub-w8a16``: AI Hub's range constraint on softmax outputs, [0, 0.99609375] whatever the data,
    set on ``bmm_pv``'s operand 0 alone; V beside it and Q·Kᵀ's operands keep their observed ranges."""
    call = _tiny_unet_call(tiny_backend)
    unet = copy.deepcopy(tiny_backend.unet)
    recipe = {**load_recipe("aihub-w8a16").to_json(), "components": ["unet"]}
    entries = quantize(unet, recipe, lambda m: [call(m, s) for s in (1.0, 0.5)], component="unet",
                       apply=False).components["unet"]
    probs = [k for k in entries if k.endswith(".bmm_pv:input[0]")]
    assert probs
    for key in probs:
        e = entries[key]
        assert (e.dtype, e.offset, e.observer["kind"]) == ("uint16", [0], "fixed")
        assert e.scale[0] == pytest.approx(0.99609375 / 65535, rel=1e-7) and e.max[0] == pytest.approx(0.99609375)
        values = entries[key.replace("input[0]", "input[1]")]  # V: observed, not pinned
        assert values.observer["kind"] == "minmax" and values.min[0] < 0
    qk = [k for k in entries if ".bmm_qk:input[" in k]
    assert len(qk) == 2 * len(probs) and all(entries[k].observer["kind"] == "minmax" for k in qk)
    assert entries["conv_in:weight[0]"].dtype == "int8" and entries["conv_in:weight[0]"].axis is None


@pytest.mark.parametrize("override, message", [
    ({"match": ["*.bmm_pv"], "operand": 0, "weights": None, "inputs": None}, "'inputs' only"),
    ({"match": ["*.bmm_pv"], "operand": -1, "inputs": None}, "operand: expected an input index"),
    ({"match": ["conv_in"], "operand": 1, "inputs": None}, "operand 1 of conv_in: it has 1 quantized input"),
])
def test_operand_overrides_are_checked(override, message):
    model, data = _model_and_data()
    with pytest.raises(RecipeError, match=message):
        quantize(model, {**W8A8_ALL, "overrides": [override]}, _loop(data), component="toy", apply=False)


def test_fixed_observer_ignores_the_data_and_needs_a_range():
    from calibration.observers import make_observer
    from quant.formats import get_format

    obs = make_observer({"kind": "fixed", "min": -0.5, "max": 2.0}, 1)
    obs.update(torch.randn(2, 3, 4) * 100)
    lo, hi = obs.compute_range(get_format("uint8"), False)
    assert lo.tolist() == [-0.5] * 3 and hi.tolist() == [2.0] * 3
    with pytest.raises(ValueError, match="needs min < max"):
        make_observer({"kind": "fixed", "min": 1.0}, None)
    with pytest.raises(RecipeError, match="observer 'fixed' needs min < max"):
        load_recipe({**load_recipe("w8a8").to_json(), "inputs": {"dtype": "uint8", "observer": {"kind": "fixed"}}})


def test_sqnr_report_of_a_component_whose_loop_calls_decode():
    """The VAE's forward loop calls ``vae.decode``: the report hooks its decoder, and a layer ahead of the
    decoder (``post_quant_conv``) still lands in its sample (this used to raise IndexError)."""
    from calibration.sqnr import OUTPUT_ROW, sqnr_report

    class ToyVAE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.post_quant_conv = torch.nn.Conv2d(4, 4, 1)
            self.decoder = torch.nn.Sequential(torch.nn.Conv2d(4, 3, 3, padding=1))

        def decode(self, z):
            return self.decoder(self.post_quant_conv(z))

    latents = [torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]

    def loop(vae):
        for z in latents:
            vae.decode(z)

    vae = ToyVAE().eval()
    recipe = {"name": "toy", "components": ["vae"], "weights": {"dtype": "int8", "axis": 0},
              "inputs": {"dtype": "uint8", "symmetric": False, "observer": "minmax"}}
    entries = quantize(vae, recipe, loop, component="vae", apply=False).components["vae"]
    report = sqnr_report(vae, "vae", entries, loop, lambda: apply_encodings(vae, entries, "vae"), samples=2)
    rows = {r["layer"]: r for r in report.rows()}
    assert {"post_quant_conv", "decoder.0", OUTPUT_ROW} <= set(rows)
    assert 20 < float(rows[OUTPUT_ROW]["accumulated_sqnr_db"]) < 60
