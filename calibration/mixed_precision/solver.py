"""Choosing one quantization scheme per module under a size budget: ANNA's dynamic programme, and baselines.

The problem (seed 001, TheStage AI's ANNA; ``docs/mixed-precision.md``): modules ``i = 0..n-1`` in
execution order, each with options ``j`` (FP16, or one of several quantized variants); a choice
costs ``unary[i][j]`` (the output MSE that option alone adds, measured by the sensitivity pass) plus
``pair[i][j, k]`` for consecutive modules ``i, i+1`` (the measured interaction ``MSE(i and j) -
MSE(i) - MSE(j)``), and takes ``size[i][j]`` bits. Minimise the quadratic cost subject to a linear
size budget: a mixed-integer quadratic programme.

With interactions only between consecutive modules, the objective is a chain, and a dynamic
programme over (module, size used so far, this module's option) is exact once sizes are integers:
``best[i+1][b + size[i+1][k]][k] = min_j best[i][b][j] + pair[i][j, k] + unary[i+1][k]``. Sizes in
bits are discretised onto a grid over the slack above the all-smallest size (see :func:`solve_dp`);
the grid is exact when every size difference is a multiple of its unit.
Interactions between non-consecutive modules are evaluated on the result, and :func:`local_search`
(one-module moves) reports how far the chain optimum is from the best configuration it can find.

Nothing here knows about UNets: the inputs are arrays a sensitivity pass measured.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Problem:
    """Costs and sizes of every (module, option); ``pair[i]`` couples modules ``i`` and ``i + 1``.

    ``extra_pairs`` holds interactions between non-consecutive modules, ``{(i, k): matrix}`` with
    ``i + 1 < k``: the chain DP ignores them, :meth:`cost` and :func:`local_search` count them.
    ``offset`` is the model's constant term (the cost of the point it is expanded around), in every
    :meth:`cost`; it moves no optimum.
    """

    unary: list[np.ndarray]
    size: list[np.ndarray]
    pair: list[np.ndarray] = field(default_factory=list)
    extra_pairs: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)
    offset: float = 0.0

    def __post_init__(self) -> None:
        self.unary = [np.asarray(u, dtype=np.float64) for u in self.unary]
        self.size = [np.asarray(s, dtype=np.float64) for s in self.size]
        n = len(self.unary)
        if n == 0 or len(self.size) != n:
            raise ValueError(f"need unary and size for each of the modules (got {len(self.unary)} and {len(self.size)})")
        for i, (u, s) in enumerate(zip(self.unary, self.size)):
            if u.shape != s.shape or u.ndim != 1 or len(u) == 0:
                raise ValueError(f"module {i}: unary {u.shape} and size {s.shape} must be equal 1-d shapes")
            if (s < 0).any() or not np.isfinite(u).all():
                raise ValueError(f"module {i}: sizes must be >= 0 and costs finite")
        if not self.pair:
            self.pair = [np.zeros((len(self.unary[i]), len(self.unary[i + 1]))) for i in range(n - 1)]
        self.pair = [np.asarray(p, dtype=np.float64) for p in self.pair]
        if len(self.pair) != n - 1:
            raise ValueError(f"need {n - 1} consecutive-pair matrices, got {len(self.pair)}")
        for i, p in enumerate(self.pair):
            if p.shape != (len(self.unary[i]), len(self.unary[i + 1])):
                raise ValueError(f"pair[{i}] has shape {p.shape}, expected {(len(self.unary[i]), len(self.unary[i + 1]))}")
        for (i, k), p in self.extra_pairs.items():
            if not 0 <= i < k - 1 < n - 1 or np.asarray(p).shape != (len(self.unary[i]), len(self.unary[k])):
                raise ValueError(f"extra pair {(i, k)} must couple non-consecutive modules with a matching matrix")
        self.names = self.names or [str(i) for i in range(n)]

    @property
    def n(self) -> int:
        return len(self.unary)

    def cost(self, choice: list[int]) -> float:
        """The quadratic model's cost of a configuration (every term, consecutive or not)."""
        total = self.offset + sum(self.unary[i][j] for i, j in enumerate(choice))
        total += sum(self.pair[i][choice[i], choice[i + 1]] for i in range(self.n - 1))
        total += sum(np.asarray(p)[choice[i], choice[k]] for (i, k), p in self.extra_pairs.items())
        return float(total)

    def total_size(self, choice: list[int]) -> float:
        return float(sum(self.size[i][j] for i, j in enumerate(choice)))

    def smallest_size(self) -> float:
        return float(sum(s.min() for s in self.size))

    def restricted(self, options: list[int]) -> Problem:
        """The instance with only ``options`` (indices, the same for every module) left: option ``j``
        of the result is option ``options[j]`` here. For a DP over a subset of the schemes."""
        keep = np.asarray(options)
        return Problem([u[keep] for u in self.unary], [s[keep] for s in self.size],
                       [p[np.ix_(keep, keep)] for p in self.pair],
                       {key: np.asarray(p)[np.ix_(keep, keep)] for key, p in self.extra_pairs.items()},
                       list(self.names), self.offset)


@dataclass
class Solution:
    choice: list[int]
    cost: float
    size: float
    method: str
    #: for the DP: whether the discretisation was exact (every size a multiple of the grid unit)
    exact: bool = True
    notes: list[str] = field(default_factory=list)


class Infeasible(ValueError):
    """No configuration fits the budget (it is below the all-smallest size)."""


def solve_dp(problem: Problem, budget: float, resolution: int = 4000, unit: float | None = None) -> Solution:
    """The chain DP: minimum of unary + consecutive-pair cost with total size <= ``budget``.

    The grid covers the *slack*, the budget above the all-smallest configuration, in ``resolution``
    steps (or steps of ``unit``): each option's size above its module's smallest is rounded to the
    nearest step. At a budget a hair above the all-quantized size (ANNA's +0.1%) the steps are then
    fine where it matters. Rounding can overshoot the real budget by a few steps; the real size is
    checked and the grid budget tightened until the solution fits. Exact (``Solution.exact``) when
    every size difference is a multiple of the step. Cost: ``n * resolution * options²`` operations.
    """
    floor = problem.smallest_size()
    if budget < floor - 1e-9:
        raise Infeasible(f"budget {budget:.6g} is below the smallest configuration ({floor:.6g})")
    extra = [s - s.min() for s in problem.size]
    slack = budget - floor
    if unit is None:
        largest = sum(float(e.max()) for e in extra)
        unit = max(min(slack, largest), 1e-12) / resolution
    grid = [np.rint(e / unit).astype(np.int64) for e in extra]
    exact = all(np.allclose(g * unit, e, rtol=0, atol=1e-9 * max(1.0, unit)) for g, e in zip(grid, extra))
    cap = int(math.floor(slack / unit + 1e-9))
    for _ in range(8):
        choice = _chain_dp(problem, grid, cap)
        if choice is None:
            break
        over = problem.total_size(choice) - budget
        if over <= 1e-9:
            notes = [] if exact else [f"size differences rounded to a {unit:.6g}-unit grid"]
            if problem.extra_pairs:
                notes.append("the DP ignores non-consecutive interactions; cost counts them (see local_search)")
            return Solution(choice, problem.cost(choice), problem.total_size(choice), "dp", exact, notes)
        cap -= max(1, int(math.ceil(over / unit)))  # rounding overshot the real budget: tighten and re-solve
        if cap < 0:
            break
    raise Infeasible(f"no configuration found within {budget:.6g} on the grid; raise the resolution")


def _chain_dp(problem: Problem, grid: list[np.ndarray], cap: int) -> list[int] | None:
    """The DP proper on integer sizes ``grid`` and capacity ``cap``; the best choice, or None."""
    inf = math.inf
    # best[b, j]: least cost of modules 0..i using exactly b grid units, module i on option j
    best = np.full((cap + 1, len(problem.unary[0])), inf)
    for j, (u, g) in enumerate(zip(problem.unary[0], grid[0])):
        if g <= cap:
            best[g, j] = min(best[g, j], u)
    back: list[np.ndarray] = []  # back[i][b, k]: option of module i behind module i+1's (b, k)
    for i in range(1, problem.n):
        options = len(problem.unary[i])
        new = np.full((cap + 1, options), inf)
        arg = np.zeros((cap + 1, options), dtype=np.int64)
        for k in range(options):
            g = int(grid[i][k])
            if g > cap:
                continue
            # came from b - g with module i-1 on option j: best[b - g, j] + pair[j, k]
            through = best[: cap + 1 - g] + problem.pair[i - 1][:, k][None, :]
            j_best = through.argmin(axis=1)
            new[g:, k] = through[np.arange(len(j_best)), j_best] + problem.unary[i][k]
            arg[g:, k] = j_best
        best = new
        back.append(arg)
    flat = int(np.argmin(best))
    b, k = divmod(flat, best.shape[1])
    if not math.isfinite(best[b, k]):
        return None
    choice = [k]
    for i in range(problem.n - 1, 0, -1):
        j = int(back[i - 1][b, k])
        b -= int(grid[i][k])
        k = j
        choice.append(k)
    choice.reverse()
    return choice


def brute_force(problem: Problem, budget: float) -> Solution:
    """Every configuration (for tests: the options' product must stay small)."""
    count = math.prod(len(u) for u in problem.unary)
    if count > 2_000_000:
        raise ValueError(f"{count} configurations: too many to enumerate")
    best: Solution | None = None
    for choice in itertools.product(*(range(len(u)) for u in problem.unary)):
        size = problem.total_size(list(choice))
        if size > budget + 1e-9:
            continue
        cost = problem.cost(list(choice))
        if best is None or cost < best.cost - 1e-12:
            best = Solution(list(choice), cost, size, "brute-force")
    if best is None:
        raise Infeasible(f"no configuration fits {budget:.6g}")
    return best


def greedy(problem: Problem, budget: float) -> Solution:
    """AIMET AMP's idea as a baseline: start from every module's cheapest-cost option and, while over
    budget, make the change that saves the most size per unit of cost added (unary terms only).

    Greedy on a ratio is not optimal for a knapsack: a test builds a case where it loses to the DP.
    """
    if budget < problem.smallest_size() - 1e-9:
        raise Infeasible(f"budget {budget:.6g} is below the smallest configuration ({problem.smallest_size():.6g})")
    choice = [min(range(len(u)), key=lambda j, u=u, s=s: (u[j], s[j])) for u, s in zip(problem.unary, problem.size)]
    while problem.total_size(choice) > budget + 1e-9:
        best_ratio, best_move = math.inf, None
        for i, j in enumerate(choice):
            for k in range(len(problem.unary[i])):
                saved = problem.size[i][j] - problem.size[i][k]
                if saved <= 0:
                    continue
                ratio = (problem.unary[i][k] - problem.unary[i][j]) / saved
                if ratio < best_ratio:
                    best_ratio, best_move = ratio, (i, k)
        i, k = best_move
        choice[i] = k
    return Solution(choice, problem.cost(choice), problem.total_size(choice), "greedy")


def local_search(problem: Problem, budget: float, start: Solution, max_rounds: int = 50) -> Solution:
    """Best-improvement moves from ``start`` under the full objective (every pair term).

    Moves: one module to another option, or two modules at once where one of them has a
    non-consecutive interaction (the terms the chain DP cannot see; a budget-neutral swap needs two
    changes). Used to report the DP's gap where the objective is not a chain.
    """
    coupled = sorted({i for pair in problem.extra_pairs for i in pair})
    choice, cost = list(start.choice), problem.cost(start.choice)

    def moves(current: list[int]):
        for i in range(problem.n):
            for k in range(len(problem.unary[i])):
                if k != current[i]:
                    yield {i: k}
        for i in coupled:
            for other in range(problem.n):
                if other == i:
                    continue
                for k in range(len(problem.unary[i])):
                    for m in range(len(problem.unary[other])):
                        if k != current[i] and m != current[other]:
                            yield {i: k, other: m}

    for _ in range(max_rounds):
        best_trial, best_cost = None, cost
        for move in moves(choice):
            trial = [move.get(i, j) for i, j in enumerate(choice)]
            if problem.total_size(trial) <= budget + 1e-9 and (c := problem.cost(trial)) < best_cost - 1e-12:
                best_trial, best_cost = trial, c
        if best_trial is None:
            break
        choice, cost = best_trial, best_cost
    return Solution(choice, cost, problem.total_size(choice), f"{start.method}+local-search", start.exact,
                    list(start.notes))
