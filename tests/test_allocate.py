"""The budget solver (quant/allocate.py) against brute force on small multiple-choice knapsacks."""

from __future__ import annotations

import itertools
import random

import pytest

from dfq_onnx.quant import allocate
from dfq_onnx.quant.allocate import Option


def _brute(groups, budget):
    best = None
    for choice in itertools.product(*[range(len(g)) for g in groups]):
        cost = sum(g[c].cost for g, c in zip(groups, choice))
        if cost <= budget:
            loss = sum(g[c].loss for g, c in zip(groups, choice))
            best = loss if best is None else min(best, loss)
    return best


def _instance(rng: random.Random, sites: int):
    """Sites with format-like options: more bits cost more and usually lose less, with noise that
    leaves some options dominated and some hulls non-convex."""
    groups = []
    for _ in range(sites):
        size = rng.choice([64, 128, 256])
        scale = rng.uniform(0.1, 3.0)
        groups.append([Option(size * (b + rng.choice([0.25, 0.5, 1.06])), scale * 2.0 ** (-b) * rng.uniform(0.6, 1.6)) for b in (2, 3, 4, 8)])
    return groups


@pytest.mark.parametrize("seed", range(40))
def test_solution_fits_and_is_within_its_bound_of_the_true_optimum(seed):
    rng = random.Random(seed)
    groups = _instance(rng, rng.randint(2, 6))
    cheapest = sum(min(o.cost for o in g) for g in groups)
    dearest = sum(max(o.cost for o in g) for g in groups)
    budget = rng.uniform(cheapest, dearest)
    found = allocate.solve(groups, budget)
    optimum = _brute(groups, budget)
    assert found.cost <= budget
    assert found.cost == pytest.approx(sum(g[c].cost for g, c in zip(groups, found.choice)))
    assert found.loss == pytest.approx(sum(g[c].loss for g, c in zip(groups, found.choice)))
    # The relaxation bounds every feasible allocation from below, the optimum included.
    assert found.bound <= optimum + 1e-12
    assert optimum - 1e-12 <= found.loss <= found.bound + found.gap + 1e-12


@pytest.mark.parametrize("seed", range(10))
def test_gap_is_at_most_one_sites_step(seed):
    """The guarantee of rounding the relaxation: above the optimum by at most the loss one site's
    fractional step saves, so with many sites the answer is close to the optimum relative to the total."""
    rng = random.Random(100 + seed)
    groups = _instance(rng, 150)
    budget = rng.uniform(sum(min(o.cost for o in g) for g in groups), sum(max(o.cost for o in g) for g in groups))
    found = allocate.solve(groups, budget)
    widest = max(max(o.loss for o in g) - min(o.loss for o in g) for g in groups)
    assert found.cost <= budget
    assert found.gap <= widest
    assert found.gap <= 0.02 * found.loss


def test_generous_budget_takes_every_least_loss_option_and_tight_one_the_cheapest():
    groups = _instance(random.Random(7), 6)
    rich = allocate.solve(groups, 1e12)
    assert rich.choice == [min(range(len(g)), key=lambda i: g[i].loss) for g in groups]
    tight_budget = sum(min(o.cost for o in g) for g in groups)
    tight = allocate.solve(groups, tight_budget)
    assert tight.cost <= tight_budget
    assert tight.choice == [min(range(len(g)), key=lambda i: (g[i].cost, g[i].loss)) for g in groups]


def test_budget_below_the_cheapest_mix_is_refused():
    groups = [[Option(10, 1.0), Option(20, 0.5)], [Option(5, 2.0)]]
    with pytest.raises(allocate.Infeasible) as err:
        allocate.solve(groups, 14)
    assert err.value.cheapest == 15


def test_hull_drops_dominated_and_non_convex_options():
    options = [Option(1, 10), Option(2, 9.9), Option(3, 4), Option(4, 5), Option(5, 1)]
    # (2, 9.9) lies above the segment (1, 10)-(3, 4); (4, 5) is dominated by (3, 4).
    assert allocate.hull(options) == [0, 2, 4]
