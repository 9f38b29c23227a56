"""BAQ-style convex relaxation with cvxpy, rounded to the option set and repaired to feasibility.

BAQ (bit allocation for quantization) models each layer's loss as an exponential in its bit-width,
    loss_l(b) ≈ c_l · 2^(−θ_l · b)            (fitted per row: least squares on log loss vs bits),
and each cost as linear in bits, cost_k,l(b) ≈ a_k,l + s_k,l · b (exact for bytes and BOPs).
The continuous problem
    min_x Σ_l c_l 2^(−θ_l x_l)   s.t.   Σ_l s_k,l x_l <= budget_k − Σ_l a_k,l,   x_l ∈ [b_min,l, b_max,l]
is convex (exp cones; CLARABEL by default). Then: x is rounded down to an allowed option, repaired
to feasibility on the true tables, and improved greedily (``greedy.py``).
Proof: the budget constraints' dual values λ (scaled by a golden-section search on s ↦ d(s·λ)) are
used as Lagrange multipliers on the TRUE tables, so ``bound = d(s·λ)`` is a valid lower bound (weak
duality) even though the fit is approximate.
Reported in ``info``: ``continuous_objective`` (fitted model at x, loss units), ``rounded_objective``
(true tables right after rounding), ``rounding_loss`` = objective − continuous_objective, fit error.

Example:
    >>> s = solve(problem, method="convex", bits=[2, 3, 4, 8])
    >>> s.info["rounding_loss"], s.gap
"""
from __future__ import annotations

import math
import time

import numpy as np

from .common import Tables, argmin0, finish
from .greedy import feasible, improve, repair
from .lagrange import _Dual, lagrangian
from .problem import Problem, Solution
from .registry import register

__all__ = ["solve", "fit"]

LN2 = math.log(2.0)


def _linfit(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row weighted least squares y ≈ a + s·x. x (B,), y/w (R, B); rows with < 2 points: s = 0."""
    n = w.sum(1)
    sx, sy = (w * x).sum(1), (w * y).sum(1)
    sxx, sxy = (w * x * x).sum(1), (w * x * y).sum(1)
    den = n * sxx - sx * sx
    ok = (n >= 2) & (den > 1e-12)
    s = np.where(ok, (n * sxy - sx * sy) / np.where(ok, den, 1.0), 0.0)
    a = np.where(n > 0, (sy - s * sx) / np.maximum(n, 1), 0.0)
    return a, s


def fit(loss: np.ndarray, allowed: np.ndarray, bits: np.ndarray):
    """(c (R,), θ (R,)) with loss[r, b] ≈ c_r 2^(−θ_r bits[b]) over allowed cells with loss > 0."""
    pos = allowed & (loss > 0)
    y = np.log(np.where(pos, loss, 1.0))
    a, s = _linfit(bits, y, pos.astype(float))
    return np.exp(a) * pos.any(1), -s / LN2


def _feasible_plan(t: Tables, choice: np.ndarray, info: dict) -> np.ndarray:
    """Repair the rounded plan; if the greedy gets stuck, repair from the cheapest plan, then fall
    back to the Lagrangian plan (recorded in ``info["repair"]``)."""
    if feasible(t, choice):
        info["repair"] = "none needed"
        return choice
    for name, start in (("rounded", choice),
                        ("cheapest", argmin0(np.where(t.allowed, t.cost.sum(0), np.inf))[0])):
        try:
            out = repair(t, start)
            info["repair"] = f"greedy from the {name} plan"
            return out
        except ValueError:
            continue
    info["repair"] = "greedy stuck; Lagrangian plan used"
    return lagrangian(t).choice


def finite_or_none(v) -> float | None:
    """JSON has no NaN / inf."""
    return float(v) if math.isfinite(v) else None


def _option_bits(problem: Problem, bits, B: int) -> tuple[np.ndarray, str]:
    """(B,) bit-width of each option and where it came from: the ``bits`` argument, else
    ``problem.bits`` (what :func:`bitplan.allocate` sets: each option's weight bits), else the option
    index 0..B-1 (only meaningful when the options are evenly spaced bit-widths)."""
    if bits is not None:
        src = "argument"
    elif problem.bits is not None:
        bits, src = problem.bits, "problem.bits"
    else:
        bits, src = np.arange(B, dtype=float), "option index (no bits given)"
    bits = np.asarray(bits, dtype=float)
    if bits.shape != (B,) or not np.all(np.isfinite(bits)):
        raise ValueError(f"bits must be {B} finite numbers (one per option), got {bits.tolist()}")
    if len(set(bits.tolist())) < 2 and B > 1:
        raise ValueError(f"bits={bits.tolist()} must hold at least two distinct bit-widths (BAQ fits loss "
                         "against bits)")
    return bits, src


def _solve_continuous(prob, solver: str, kw: dict) -> dict:
    """Solve with ``solver``; on a cvxpy SolverError retry with SCS and say so."""
    import cvxpy as cp
    rec = {"cvxpy_solver": solver, "solver_fallback": None}
    try:
        prob.solve(solver=solver, **kw)
    except cp.error.SolverError as e:
        rec["solver_fallback"] = f"{solver} failed ({str(e)[:200]}); SCS used"
        rec["cvxpy_solver"] = "SCS"
        try:
            prob.solve(solver="SCS")
        except cp.error.SolverError as e2:
            rec["solver_fallback"] += f"; SCS failed too ({str(e2)[:200]}): rounded from the smallest bits"
    return rec


@register("convex")
def solve(problem: Problem, bits=None, solver: str = "CLARABEL", time_limit: float | None = None,
          **_) -> Solution:
    """BAQ convex model → round → repair → improve; bound from the dual values (see module doc).

    ``bits`` (B,) gives each option's bit-width; default ``problem.bits`` (set by
    :func:`bitplan.allocate` / :func:`bitplan.api.build_problem` from the options), else the option
    index 0..B-1 (``info["bits_source"]`` says which). Several options may share a bit-width (e.g.
    per-channel and group-128 at 4 bits): the fit treats them as samples of the same curve.
    ``info["solver_fallback"]`` records a switch to SCS when ``solver`` fails.
    Example: ``solve(Problem(loss, {"size": size}, {"size": 4e6}), method="convex", bits=(2, 4, 8))``
    """
    import cvxpy as cp

    t0 = time.perf_counter()
    red, row_of = problem.reduced()
    R, B = red.shape
    bits, bits_source = _option_bits(problem, bits, B)
    t = Tables.of(red)
    allowed = red.allowed                                              # (R, B)
    c, theta = fit(red.loss, allowed, bits)                            # (R,), (R,)
    c_n = c / t.spread                                                 # normalised objective units
    lo = np.where(allowed, bits, np.inf).min(1)                        # (R,) allowed bit range
    hi = np.where(allowed, bits, -np.inf).max(1)
    K = len(t.names)
    A, rhs = np.zeros((K, R)), np.zeros(K)
    for k, name in enumerate(t.names):
        a, s = _linfit(bits, red.costs[name], allowed.astype(float))
        A[k], rhs[k] = s / t.cost_scale[k], (red.budgets[name] - a.sum()) / t.cost_scale[k]
    # continuous BAQ problem
    x = cp.Variable(R)
    objective = cp.Minimize(cp.sum(cp.multiply(c_n, cp.exp(cp.multiply(-theta * LN2, x)))))
    budget = A @ x <= rhs
    prob = cp.Problem(objective, [budget, x >= lo, x <= hi] if K else [x >= lo, x <= hi])
    build_s = time.perf_counter() - t0                                 # fit + cvxpy expression
    kw = {} if time_limit is None else {"time_limit": float(time_limit)}
    info = {**_solve_continuous(prob, solver, kw), "cvxpy_status": prob.status, "bits": bits.tolist(),
            "bits_source": bits_source, "build_s": build_s, "solve_s": time.perf_counter() - t0 - build_s}
    xv = np.clip(np.asarray(x.value if x.value is not None else lo, float), lo, hi)       # (R,)
    cont = float(np.sum(c * np.exp(-theta * LN2 * xv)))
    # round down to an allowed option (costs grow with bits), then repair and improve on true tables
    below = allowed & (bits[None, :] <= xv[:, None] + 1e-9)
    # the highest such bit-width; among options sharing it (group sizes, act bits) the cheapest
    cost = sum((red.costs[k] / t.cost_scale[i] for i, k in enumerate(t.names)), np.zeros((R, B)))  # (R, B)
    cheap = np.where(allowed, cost, np.inf)
    top = np.where(below, bits[None, :], -np.inf).max(1, keepdims=True)                  # (R, 1)
    low = np.where(allowed, bits[None, :], np.inf).min(1, keepdims=True)
    pick = np.where(below.any(1)[:, None], below & (bits[None, :] == top), allowed & (bits[None, :] == low))
    choice = np.where(pick, cheap, np.inf).argmin(1)
    rounded_obj = t.to_loss(t.objective(choice))
    lam = np.zeros(K)
    if K and budget.dual_value is not None:
        lam = np.maximum(np.atleast_1d(np.asarray(budget.dual_value, float)), 0.0)
    choice = _feasible_plan(t, choice, info)
    choice = improve(t, choice, price=lam if lam.any() else None)
    dual = _Dual(t)
    d = dual(lam)[0]
    if lam.any():                          # the fit's λ is off-scale for the true tables: line search
        a, b = 0.0, 4.0                    # golden section on s ↦ d(s·λ), concave
        g = (math.sqrt(5) - 1) / 2
        for _ in range(25):
            m1, m2 = b - g * (b - a), a + g * (b - a)
            if dual(m1 * lam)[0] < dual(m2 * lam)[0]:
                a = m1
            else:
                b = m2
        d = dual.best[0]
    fitted = np.where(allowed, c[:, None] * 2.0 ** (-theta[:, None] * bits[None, :]), np.nan)
    rel = np.abs(fitted - red.loss) / np.maximum(np.abs(red.loss), 1e-300)
    info.update({"continuous_objective": cont, "rounded_objective": rounded_obj,
                 "fit_median_rel_error": float(np.nanmedian(np.where(allowed, rel, np.nan))),
                 "lambda_normalised": lam.tolist()})
    sol = finish(problem, row_of, choice, t.to_loss(d), "convex", t0, info, t.spread)
    sol.info["rounding_loss"] = sol.objective - cont
    # what a plan records about this solve (JSON values): which bits were fitted, which cvxpy
    # solver ran (and any fallback), how well BAQ's model fits the true table
    sol.info["record"] = {k: sol.info[k] for k in ("bits", "bits_source", "cvxpy_solver", "solver_fallback",
                                                   "cvxpy_status", "repair")}
    sol.info["record"]["fit_median_rel_error"] = finite_or_none(sol.info["fit_median_rel_error"])
    return sol
