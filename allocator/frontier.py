"""Budget sweeps for a Pareto plot: one set of tables, one solve per budget value, warm starts.

The tie contraction is done once; values are solved in increasing order so every previous plan
is a feasible warm start for the next (``start=`` for ``highs``/``ilp``) and the previous
multipliers seed the next Lagrangian (``lam0=`` for ``lagrange``/``auto``).

Example:
    >>> sols = frontier(problem, "size", np.linspace(2e6, 8e6, 20))
    >>> [(s.totals["size"], s.objective) for s in sols if s is not None]
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from .errors import InfeasibleBudgetError

from .problem import Problem, Solution
from .registry import SOLVERS, available

__all__ = ["frontier"]

_WARM = {"lagrange": "lam0", "auto": "lam0", "highs": "start", "ilp": "start"}


def frontier(problem: Problem, budget_name: str, values, method: str = "auto",
             skip_infeasible: bool = True, **opts) -> list[Solution | None]:
    """Solve ``problem`` once per value of budget ``budget_name``; results in the order of ``values``.

    Infeasible values give ``None`` (or raise InfeasibleBudgetError with ``skip_infeasible=False``).
    ``opts`` go to the solver (e.g. ``time_limit``).
    """
    if method not in SOLVERS:
        raise ValueError(f"unknown solver {method!r}; known: {available()}")
    if budget_name not in problem.budgets:
        raise ValueError(f"budget {budget_name!r} is not one of {sorted(problem.budgets)}")
    vals = np.asarray(values, dtype=np.float64).ravel()
    if vals.size == 0 or not np.all(np.isfinite(vals)):
        raise ValueError(f"values must be a non-empty sequence of finite numbers, got {values!r}")
    red, row_of = problem.reduced()                              # contract ties once
    smallest = red.smallest_feasible()
    out: list[Solution | None] = [None] * len(vals)
    warm = None
    for i in np.argsort(vals, kind="stable"):
        v = float(vals[i])
        sub = red.with_budgets(**{budget_name: v})                 # same tables, new cap
        full = problem.with_budgets(**{budget_name: v})
        t0 = time.perf_counter()
        try:
            sub.check_budgets()
            kw = dict(opts)
            if warm is not None and method in _WARM:
                kw[_WARM[method]] = warm[_WARM[method]]
            sol = SOLVERS[method](sub, **kw)
        except InfeasibleBudgetError as e:
            if not skip_infeasible:
                raise InfeasibleBudgetError(f"{budget_name} = {v:.10g}: {e}", e.smallest or smallest) from e
            continue
        choice = np.asarray(sol.choice)[row_of]                  # (L,) expand tie groups
        bad = full.violations(choice)
        if bad:
            raise RuntimeError(f"solver {method!r} returned an infeasible plan at {budget_name}={v}: {bad[:3]}")
        obj, totals = full.evaluate(choice)
        info = {**sol.info, "frontier_value": v, "warm": warm is not None}
        out[i] = dataclasses.replace(sol, choice=choice, objective=obj, bound=min(sol.bound, obj),
                                     totals=totals, info=info,
                                     seconds=sol.seconds or time.perf_counter() - t0)
        warm = {"start": np.asarray(sol.choice), "lam0": sol.info.get("lambda")}
    return out
