"""Hypothesis strategies for small random allocation problems (ties, fixed, ragged options)."""
from __future__ import annotations

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

from bitplan.allocator import Problem


@st.composite
def problems(draw, max_rows: int = 8, max_options: int = 5, budgets: tuple[int, int] = (1, 3),
             integer_costs: bool = True, extras: bool = True) -> Problem:
    """A random Problem, L <= max_rows, B <= max_options, budgets[0]..budgets[1] budgets.

    Costs are small integers (as bytes are) so exact solvers and brute force agree exactly;
    losses are drawn on a coarse grid so equal-objective plans occur. With ``extras``: tie groups,
    fixed choices and a ragged ``allowed`` mask. Budgets lie between each cost's minimum and
    maximum total, so the single-budget check passes but joint infeasibility can still happen.
    """
    L = draw(st.integers(1, max_rows))
    B = draw(st.integers(1, max_options))
    K = draw(st.integers(*budgets))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    loss = np.round(rng.random((L, B)) * 10, 1)                          # (L, B)
    costs = {}
    for k in range(K):
        c = rng.integers(0, 20, (L, B)).astype(float) if integer_costs else rng.random((L, B)) * 20
        costs[f"c{k}"] = c
    allowed, ties, fixed = None, [], {}
    if extras:
        allowed = rng.random((L, B)) > 0.25
        allowed[np.arange(L), rng.integers(0, B, L)] = True              # >= 1 option per row
        if L >= 2 and draw(st.booleans()):
            g = rng.choice(L, size=int(rng.integers(2, min(L, 3) + 1)), replace=False)
            ties.append(g.tolist())
        if draw(st.booleans()):
            r = int(rng.integers(0, L))
            fixed[r] = int(rng.choice(np.flatnonzero(allowed[r])))
    fr = draw(st.floats(0.0, 1.0))
    mask = np.ones((L, B), bool) if allowed is None else allowed
    budgets_ = {}
    for k, c in costs.items():
        m = np.where(mask, c, np.inf)
        lo, hi = m.min(1).sum(), np.where(mask, c, -np.inf).max(1).sum()
        budgets_[k] = float(np.floor(lo + fr * (hi - lo))) if integer_costs else float(lo + fr * (hi - lo))
    try:
        p = Problem(loss, costs, budgets_, ties, None, fixed, allowed)
        p.check_budgets()
    except ValueError:                                                   # conflicting ties/fixed
        assume(False)
    return p
