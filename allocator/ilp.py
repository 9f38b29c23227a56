"""Exact multiple-choice knapsack as a 0/1 ILP with PuLP + CBC.

Model (PuLP example order: data -> variables -> objective -> named constraints -> solve -> read back),
on the tie-contracted problem (``Problem.reduced()``: a tie group is one row; fixed and ragged
options are simply missing columns):
    x[r,b] ∈ {0,1} for allowed (r, b);  min Σ loss'[r,b] x[r,b]
    one_option_{r}:  Σ_b x[r,b] = 1
    budget_{k}:      Σ cost'_k[r,b] x[r,b] <= cap'_k

Tables are normalised (``common.Tables``): the loss is shifted per row and scaled so the objective
spans [0, 1e6] — with tiny raw losses CBC's absolute tolerances return "optimal" plans that are not
(../shared/SOLVERS.md) — and each budget row is shifted/scaled so its free part is 1.
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

from .errors import InfeasibleBudgetError

from .common import Tables, finish
from .greedy import improve, repair
from .lagrange import lagrangian
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
          msg: bool = False, start=None, warm_start: bool = True, **_) -> Solution:
    """Solve exactly with CBC; status "optimal" only when CBC's log (or the Lagrangian bound) proves it.

    ``start`` (L,) is a feasible plan handed to CBC as a warm start (``-mips``); by default the
    Lagrangian plan is used, and its dual bound backs up CBC's (``warm_start=False``: neither).
    Example: ``solve(Problem(loss, {"size": size}, {"size": 4e6}), method="ilp", time_limit=30)``
    """
    import pulp

    t0 = time.perf_counter()
    red, row_of = problem.reduced()                      # ties: one row per group
    t = Tables.of(red)                                   # objective spread 1e6, budgets' free part 1
    B, R = t.loss.shape
    cells = np.flatnonzero(t.allowed.T.ravel())          # (n,) allowed (r, b), r-major
    r_of, b_of = cells // B, cells % B
    row_start = np.searchsorted(r_of, np.arange(R + 1))  # (R+1,) first column of each row
    # variables
    prob = pulp.LpProblem("bit_allocation", pulp.LpMinimize)
    x = [pulp.LpVariable(f"x_{r}_{b}", cat=pulp.LpBinary) for r, b in zip(r_of.tolist(), b_of.tolist())]
    # objective
    prob += pulp.LpAffineExpression(zip(x, (t.loss[b_of, r_of] * OBJ_SPREAD).tolist())), "loss"
    # named constraints (expressions built from zip(vars, coefs): no per-term lpSum overhead)
    lo, hi = row_start[:-1].tolist(), row_start[1:].tolist()
    for r in range(R):
        prob += pulp.LpConstraint(pulp.LpAffineExpression((v, 1.0) for v in x[lo[r]:hi[r]]),
                                  pulp.LpConstraintEQ, f"one_option_{r}", 1.0)
    for k, name in enumerate(t.names):
        coef = t.cost[k, b_of, r_of]
        nz = np.flatnonzero(coef).tolist()
        expr = pulp.LpAffineExpression((x[j], c) for j, c in zip(nz, coef[nz].tolist()))
        prob += pulp.LpConstraint(expr, pulp.LpConstraintLE, f"budget_{name}", float(t.cap[k]))
    x0, lag_bound, lag_s = None, -math.inf, 0.0
    if start is not None:
        s0 = np.asarray(start, dtype=np.int64)
        if problem.violations(s0):
            raise ValueError(f"start plan is not feasible: {problem.violations(s0)[:3]}")
        x0 = np.zeros(R, dtype=np.int64)
        x0[row_of] = s0
    elif warm_start:
        lr = lagrangian(t, time_limit=None if time_limit is None else 0.25 * time_limit)
        x0, lag_bound, lag_s = lr.choice, lr.bound, lr.seconds
    if x0 is not None:
        for j, (r, b) in enumerate(zip(r_of.tolist(), b_of.tolist())):
            x[j].setInitialValue(1 if x0[r] == b else 0)
    build_s = time.perf_counter() - t0 - lag_s                       # PuLP model, not the warm start
    # solve
    fd, log_path = tempfile.mkstemp(suffix=".log", prefix="bitplan_cbc_")
    os.close(fd)
    try:
        solver = pulp.PULP_CBC_CMD(msg=msg, timeLimit=time_limit, threads=threads, logPath=log_path,
                                   gapRel=0.0, gapAbs=1e-6, warmStart=x0 is not None,
                                   options=["primalTolerance 1e-9", "integerTolerance 1e-9"])
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
    val = np.array([v.varValue if v.varValue is not None else -1.0 for v in x])
    if (val < 0).all():
        raise RuntimeError(f"CBC returned no plan (status {pulp.LpStatus[prob.status]}, "
                           f"log status {cbc_status}); use method='lagrange' or a longer time_limit")
    dense = np.full(R * B, -1.0)
    dense[cells] = val
    choice = dense.reshape(R, B).argmax(1)                           # (R,)
    info = {"build_s": build_s, "solve_s": time.perf_counter() - t0 - build_s, "lagrange_s": lag_s,
            "cbc_status": cbc_status, "columns": len(cells)}
    if not t.accepts(choice):                                      # tolerance slip: repair it
        choice, info["repaired"] = improve(t, repair(t, choice)), True
    if x0 is not None and t.objective(x0) < t.objective(choice):
        choice = x0
    if cbc_status == "optimal" and not info.get("repaired"):
        bound = t.objective(choice)                                  # CBC proved it (gap <= 1e-6/1e6)
    else:
        bound = cbc_bound / OBJ_SPREAD if cbc_bound is not None else -math.inf
    bound = max(bound, lag_bound)
    return finish(problem, row_of, choice, t.to_loss(bound), "ilp", t0, info, t.spread)
