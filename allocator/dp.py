"""Exact dynamic program for ONE budget over a discretised budget axis, with a proven bound.

The budget's free part F = budget − Σ_r min_b cost[r,b] is cut into C bins of width u = F / C
(u = 1 when every shifted cost is an integer — or a multiple of their gcd g, then u = g — and
F / u <= max_bins: then the DP is exact). Two DPs share the same recursion

    V_r(c) = min_b  V_{r-1}(c − w[r,b]) + loss[r,b]       (c = 0..C bins)

* costs rounded UP   (w = ceil(cost / u)): every plan it returns is truly feasible (upper plan);
* costs rounded DOWN (w = floor(cost / u)): every truly feasible plan fits, so its optimum is a
  proven lower bound.
Worst-case error: rounding up adds < u per row, so the returned plan is at least as good as the
true optimum for the budget reduced by R·u = (R / C)·F, i.e. the error is at most
OPT(budget − R·F/C) − OPT(budget); the floor-DP bound makes the actual gap explicit and the status
is "optimal" only when the two meet. Exact (gap 0) with integer costs and F <= max_bins.
Cost: R·C·B additions (time) and R·C bytes of back-pointers (memory) — small R, or as a bound.

Example:
    >>> s = solve(Problem(loss, {"size": size_bytes}, {"size": 4e6}), method="dp", max_bins=200_000)
    >>> s.info["bin_width"], s.info["exact"]
"""
from __future__ import annotations

import math
import time

import numpy as np

from .errors import InfeasibleBudgetError

from .problem import Problem, Solution
from .common import Tables, finish
from .greedy import improve
from .registry import register

__all__ = ["solve", "MAX_CELLS"]

MAX_CELLS = 200_000_000       # R · (C+1) back-pointer bytes allowed (int8), ~200 MB


def _grid(w: np.ndarray, free: float, max_bins: int) -> tuple[float, bool]:
    """Bin width u and whether the grid is exact (every shifted cost a multiple of u)."""
    finite = w[np.isfinite(w)]
    if np.all(finite == np.round(finite)) and finite.max(initial=0) < 2 ** 53:
        g = int(np.gcd.reduce(finite.astype(np.int64))) if finite.any() else 1
        g = max(g, 1)
        if math.floor(free / g) <= max_bins:
            return float(g), True
    return (free / max_bins if free > 0 else 1.0), False


def _dp(loss: np.ndarray, w: np.ndarray, C: int):
    """Min Σ loss s.t. Σ w <= C; loss (R, B) with +inf for disallowed, w (R, B) int bins.

    Returns (value, choice (R,)) or (inf, None).
    """
    R, B = loss.shape
    V = np.zeros(C + 1)                                   # V(c): best loss with Σ w <= c
    back = np.zeros((R, C + 1), dtype=np.int8 if B <= 127 else np.int16)   # (R, C+1) option chosen
    cand = np.empty(C + 1)
    for r in range(R):
        new = np.full(C + 1, np.inf)
        for b in range(B):
            wb = int(w[r, b])
            if not np.isfinite(loss[r, b]) or wb > C:
                continue
            cand[:wb] = np.inf
            np.add(V[:C + 1 - wb], loss[r, b], out=cand[wb:])
            better = cand < new
            np.copyto(new, cand, where=better)
            back[r][better] = b
        V = new
    if not np.isfinite(V[C]):
        return math.inf, None
    choice = np.empty(R, dtype=np.int64)
    c = C
    for r in range(R - 1, -1, -1):
        b = int(back[r, c])
        choice[r] = b
        c -= int(w[r, b])
    return float(V[C]), choice


@register("dp")
def solve(problem: Problem, max_bins: int = 100_000, bound: bool = True, **_) -> Solution:
    """Exact DP for one budget (see module docstring for the grid and its error bound).

    Example: ``solve(Problem(loss, {"size": size}, {"size": 4e6}), method="dp", max_bins=50_000)``
    """
    t0 = time.perf_counter()
    if len(problem.budgets) != 1:
        raise ValueError(f"dp handles exactly one budget, got {sorted(problem.budgets)}; "
                         "use method='highs', 'ilp' or 'lagrange' for several")
    if not isinstance(max_bins, int) or max_bins < 1:
        raise ValueError(f"max_bins must be a positive int, got {max_bins!r}")
    red, row_of = problem.reduced()
    (name, cap), = red.budgets.items()
    R, B = red.shape
    if R * (max_bins + 1) > MAX_CELLS:
        max_bins = max(1, MAX_CELLS // R - 1)             # memory cap on back-pointers
    loss = np.where(red.allowed, red.loss, np.inf)        # (R, B)
    cost = np.where(red.allowed, red.costs[name], np.inf)
    cmin = cost.min(1)                                    # (R,)
    w = cost - cmin[:, None]                              # (R, B) shifted cost, inf if disallowed
    free = cap - float(cmin.sum())
    u, exact = _grid(w, max(free, 0.0), max_bins)
    C = int(math.floor(max(free, 0.0) / u + 1e-9 * exact))
    w_up = np.where(np.isfinite(w), np.ceil(w / u - 1e-12 * exact), C + 1)    # bins, >= true
    build_s = time.perf_counter() - t0
    val, choice = _dp(loss, w_up, C)
    if choice is None:
        raise InfeasibleBudgetError(f"budget {name!r} = {cap:.10g} is infeasible",
                                    problem.smallest_feasible())
    info = {"bin_width": u, "bins": C, "exact": exact, "budget": name, "build_s": build_s}
    lower = -math.inf
    if exact:
        lower = val
    elif bound:
        w_dn = np.where(np.isfinite(w), np.floor(w / u), C + 1)
        lower, _ = _dp(loss, w_dn, C)
        info["bound_dp"] = "floor"
    info["worst_case_budget_shortfall"] = 0.0 if exact else R * u   # cost units (see docstring)
    if not exact:                                         # spend the slack the rounding left
        t = Tables.of(red)
        choice = improve(t, choice)
    return finish(problem, row_of, choice, lower, "dp", t0, info)
