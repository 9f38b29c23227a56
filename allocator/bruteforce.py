"""Exhaustive search: the ground truth for tests (tiny problems only, B**L candidates)."""
from __future__ import annotations

import time

import numpy as np

from .errors import InfeasibleBudgetError

from .problem import Problem, Solution
from .registry import register

MAX_CANDIDATES = 2_000_000
CHUNK = 100_000          # plans evaluated per numpy pass


@register("bruteforce")
def solve(problem: Problem, **_) -> Solution:
    """Enumerate every choice of the tie-reduced problem (vectorised in chunks); exact, for L*B tiny.

    A plan is feasible when every total <= its budget exactly (no tolerance). Ties between equal
    objectives go to the first plan in enumeration order.
    Example: ``solve(Problem(loss, costs, budgets), method="bruteforce")``
    """
    t0 = time.perf_counter()
    red, row_of = problem.reduced()
    opts = [np.flatnonzero(a) for a in red.allowed]
    sizes = tuple(len(o) for o in opts)
    n = int(np.prod(sizes, dtype=np.float64))
    if n > MAX_CANDIDATES:
        raise ValueError(f"bruteforce would enumerate {n} plans (> {MAX_CANDIDATES}); use another solver")
    R = len(opts)
    rows = np.arange(R)
    best, best_c = np.inf, None
    for lo in range(0, n, CHUNK):
        digits = np.unravel_index(np.arange(lo, min(n, lo + CHUNK)), sizes)       # R arrays (m,)
        c = np.stack([opts[r][digits[r]] for r in range(R)], axis=1)              # (m, R)
        ok = np.ones(len(c), bool)
        for k, cap in red.budgets.items():
            ok &= red.costs[k][rows, c].sum(1) <= cap
        if not ok.any():
            continue
        v = np.where(ok, red.loss[rows, c].sum(1), np.inf)
        i = int(v.argmin())
        if v[i] < best:
            best, best_c = float(v[i]), c[i]
    if best_c is None:
        raise InfeasibleBudgetError("no plan meets all budgets together", problem.smallest_feasible())
    choice = best_c[row_of]
    obj, totals = problem.evaluate(choice)
    return Solution(choice, obj, obj, "optimal", "bruteforce", time.perf_counter() - t0, totals)
