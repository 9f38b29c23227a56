"""Exhaustive search: the ground truth for tests (tiny problems only, B**L candidates)."""
from __future__ import annotations

import itertools
import time

import numpy as np

from bitplan.errors import InfeasibleBudgetError

from .problem import Problem, Solution
from .registry import register

MAX_CANDIDATES = 2_000_000


@register("bruteforce")
def solve(problem: Problem, **_) -> Solution:
    """Enumerate every choice of the tie-reduced problem; exact, for L*B tiny.

    Example: ``solve(Problem(loss, costs, budgets), method="bruteforce")``
    """
    t0 = time.perf_counter()
    red, row_of = problem.reduced()
    opts = [np.flatnonzero(a) for a in red.allowed]
    n = int(np.prod([len(o) for o in opts], dtype=np.float64))
    if n > MAX_CANDIDATES:
        raise ValueError(f"bruteforce would enumerate {n} plans (> {MAX_CANDIDATES}); use another solver")
    best, best_c = np.inf, None
    rows = np.arange(len(opts))
    for c in itertools.product(*opts):
        c = np.array(c)
        if all(red.costs[k][rows, c].sum() <= cap for k, cap in red.budgets.items()):
            v = red.loss[rows, c].sum()
            if v < best:
                best, best_c = v, c
    if best_c is None:
        raise InfeasibleBudgetError("no plan meets all budgets together", problem.smallest_feasible())
    choice = best_c[row_of]
    obj, totals = problem.evaluate(choice)
    return Solution(choice, obj, obj, "optimal", "bruteforce", time.perf_counter() - t0, totals)
