"""The calibration-methods slot: phases, results as data (encodings 1.1), recipes that name methods.

``weight_balance`` is the shipped example (exact in FP32); two test-only methods exercise the other
two phases: one rescales weights after their encodings are computed (which must stay frozen), one
adds a bias a layer lacks and changes an activation encoding after the ranges.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass

import pytest
import torch

from calibration.methods import Method, MethodError, MethodResult, register_method
from calibration.quantize import quantize
from calibration.recipes import RecipeError, load_recipe
from quant.encodings import Encoding, Encodings, tensor_key
from quant.fake_quant import apply_encodings, install_pre_scales, load_weights_delta


class Toy(torch.nn.Module):
    """Two linears; the second has no bias and is called with its input as a keyword."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 4, bias=False)
        with torch.no_grad():
            self.fc1.weight[:, 3] *= 20  # one wide input column: the case balancing changes

    def forward(self, x):
        return self.fc2(input=torch.relu(self.fc1(x)))


class Components:
    def __init__(self, unet):
        self.unet = unet


DATA = [torch.randn(32, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
W8A8 = {"name": "toy-w8a8", "components": ["unet"],
        "weights": {"dtype": "int8", "axis": None}, "inputs": {"dtype": "int8", "observer": "minmax"}}


def loop(model):
    for x in DATA:
        model(x)


@register_method
class HalveWeights(Method):
    """Test-only post_weight_ranges method: halves every weight after the weight encodings exist."""

    kind = "test_halve_weights"
    phase = "post_weight_ranges"

    @dataclass(frozen=True)
    class Settings:
        factor: float = 0.5

    def run(self, target):
        assert all(parse.endswith(":weight[0]") for parse in target.entries)  # weight encodings only, so far
        return MethodResult(weights={f"{p.name}.weight": p.module.weight * self.settings.factor for p in target.plans})


@register_method
class AddBias(Method):
    """Test-only post_ranges method: gives fc2 a bias and widens fc2's input range twice."""

    kind = "test_add_bias"
    phase = "post_ranges"

    @dataclass(frozen=True)
    class Settings:
        touch_weight_encoding: bool = False

    def run(self, target):
        key = tensor_key("fc2", "weight" if self.settings.touch_weight_encoding else "input")
        old = target.entries[key]
        wider = Encoding(old.dtype, old.bits, old.symmetric, old.axis, [2 * s for s in old.scale], old.offset, [], [])
        return MethodResult(weights={"fc2.bias": torch.full((4,), 0.25)}, encodings={key: wider}, stats={"biases": 1})


def test_weight_balance_is_exact_in_fp32_and_balances_columns():
    model, reference = Toy().eval(), Toy().eval()
    recipe = {**W8A8, "methods": [{"kind": "weight_balance", "strength": 1.0}]}
    encodings = quantize(model, recipe, loop, component="unet", apply=False)
    with torch.no_grad():
        x = DATA[0]
        assert torch.allclose(model(x), reference(x), rtol=1e-5, atol=1e-6)
        column_absmax = model.fc1.weight.abs().amax(dim=0)
        assert torch.allclose(column_absmax, column_absmax.mean().expand(8), rtol=1e-5)
    assert set(encodings.pre_scales["unet"]) == {"fc1:input[0]", "fc2:input[0]"}
    assert set(encodings.delta) == {"unet.fc1.weight", "unet.fc2.weight"}
    record = encodings.methods[0]
    assert (record["kind"], record["phase"], record["settings"], record["stats"]["layers"]) == \
        ("weight_balance", "pre_ranges", {"strength": 1.0}, 2)


def test_strength_zero_changes_nothing():
    model = Toy().eval()
    plain = quantize(Toy().eval(), W8A8, loop, component="unet", apply=False)
    balanced = quantize(model, {**W8A8, "methods": [{"kind": "weight_balance", "strength": 0.0}]}, loop,
                        component="unet", apply=False)
    assert json.dumps(balanced.to_json()["components"]) == json.dumps(plain.to_json()["components"])


def test_saved_encodings_reproduce_the_calibrated_model_on_a_fresh_one(tmp_path):
    """Encodings 1.1 as the one hand-over: a fresh model + delta + pre-scales + quantizers == the calibrated one."""
    recipe = {**W8A8, "methods": [{"kind": "weight_balance"}, {"kind": "test_add_bias"}]}
    calibrated = Toy().eval()
    encodings = quantize(calibrated, recipe, loop, component="unet", apply=True)
    path = encodings.save(tmp_path / "enc.json")
    data = json.loads(path.read_text())
    assert data["version"] == "1.1.0" and data["weights_delta"] == "enc.delta.safetensors"
    assert len(data["weights_delta_sha256"]) == 64 and "fc1:input[0]" in data["pre_scales"]["unet"]
    assert [m["kind"] for m in data["methods"]] == ["weight_balance", "test_add_bias"]

    fresh = Components(Toy().eval())
    assert fresh.unet.fc2.bias is None
    loaded = Encodings.load(path)
    load_weights_delta(fresh, loaded, path)
    assert torch.equal(fresh.unet.fc2.bias, torch.full((4,), 0.25))  # the bias the layer lacked is added
    apply_encodings(fresh.unet, loaded.components["unet"], "unet", pre_scales=loaded.pre_scales["unet"])
    with torch.no_grad():
        assert torch.equal(fresh.unet(DATA[1]), calibrated(DATA[1]))


def test_a_changed_delta_file_is_refused(tmp_path):
    encodings = quantize(Toy().eval(), {**W8A8, "methods": [{"kind": "weight_balance"}]}, loop, component="unet",
                         apply=False)
    path = encodings.save(tmp_path / "enc.json")
    other = quantize(Toy().eval(), {**W8A8, "methods": [{"kind": "weight_balance", "strength": 0.5}]}, loop,
                     component="unet", apply=False)
    other.save(tmp_path / "other.json")
    (tmp_path / "other.delta.safetensors").replace(tmp_path / "enc.delta.safetensors")
    with pytest.raises(ValueError, match="sha256"):
        load_weights_delta(Components(Toy().eval()), Encodings.load(path), path)


def test_weight_encodings_are_frozen_after_their_phase():
    plain = quantize(Toy().eval(), W8A8, loop, component="unet", apply=False).components["unet"]
    model = Toy().eval()
    halved = quantize(model, {**W8A8, "methods": [{"kind": "test_halve_weights"}]}, loop, component="unet",
                      apply=False)
    entries = halved.components["unet"]
    assert entries["fc1:weight[0]"].scale == plain["fc1:weight[0]"].scale  # not recomputed from halved weights
    assert torch.equal(halved.delta["unet.fc1.weight"], Toy().fc1.weight * 0.5)
    # activations were observed on the model as the method left it (halved weights)
    with torch.no_grad():
        amax = max(float(torch.relu(model.fc1(x)).abs().max()) for x in DATA)
    assert entries["fc2:input[0]"].scale[0] == pytest.approx(amax / 127, rel=1e-6)
    assert entries["fc2:input[0]"].scale[0] != pytest.approx(plain["fc2:input[0]"].scale[0], rel=1e-3)


def test_a_method_may_not_change_what_its_phase_has_frozen():
    with pytest.raises(MethodError, match="weight encodings are frozen"):
        quantize(Toy().eval(), {**W8A8, "methods": [{"kind": "test_add_bias", "touch_weight_encoding": True}]},
                 loop, component="unet")


def test_post_ranges_results_land_in_the_encodings():
    encodings = quantize(Toy().eval(), {**W8A8, "methods": [{"kind": "test_add_bias"}]}, loop, component="unet",
                         apply=False)
    plain = quantize(Toy().eval(), W8A8, loop, component="unet", apply=False)
    assert encodings.components["unet"]["fc2:input[0]"].scale[0] == 2 * plain.components["unet"]["fc2:input[0]"].scale[0]
    assert set(encodings.delta) == {"unet.fc2.bias"} and encodings.methods[0]["stats"] == {"biases": 1}


@pytest.mark.parametrize("entry, message", [
    ({"kind": "nope"}, "unknown method kind 'nope'"),
    ({"kind": "weight_balance", "alpha": 1}, "unknown setting.*alpha"),
    ({"kind": "weight_balance", "strength": "high"}, "strength: expected float"),
    ({"kind": "weight_balance", "strength": 2.0}, r"strength 2.0 is outside \[0, 1\]"),
    ({"kind": "weight_balance", "components": ["vae"]}, "components vae are not calibrated by this recipe"),
    ({"components": ["unet"]}, "a method is a mapping with a 'kind'"),
])
def test_bad_method_entries_are_errors_naming_the_entry(entry, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe({**W8A8, "methods": [entry]})


def test_recipe_to_json_describes_the_recipe_as_run_and_reads_back():
    recipe = load_recipe({**W8A8, "components": {"unet": None, "vae": {"weights": {"dtype": "uint8", "symmetric": False}}},
                          "methods": [{"kind": "weight_balance", "components": "vae", "strength": 0.5}]})
    recorded = recipe.to_json()
    assert recorded["methods"] == [{"kind": "weight_balance", "components": ["vae"], "strength": 0.5}]
    assert recorded["components"]["vae"]["weights"]["dtype"] == "uint8"
    assert load_recipe(recorded).to_json() == recorded
    vae = recipe.for_component("vae")
    assert (vae.weights.dtype, vae.inputs.dtype, len(vae.methods)) == ("uint8", "int8", 1)
    assert (recipe.for_component("unet").weights.dtype, recipe.for_component("unet").methods) == ("int8", ())


def test_builtin_recipes_record_their_fields():
    recipe = load_recipe("w8a8")
    recorded = recipe.to_json()
    assert recorded["source"] == "w8a8" and recorded["weights"]["dtype"] == "int8"
    assert load_recipe(recorded).to_json() == recorded


def test_a_keyword_call_is_calibrated_and_fake_quantized_like_a_positional_one():
    """fc2 is called as ``fc2(input=...)``: its input quantizer must see that call, in both places."""
    model = Toy().eval()
    encodings = quantize(model, W8A8, loop, component="unet", apply=True)
    assert "fc2:input[0]" in encodings.components["unet"]
    with torch.no_grad():
        hidden = torch.relu(model.fc1(DATA[0]))
        positional = model.fc2(hidden)
        assert torch.equal(model.fc2(input=hidden), positional)
        assert not torch.equal(positional, torch.nn.functional.linear(hidden, model.fc2.weight))  # it is quantized


def test_pre_scales_must_fit_the_layer():
    from quant.encodings import EncodingsError, PreScale

    with pytest.raises(EncodingsError, match="3 factors on axis -1 do not fit 'fc1'"):
        install_pre_scales(Toy(), {"fc1:input[0]": PreScale(-1, [1.0, 2.0, 3.0])})


def test_encodings_1_0_files_still_load(tmp_path):
    data = quantize(Toy().eval(), W8A8, loop, component="unet", apply=False).to_json()
    for key in ("methods", "weights_delta_sha256", "pre_scales"):
        data.pop(key)
    data["version"] = "1.0.0"
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    loaded = Encodings.load(path)
    assert loaded.methods == [] and loaded.pre_scales == {} and len(loaded.components["unet"]) == 4
    data["version"] = "2.0.0"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="encodings version 2.0.0"):
        Encodings.load(path)


def test_the_onnx_export_runs_pre_scales_and_marks_keyword_inputs(tmp_path):
    """A method's pre-scales become Mul nodes before the input Q/DQ, and fc2's keyword-passed input is
    marked: ONNX Runtime then runs what fake quantization simulates."""
    import onnx

    from backends.onnx_export import GraphSignature, export_onnx, save_model
    from backends.ort_backend import create_session, run_bound
    from backends.qdq import apply_marks, check_no_marks
    from backends.qdq_model import integer_kernels_exact
    from quant.fake_quant import pre_scaled
    from quant.quantizers import sqnr_db

    recipe = {**W8A8, "methods": [{"kind": "weight_balance"}]}
    exported = Toy().eval()
    encodings = quantize(exported, recipe, loop, component="unet", apply=False)
    fresh = Components(Toy().eval())  # the backends' path: a fresh model, the delta loaded, no hooks
    path = encodings.save(tmp_path / "enc.json")
    load_weights_delta(fresh, Encodings.load(path), path)
    entries, pre_scales = encodings.components["unet"], encodings.pre_scales["unet"]
    signature = GraphSignature(("x",), ("y",), (DATA[0],), {"x": {0: "batch"}, "y": {0: "batch"}})
    with pre_scaled(fresh.unet, pre_scales):
        marked = export_onnx(fresh.unet, signature, tmp_path / "toy.marked.onnx", marks=entries.keys())
    model = onnx.load(str(marked))
    result = apply_marks(model, entries)
    check_no_marks(model)
    assert result.activations == 2 and result.weights == 2  # fc2's input, passed by keyword, is marked too
    assert sum(node.op_type == "Mul" for node in model.graph.node) == 2
    session = create_session(save_model(model, tmp_path / "toy.onnx"),
                             qdq_fusion=integer_kernels_exact(result.max_abs_int8_weight, result.activations_8bit))
    apply_encodings(fresh.unet, entries, "unet", pre_scales=pre_scales)
    with torch.no_grad():
        expected = fresh.unet(DATA[2])
    assert sqnr_db(expected, run_bound(session, {"x": DATA[2]}, "y", expected.shape)) > 60


# -- smoothquant ---------------------------------------------------------------------------------------

class Outlier(torch.nn.Module):
    """An input with one channel 60x the others (what trained transformers grow) into a Linear, then a second one."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.fc1 = torch.nn.Linear(16, 16)
        self.fc2 = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


OUTLIER_DATA = [torch.randn(64, 16, generator=torch.Generator().manual_seed(i)) * torch.tensor([60.0] + [1.0] * 15)
                for i in range(3)]
PER_CHANNEL_W8A8 = {"name": "toy-w8a8", "components": ["unet"],
                    "weights": {"dtype": "int8", "symmetric": True, "axis": 0, "observer": "minmax"},
                    "inputs": {"dtype": "uint8", "symmetric": False, "axis": None, "observer": "minmax"}}


def _outlier_loop(model):
    for x in OUTLIER_DATA:
        model(x)


def _output_sqnr(recipe) -> tuple[float, torch.nn.Module]:
    from quant.quantizers import sqnr_db

    reference = Outlier().eval()
    model = Outlier().eval()
    encodings = quantize(model, recipe, _outlier_loop, component="unet", apply=True)
    with torch.no_grad():
        return sqnr_db(reference(OUTLIER_DATA[0]), model(OUTLIER_DATA[0])), encodings


def test_smoothquant_is_exact_in_fp32():
    model, reference = Outlier().eval(), Outlier().eval()
    recipe = {**PER_CHANNEL_W8A8, "methods": [{"kind": "smoothquant", "alpha": 0.5}]}
    encodings = quantize(model, recipe, _outlier_loop, component="unet", apply=False)
    with torch.no_grad():  # changed weights + the 1/s pre-scale hooks, no quantizers: the same function
        assert torch.allclose(model(OUTLIER_DATA[1]), reference(OUTLIER_DATA[1]), rtol=1e-5, atol=1e-4)
    scale = encodings.pre_scales["unet"]["fc1:input[0]"].scale
    assert scale[0] < min(scale[1:])  # the outlier channel is divided the most


def test_smoothquant_beats_min_max_on_an_outlier_channel_and_selects_by_input_sqnr():
    plain, _ = _output_sqnr(PER_CHANNEL_W8A8)
    smoothed, _ = _output_sqnr({**PER_CHANNEL_W8A8, "methods": [{"kind": "smoothquant", "alpha": 0.5}]})
    assert smoothed > plain + 6, (plain, smoothed)  # the case built to need it
    top, encodings = _output_sqnr({**PER_CHANNEL_W8A8, "methods": [{"kind": "smoothquant", "alpha": 0.5,
                                                                     "select": "top_k", "top_k": 1}]})
    stats = encodings.methods[0]["stats"]
    assert stats["layers"] == ["fc1"] and stats["input_sqnr_db_lowest"][0][0] == "fc1"
    assert top == pytest.approx(smoothed, abs=3.0)  # smoothing the one bad input is what matters


def test_smoothquant_leaves_a_layer_the_data_never_runs_alone():
    """A branch the forward loop never calls (the VAE's encoder when only decode runs) has no input maxima:
    SmoothQuant smooths the layers that ran and leaves that one's weights and input as they were."""

    class WithIdleBranch(Outlier):
        def __init__(self):
            super().__init__()
            self.idle = torch.nn.Linear(16, 16)

    model, reference = WithIdleBranch().eval(), WithIdleBranch().eval()
    recipe = {**PER_CHANNEL_W8A8, "methods": [{"kind": "smoothquant", "alpha": 0.5}]}
    encodings = quantize(model, recipe, _outlier_loop, component="unet", apply=False)
    assert "fc1" in encodings.methods[0]["stats"]["layers"] and "idle" not in encodings.methods[0]["stats"]["layers"]
    assert "idle:input[0]" not in encodings.pre_scales["unet"] and "fc1:input[0]" in encodings.pre_scales["unet"]
    assert torch.equal(model.idle.weight, reference.idle.weight)


def test_smoothquant_folds_into_a_transformer_blocks_layernorms_and_stays_exact():
    block, reference = _transformer_block(), _transformer_block()
    g = torch.Generator().manual_seed(5)
    data = [(torch.randn(2, 10, 32, generator=g) * torch.tensor([20.0] + [1.0] * 31), torch.randn(2, 7, 24, generator=g))
            for _ in range(2)]

    def loop(model):
        for x, context in data:
            model(x, encoder_hidden_states=context)

    recipe = {**PER_CHANNEL_W8A8, "methods": [{"kind": "smoothquant", "alpha": 0.5}]}
    encodings = quantize(block, recipe, loop, component="unet", apply=False)
    stats = encodings.methods[0]["stats"]
    assert stats["folded_into"] == {"norm1": ["attn1.to_k", "attn1.to_q", "attn1.to_v"], "norm2": ["attn2.to_q"],
                                    "norm3": ["ff.net.0.proj"], "attn1.to_v": ["attn1.to_out.0"],
                                    "attn2.to_v": ["attn2.to_out.0"], "ff.net.0.proj": ["ff.net.2"]}
    assert stats["folds_by_kind"] == {"layer_norm": 3, "group_norm": 0, "linear": 3} and not stats["fold_refused"]
    # only the inputs read from the text states keep an explicit Mul
    assert set(encodings.pre_scales.get("unet", {})) == {"attn2.to_k:input[0]", "attn2.to_v:input[0]"}
    assert {"unet.norm1.weight", "unet.norm1.bias", "unet.ff.net.0.proj.bias"} <= set(encodings.delta)
    x, context = data[1]
    with torch.no_grad():
        assert torch.allclose(block(x, encoder_hidden_states=context), reference(x, encoder_hidden_states=context),
                              rtol=1e-4, atol=1e-4)
    unfolded = quantize(_transformer_block(), {**recipe, "methods": [{"kind": "smoothquant", "alpha": 0.5,
                                                                       "fold": False}]}, loop, component="unet")
    assert "attn1.to_q:input[0]" in unfolded.pre_scales["unet"] and not unfolded.methods[0]["stats"]["folded_into"]


def test_smoothquant_folds_a_transformer2d_groupnorm_into_proj_in_through_the_reshape():
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    torch.manual_seed(4)
    model = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=16, norm_num_groups=4,
                               cross_attention_dim=24, use_linear_projection=True).eval()
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(6)
    data = [(torch.randn(2, 16, 4, 4, generator=g) * torch.logspace(-1, 1, 16)[None, :, None, None],
             torch.randn(2, 7, 24, generator=g)) for _ in range(2)]

    def loop(m):
        for x, context in data:
            m(x, encoder_hidden_states=context)

    recipe = {**PER_CHANNEL_W8A8, "methods": [{"kind": "smoothquant", "alpha": 0.5}]}
    encodings = quantize(model, recipe, loop, component="unet", apply=False)
    stats = encodings.methods[0]["stats"]
    assert stats["folded_into"]["norm"] == ["proj_in"] and stats["folds_by_kind"]["group_norm"] == 1
    assert "proj_in:input[0]" not in encodings.pre_scales["unet"] and {"unet.norm.weight", "unet.norm.bias"} <= \
        set(encodings.delta)
    x, context = data[1]
    with torch.no_grad():
        want, got = reference(x, encoder_hidden_states=context).sample, model(x, encoder_hidden_states=context).sample
    assert float((got - want).norm() / want.norm()) <= 1e-5


class _NormAlsoAdded(torch.nn.Module):
    """A LayerNorm whose output feeds a Linear *and* a residual add: folding 1/s into it would not be exact."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.norm, self.fc = torch.nn.LayerNorm(16), torch.nn.Linear(16, 16)

    def forward(self, x):
        h = self.norm(x)
        return self.fc(h) + h


def test_smoothquant_refuses_a_fold_the_fp32_check_finds_inexact():
    model, reference = _NormAlsoAdded(), _NormAlsoAdded()
    recipe = {**PER_CHANNEL_W8A8, "methods": [{"kind": "smoothquant", "alpha": 0.5}]}
    encodings = quantize(model, recipe, _outlier_loop, component="unet", apply=False)
    assert encodings.methods[0]["stats"]["fold_refused"] and "fc:input[0]" in encodings.pre_scales["unet"]
    with torch.no_grad():
        assert torch.allclose(model(OUTLIER_DATA[1]), reference(OUTLIER_DATA[1]), rtol=1e-5, atol=1e-4)


def test_smoothquant_settings_are_checked():
    with pytest.raises(RecipeError, match="alpha 1.5 is outside"):
        load_recipe({**PER_CHANNEL_W8A8, "methods": [{"kind": "smoothquant", "alpha": 1.5}]})
    with pytest.raises(RecipeError, match="select 'best'"):
        load_recipe({**PER_CHANNEL_W8A8, "methods": [{"kind": "smoothquant", "select": "best"}]})


# -- bias_correction -------------------------------------------------------------------------------------

class Shifted(torch.nn.Module):
    """A Linear whose int4 weights all round down by 0.4 of a step, fed positive inputs: a known mean shift."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 8, bias=False)
        with torch.no_grad():
            step = 0.1
            grid = torch.randint(-5, 6, (8, 16), generator=torch.Generator().manual_seed(0)).float()
            self.fc.weight.copy_((grid + 0.4) * step)
            self.fc.weight[:, 0] = 7 * step  # fixes each row's absmax, so the int4 step is exactly 0.1

    def forward(self, x):
        return self.fc(x)


SHIFT_DATA = [1.0 + 0.1 * torch.randn(64, 16, generator=torch.Generator().manual_seed(i)) for i in range(4)]
W4_ONLY = {"name": "toy-w4", "components": ["unet"],
           "weights": {"dtype": "int4", "symmetric": True, "axis": 0, "observer": "minmax"}, "inputs": None}


def _shift_loop(model):
    for x in SHIFT_DATA:
        model(x)


def test_bias_correction_removes_the_mean_shift_weight_quantization_adds():
    reference = Shifted().eval()
    results = {}
    for name, recipe in (("plain", W4_ONLY), ("corrected", {**W4_ONLY, "methods": [{"kind": "bias_correction"}]})):
        model = Shifted().eval()
        encodings = quantize(model, recipe, _shift_loop, component="unet", apply=True)
        with torch.no_grad():
            x = SHIFT_DATA[0]
            results[name] = float((model(x) - reference(x)).mean())
        if name == "corrected":
            assert set(encodings.delta) == {"unet.fc.bias"}  # a layer without a bias got one
            assert encodings.methods[0]["stats"]["layers"] == 1
    # rounding down 0.4 step of 0.1 on 15 inputs of mean ~1: the output mean moves by about -0.6
    assert results["plain"] == pytest.approx(-0.6, abs=0.1)
    assert abs(results["corrected"]) < 0.02 * abs(results["plain"])


# -- cross_layer_equalization ------------------------------------------------------------------------------

def _transformer_block():
    from diffusers.models.attention import BasicTransformerBlock

    torch.manual_seed(3)
    block = BasicTransformerBlock(32, 2, 16, cross_attention_dim=24, activation_fn="geglu").eval()
    with torch.no_grad():  # unequal channel ranges, the case CLE is for
        for linear in (block.attn1.to_v, block.attn2.to_v, block.ff.net[0].proj):
            linear.weight.mul_(torch.logspace(-1, 1, linear.out_features)[:, None])
    return block


def test_cle_finds_the_exact_pairs_keeps_fp32_and_equalizes_ranges():
    from calibration.methods.cross_layer_equalization import equalization_pairs

    block, reference = _transformer_block(), _transformer_block()
    x, context = torch.randn(2, 10, 32), torch.randn(2, 7, 24)
    pairs = equalization_pairs(block)
    assert [(a, b) for a, b, _ in pairs] == [("attn1.to_v", "attn1.to_out.0"), ("attn2.to_v", "attn2.to_out.0"),
                                             ("ff.net.0.proj", "ff.net.2")]
    recipe = {**PER_CHANNEL_W8A8, "types": ["Linear"], "weights": {**PER_CHANNEL_W8A8["weights"], "axis": None},
              "methods": [{"kind": "cross_layer_equalization"}]}
    encodings = quantize(block, recipe, lambda m: m(x, encoder_hidden_states=context), component="unet", apply=False)
    with torch.no_grad():
        want, got = reference(x, encoder_hidden_states=context), block(x, encoder_hidden_states=context)
    assert float((got - want).norm() / want.norm()) <= 1e-5
    inner = block.ff.net[2].in_features
    for first, second, channels in ((block.attn1.to_v, block.attn1.to_out[0], 32), (block.ff.net[0].proj, block.ff.net[2], inner)):
        rows = first.weight.detach()[:channels].abs().amax(dim=1)
        cols = second.weight.detach().abs().amax(dim=0)
        assert torch.allclose(rows, cols, rtol=1e-5)
    stats = encodings.methods[0]["stats"]
    assert stats["pairs"] == 3 and stats["largest_row_range_ratio_after"] < stats["largest_row_range_ratio_before"]


def test_cle_on_clip_pairs_value_and_output_projections():
    from transformers import CLIPTextConfig, CLIPTextModel

    from calibration.methods.cross_layer_equalization import equalization_pairs

    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, max_position_embeddings=16)).eval()
    names = [(a, b) for a, b, _ in equalization_pairs(model)]
    modules = dict(model.named_modules())
    assert len(names) == 2 and all(a.endswith(f"layers.{i}.self_attn.v_proj") and b.endswith(f"layers.{i}.self_attn.out_proj")
                                   and a in modules and b in modules for i, (a, b) in enumerate(names))
    # the MLP (fc1 -> quick_gelu -> fc2) is not a pair: gelu does not commute with scaling


# -- adaround ------------------------------------------------------------------------------------------------

def _ada_model():
    torch.manual_seed(5)
    return torch.nn.Sequential(torch.nn.Linear(32, 16)).eval()


# correlated inputs, as real activations are: with white inputs round-to-nearest is already optimal
# (the output error is then just the weight error's norm), and AdaRound has nothing to learn
_MIX = torch.randn(32, 32, generator=torch.Generator().manual_seed(99)) + 3.0
ADA_DATA = [torch.randn(64, 32, generator=torch.Generator().manual_seed(i)) @ _MIX for i in range(8)]


def _ada_loop(model):
    for x in ADA_DATA:
        model(x)


def test_adaround_beats_round_to_nearest_at_4_bits_and_stays_on_the_grid():
    from quant.quantizers import quantize_tensor, sqnr_db

    w4 = {"name": "toy-w4", "components": ["unet"], "inputs": None,
          "weights": {"dtype": "int4", "symmetric": True, "axis": 0, "observer": "minmax"}}
    reference = _ada_model()
    outputs = {}
    for name, recipe in (("nearest", w4), ("adaround", {**w4, "methods": [{"kind": "adaround", "iterations": 1000,
                                                                             "samples": 8}]})):
        model = _ada_model()
        encodings = quantize(model, recipe, _ada_loop, component="unet", apply=True)
        with torch.no_grad():
            outputs[name] = sqnr_db(reference(ADA_DATA[0]), model(ADA_DATA[0]))
        if name == "adaround":
            ((nearest, learned),) = encodings.methods[0]["stats"]["reconstruction_mse"].values()
            assert learned < 0.6 * nearest, (nearest, learned)  # 0.57 measured at 1000 iterations
            qp = encodings.components["unet"]["0:weight[0]"].qparams()
            rounded = encodings.delta["unet.0.weight"]
            assert torch.equal(quantize_tensor(rounded, qp) * qp.scale[:, None], rounded)  # integers x frozen scale
    assert outputs["adaround"] > outputs["nearest"] + 2.5, outputs  # +2.8 dB measured (23.8 -> 26.6)


@pytest.mark.parametrize("method", ["adaround", "bias_correction"])
def test_the_sqnr_report_measures_changed_weights_against_their_fp32_values(method):
    """A weight-writing method's result is in the module the report gets; its FP32 values (``fp32_values``)
    are the reference, so the report's output SQNR is the quantized model's against the *original* model
    (AdaRound's weights are on the grid: against the rounded module itself the noise would be zero)."""
    from calibration.sqnr import OUTPUT_ROW, sqnr_report

    if method == "adaround":
        make, data, loop, settings = _ada_model, ADA_DATA, _ada_loop, {"iterations": 50, "samples": 4}
    else:
        make, data, loop, settings = Shifted, SHIFT_DATA, _shift_loop, {}
    recipe = {**W4_ONLY, "methods": [{"kind": method, **settings}]}
    model, reference = make().eval(), make().eval()
    encodings = quantize(model, recipe, loop, component="unet", apply=False)
    assert set(encodings.fp32_values) == set(encodings.delta)
    deployed = {k: v.clone() for k, v in model.state_dict().items()}
    entries = encodings.components["unet"]
    fp32 = {k.partition(".")[2]: v for k, v in encodings.fp32_values.items()}
    report = sqnr_report(model, "unet", entries, loop, lambda: apply_encodings(model, entries, "unet"), samples=2,
                         fp32_values=fp32)
    with torch.no_grad():
        signal = sum(float(reference(x).double().pow(2).sum()) for x in data[:2])
        noise = sum(float((reference(x).double() - model(x).double()).pow(2).sum()) for x in data[:2])
    expected = 10 * math.log10(signal / noise)
    rows = {r["layer"]: r for r in report.rows()}
    layer = "0" if method == "adaround" else "fc"
    assert rows[OUTPUT_ROW]["accumulated_sqnr_db"] == pytest.approx(expected, abs=1e-3)
    assert rows[layer]["local_sqnr_db"] == pytest.approx(expected, abs=1e-3)  # one layer: local = end to end
    state = model.state_dict()
    assert all(torch.equal(deployed[k], state[k]) for k in fp32)  # the deployed values are back


def test_adaround_refuses_float_weights():
    fp8 = {"name": "toy-fp8", "components": ["unet"], "inputs": None,
           "weights": {"dtype": "float8e4m3fn", "symmetric": True, "axis": 0, "observer": "minmax"},
           "methods": [{"kind": "adaround", "iterations": 1}]}
    with pytest.raises(Exception, match="float format with no rounding grid"):
        quantize(_ada_model(), fp8, _ada_loop, component="unet", apply=False)

# -- qncd_smoothing --------------------------------------------------------------------------------------------

def _resblock():
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(7)
    block = ResnetBlock2D(in_channels=16, out_channels=16, temb_channels=8, groups=4).eval()
    with torch.no_grad():
        block.norm2.weight.copy_(torch.linspace(0.5, 2.0, 16))
    return block


class _Wrapped(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x, temb):
        return self.block(x, temb)


RES_DATA = [(torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(i)),
             torch.randn(2, 8, generator=torch.Generator().manual_seed(100 + i)) * 3) for i in range(3)]


def _res_loop(model):
    for x, temb in RES_DATA:
        model(x, temb)


def test_qncd_smoothing_matches_qncd_formula_and_is_exact_in_fp32():
    from calibration.methods.qncd_smoothing import group_normalised

    model, reference = _Wrapped(_resblock()), _Wrapped(_resblock())
    recipe = {**PER_CHANNEL_W8A8, "types": ["Conv2d"], "methods": [{"kind": "qncd_smoothing"}]}
    encodings = quantize(model, recipe, _res_loop, component="unet", apply=False)
    with torch.no_grad():  # conv2 weights x s, its input / s: the same function
        for x, temb in RES_DATA:
            assert torch.allclose(model(x, temb), reference(x, temb), rtol=1e-5, atol=1e-5)
        # QNCD's save_temb / set_conv_weight by hand: GN without affine, clamp >= 1, mean, clamp, x gamma
        block = reference.block
        per_call = [group_normalised(block.time_emb_proj(torch.nn.functional.silu(t)), block.norm2).clamp(min=1)
                    for _, t in RES_DATA]
        expected = block.norm2.weight * torch.cat(per_call).mean(dim=0).clamp(min=1)
    got = 1.0 / torch.tensor(encodings.pre_scales["unet"]["block.conv2:input[0]"].scale)
    assert torch.allclose(got, expected, rtol=1e-5)
    assert encodings.methods[0]["stats"]["blocks"] == 1


def test_qncd_noise_correction_is_recorded_as_runtime_and_makes_runs_non_compliant(tmp_path):
    from harness.loadgen_run import noise_correction_of
    from harness.run_config import RunConfig

    recipe = {**PER_CHANNEL_W8A8, "methods": [{"kind": "qncd_noise_correction", "interval": 5}]}
    encodings = quantize(Outlier().eval(), recipe, _outlier_loop, component="unet", apply=False)
    assert encodings.runtime == {"noise_correction": {"kind": "qncd", "interval": 5, "seed": 0}}
    assert encodings.methods[0]["changes_sampler"] is True  # the submission's closed-division check refuses it
    path = encodings.save(tmp_path / "enc.json")
    assert Encodings.load(path).runtime == encodings.runtime
    correction = noise_correction_of(RunConfig(encodings=str(path)))
    assert correction.interval == 5 and noise_correction_of(RunConfig()) is None
