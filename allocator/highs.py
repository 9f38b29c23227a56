"""Exact multiple-choice knapsack with highspy directly (numpy CSC ``passModel``, no PuLP layer).

Model on the tie-contracted problem (ties = one row per group; fixed/ragged = only allowed cells
become columns):
    x[r,b] ∈ {0,1} for allowed (r, b);  min Σ 1e6·loss_n[r,b] x[r,b]
    row r:        Σ_b x[r,b] = 1
    budget row k: Σ cost_n[k,b,r] x[r,b] <= cap_n[k]
with ``common.Tables`` normalisation (objective spread 1e6, each budget's free part = 1): raw byte
counts and 1e-9 losses make HiGHS return "optimal" plans that are not (../shared/SOLVERS.md).
HiGHS is warm-started with the Lagrangian plan (``setSolution``), cells that provably cannot beat
that plan are dropped (Lagrangian reduced-cost fixing, :func:`prune`), and the final bound is the
larger of HiGHS's dual bound and the Lagrangian one. Every plan is re-checked exactly; a plan that breaks
a budget by a tolerance is repaired greedily and then can only be called "feasible".

Example:
    >>> s = solve(Problem(loss, {"size": size, "lat": lat}, {"size": 4e6, "lat": 2.0}), method="highs")
    >>> s.status, s.info["highs_status"]
    ('optimal', 'Optimal')
"""
from __future__ import annotations

import math
import time

import numpy as np

from bitplan.errors import InfeasibleBudgetError

from .common import OPT_RTOL, Tables, finish
from .greedy import improve, repair
from .lagrange import lagrangian
from .problem import Problem, Solution
from .registry import register

__all__ = ["solve", "build", "prune", "run", "OBJ_SCALE"]

OBJ_SCALE = 1e6        # the normalised objective spans [0, 1]; HiGHS sees [0, 1e6]


def prune(t: Tables, lam: np.ndarray, dual: float, incumbent: float) -> np.ndarray:
    """Lagrangian reduced-cost fixing: (B, R) mask of the cells an optimal plan may still use.

    For any feasible plan x using cell (r, b): objective(x) >= d(λ) + rc[b, r], with
    rc = (loss + Σ λ_k cost_k)[b, r] − min_b'(...)[r] >= 0. Cells with d(λ) + rc > incumbent
    (+ a 1e-9 relative margin for round-off) cannot appear in a plan better than the incumbent,
    so dropping them keeps the optimum and keeps the MILP's dual bound valid for the full problem.
    """
    priced = t.loss.copy()                                          # (B, R)
    for k, l in enumerate(lam):
        if l != 0:
            priced += l * t.cost[k]
    rc = priced - priced.min(0)
    margin = 1e-9 * max(abs(incumbent), 1e-12) + 1e-12
    return t.allowed & (dual + rc <= incumbent + margin)


def build(t: Tables, mask: np.ndarray | None = None):
    """Column-wise (CSC) arrays of the MILP. Returns (cells (n,), arrays for passModel).

    Column j is cell ``cells[j] = r * B + b`` (row-major over reduced rows and options);
    ``mask`` (B, R) restricts the columns (default: ``t.allowed``).
    """
    B, R = t.loss.shape
    K = t.cost.shape[0]
    mask = t.allowed if mask is None else mask
    cells = np.flatnonzero(mask.T.ravel())                          # (n,) usable (r, b), r-major
    r, b = cells // B, cells % B
    n = len(cells)
    idx = np.empty((n, 1 + K), dtype=np.int32)                       # row indices per column
    val = np.empty((n, 1 + K))
    idx[:, 0], val[:, 0] = r, 1.0
    for k in range(K):
        idx[:, 1 + k] = R + k
        val[:, 1 + k] = t.cost[k, b, r]
    keep = val != 0.0                                                # zero costs are no entries
    start = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(keep.sum(1), out=start[1:])
    return cells, dict(
        num_col=n, num_row=R + K, num_nz=int(start[-1]),
        col_cost=np.ascontiguousarray(t.loss[b, r] * OBJ_SCALE),
        col_lower=np.zeros(n), col_upper=np.ones(n),
        row_lower=np.r_[np.ones(R), np.full(K, -np.inf)],
        row_upper=np.r_[np.ones(R), t.cap],
        a_start=start, a_index=idx[keep], a_value=val[keep],
        integrality=np.ones(n, dtype=np.int32))


def _set_options(h, time_limit, threads, msg):
    # gap: half of OPT_RTOL, relative to the shifted objective (<= the true one), so HiGHS's
    # "optimal" also passes our own check; feasibility 1e-9 of a budget's free part <= Tables.tol
    opts = {"output_flag": bool(msg), "mip_rel_gap": 0.5 * OPT_RTOL, "mip_abs_gap": 1e-6,
            "presolve_rule_off": 32768,              # probing overruns time limits (SOLVERS.md)
            # RINS sub-MIPs hung past time_limit (and past the interrupt callback) on a
            # 1000-row, 3-budget table here; without RINS the same hard cases proved faster
            "mip_heuristic_run_rins": False,
            "mip_feasibility_tolerance": 1e-9, "primal_feasibility_tolerance": 1e-9,
            "random_seed": 0}
    if time_limit is not None:
        opts["time_limit"] = float(max(time_limit, 0.01))
    if threads is not None:
        opts["threads"] = int(threads)
    for k, v in opts.items():
        h.setOptionValue(k, v)


def run(t: Tables, time_limit: float | None = 60.0, start: np.ndarray | None = None,
        threads: int | None = None, msg: bool = False, mask: np.ndarray | None = None
        ) -> tuple[np.ndarray | None, float, dict]:
    """Solve the normalised MILP (columns limited to ``mask``, e.g. from :func:`prune`).

    Returns (reduced choice or None, normalised bound, info).
    """
    import highspy

    t0 = time.perf_counter()
    B, R = t.loss.shape
    cells, m = build(t, mask)
    h = highspy.Highs()
    _set_options(h, time_limit, threads, msg)
    h.passModel(m["num_col"], m["num_row"], m["num_nz"], int(highspy.MatrixFormat.kColwise),
                int(highspy.ObjSense.kMinimize), 0.0, m["col_cost"], m["col_lower"], m["col_upper"],
                m["row_lower"], m["row_upper"], m["a_start"], m["a_index"], m["a_value"],
                m["integrality"])
    if start is not None:                                            # warm start: a feasible plan
        col_of = np.full(R * B, -1, dtype=np.int64)
        col_of[cells] = np.arange(len(cells))
        x0 = np.zeros(len(cells))
        x0[col_of[np.arange(R) * B + np.asarray(start)]] = 1.0
        h.setSolution(len(cells), np.arange(len(cells), dtype=np.int32), x0)
    build_s = time.perf_counter() - t0
    if time_limit is not None:              # HiGHS's own limit is not always checked (sub-MIPs)
        deadline = time.perf_counter() + float(time_limit)

        def _stop(e):
            if time.perf_counter() > deadline:
                e.interrupt()
        h.cbMipInterrupt += _stop
    h.run()
    status = h.modelStatusToString(h.getModelStatus())
    info = h.getInfo()
    res = {"build_s": build_s, "solve_s": time.perf_counter() - t0 - build_s, "highs_status": status,
           "nodes": int(info.mip_node_count), "columns": len(cells),
           "columns_pruned": int(t.allowed.sum()) - len(cells)}
    if h.getModelStatus() == highspy.HighsModelStatus.kInfeasible:
        res["infeasible"] = True
        return None, math.inf, res
    bound = float(info.mip_dual_bound) / OBJ_SCALE
    if not math.isfinite(bound):
        bound = -math.inf
    if info.primal_solution_status != 2:                             # 2 = feasible point found
        return None, bound, res
    x = np.asarray(h.getSolution().col_value)                        # (n,)
    dense = np.full(R * B, -1.0)
    dense[cells] = x
    choice = dense.reshape(R, B).argmax(1)                           # (R,)
    return choice, bound, res


@register("highs")
def solve(problem: Problem, time_limit: float | None = 60.0, warm_start: bool = True,
          start=None, threads: int | None = None, msg: bool = False,
          reduced_cost_fixing: bool = True, **_) -> Solution:
    """Exact solve with HiGHS (time-limited); "optimal" only when the bound closes the gap.

    ``start`` (L,) is a feasible plan to warm-start from; by default the Lagrangian plan is used
    (``warm_start=False`` turns that off) and its multipliers prune cells that provably cannot
    beat it (:func:`prune`; ``reduced_cost_fixing=False`` keeps every cell).
    Example: ``solve(Problem(loss, {"size": size}, {"size": 4e6}), method="highs", time_limit=10)``
    """
    t0 = time.perf_counter()
    red, row_of = problem.reduced()
    t = Tables.of(red)
    prep_s = time.perf_counter() - t0                                # contract ties + normalise
    lag_bound, x0, info, mask = -math.inf, None, {}, None
    if start is not None:
        s0 = np.asarray(start, dtype=np.int64)
        if problem.violations(s0):
            raise ValueError(f"start plan is not feasible: {problem.violations(s0)[:3]}")
        x0 = np.zeros(t.R, dtype=np.int64)
        x0[row_of] = s0
    elif warm_start:
        lr = lagrangian(t, time_limit=None if time_limit is None else 0.25 * time_limit)
        lag_bound, x0 = lr.bound, lr.choice
        info["lagrange_s"], info["lagrange_gap_n"] = lr.seconds, lr.objective - lr.bound
        if reduced_cost_fixing:
            mask = prune(t, lr.lam, lr.bound, lr.objective)
    left = None if time_limit is None else max(0.05, time_limit - (time.perf_counter() - t0))
    ch, bound, res = run(t, left, x0, threads, msg, mask)
    info.update(res)
    info["build_s"] = prep_s + res["build_s"]                        # tables + CSC + passModel
    if res.get("infeasible"):
        raise InfeasibleBudgetError(
            "no plan meets all budgets together (HiGHS proved infeasibility); each budget's smallest "
            f"feasible value on its own: {problem.smallest_feasible()}", problem.smallest_feasible())
    if ch is not None and not t.accepts(ch):                       # tolerance slip: repair it
        info["repaired"] = True
        ch = improve(t, repair(t, ch))
    if ch is None or (x0 is not None and t.objective(x0) < t.objective(ch)):
        ch = x0
    if ch is None:
        raise RuntimeError(f"HiGHS found no plan within the time limit ({res['highs_status']}); "
                           "use method='lagrange' or a longer time_limit")
    bound = max(bound, lag_bound)
    return finish(problem, row_of, ch, t.to_loss(bound), "highs", t0, info, t.spread)
