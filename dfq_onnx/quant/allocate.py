"""Choosing one format per site under a size budget: a multiple-choice knapsack.

Each site (a group) offers options (cost in stored bits, estimated loss); exactly one option per
site is taken, the total cost must stay within the budget, the total loss is minimised.

Solved through its Lagrangian relaxation: on each site's lower convex hull of (cost, loss) the
upgrades from the cheapest option are taken in order of loss saved per bit, across all sites at
once, while they fit. The relaxation (the same greedy order, the first upgrade that does not fit
taken fractionally) is a lower bound on the optimum, so the answer carries its own guarantee:
optimum <= loss <= bound + gap. After the hull, every other option of every site is tried as a
single swap that fits and lowers the loss (closes part of the gap that integrality leaves).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Option:
    cost: float  # stored bits
    loss: float  # estimated loss (any additive unit)


@dataclasses.dataclass
class Allocation:
    choice: list[int]  # per group, the index of its chosen option
    cost: float
    loss: float
    bound: float  # the Lagrangian relaxation's loss: no allocation within the budget is below it

    @property
    def gap(self) -> float:
        """How far above the optimum the answer can be, at most."""
        return max(self.loss - self.bound, 0.0)


class Infeasible(ValueError):
    """Even the cheapest option of every group exceeds the budget."""

    def __init__(self, cheapest: float, budget: float):
        super().__init__(f"the cheapest options cost {cheapest:.0f} bits, over the budget of {budget:.0f}")
        self.cheapest, self.budget = cheapest, budget


def hull(options: list[Option]) -> list[int]:
    """Indices of the options on the lower convex hull of (cost, loss), by increasing cost: each
    step to the next costs more, saves loss, and saves less per bit than the step before."""
    order = sorted(range(len(options)), key=lambda i: (options[i].cost, options[i].loss))
    kept: list[int] = []
    for i in order:
        if kept and options[i].loss >= options[kept[-1]].loss:
            continue  # dominated: costs at least as much, loses at least as much
        while len(kept) >= 2 and _not_convex(options[kept[-2]], options[kept[-1]], options[i]):
            kept.pop()
        kept.append(i)
    return kept


def _not_convex(a: Option, b: Option, c: Option) -> bool:
    """Whether b lies on or above the segment from a to c (the step a->b saves no more per bit than b->c)."""
    return (b.loss - a.loss) * (c.cost - a.cost) >= (c.loss - a.loss) * (b.cost - a.cost)


def solve(groups: list[list[Option]], budget: float) -> Allocation:
    """The allocation of least estimated loss whose cost stays within `budget` (see the module's
    docstring for the method and the bound it reports)."""
    hulls = [hull(g) for g in groups]
    choice = [h[0] for h in hulls]
    cost = sum(g[c].cost for g, c in zip(groups, choice))
    if cost > budget:
        raise Infeasible(cost, budget)
    steps = []  # (saving per bit, group, position on its hull)
    for gi, h in enumerate(hulls):
        for pos in range(1, len(h)):
            a, b = groups[gi][h[pos - 1]], groups[gi][h[pos]]
            steps.append(((a.loss - b.loss) / (b.cost - a.cost), gi, pos))
    steps.sort(key=lambda s: (-s[0], s[1], s[2]))
    position = [0] * len(groups)
    bound = None
    for rate, gi, pos in steps:
        if position[gi] != pos - 1:
            continue  # an earlier step of this group did not fit: its later ones cannot follow
        nxt = groups[gi][hulls[gi][pos]]
        extra = nxt.cost - groups[gi][choice[gi]].cost
        if cost + extra > budget:
            if bound is None:  # the relaxation takes this step fractionally, then stops
                bound = _loss(groups, choice) - rate * (budget - cost)
            continue
        choice[gi], cost, position[gi] = hulls[gi][pos], cost + extra, pos
    loss = _loss(groups, choice)
    bound = loss if bound is None else bound
    choice, cost, loss = _improve(groups, choice, cost, loss, budget)
    return Allocation(choice, cost, loss, min(bound, loss))


def _improve(groups: list[list[Option]], choice: list[int], cost: float, loss: float, budget: float):
    """Single swaps (any option of one group) that fit and lower the loss, best first, until none does."""
    while True:
        best = None
        for gi, g in enumerate(groups):
            now = g[choice[gi]]
            for oi, o in enumerate(g):
                if cost - now.cost + o.cost <= budget and o.loss < now.loss:
                    gain = now.loss - o.loss
                    if best is None or gain > best[0]:
                        best = (gain, gi, oi)
        if best is None:
            return choice, cost, _loss(groups, choice)
        _, gi, oi = best
        cost += groups[gi][oi].cost - groups[gi][choice[gi]].cost
        loss -= best[0]
        choice[gi] = oi


def _loss(groups: list[list[Option]], choice: list[int]) -> float:
    return sum(g[c].loss for g, c in zip(groups, choice))
