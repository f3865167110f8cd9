"""Mixed-precision bit allocation against brute force on small random instances."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from piecewise_quant.calibration.mixed_precision import Candidate, allocate, summarize

# (bits, grid, bits per weight): realistic storage costs (group 128, fp16 scales / zero points)
SCHEMES = [
    (2, "uniform", 2.25),
    (3, "uniform", 3.25),
    (3, "piecewise", 3.2),
    (4, "uniform", 4.25),
    (4, "piecewise", 4.2),
    (8, "uniform", 8.25),
]
TOL = 1e-12


def random_instance(seed: int, n_layers: int = 5):
    rng = random.Random(seed)
    candidates, n_weights = {}, {}
    for i in range(n_layers):
        schemes = rng.sample(SCHEMES, rng.randint(4, 6))
        sensitivity = rng.lognormvariate(0.0, 1.5)
        candidates[f"layers.{i}"] = [
            Candidate(b, g, bpw, sensitivity * 2.0 ** (-2 * b) * rng.uniform(0.5, 1.5)) for b, g, bpw in schemes
        ]
        n_weights[f"layers.{i}"] = rng.choice([1, 2, 4, 8]) * 4096
    return candidates, n_weights


def average_bits(choice, n_weights) -> float:
    return sum(n_weights[k] * c.bits_per_weight for k, c in choice.items()) / sum(n_weights[k] for k in choice)


def total_error(choice) -> float:
    return math.fsum(c.error for c in choice.values())


def brute_force(candidates, n_weights, budget) -> float:
    names = sorted(candidates)
    total_n = sum(n_weights[k] for k in names)
    best = math.inf
    for combo in itertools.product(*(candidates[k] for k in names)):
        cost = sum(n_weights[k] * c.bits_per_weight for k, c in zip(names, combo))
        if cost <= budget * total_n * (1 + TOL):
            best = min(best, math.fsum(c.error for c in combo))
    return best


def best_uniform(candidates, n_weights, budget) -> float:
    """The best single (bits, grid) for every layer that fits the budget."""
    keys = set.intersection(*({(c.bits, c.grid) for c in cs} for cs in candidates.values()))
    best = math.inf
    for key in keys:
        choice = {k: next(c for c in cs if (c.bits, c.grid) == key) for k, cs in candidates.items()}
        if average_bits(choice, n_weights) <= budget * (1 + TOL):
            best = min(best, total_error(choice))
    return best


def budget_range(candidates, n_weights):
    total_n = sum(n_weights.values())
    lo = sum(n_weights[k] * min(c.bits_per_weight for c in cs) for k, cs in candidates.items()) / total_n
    hi = sum(n_weights[k] * max(c.bits_per_weight for c in cs) for k, cs in candidates.items()) / total_n
    return lo, hi


def test_matches_brute_force_on_random_instances():
    gaps = []
    for seed in range(50):
        candidates, n_weights = random_instance(seed)
        lo, hi = budget_range(candidates, n_weights)
        for frac in (0.15, 0.4, 0.7):
            budget = lo + (hi - lo) * frac
            choice = allocate(candidates, n_weights, budget)
            assert sorted(choice) == sorted(candidates)
            assert all(choice[k] in candidates[k] for k in choice)
            assert average_bits(choice, n_weights) <= budget * (1 + TOL)
            err = total_error(choice)
            optimum = brute_force(candidates, n_weights, budget)
            assert err >= optimum * (1 - 1e-9)
            assert err <= best_uniform(candidates, n_weights, budget) * (1 + 1e-9)
            gaps.append(err / optimum - 1 if optimum > 0 else 0.0)
    within = sum(g <= 0.02 for g in gaps) / len(gaps)
    assert within >= 0.9, f"only {within:.0%} of allocations within 2% of the optimum (worst {max(gaps):.1%})"


def test_larger_budget_never_increases_error():
    for seed in range(20):
        candidates, n_weights = random_instance(100 + seed, n_layers=6)
        lo, hi = budget_range(candidates, n_weights)
        errors = [total_error(allocate(candidates, n_weights, lo + (hi - lo) * f / 20)) for f in range(21)]
        assert all(b <= a * (1 + 1e-12) for a, b in zip(errors, errors[1:])), errors


def test_generous_budget_takes_lowest_error_and_tight_budget_cheapest():
    candidates, n_weights = random_instance(7)
    lo, hi = budget_range(candidates, n_weights)
    best = allocate(candidates, n_weights, hi + 1.0)
    assert all(c.error == min(x.error for x in candidates[k]) for k, c in best.items())
    cheapest = allocate(candidates, n_weights, lo)
    assert all(c.bits_per_weight == min(x.bits_per_weight for x in candidates[k]) for k, c in cheapest.items())


def test_dominated_candidate_never_chosen_and_ties_prefer_fewer_bits():
    dominated = Candidate(8, "uniform", 8.25, 0.5)  # costlier and worse than the 4-bit one
    tie = Candidate(3, "uniform", 3.25, 0.1)  # same error as the 3-bit piecewise, more bits
    cands = {
        "a": [Candidate(2, "uniform", 2.25, 1.0), dominated, Candidate(4, "piecewise", 4.2, 0.1)],
        "b": [tie, Candidate(3, "piecewise", 3.2, 0.1)],
    }
    n = {"a": 100, "b": 100}
    for budget in (3.5, 6.0, 10.0):
        choice = allocate(cands, n, budget)
        assert choice["a"] is not dominated
        assert choice["b"].grid == "piecewise"


def test_deterministic_tie_between_layers():
    cands = {name: [Candidate(2, "uniform", 2.0, 1.0), Candidate(4, "uniform", 4.0, 0.5)] for name in ("b", "a")}
    n = {"a": 10, "b": 10}
    choice = allocate(cands, n, 3.0)  # room for one upgrade only; both are equally good
    assert (choice["a"].bits, choice["b"].bits) == (4, 2)
    assert allocate(cands, n, 3.0) == choice


def test_budget_exactly_at_an_allocation_holds_despite_rounding():
    cands = {f"l{i}": [Candidate(4, "uniform", 4.1, 1.0), Candidate(8, "uniform", 8.3, 0.0)] for i in range(7)}
    n = {f"l{i}": 3 + i for i in range(7)}
    choice = allocate(cands, n, 4.1)
    assert all(c.bits == 4 for c in choice.values())
    choice = allocate(cands, n, 8.3)
    assert all(c.bits == 8 for c in choice.values())


def test_infeasible_budget_names_the_minimum():
    candidates = {
        "x": [Candidate(3, "uniform", 3.25, 0.1), Candidate(4, "uniform", 4.25, 0.05)],
        "y": [Candidate(2, "uniform", 2.25, 0.2)],
    }
    n = {"x": 100, "y": 300}
    minimum = (100 * 3.25 + 300 * 2.25) / 400  # 2.5
    with pytest.raises(ValueError, match=r"smallest achievable average is 2\.5 .*Raise the budget to at least 2\.5"):
        allocate(candidates, n, 2.4)
    assert average_bits(allocate(candidates, n, minimum), n) == pytest.approx(minimum)


def test_summarize():
    candidates, n_weights = random_instance(3)
    choice = allocate(candidates, n_weights, 4.0)
    s = summarize(choice, n_weights)
    assert s["average_bits_per_weight"] == pytest.approx(average_bits(choice, n_weights))
    assert s["average_bits_per_weight"] <= 4.0 * (1 + TOL)
    assert s["total_weights"] == sum(n_weights.values())
    assert s["total_error"] == pytest.approx(total_error(choice))
    assert sum(s["counts"].values()) == len(choice)
    assert all(isinstance(b, int) and isinstance(g, str) for b, g in s["counts"])


GOOD = {"l": [Candidate(4, "uniform", 4.25, 0.1)]}


@pytest.mark.parametrize(
    "candidates, n_weights, budget, match",
    [
        ({}, {}, 4.0, "empty"),
        ({"l": []}, {"l": 10}, 4.0, "'l' has no candidate"),
        (GOOD, {}, 4.0, "n_weights has no entry for layer 'l'"),
        (GOOD, {"l": 0}, 4.0, r"n_weights\['l'\] must be a positive integer"),
        (GOOD, {"l": -5}, 4.0, r"n_weights\['l'\] must be a positive integer"),
        (GOOD, {"l": 1.5}, 4.0, r"n_weights\['l'\] must be a positive integer"),
        ({"l": [Candidate(4, "uniform", 4.25, float("nan"))]}, {"l": 10}, 4.0, "layer 'l', candidate 0: error"),
        ({"l": [Candidate(4, "uniform", 4.25, -0.1)]}, {"l": 10}, 4.0, "layer 'l', candidate 0: error"),
        ({"l": [Candidate(4, "uniform", float("nan"), 0.1)]}, {"l": 10}, 4.0, "bits_per_weight"),
        (GOOD, {"l": 10}, float("inf"), "budget must be a finite"),
        (GOOD, {"l": 10}, float("nan"), "budget must be a finite"),
        (GOOD, {"l": 10}, -1.0, "budget must be a positive"),
    ],
)
def test_bad_inputs_raise(candidates, n_weights, budget, match):
    with pytest.raises(ValueError, match=match):
        allocate(candidates, n_weights, budget)


def test_capped_frontier_still_fits_and_beats_uniform():
    candidates, n_weights = random_instance(11, n_layers=40)
    lo, hi = budget_range(candidates, n_weights)
    for frac in (0.2, 0.5):
        budget = lo + (hi - lo) * frac
        capped = allocate(candidates, n_weights, budget, max_states=4)
        assert average_bits(capped, n_weights) <= budget * (1 + TOL)
        assert total_error(capped) <= best_uniform(candidates, n_weights, budget) * (1 + 1e-9)
    with pytest.raises(ValueError, match="max_states"):
        allocate(candidates, n_weights, hi, max_states=0)
