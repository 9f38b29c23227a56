"""Default solver: Lagrangian first, exact HiGHS (time-limited, warm-started) when the size allows.

Policy (measured in ../shared/SOLVERS.md and benchmarks/solver_scaling.py):
1. ``lagrange`` always runs first (milliseconds to seconds up to 10^6 groups). If its dual bound
   already proves the plan optimal — or within ``gap_tol`` — that plan is returned.
2. Otherwise, if the MILP has at most ``exact_cells`` columns (allowed row × option cells after
   contracting ties), HiGHS runs on the same normalised tables for the rest of ``time_limit``,
   warm-started with the Lagrangian plan, on the cells that reduced-cost fixing keeps; the better
   plan and the larger bound are kept.
3. Otherwise the Lagrangian plan is returned with its proven gap.
``Solution.method`` names the solver whose plan is returned ("lagrange" or "highs");
``info["auto"]`` says what ran, for how long, and why.

Example:
    >>> s = solve(problem)                      # method="auto" is the default
    >>> s.method, s.info["auto"]["ran"], s.gap
    ('highs', ['lagrange', 'highs'], 0.0)
"""
from __future__ import annotations

import math
import time

import numpy as np

from .errors import InfeasibleBudgetError

from .common import OPT_RTOL, Tables, finish, proven
from .greedy import improve, repair
from .lagrange import lagrangian
from .problem import Problem, Solution
from .registry import register

__all__ = ["solve", "EXACT_CELLS"]

EXACT_CELLS = 300_000       # MILP columns up to which HiGHS is tried (≈ 50k rows × 6 options)


@register("auto")
def solve(problem: Problem, time_limit: float | None = 30.0, exact_cells: int = EXACT_CELLS,
          gap_tol: float = OPT_RTOL, lam0=None, threads: int | None = None, **_) -> Solution:
    """Pick the solver by size; see the module docstring.

    Example: ``solve(Problem(loss, costs, budgets), method="auto", time_limit=10)``
    """
    from . import highs

    t0 = time.perf_counter()
    red, row_of = problem.reduced()
    t = Tables.of(red)
    build_s = time.perf_counter() - t0
    lam_n = None if lam0 is None else np.asarray(lam0, float) * t.cost_scale / t.spread
    lr = lagrangian(t, None if time_limit is None else 0.5 * time_limit, lam0=lam_n)
    lam_raw = (lr.lam / t.cost_scale * t.spread).tolist()
    cells = int(t.allowed.sum())
    log = {"ran": ["lagrange"], "lagrange_s": lr.seconds, "cells": cells,
           "lagrange_gap": (lr.objective - lr.bound) * t.spread / max(abs(t.to_loss(lr.objective)), 1e-300)}
    info = {"auto": log, "lambda": lam_raw, "iterations": lr.evals, "build_s": build_s}
    obj_l, bnd_l = t.to_loss(lr.objective), t.to_loss(lr.bound)
    if lr.choice is not None and (proven(obj_l, bnd_l, t.spread) or proven(obj_l, bnd_l, t.spread, gap_tol)):
        log["reason"] = "Lagrangian bound closes the gap"
        return finish(problem, row_of, lr.choice, bnd_l, "lagrange", t0, info, t.spread)
    left = math.inf if time_limit is None else time_limit - (time.perf_counter() - t0)
    if lr.choice is not None and (cells > exact_cells or left <= 0.05):
        log["reason"] = (f"{cells} MILP columns > exact_cells={exact_cells}" if cells > exact_cells
                         else "no time left for the exact solver")
        return finish(problem, row_of, lr.choice, bnd_l, "lagrange", t0, info, t.spread)
    mask = None if lr.choice is None else highs.prune(t, lr.lam, lr.bound, lr.objective)  # reduced-cost fixing
    ch, bound, res = highs.run(t, None if time_limit is None else left, lr.choice, threads, mask=mask)
    log["ran"].append("highs")
    info["build_s"] += res["build_s"]
    log["highs"] = res
    if res.get("infeasible"):       # cannot happen with a feasible warm start, but be explicit
        raise InfeasibleBudgetError("no plan meets all budgets together (HiGHS proved infeasibility)",
                                    problem.smallest_feasible())
    if ch is not None and not t.accepts(ch):
        ch = improve(t, repair(t, ch))
        res["repaired"] = True
    method = "highs"
    if lr.choice is not None and (ch is None or t.objective(lr.choice) <= t.objective(ch)):
        ch, method = lr.choice, ("lagrange" if ch is None else "highs")
    if ch is None:
        raise RuntimeError(f"no plan found within the time limit (HiGHS {res['highs_status']}, the "
                           "Lagrangian heuristic found none either); give a longer time_limit")
    log["reason"] = f"exact solver within time limit ({res['highs_status']})"
    return finish(problem, row_of, ch, t.to_loss(max(bound, lr.bound)), method, t0, info, t.spread)
