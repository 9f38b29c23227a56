"""Exact multiple-choice knapsack as a 0/1 ILP with PuLP + CBC.

Model (PuLP example order: data -> variables -> objective -> named constraints -> solve -> read back):
    x[l,b] ∈ {0,1} for allowed (l, b);  min Σ loss'[l,b] x[l,b]
    one_option_{l}:  Σ_b x[l,b] = 1
    budget_{k}:      Σ cost_k[l,b] x[l,b] <= budget_k
    tie_{g}_{l}_{b}: x[l,b] = x[g0,b]           (ties as equality constraints)

The loss is shifted per row (a constant) and scaled so the spread of the objective is ~1e6: with
tiny raw losses CBC's absolute tolerances return "optimal" plans that are not (../shared/SOLVERS.md).
The status is read from CBC's own log — PuLP maps a time-limit stop to "Optimal" — and the objective
is recomputed from the tables; ``bound`` is CBC's proven lower bound, mapped back to loss units.
"""
from __future__ import annotations

import math
import os
import re
import tempfile
import time

import numpy as np

from bitplan.errors import InfeasibleBudgetError

from .problem import Problem, Solution
from .registry import register

OBJ_SPREAD = 1e6        # target range of the scaled objective


def scale_loss(problem: Problem) -> tuple[np.ndarray, float, float]:
    """(scaled loss (L,B), offset, factor) with loss = scaled / factor + offset summed over rows."""
    masked = np.where(problem.allowed, problem.loss, np.inf)
    row_min = masked.min(1)                                            # (L,)
    spread = float(np.where(problem.allowed, problem.loss - row_min[:, None], 0).max(1).sum())
    factor = OBJ_SPREAD / spread if spread > 0 else 1.0
    return (problem.loss - row_min[:, None]) * factor, float(row_min.sum()), factor


def _parse_cbc_log(text: str) -> tuple[str, float | None]:
    """('optimal'|'time'|'infeasible'|'unknown', lower bound in scaled units or None)."""
    if "Result - Optimal solution found" in text:
        return "optimal", None
    if "Result - Problem proven infeasible" in text or "Problem is infeasible" in text:
        return "infeasible", None
    m = re.search(r"Lower bound:\s*([-+0-9.eE]+)", text)
    bound = float(m.group(1)) if m else None
    if "Stopped on time" in text or "Result - Stopped" in text:
        return "time", bound
    return "unknown", bound


@register("ilp")
def solve(problem: Problem, time_limit: float | None = 120.0, threads: int | None = None,
          msg: bool = False) -> Solution:
    """Solve exactly with CBC; status "optimal" only when CBC's log proves it.

    Example: ``solve(Problem(loss, {"size": size}, {"size": 4e6}), method="ilp", time_limit=30)``
    """
    import pulp

    t0 = time.perf_counter()
    L, B = problem.shape
    scaled, offset, factor = scale_loss(problem)
    # variables
    prob = pulp.LpProblem("bit_allocation", pulp.LpMinimize)
    cells = [(l, b) for l in range(L) for b in range(B) if problem.allowed[l, b]]
    x = {(l, b): pulp.LpVariable(f"x_{l}_{b}", cat=pulp.LpBinary) for l, b in cells}
    by_row: dict[int, list[int]] = {}
    for l, b in cells:
        by_row.setdefault(l, []).append(b)
    # objective
    prob += pulp.LpAffineExpression([(x[l, b], float(scaled[l, b])) for l, b in cells]), "loss"
    # named constraints
    for l, bs in by_row.items():
        prob += pulp.lpSum(x[l, b] for b in bs) == 1, f"one_option_{l}"
    for k, cap in problem.budgets.items():
        c = problem.costs[k]
        prob += pulp.LpAffineExpression([(x[l, b], float(c[l, b])) for l, b in cells]) <= cap, \
            f"budget_{k}"
    for gi, g in enumerate(problem.tie_groups()):
        for l in g[1:]:
            for b in by_row[g[0]]:
                prob += (x[l, b] if (l, b) in x else 0) == x[g[0], b], f"tie_{gi}_{l}_{b}"
    build_s = time.perf_counter() - t0
    # solve
    fd, log_path = tempfile.mkstemp(suffix=".log", prefix="bitplan_cbc_")
    os.close(fd)
    try:
        solver = pulp.PULP_CBC_CMD(msg=msg, timeLimit=time_limit, threads=threads, logPath=log_path,
                                   gapRel=0.0, gapAbs=0.0)
        prob.solve(solver)
        with open(log_path) as f:
            log = f.read()
    finally:
        os.unlink(log_path)
    cbc_status, cbc_bound = _parse_cbc_log(log)
    if cbc_status == "infeasible" or pulp.LpStatus[prob.status] == "Infeasible":
        raise InfeasibleBudgetError(
            "no plan meets all budgets together (CBC proved infeasibility); each budget's smallest "
            f"feasible value on its own: {problem.smallest_feasible()}", problem.smallest_feasible())
    # read back
    choice = np.full(L, -1, dtype=np.int64)
    for (l, b), v in x.items():
        if v.varValue is not None and v.varValue > 0.5:
            choice[l] = b
    if (choice < 0).any():
        raise RuntimeError(f"CBC returned no complete plan (status {pulp.LpStatus[prob.status]}, "
                           f"log status {cbc_status})")
    obj, totals = problem.evaluate(choice)
    if cbc_status == "optimal":
        bound, status = obj, "optimal"
    else:
        bound = cbc_bound / factor + offset if cbc_bound is not None else -math.inf
        status = "optimal" if bound >= obj - 1e-9 * max(1.0, abs(obj)) else "feasible"
    return Solution(choice, obj, bound, status, "ilp", time.perf_counter() - t0, totals,
                    {"build_s": build_s, "cbc_status": cbc_status, "scale": factor})
