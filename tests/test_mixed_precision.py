"""ANNA's size-constrained choice of one scheme per module: the chain DP against brute force and greedy."""

from __future__ import annotations

import numpy as np
import pytest

from calibration.mixed_precision.solver import Infeasible, Problem, brute_force, greedy, local_search, solve_dp


def _random_problem(rng: np.random.Generator, n: int, options: int, integer_sizes: bool) -> Problem:
    unary = [np.concatenate([[0.0], rng.gamma(1.0, 1.0, options - 1)]) for _ in range(n)]  # option 0: FP16
    if integer_sizes:
        size = [np.concatenate([[16], rng.integers(4, 12, options - 1)]) for _ in range(n)]
    else:
        size = [np.concatenate([[16.0], rng.uniform(4, 12, options - 1)]) for _ in range(n)]
    pair = [rng.normal(0, 0.3, (options, options)) * np.outer(np.arange(options) > 0, np.arange(options) > 0)
            for _ in range(n - 1)]  # interactions only between two quantized modules
    return Problem(unary, size, pair)


@pytest.mark.parametrize("seed", range(12))
def test_dp_equals_brute_force_on_chains_of_up_to_eight_modules(seed):
    rng = np.random.default_rng(seed)
    n, options = int(rng.integers(2, 9)), int(rng.integers(2, 5))
    problem = _random_problem(rng, n, options, integer_sizes=True)
    smallest, largest = problem.smallest_size(), 16.0 * n
    for budget in np.linspace(smallest, largest, 5).round():
        budget = max(budget, np.ceil(smallest))
        exact = brute_force(problem, budget)
        found = solve_dp(problem, budget, unit=1.0)  # integer sizes on a unit grid: exact
        assert found.exact and found.size <= budget
        assert found.cost == pytest.approx(exact.cost, abs=1e-9), (n, options, budget, found.choice, exact.choice)


def test_dp_on_real_valued_sizes_stays_within_budget_and_near_the_optimum():
    rng = np.random.default_rng(7)
    problem = _random_problem(rng, 7, 4, integer_sizes=False)
    budget = problem.smallest_size() + 20.0
    exact = brute_force(problem, budget)
    coarse, fine = solve_dp(problem, budget, resolution=10), solve_dp(problem, budget, resolution=20000)
    assert not coarse.exact and coarse.size <= budget and coarse.cost >= exact.cost - 1e-9
    assert fine.size <= budget and fine.cost == pytest.approx(exact.cost, abs=1e-9)


def test_greedy_loses_to_the_dp_on_a_knapsack_it_cannot_see():
    """Saving 5 of 14 size units: greedy flips the two best cost-per-size modules (7.2), the DP the one big one (5)."""
    problem = Problem(unary=[[0, 5.0], [0, 3.6], [0, 3.6]], size=[[6, 1], [4, 0], [4, 0]], names=["A", "B", "C"])
    assert greedy(problem, 9).choice == [0, 1, 1] and greedy(problem, 9).cost == pytest.approx(7.2)
    dp = solve_dp(problem, 9, unit=1.0)
    assert dp.choice == [1, 0, 0] and dp.cost == pytest.approx(5.0) == brute_force(problem, 9).cost


def test_non_consecutive_interactions_are_counted_and_local_search_reports_the_gap():
    # module 0 and 2 interact badly when both quantized: the chain DP cannot see it, the full cost can
    problem = Problem(unary=[[0, 1.0], [0, 3.0], [0, 1.0]], size=[[2, 1], [2, 1], [2, 1]],
                      extra_pairs={(0, 2): np.array([[0, 0], [0, 10.0]])})
    dp = solve_dp(problem, 4, unit=1.0)
    assert dp.choice == [1, 0, 1] and dp.cost == pytest.approx(12.0)  # the chain optimum, judged by every term
    better = local_search(problem, 4, dp)
    assert better.cost == pytest.approx(brute_force(problem, 4).cost) == pytest.approx(4.0)


def test_a_budget_below_the_smallest_configuration_is_infeasible():
    problem = Problem(unary=[[0, 1.0]], size=[[16, 8]])
    with pytest.raises(Infeasible, match="below the smallest"):
        solve_dp(problem, 7)
    with pytest.raises(ValueError, match="equal 1-d shapes"):
        Problem(unary=[[0, 1.0]], size=[[16]])


def test_a_restricted_instance_is_solved_over_its_options_only():
    rng = np.random.default_rng(3)
    problem = _random_problem(rng, 6, 4, integer_sizes=True)
    options = [0, 2]
    sub = problem.restricted(options)
    budget = sub.smallest_size() + 12
    dp = solve_dp(sub, budget, unit=1.0)
    assert dp.cost == pytest.approx(brute_force(sub, budget).cost, abs=1e-9)
    full = [options[j] for j in dp.choice]
    assert set(full) <= set(options) and problem.cost(full) == pytest.approx(dp.cost)


def _coherent_clipping_case():
    """Six groups, schemes ``fp8`` (rounding noise, variance 1 per group, adding incoherently) and ``clip``
    (variance 0.1 and a bias of 0.8 of one sign): alone, clip costs 0.74 < 1, so a quadratic model built
    from groups measured alone prefers it everywhere; together k clipped groups cost (0.8 k)² + 0.1 k."""
    from calibration.mixed_precision.sensitivity import Sensitivity

    groups = [f"g{i}" for i in range(6)]

    def true_mse(choice: dict[str, str]) -> float:
        clipped = sum(1 for o in choice.values() if o == "clip")
        return (0.8 * clipped) ** 2 + 0.1 * clipped + sum(1.0 for o in choice.values() if o == "fp8")

    alone = {g: {s: {"mse": true_mse({g: s}), "sqnr_db": 0.0} for s in ("fp8", "clip")} for g in groups}
    cost = {g: {"fp16": 16.0, "fp8": 8.0, "clip": 8.0} for g in groups}
    return Sensitivity(groups, ["fp8", "clip"], unary=alone, bits=cost, bitops=cost), true_mse


def test_the_measured_pick_keeps_the_single_scheme_dp_where_mixing_schemes_only_looks_better():
    """The DP over both schemes clips every quantized group (the model adds their errors as measured alone);
    measured, that is far worse than the DP over FP16 and fp8, which the measured pick reports."""
    from calibration.mixed_precision.search import BitOpsModel, choose, sweep

    sensitivity, true_mse = _coherent_clipping_case()
    sizes = BitOpsModel(sensitivity)
    points = sweep(sensitivity, sizes, [58.4], "fp8", constraint="bitops")  # room for one group in FP16
    assert [p.method for p in points] == ["uniform", "dp", "dp[fp8]", "greedy"]  # dp[clip] is the DP's own choice
    dp = {p.method: p for p in points if p.is_dp}
    assert set(dp["dp"].choice.values()) == {"fp16", "clip"} and len(dp["dp"].fp16_groups) == 1
    assert set(dp["dp[fp8]"].choice.values()) == {"fp16", "fp8"} and len(dp["dp[fp8]"].fp16_groups) == 1
    assert dp["dp"].predicted_mse < dp["dp[fp8]"].predicted_mse  # the model's ranking
    for point in points:
        point.measured_mse = true_mse(point.choice)
    assert dp["dp"].measured_mse == pytest.approx(16.5) and dp["dp[fp8]"].measured_mse == pytest.approx(5.0)
    assert choose(points, "model") == [dp["dp"]] and dp["dp"].chosen
    assert choose(points, "measured") == [dp["dp[fp8]"]] and dp["dp[fp8]"].chosen and not dp["dp"].chosen


def test_candidates_equal_to_the_full_dp_are_dropped_and_targets_may_be_missed():
    from calibration.mixed_precision.search import BitOpsModel, Configuration, smallest_meeting, sweep

    sensitivity, _ = _coherent_clipping_case()
    sensitivity.schemes = ["fp8"]  # one scheme: the full DP is the only candidate
    points = sweep(sensitivity, BitOpsModel(sensitivity), [58.4, 40.0], "fp8", constraint="bitops")
    assert [p.method for p in points] == ["uniform", "dp", "greedy"]  # 40% is below the all-fp8 size: skipped
    small, large = (Configuration(str(p), "dp", {}, p, 0.0, image_psnr_db=db) for p, db in ((55.0, 30.0), (70.0, 40.0)))
    assert smallest_meeting([large, small], "image_psnr_db", 29.0) is small
    assert smallest_meeting([large, small], "image_psnr_db", 35.0) is large
    assert smallest_meeting([large, small], "image_psnr_db", 45.0) is None


def test_the_table_marks_the_reported_configuration_and_says_when_no_configuration_meets_the_target(tmp_path):
    from calibration.mixed_precision.commands import _write_table
    from calibration.mixed_precision.search import BitOpsModel, choose, sweep

    sensitivity, true_mse = _coherent_clipping_case()
    points = sweep(sensitivity, BitOpsModel(sensitivity), [58.4], "fp8", constraint="bitops")
    for point in points:
        point.measured_mse, point.measured_sqnr_db = true_mse(point.choice), 0.0
    (chosen,) = choose(points)
    chosen.image_psnr_db = 21.5
    result = {"schemes": ["fp8", "clip"], "profile": "toy", "percent_of": "FP16 BitOps", "samples": 1,
              "sensitivity": {"groups": 6, "unet_calls": 0, "seconds": 0}, "around": "fp32", "pairs": "none",
              "pick": "measured", "rank_correlation_dp": None, "images": {"captions": 2, "fp32_caption_accuracy": None},
              "target_psnr": {"psnr_db": 30.0, "images": 2, "best_psnr_db": 21.5, "smallest": None}}
    _write_table(tmp_path, points, result)
    table = (tmp_path / "mixed_precision.md").read_text()
    assert "| 58.4% | dp[fp8] * |" in table and "| 58.4% | dp |" in table and "21.50" in table
    assert "none in the sweep (best 21.50 dB)" in table


# -- sensitivity -----------------------------------------------------------------------------------

import torch  # noqa: E402

from calibration.mixed_precision.sensitivity import group_of, measure_sensitivity  # noqa: E402
from calibration.quantize import quantize  # noqa: E402


class Chain(torch.nn.Module):
    """Four Linears; ``outlier`` makes one channel of ``l2``'s input 100x larger without changing the function."""

    def __init__(self, outlier: bool):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2, self.l3, self.l4 = (torch.nn.Linear(16, 16) for _ in range(4))
        if outlier:
            with torch.no_grad():
                self.l1.weight[3] *= 100.0
                self.l1.bias[3] *= 100.0
                self.l2.weight[:, 3] /= 100.0

    def forward(self, x):
        return self.l4(torch.tanh(self.l3(self.l2(self.l1(x)))))


def _data_loop(calls=None):
    data = [torch.randn(32, 16, generator=torch.Generator().manual_seed(i)) for i in range(4)]

    def loop(module):
        for x in data:
            if calls is not None:
                calls.append(1)
            module(x)
    return loop


def _schemes(model):
    recipe = {"name": "w8a8-toy", "components": ["unet"], "types": ["Linear"],
              "weights": {"dtype": "int8", "symmetric": True, "axis": 0, "observer": "minmax"},
              "inputs": {"dtype": "uint8", "symmetric": False, "axis": None, "observer": "minmax"}}
    four_bit = dict(recipe, name="w4a8-toy", weights=dict(recipe["weights"], dtype="int4"))
    return {name: quantize(model, r, _data_loop(), component="unet", apply=False).components["unet"]
            for name, r in (("w8a8", recipe), ("w4a8", four_bit))}


def test_the_layer_made_to_matter_ranks_first_and_sizes_are_counted():
    model = Chain(outlier=True).eval()
    reference = model(torch.ones(1, 16))
    sensitivity = measure_sensitivity(model, _schemes(model), _data_loop(), samples=4, pairs="same")
    assert sensitivity.groups == ["l1", "l2", "l3", "l4"]  # execution order
    assert [g for g, _ in sensitivity.ranking("w8a8")][0] == "l2"  # its per-tensor input range is 100x too wide
    assert all(sensitivity.unary[g]["w4a8"]["mse"] > sensitivity.unary[g]["w8a8"]["mse"] for g in ("l1", "l3", "l4"))
    assert torch.equal(model(torch.ones(1, 16)), reference)  # every weight restored, every hook removed
    bits = sensitivity.bits["l1"]
    assert bits["fp16"] == 16 * 256 and bits["w8a8"] == 8 * 256 + 16 * 32 and bits["w4a8"] == 4 * 256 + 16 * 32
    problem = sensitivity.problem()
    assert problem.n == 4 and problem.unary[1][1] == sensitivity.unary["l2"]["w8a8"]["mse"]
    assert problem.pair[0][1, 1] == sensitivity.pairs["l1|l2"]["w8a8|w8a8"] and problem.pair[0][1, 2] == 0.0


def test_around_a_scheme_the_model_is_exact_at_that_point_and_every_move_from_it():
    """Expanded at all-w8a8: the prediction equals the measured output MSE at all-w8a8, at every single
    group moved (to FP16 or w4a8) and at every consecutive pair moved."""
    from calibration.mixed_precision.search import configuration_entries, measure_configuration
    from calibration.mixed_precision.sensitivity import OutputRecorder

    model = Chain(outlier=True).eval()
    reference_out = model(torch.ones(1, 16))
    schemes = _schemes(model)
    around = measure_sensitivity(model, schemes, _data_loop(), samples=4, pairs="all", around="w8a8")
    assert around.moves == ["fp16", "w4a8"] and set(around.pairs["l1|l2"]) == {
        "fp16|fp16", "fp16|w4a8", "w4a8|fp16", "w4a8|w4a8"}
    problem, options = around.problem(), around.options
    reference = OutputRecorder(model, _data_loop(), 4)()

    def measured(choice):
        entries = configuration_entries(dict(zip(around.groups, choice)), schemes, around.layers)
        return measure_configuration(model, entries, _data_loop(), 4, reference)[0]

    def predicted(choice):
        return problem.cost([options.index(o) for o in choice])

    base = ["w8a8"] * 4
    assert predicted(base) == around.base_mse == pytest.approx(measured(base), rel=1e-9) and around.base_mse > 0
    for i in range(4):
        for option in around.moves:
            choice = base[:i] + [option] + base[i + 1:]
            assert predicted(choice) == pytest.approx(measured(choice), rel=1e-9), choice
    for i in range(3):
        choice = base[:i] + ["fp16", "w4a8"] + base[i + 2:]
        assert predicted(choice) == pytest.approx(measured(choice), rel=1e-9), choice
    assert around.ranking("fp16")[0][0] == "l2"  # the outlier layer gains most from FP16
    assert torch.equal(model(torch.ones(1, 16)), reference_out)  # every weight restored, every hook removed
    with pytest.raises(ValueError, match="around must be one of the schemes"):
        measure_sensitivity(model, schemes, _data_loop(), samples=1, around="fp8")


class Linear2(torch.nn.Module):
    """Two Linears, the second with orthogonal columns: the output error a first-layer error causes is
    exactly ``sum_i (W2^T W2)_ii dY_i^2``, the quantity AutoQuantize's score estimates."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.l1, self.l2 = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
        q, _ = torch.linalg.qr(torch.randn(16, 16))
        with torch.no_grad():
            self.l2.weight.copy_(q * torch.logspace(-0.5, 0.5, 16))  # orthogonal columns, unequal norms

    def forward(self, x):
        return self.l2(self.l1(x))


def test_gradient_scores_estimate_the_measured_output_error_and_rank_like_it():
    from calibration.mixed_precision.gradient_scores import gradient_sensitivity

    model = Linear2().eval().requires_grad_(False)  # as loaded for inference: the scorer turns grads on, then back
    schemes = _schemes(model)
    measured = measure_sensitivity(model, schemes, _data_loop(), samples=4, pairs="none")
    scored = gradient_sensitivity(model, schemes, _data_loop(), samples=4, probes=400)
    assert scored.groups == measured.groups == ["l1", "l2"] and scored.bits == measured.bits
    for group in ("l1", "l2"):
        for scheme in schemes:  # a linear model: first order is exact; orthogonal columns: no cross terms
            assert scored.unary[group][scheme]["mse"] == pytest.approx(measured.unary[group][scheme]["mse"], rel=0.05)
    assert not any(p.requires_grad for p in model.parameters())
    def no_grad_loop(module):
        with torch.inference_mode():
            _data_loop()(module)

    with pytest.raises(ValueError, match="outside torch.no_grad"):
        gradient_sensitivity(model, schemes, no_grad_loop, samples=1)
    # the Chain's outlier layer ranks first here too, from 4 backward passes instead of 8 x 4 forwards
    chain = Chain(outlier=True).eval()
    ranking = gradient_sensitivity(chain, _schemes(chain), _data_loop(), samples=4).ranking("w8a8")
    assert ranking[0][0] == "l2" and ranking[0][1] > 10 * ranking[1][1]


def test_a_killed_sensitivity_run_resumes_with_the_same_numbers(tmp_path):
    model = Chain(outlier=True).eval()
    schemes = _schemes(model)
    whole = measure_sensitivity(model, schemes, _data_loop(), samples=4, pairs="all")
    calls: list[int] = []

    def dying_loop(module):
        if len(calls) > 4 * 9:  # reference pass + a few measurements, then "killed"
            raise KeyboardInterrupt
        _data_loop(calls)(module)

    with pytest.raises(KeyboardInterrupt):
        measure_sensitivity(model, schemes, dying_loop, samples=4, pairs="all", cache=tmp_path / "s.json")
    done_before = len(calls)
    calls.clear()
    resumed = measure_sensitivity(model, schemes, _data_loop(calls), samples=4, pairs="all", cache=tmp_path / "s.json")
    assert resumed.unary == whole.unary and resumed.pairs == whole.pairs
    everything = 4 * (1 + 4 * 2 + 3 * 4)  # samples x (reference + groups x schemes + pairs x scheme pairs)
    assert len(calls) < everything <= done_before + len(calls)  # resumed from the cache, did not start over


def test_reusing_fp32_outputs_before_the_group_is_exact_and_skips_work(tiny_backend, tmp_path):
    """On the tiny UNet: the units that finish before a group (conv_in, time embedding, earlier down
    blocks, ...) replay their FP32 outputs, and every measured number is bit-identical to running them."""
    import copy

    from tiny_encodings import calibrate_tiny_unet, tiny_unet_loop, unet_example_args

    args = unet_example_args(tiny_backend)
    entries = calibrate_tiny_unet(tiny_backend, args, "w8a8", tmp_path)[0].components["unet"]
    unet = copy.deepcopy(tiny_backend.unet)
    loop = tiny_unet_loop(args)

    layers = sorted({k.split(":")[0] for k in entries})
    groups = {block: [next(layer for layer in layers if layer.startswith(f"{block}."))]  # one layer per block
              for block in ("down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1")}
    reused = measure_sensitivity(unet, {"w8a8": entries}, loop, samples=2, pairs="same", groups=groups)
    whole = measure_sensitivity(unet, {"w8a8": entries}, loop, samples=2, pairs="same", groups=groups,
                                reuse_limit_bytes=0)
    assert reused.unary == whole.unary and reused.pairs == whole.pairs and len(reused.pairs) == 4
    # around w8a8 the units replayed are the all-w8a8 ones: as exact
    reused = measure_sensitivity(unet, {"w8a8": entries}, loop, samples=2, pairs="same", groups=groups, around="w8a8")
    whole_around = measure_sensitivity(unet, {"w8a8": entries}, loop, samples=2, pairs="same", groups=groups,
                                       around="w8a8", reuse_limit_bytes=0)
    assert reused.unary == whole_around.unary and reused.pairs == whole_around.pairs and reused.base_mse > 0
    assert reused.reused_macs_fraction > 0.2
    # measured 0.23 here (the down_blocks.0 group skips nothing, the up_blocks.1 one all but a tenth)
    assert whole.reused_macs_fraction == 0.0 and reused.reused_macs_fraction > 0.2, reused.reused_macs_fraction
    assert "forward" not in vars(unet.down_blocks[0]) and "forward" not in vars(unet.conv_in)  # all restored


def test_attention_linears_group_with_their_module():
    assert group_of("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q") == \
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
    assert group_of("down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2") == \
        "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"


def test_dp_at_the_budget_edges_of_real_valued_sizes():
    """At exactly the all-FP16 size the optimum is at most all-FP16's 0; a hair above the all-smallest size is feasible."""
    rng = np.random.default_rng(3)
    problem = _random_problem(rng, 40, 4, integer_sizes=False)
    everything = float(sum(s.max() for s in problem.size))
    top = solve_dp(problem, everything)
    assert top.cost <= 1e-12 and top.size <= everything  # all FP16 costs 0; negative interactions may beat it
    tight = solve_dp(problem, problem.smallest_size() * 1.001)
    assert tight.size <= problem.smallest_size() * 1.001 and tight.cost <= problem.cost(
        [int(np.argmin(s)) for s in problem.size]) + 1e-12


def test_greedy_keeps_everything_fp16_when_the_budget_allows_and_costs_are_tiny():
    """Sizes in bits dwarf MSEs: the starting point must compare costs first, not a size-weighted sum."""
    problem = Problem(unary=[[0, 1e-9], [0, 2e-9]], size=[[1.6e6, 8e5], [1.6e6, 8e5]])
    assert greedy(problem, 3.2e6).choice == [0, 0]
    assert greedy(problem, 2.4e6).choice == [1, 0]


# -- seed 003: block-progressive analysis ------------------------------------------------------------

from calibration.mixed_precision.blocks import block_progressive, hybrid_recipe, top_level_block  # noqa: E402


class TimedChain(Chain):
    def forward(self, x, timestep):
        return super().forward(x * (1.0 + float(timestep) / 1000.0))


def test_block_progressive_finds_the_outlier_block_and_the_hybrid_recipe_keeps_it_high():
    model = TimedChain(outlier=True).eval()
    data = [(torch.randn(32, 16, generator=torch.Generator().manual_seed(i)), t) for i, t in
            enumerate((999, 999, 501, 501))]

    def loop(module):
        for x, t in data:
            module(x, timestep=torch.tensor(t))

    recipe = {"name": "w8a8-toy", "components": ["unet"], "types": ["Linear"],
              "weights": {"dtype": "int8", "symmetric": True, "axis": 0, "observer": "minmax"},
              "inputs": {"dtype": "uint8", "symmetric": False, "axis": None, "observer": "minmax"}}
    entries = quantize(model, recipe, loop, component="unet", apply=False).components["unet"]
    analysis = block_progressive(model, entries, loop, samples=4)
    assert analysis.blocks == ["l1", "l2", "l3", "l4"] and analysis.timesteps == [999, 501]
    assert analysis.sensitive(0.5) == ["l2"] and sum(analysis.noise_share) == pytest.approx(1.0)
    assert analysis.cumulative_db[1][0] < analysis.cumulative_db[0][0]  # adding the outlier block costs SQNR
    hybrid = hybrid_recipe(recipe, analysis.sensitive(0.5), "fp16")
    from calibration.recipes import load_recipe

    plans, excluded = load_recipe(hybrid).plan(model)
    assert excluded == ["l2"] and [p.name for p in plans] == ["l1", "l3", "l4"]
    assert top_level_block("down_blocks.1.attentions.0.proj_in") == "down_blocks.1"
    assert top_level_block("mid_block.resnets.0.conv1") == "mid_block" and top_level_block("conv_in") == "conv_in"


# -- the commands on the trained testbed ---------------------------------------------------------------

def test_mixed_precision_command_writes_configurations_that_fake_quant_and_ort_run(tmp_path, capsys):
    """Two schemes, one calibration prompt at one step, one sample per measurement: the whole command;
    the DP configuration it writes loads in the torch fake-quant backend and in ONNX Runtime, which agree."""
    import json

    from backends import BackendOptions, create_backend
    from harness.cli import main
    from quant.encodings import Encodings
    from quant.quantizers import sqnr_db
    from sdxl.models import model_spec

    out = tmp_path / "mp"
    assert main(["mixed-precision", "--profile", "testbed", "--schemes", "w8a8,w8a16", "--num-prompts", "1",
                 "--timesteps", "single", "--samples", "1", "--pairs", "same", "--percents", "70.5",
                 "--random-draws", "1", "--target-sqnr", "0", "--target-psnr", "0", "--images", "2",
                 "--output", str(out),
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    result = json.loads((out / "mixed_precision.json").read_text())
    methods = [p["method"] for p in result["points"]]
    assert methods[:2] == ["uniform", "dp"] and "greedy" in methods and methods[-1].startswith("random-fp16")
    candidates = [p for p in result["points"] if p["method"] == "dp" or p["method"].startswith("dp[")]
    dp = next(p for p in candidates if p["chosen"])  # the measured pick: the lowest measured MSE
    assert [p["chosen"] for p in candidates].count(True) == 1
    assert dp["measured_mse"] == min(p["measured_mse"] for p in candidates)
    assert dp["percent_of_fp16"] <= 70.5 and dp["measured_sqnr_db"] > result["points"][0]["measured_sqnr_db"]
    assert result["target"]["smallest"]["label"] == "70.5%" and f"| 70.5% | {dp['method']} * |" in capsys.readouterr().out
    psnr = result["target_psnr"]  # the 70.5% configuration's images, generated: a finite PSNR, above 0 dB
    assert psnr["smallest"]["label"] == "70.5%" and 0 < psnr["smallest"]["image_psnr_db"] < float("inf")
    uniform = result["points"][0]  # generated too (the Pareto plot's baseline), with the checker's accuracy
    assert 0 < uniform["image_psnr_db"] < float("inf") and 0 <= uniform["caption_accuracy"] <= 1
    path = out / "encodings" / "dp-70.5.json"
    # its recipe, calibrated with no capture flags (it records the search's), writes the same entries
    assert main(["calibrate", "--profile", "testbed", "--recipe", str(out / "encodings" / "dp-70.5.yaml"),
                 "--sqnr-samples", "0", "--output",
                 str(tmp_path / "again.json"), "--cache-dir", str(tmp_path / "cache")]) == 0
    written, again = Encodings.load(path).components["unet"], Encodings.load(tmp_path / "again.json").components["unet"]
    assert written.keys() == again.keys() and all(written[k] == again[k] for k in written)
    assert dp["fp16_groups"] and set(dp["choice"].values()) - {"fp16"}
    spec = model_spec("testbed")
    torch_backend = create_backend("torch", spec, BackendOptions(encodings=str(path), show_progress=False))
    ort_backend = create_backend("ort", spec, BackendOptions(encodings=str(path), show_progress=False,
                                                             extra={"cache_dir": str(tmp_path / "cache")}))
    torch.manual_seed(0)
    args = (torch.randn(2, 4, 8, 8), torch.tensor(501), torch.randn(2, 77, 96), torch.randn(2, 64),
            torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2))
    fake_quant, ort = torch_backend.predict_noise(*args), ort_backend.predict_noise(*args)
    assert sqnr_db(fake_quant, ort) > 30.0


def test_sensitivity_command_with_gradient_scores(tmp_path, capsys):
    """``--scores gradient``: AutoQuantize's scores for every group and scheme from one backward pass, in
    the same table (and files) as the measured sensitivity; the 4-bit scheme costs more for every group."""
    import json

    from harness.cli import main

    out = tmp_path / "sens"
    assert main(["sensitivity", "--profile", "testbed", "--schemes", "w8a8,w4a8", "--num-prompts", "1",
                 "--timesteps", "single", "--samples", "1", "--scores", "gradient", "--output", str(out),
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    saved = json.loads((out / "sensitivity.json").read_text())
    assert saved["scores"] == "gradient" and saved["forward_passes"] == 1 and len(saved["groups"]) > 100
    unary = saved["unary"]
    assert all(0 < unary[g]["w8a8"]["mse"] < unary[g]["w4a8"]["mse"] for g in saved["groups"]
               if unary[g]["w8a8"]["mse"] > 0)
    assert "most sensitive groups under w8a8" in capsys.readouterr().out
    for flags, message in ((["--around", "fp8"], "--around must be fp32 or one of --schemes"),
                           (["--around", "w8a8"], "--around applies to measured scores")):
        assert main(["sensitivity", "--profile", "testbed", "--schemes", "w8a8,w4a8", "--scores", "gradient",
                     *flags, "--output", str(out)]) == 2
        assert message in capsys.readouterr().err


def test_bitops_prices_16_bit_activations_that_weight_size_calls_free():
    """W8A8 and W8A16 take the same weight bits; BitOps (MACs x w bits x a bits) charges A16 twice A8."""
    model = Chain(outlier=False).eval()
    base = {"name": "w8a8-toy", "components": ["unet"], "types": ["Linear"],
            "weights": {"dtype": "int8", "symmetric": True, "axis": 0, "observer": "minmax"},
            "inputs": {"dtype": "uint8", "symmetric": False, "axis": None, "observer": "minmax"}}
    a16 = dict(base, name="w8a16-toy", inputs=dict(base["inputs"], dtype="uint16"))
    schemes = {n: quantize(model, r, _data_loop(), component="unet", apply=False).components["unet"]
               for n, r in (("w8a8", base), ("w8a16", a16))}
    sensitivity = measure_sensitivity(model, schemes, _data_loop(), samples=4, pairs="none")
    macs = 32 * 16 * 16  # a batch of 32 rows through a 16x16 Linear, per call
    for group in sensitivity.groups:
        assert sensitivity.bits[group]["w8a8"] == sensitivity.bits[group]["w8a16"]
        assert sensitivity.bitops[group] == {"fp16": 256 * macs, "w8a8": 64 * macs, "w8a16": 128 * macs}
    assert sensitivity.problem("bitops").size[0].tolist() == [256 * macs, 64 * macs, 128 * macs]


def test_the_target_check_computes_psnr_as_the_accuracy_package_does():
    from accuracy.fidelity import psnr_ssim
    from calibration.mixed_precision.images import image_psnr

    rng = np.random.default_rng(0)
    reference = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    generated = np.clip(reference.astype(int) + rng.integers(-9, 10, reference.shape), 0, 255).astype(np.uint8)
    generated[2] = reference[2]
    ours = image_psnr(generated, reference)
    assert ours[2] == np.inf
    assert ours[:2] == pytest.approx([psnr_ssim(a, b)[0] for a, b in zip(generated[:2], reference[:2])], abs=1e-4)
