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

from .errors import InfeasibleBudgetError

from .common import OPT_RTOL, Tables, finish
from .greedy import improve, repair
from .lagrange import lagrangian
from .problem import Problem, Solution
from .registry import register

__all__ = ["solve", "build", "prune", "dominated", "run", "OBJ_SCALE", "ISOLATE_COLUMNS"]

OBJ_SCALE = 1e6        # the normalised objective spans [0, 1]; HiGHS sees [0, 1e6]


def prune(t: Tables, lam: np.ndarray, dual: float, incumbent: float) -> np.ndarray:
    """Lagrangian reduced-cost fixing: (B, R) mask of the cells an optimal plan may still use.

    For any feasible plan x using cell (r, b): objective(x) >= d(λ) + rc[b, r], with
    rc = (loss + Σ λ_k cost_k)[b, r] − min_b'(...)[r] >= 0. Cells with d(λ) + rc > incumbent
    (+ a 1e-9 relative margin for round-off) cannot appear in a plan better than the incumbent,
    so dropping them keeps the optimum and keeps the MILP's dual bound valid for the full problem.
    Dominated cells (:func:`dominated`) are dropped too: a dominating cell has rc no larger, so an
    improving plan moved off them stays inside the mask.
    """
    priced = t.loss.copy()                                          # (B, R)
    for k, l in enumerate(lam):
        if l != 0:
            priced += l * t.cost[k]
    rc = priced - priced.min(0)
    margin = 1e-9 * max(abs(incumbent), 1e-12) + 1e-12
    return t.allowed & (dual + rc <= incumbent + margin) & ~dominated(t)


def dominated(t: Tables) -> np.ndarray:
    """(B, R) mask of allowed cells another allowed option of the same row dominates.

    Option b of row r is dominated by b' when loss and every cost of b' are <= those of b and
    (one is strictly smaller, or the two are equal and b' < b): any plan using b can switch to b'
    without raising its loss or any total, so dropping b keeps an optimal plan (exact).
    """
    B, R = t.loss.shape
    out = np.zeros((B, R), dtype=bool)
    for b in range(B):
        for b2 in range(B):
            if b2 == b:
                continue
            le = t.allowed[b] & t.allowed[b2] & (t.loss[b2] <= t.loss[b])
            lt = t.loss[b2] < t.loss[b]
            for k in range(t.cost.shape[0]):
                le &= t.cost[k, b2] <= t.cost[k, b]
                lt |= t.cost[k, b2] < t.cost[k, b]
            out[b] |= le & (lt | (b2 < b))
    return out


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


ISOLATE_COLUMNS = 10_000    # MILPs with more columns run in a killable child process
GRACE_S = 3.0              # wall-clock grace over time_limit before the child is killed


def _run_isolated(job: dict, wall: float):
    """Run ``highs_worker.solve_arrays(**job)`` in a child process; kill it after ``wall`` s."""
    import os
    import pickle
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bitplan_highs_") as d:
        src, dst = os.path.join(d, "in.pkl"), os.path.join(d, "out.pkl")
        with open(src, "wb") as f:
            pickle.dump(job, f, protocol=pickle.HIGHEST_PROTOCOL)
        proc = subprocess.Popen([sys.executable, "-m", "bitplan.allocator.highs_worker", src, dst],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _, err = proc.communicate(timeout=wall)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return None, -math.inf, {"highs_status": f"killed at the wall-clock limit ({wall:.1f} s)",
                                     "nodes": -1, "killed": True}
        if proc.returncode != 0 or not os.path.exists(dst):
            raise RuntimeError(f"HiGHS worker failed (exit {proc.returncode}): {err.decode()[-500:]}")
        with open(dst, "rb") as f:
            return pickle.load(f)


def run(t: Tables, time_limit: float | None = 60.0, start: np.ndarray | None = None,
        threads: int | None = None, msg: bool = False, mask: np.ndarray | None = None,
        isolate: bool | None = None) -> tuple[np.ndarray | None, float, dict]:
    """Solve the normalised MILP (columns limited to ``mask``, e.g. from :func:`prune`).

    ``isolate`` (default: more than ISOLATE_COLUMNS columns and a time limit) runs HiGHS in a child
    process that is killed at ``time_limit + GRACE_S``: HiGHS alone overran limits by 4x here.
    Returns (reduced choice or None, normalised bound, info).
    """
    from .highs_worker import solve_arrays

    t0 = time.perf_counter()
    B, R = t.loss.shape
    if mask is not None and start is not None:                       # keep the start plan's cells
        mask = mask.copy()
        mask[np.asarray(start), np.arange(R)] = True
    cells, m = build(t, mask)
    x0 = None
    if start is not None:                                            # warm start: a feasible plan
        col_of = np.full(R * B, -1, dtype=np.int64)
        col_of[cells] = np.arange(len(cells))
        x0 = np.zeros(len(cells))
        x0[col_of[np.arange(R) * B + np.asarray(start)]] = 1.0
    if isolate is None:
        isolate = time_limit is not None and len(cells) > ISOLATE_COLUMNS
    job = dict(m=m, time_limit=time_limit, x0=x0, threads=threads, msg=msg, rel_gap=0.5 * OPT_RTOL)
    build_s = time.perf_counter() - t0
    if isolate:
        x, bound, res = _run_isolated(job, float(time_limit) + GRACE_S)
    else:
        x, bound, res = solve_arrays(**job)
    res.update({"build_s": build_s, "solve_s": time.perf_counter() - t0 - build_s,
                "columns": len(cells), "columns_pruned": int(t.allowed.sum()) - len(cells),
                "isolated": bool(isolate)})
    bound = bound / OBJ_SCALE if math.isfinite(bound) else bound
    if res.get("infeasible") or x is None:
        return None, bound, res
    dense = np.full(R * B, -1.0)
    dense[cells] = x
    return dense.reshape(R, B).argmax(1), bound, res                 # (R,) reduced choice


@register("highs")
def solve(problem: Problem, time_limit: float | None = 60.0, warm_start: bool = True,
          start=None, threads: int | None = None, msg: bool = False,
          reduced_cost_fixing: bool = True, **_) -> Solution:
    """Exact solve with HiGHS (time-limited); "optimal" only when the bound closes the gap.

    ``start`` (L,) is a feasible plan to warm-start from; with ``warm_start`` (default) the
    Lagrangian also runs: the better of the two plans starts HiGHS and the multipliers prune cells
    that provably cannot beat it (:func:`prune`; ``reduced_cost_fixing=False`` keeps every cell).
    Example: ``solve(Problem(loss, {"size": size}, {"size": 4e6}), method="highs", time_limit=10)``
    """
    t0 = time.perf_counter()
    red, row_of = problem.reduced()
    t = Tables.of(red)
    prep_s = time.perf_counter() - t0                                # contract ties + normalise
    lag_bound, x0, info, mask = -math.inf, None, {}, None
    if start is not None:                                            # e.g. the previous sweep point
        s0 = np.asarray(start, dtype=np.int64)
        if problem.violations(s0):
            raise ValueError(f"start plan is not feasible: {problem.violations(s0)[:3]}")
        x0 = np.zeros(t.R, dtype=np.int64)
        x0[row_of] = s0
    if warm_start:
        lr = lagrangian(t, time_limit=None if time_limit is None else 0.25 * time_limit)
        lag_bound = lr.bound
        if lr.choice is not None and (x0 is None or lr.objective < t.objective(x0)):
            x0 = lr.choice
        info["lagrange_s"], info["lagrange_gap_n"] = lr.seconds, lr.objective - lr.bound
        if reduced_cost_fixing and x0 is not None:                   # prune against the best plan
            mask = prune(t, lr.lam, lr.bound, t.objective(x0))
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
