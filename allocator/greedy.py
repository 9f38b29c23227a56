"""Greedy repair (to feasibility) and greedy improvement (spend the slack) on normalised tables.

Both are vectorised over rows: each pass scores one move per row, sorts, and applies the longest
prefix of moves that still fits, so a pass costs O(R·B·K) numpy work, not a Python loop per row.
Used by ``lagrange`` (primal recovery), ``convex`` (after rounding) and the exact solvers (when a
MILP plan breaks a budget by a tolerance).

Example:
    >>> t = Tables.of(red)
    >>> c = repair(t, t.loss.argmin(0))          # feasible (R,) choice, or InfeasibleBudgetError
    >>> c = improve(t, c, price=lam)             # never worse, still feasible
"""
from __future__ import annotations

import numpy as np

from .errors import InfeasibleBudgetError

from .common import Tables, argmin0

__all__ = ["repair", "improve", "feasible", "FEAS_TOL"]

FEAS_TOL = 1e-12      # normalised units (1.0 = the free part of a budget)


def feasible(t: Tables, choice: np.ndarray) -> bool:
    """All budgets met (normalised, tolerance FEAS_TOL)."""
    return bool(np.all(t.totals(choice) <= t.cap + FEAS_TOL))


def _deltas(t: Tables, choice: np.ndarray):
    """Loss and cost change of moving every row to every option: (B, R), (K, B, R)."""
    dl = t.loss - t.take(t.loss, choice)
    dc = t.cost - t.take(t.cost, choice)[:, None, :]
    return dl, dc


def repair(t: Tables, choice: np.ndarray, max_passes: int = 200) -> np.ndarray:
    """Move rows to cheaper options, least loss per unit of relief first, until every budget holds.

    Relief of a move = Σ over broken budgets of (cost saved / excess), minus Σ over the other
    budgets of (cost added / slack). Raises InfeasibleBudgetError when no move helps any more
    (the heuristic gives up; this does not prove infeasibility — an exact solver can).
    """
    choice = np.asarray(choice, dtype=np.int64).copy()
    for _ in range(max_passes):
        excess = t.totals(choice) - t.cap                            # (K,)
        broken = excess > FEAS_TOL
        if not broken.any():
            return choice
        dl, dc = _deltas(t, choice)
        slack = np.maximum(-excess, 1e-15)
        relief = np.zeros_like(dl)                                   # (B, R)
        for k in range(len(excess)):
            if broken[k]:
                relief += np.minimum(-dc[k], excess[k]) / excess[k]
            else:
                relief -= np.maximum(dc[k], 0.0) / slack[k]
        ok = t.allowed & (relief > 1e-15)
        score = np.where(ok, np.maximum(dl, 0.0) / np.where(ok, relief, 1.0), np.inf)
        b, s = argmin0(score)                                        # (R,) best move per row
        cand = np.flatnonzero(np.isfinite(s))
        if len(cand) == 0:
            raise InfeasibleBudgetError(
                "greedy repair found no plan meeting all budgets together (a heuristic, not a proof; "
                "method='highs' can prove infeasibility)")
        cand = cand[np.argsort(s[cand], kind="stable")]
        mv = dc[:, b[cand], cand]                                    # (K, n) cost change per move
        cum = np.cumsum(mv, axis=1)
        need = np.flatnonzero(broken)
        covered = np.all(cum[need] <= -excess[need, None], axis=0)   # (n,) all fixed after i moves
        n = int(np.argmax(covered)) + 1 if covered.any() else len(cand)
        hold = ~broken
        if hold.any():                                               # don't break a budget that holds
            over = np.any(cum[hold, :n] > -excess[hold, None], axis=0)
            if over.any():
                n = max(1, int(np.argmax(over)))
        choice[cand[:n]] = b[cand[:n]]
    raise InfeasibleBudgetError(f"greedy repair did not reach feasibility in {max_passes} passes")


def improve(t: Tables, choice: np.ndarray, price: np.ndarray | None = None,
            max_passes: int = 50) -> np.ndarray:
    """Spend the remaining slack: apply loss-reducing moves that fit, best gain per priced cost first.

    ``price`` (K,) weights the budgets (the Lagrange multipliers are a good choice); default
    1/slack. ``choice`` must be feasible; the result is feasible and never has a higher loss.
    """
    choice = np.asarray(choice, dtype=np.int64).copy()
    K = t.cost.shape[0]
    for _ in range(max_passes):
        slack = t.cap - t.totals(choice)                             # (K,) >= -FEAS_TOL
        p = (1.0 / np.maximum(slack, 1e-12)) if price is None else np.maximum(np.asarray(price, float), 0)
        if K:
            p = p + 1e-9 * max(float(p.max()), 1e-12)
        dl, dc = _deltas(t, choice)
        fits = t.allowed & (dl < 0)
        use = np.zeros_like(dl)
        for k in range(K):
            fits &= dc[k] <= slack[k] + FEAS_TOL
            use += p[k] * np.maximum(dc[k], 0.0)
        if not fits.any():
            return choice
        neg = np.where(fits, dl / (use + 1e-300), np.inf)            # −(gain per priced cost)
        b, s = argmin0(neg)
        cand = np.flatnonzero(np.isfinite(s))
        cand = cand[np.argsort(s[cand], kind="stable")]
        moved = False
        while len(cand):                                             # longest fitting prefix, repeat
            mv = dc[:, b[cand], cand]                                # (K, n)
            cum = np.cumsum(mv, axis=1)
            bad = np.any(cum > slack[:, None] + FEAS_TOL, axis=0)
            n = int(np.argmax(bad)) if bad.any() else len(cand)
            if n == 0:
                break
            choice[cand[:n]] = b[cand[:n]]
            slack = slack - cum[:, n - 1]
            moved = True
            rest = cand[n:]
            cand = rest[np.all(dc[:, b[rest], rest] <= slack[:, None] + FEAS_TOL, axis=0)]
        if not moved:
            return choice
    return choice
