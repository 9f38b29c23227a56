"""Lagrangian relaxation with a proven bound, greedy repair and local improvement (10^4–10^6 groups).

For multipliers λ >= 0 (one per budget) the relaxed problem separates by row:

    d(λ) = Σ_r min_b ( loss[r,b] + Σ_k λ_k cost_k[r,b] ) − Σ_k λ_k budget_k   <=  optimum

so every evaluated λ gives a valid lower bound (weak duality); ``bound`` is the best one seen.
* one budget: d is concave piecewise linear in λ; bisection on the sign of its subgradient
  (total cost − budget) converges to the maximiser λ*.
* several budgets: a trust-region cutting-plane (bundle) method maximises d; the master problem is a
  (K+1)-variable LP solved with highspy.
The primal plan is the argmin at λ (on the feasible side), repaired to feasibility and improved
greedily with λ as prices (``greedy.py``). Tables are normalised (``common.Tables``) so λ ~ O(1).

Example:
    >>> s = solve(Problem(loss, {"size": size}, {"size": 4e6}), method="lagrange")
    >>> s.gap          # (objective − bound) / objective, proven
"""
from __future__ import annotations

import math
import time

import numpy as np

from .errors import InfeasibleBudgetError

from .common import OPT_RTOL, Tables, argmin0, finish, new_highs, remaining
from .greedy import feasible, improve, repair
from .problem import Problem, Solution
from .registry import register

__all__ = ["solve", "lagrangian", "LagrangeResult"]


class LagrangeResult:
    """Output of :func:`lagrangian` (normalised units; ``Tables.to_loss`` maps back)."""

    def __init__(self, choice, objective, bound, lam, evals, seconds):
        self.choice = choice            # (R,) reduced choice, feasible; None if recovery failed
        self.objective = objective      # normalised objective of choice (inf when None)
        self.bound = bound              # normalised proven lower bound
        self.lam = lam                  # (K,) best multipliers (normalised)
        self.evals = evals              # dual evaluations
        self.seconds = seconds


def _priced(t: Tables, lam: np.ndarray) -> np.ndarray:
    """loss + Σ_k λ_k cost_k, (B, R)."""
    c = t.loss.copy()
    for k, l in enumerate(lam):
        if l != 0:
            c += l * t.cost[k]
    return c


class _Dual:
    """d(λ), a subgradient and the argmin plan; remembers every evaluation (each one a cut)."""

    def __init__(self, t: Tables):
        self.t = t
        self.cuts: list[tuple[np.ndarray, float, np.ndarray]] = []      # (λ, d, g)
        self.best = (-np.inf, None, None)                               # (d, λ, choice)
        self.best_feasible = (np.inf, None)                             # (objective, choice)

    def __call__(self, lam: np.ndarray):
        t = self.t
        ch, m = argmin0(_priced(t, lam))                                 # (R,), (R,)
        tot = t.totals(ch)                                               # (K,)
        d = float(m.sum() - lam @ t.cap)
        g = tot - t.cap
        lam = np.array(lam, dtype=float)
        self.cuts.append((lam, d, g))
        if d > self.best[0]:
            self.best = (d, lam, ch)
        if np.all(g <= 1e-12):
            obj = t.objective(ch)
            if obj < self.best_feasible[0]:
                self.best_feasible = (obj, ch)
        return d, g, ch


def _bisect(dual: _Dual, k: int, K: int, iters: int, deadline) -> float:
    """Maximise d along λ_k (others 0); returns the feasible-side λ_k."""
    e = np.zeros(K)
    e[k] = 1.0
    _, g, _ = dual(0 * e)
    if g[k] <= 0:
        return 0.0
    lo, hi = 0.0, 1.0
    while True:                                           # grow until budget k alone holds
        _, g, _ = dual(hi * e)
        if g[k] <= 0 or hi > 1e30:
            break
        lo, hi = hi, hi * 4
    for _ in range(iters):
        if hi - lo <= 1e-13 * hi or remaining(deadline) <= 0:
            break
        mid = 0.5 * (lo + hi)
        _, g, _ = dual(mid * e)
        if g[k] > 0:
            lo = mid
        else:
            hi = mid
    return hi


def _bundle(dual: _Dual, K: int, iters: int, deadline, tol: float) -> None:
    """Trust-region cutting planes on d(λ), λ in R^K_+ (every evaluation stays a valid bound)."""
    import highspy

    h = new_highs()
    d_c, center, _ = dual.best
    delta = np.maximum(np.max([c[0] for c in dual.cuts], axis=0), 1e-3)       # (K,)
    for _ in range(iters):
        if remaining(deadline) <= 0:
            break
        lams = np.array([c[0] for c in dual.cuts])                   # (n, K)
        ds = np.array([c[1] for c in dual.cuts])
        gs = np.array([c[2] for c in dual.cuts])
        n = len(ds)
        # master LP, variables (λ_1..λ_K, τ): max τ  s.t.  τ − g_i·λ <= d_i − g_i·λ_i,  λ in the box
        A = np.hstack([-gs, np.ones((n, 1))])                        # (n, K+1), column-wise below
        lo = np.r_[np.maximum(0.0, center - delta), -np.inf]
        hi = np.r_[center + delta, np.inf]
        h.clearModel()
        h.passModel(K + 1, n, n * (K + 1), int(highspy.MatrixFormat.kColwise),
                    int(highspy.ObjSense.kMinimize), 0.0, np.r_[np.zeros(K), -1.0], lo, hi,
                    np.full(n, -np.inf), ds - np.einsum("ij,ij->i", gs, lams),
                    np.arange(0, n * (K + 1) + 1, n, dtype=np.int32),
                    np.tile(np.arange(n, dtype=np.int32), K + 1), np.ascontiguousarray(A.T).ravel(),
                    np.zeros(K + 1, dtype=np.int32))
        h.run()
        if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
            break
        x = np.asarray(h.getSolution().col_value)
        lam_new, pred = x[:K], x[K] - d_c
        if pred <= tol * max(1.0, abs(d_c)):
            at_edge = np.any(np.isclose(lam_new, center + delta, rtol=1e-9, atol=0))
            if not at_edge:
                break                                            # model says no ascent left
            delta *= 4
            continue
        d_n, _, _ = dual(np.maximum(lam_new, 0.0))
        if d_n - d_c >= 0.1 * pred:                              # serious step
            center, d_c = np.maximum(lam_new, 0.0), d_n
            delta *= 2
        else:                                                    # null step: the cut refines the model
            delta *= 0.7
        if np.all(delta < 1e-14 * np.maximum(center, 1e-3)):
            break


def lagrangian(t: Tables, time_limit: float | None = None, max_iter: int = 200,
               gap_tol: float = OPT_RTOL, lam0: np.ndarray | None = None) -> LagrangeResult:
    """Dual ascent + primal recovery on normalised tables. See the module docstring.

    ``lam0`` (K,) warm-starts the multipliers (e.g. from the previous point of a budget sweep).
    """
    t0 = time.perf_counter()
    deadline = None if time_limit is None else t0 + time_limit
    K = t.cost.shape[0]
    dual = _Dual(t)
    dual(np.zeros(K))
    if lam0 is not None:
        dual(np.maximum(np.asarray(lam0, float), 0.0))
    if dual.best_feasible[1] is not None and dual.best_feasible[0] <= dual.best[0] + 1e-15:
        ch = dual.best_feasible[1]                                    # λ = 0 plan is feasible
    else:
        if K == 1:
            _bisect(dual, 0, 1, max_iter, deadline)
        else:
            for k in range(K):
                _bisect(dual, k, K, 12, deadline)                     # coarse: cuts + a scale
            _bundle(dual, K, max_iter, deadline, tol=1e-3 * gap_tol)
        if dual.best[0] > 1.0 + 1e-9:        # every plan's normalised loss is <= 1: no plan fits
            raise InfeasibleBudgetError(
                "no plan meets all budgets together (proved: the Lagrangian dual bound exceeds the "
                "loss of every plan)")
        ch = _recover(t, dual)
    obj = t.objective(ch) if ch is not None else math.inf
    bound = min(dual.best[0], obj)
    lam = dual.best[1] if dual.best[1] is not None else np.zeros(K)
    return LagrangeResult(ch, obj, bound, lam, len(dual.cuts), time.perf_counter() - t0)


def _recover(t: Tables, dual: _Dual) -> np.ndarray:
    """Best feasible plan from the dual: feasible argmins and repaired near-optimal argmins, improved."""
    lam = dual.best[1]
    cands = []
    if dual.best_feasible[1] is not None:
        cands.append(dual.best_feasible[1])
    # the plans at the best few multipliers (slightly infeasible ones repair cheaply)
    order = sorted(range(len(dual.cuts)), key=lambda i: -dual.cuts[i][1])[:4]
    for i in order:
        lam_i = dual.cuts[i][0]
        cands.append(argmin0(_priced(t, lam_i))[0])
    best, best_obj = None, np.inf
    for ch in cands:
        try:
            ch = ch if feasible(t, ch) else repair(t, ch)
        except ValueError:
            continue
        ch = improve(t, ch, price=lam)
        obj = t.objective(ch)
        if obj < best_obj:
            best, best_obj = ch, obj
    if best is None:                          # last resort: repair from the cheapest plan
        try:
            best = improve(t, repair(t, argmin0(np.where(t.allowed, t.cost.sum(0), np.inf))[0]), price=lam)
        except InfeasibleBudgetError:         # the heuristic gave up: no proof either way
            return None
    return best


@register("lagrange")
def solve(problem: Problem, time_limit: float | None = None, max_iter: int = 200,
          gap_tol: float = OPT_RTOL, lam0=None, **_) -> Solution:
    """Lagrangian dual bound + repaired/improved primal plan; status "optimal" only if the gap closes.

    ``lam0`` (K,) warm-starts the multipliers, in loss units per cost unit (``info["lambda"]`` of a
    previous solve, e.g. the neighbouring point of a budget sweep).

    Example: ``solve(Problem(loss, {"size": s, "lat": t}, {"size": 4e6, "lat": 2.0}), method="lagrange")``
    """
    t0 = time.perf_counter()
    red, row_of = problem.reduced()
    t = Tables.of(red)
    lam_n = None if lam0 is None else np.asarray(lam0, float) * t.cost_scale / t.spread
    r = lagrangian(t, time_limit, max_iter, gap_tol, lam_n)
    if r.choice is None:
        raise InfeasibleBudgetError(
            "the Lagrangian heuristic found no plan meeting all budgets together (not a proof; "
            "method='highs' decides feasibility exactly); each budget's smallest feasible value on "
            f"its own: {problem.smallest_feasible()}", problem.smallest_feasible())
    build_s = time.perf_counter() - t0 - r.seconds
    info = {"iterations": r.evals, "lambda": (r.lam / t.cost_scale * t.spread).tolist(),  # loss/cost
            "lambda_normalised": r.lam.tolist(), "solve_s": r.seconds, "build_s": build_s}
    return finish(problem, row_of, r.choice, t.to_loss(r.bound), "lagrange", t0, info, t.spread)
