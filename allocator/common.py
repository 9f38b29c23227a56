"""Pieces every solver shares: normalised tables, honest status, and assembling a ``Solution``.

Solvers work on the tie-contracted problem (``Problem.reduced()``: one row per tie group, fixed
choices already encoded in ``allowed``) and expand the choice back with ``choice[row_of]``.

Example:
    >>> t = Tables.of(red)                     # (B, R) arrays, costs shifted so each row's min is 0
    >>> sol = finish(problem, row_of, choice_red, bound, "lagrange", t0, {"iters": 40})
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from .problem import FEAS_RTOL, Problem, Solution

__all__ = ["OPT_RTOL", "Tables", "argmin0", "proven", "finish", "remaining"]

OPT_RTOL = 1e-9       # "optimal" needs (objective − bound) <= OPT_RTOL · max(|objective|, loss spread)


@dataclass
class Tables:
    """Dense, normalised, option-major view of a tie-free problem, shared by the heuristics.

    Option-major (B, R) layout: reductions over the few options run as B vectorised passes over
    contiguous rows (numpy's argmin over a short last axis is ~5x slower at R = 5e5).
    loss is shifted per row and divided by ``spread`` (Σ over rows of the loss range), so the
    objective ranges over [0, 1]; each budgeted cost is shifted per row and divided by its free
    budget ``cap − Σ_rows min cost`` so its right-hand side is 1. Disallowed cells hold +inf loss.
    """
    loss: np.ndarray          # (B, R) (loss − row min) / spread; +inf where not allowed
    cost: np.ndarray          # (K, B, R) (cost_k − row min) / scale_k; 0 where not allowed
    cap: np.ndarray           # (K,) normalised right-hand sides (1.0, or 0 when no freedom)
    allowed: np.ndarray       # (B, R) bool
    offset: float             # Σ_rows min loss  (loss units)
    spread: float             # loss units per normalised unit
    cost_offset: np.ndarray   # (K,) Σ_rows min cost_k (cost units)
    cost_scale: np.ndarray    # (K,) cost units per normalised unit
    names: list[str]          # (K,) budget names
    tol: np.ndarray           # (K,) Problem.violations' slack (FEAS_RTOL·max(|budget|, 1)), normalised

    @classmethod
    def of(cls, red: Problem) -> "Tables":
        """Normalise ``red`` (a problem without ties, e.g. from ``Problem.reduced()``)."""
        allowed = np.ascontiguousarray(red.allowed.T)                     # (B, R)
        loss = np.where(allowed, red.loss.T, np.inf)                      # (B, R)
        row_min = loss.min(0)                                             # (R,)
        loss -= row_min
        spread = float(np.where(allowed, loss, 0.0).max(0).sum())
        spread = spread if spread > 0 else 1.0
        loss /= spread
        names = list(red.budgets)
        K, (R, B) = len(names), red.shape
        cost = np.empty((K, B, R))
        cap = np.empty(K)
        offs, scales, tol = np.empty(K), np.empty(K), np.empty(K)
        for k, name in enumerate(names):
            c = np.where(allowed, red.costs[name].T, np.inf)              # (B, R)
            c -= c.min(0)
            off = float(np.where(allowed, red.costs[name].T, np.inf).min(0).sum())
            free = red.budgets[name] - off                                # budget above the cheapest plan
            c[~allowed] = 0.0
            ref = float(c.max(0).sum())
            scale = free if free > 1e-12 * max(ref, 1e-300) else (ref if ref > 0 else 1.0)
            cost[k] = c / scale
            cap[k] = free / scale
            offs[k], scales[k] = off, scale
            tol[k] = FEAS_RTOL * max(abs(red.budgets[name]), 1.0) / scale
        return cls(loss, cost, cap, allowed, float(row_min.sum()), spread, offs, scales, names, tol)

    @property
    def R(self) -> int:
        return self.loss.shape[1]

    def take(self, table: np.ndarray, choice: np.ndarray) -> np.ndarray:
        """table[..., choice[r], r] for a (…, B, R) table -> (…, R)."""
        R = self.R
        flat = choice * R + np.arange(R)
        return table.reshape(*table.shape[:-2], -1)[..., flat]

    def totals(self, choice: np.ndarray) -> np.ndarray:
        """(K,) normalised cost totals of a reduced choice (R,)."""
        if self.cost.shape[0] == 0:                                  # no budgets
            return np.zeros(0)
        return self.take(self.cost, choice).sum(-1)

    def accepts(self, choice: np.ndarray) -> bool:
        """Feasible by ``Problem.violations``' rule (relative slack FEAS_RTOL): how MILP plans,
        found with solver tolerances of 1e-9 normalised (<= ``tol``), are judged."""
        return bool(np.all(self.totals(choice) <= self.cap + self.tol))

    def objective(self, choice: np.ndarray) -> float:
        """Normalised objective of a reduced choice (R,)."""
        return float(self.take(self.loss, choice).sum())

    def to_loss(self, v: float) -> float:
        """Normalised objective/bound -> loss units."""
        return v * self.spread + self.offset


def argmin0(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(argmin, min) over axis 0 of a (B, R) array, as B contiguous passes; first index wins ties."""
    best = c[0].copy()
    idx = np.zeros(c.shape[1], dtype=np.int64)
    for b in range(1, c.shape[0]):
        better = c[b] < best
        np.copyto(best, c[b], where=better)
        np.copyto(idx, b, where=better)
    return idx, best


def proven(objective: float, bound: float, spread: float = 0.0, rtol: float = OPT_RTOL) -> bool:
    """True when ``bound`` proves ``objective`` optimal: gap <= rtol·|objective| + 1e-12·spread.

    ``spread`` (Σ over rows of the loss range) only supplies an absolute floor for objectives ~0.
    """
    if not math.isfinite(bound):
        return False
    return objective - bound <= rtol * abs(objective) + 1e-12 * spread


def remaining(deadline: float | None) -> float:
    """Seconds left before ``deadline`` (a perf_counter time), +inf when there is none."""
    return math.inf if deadline is None else max(0.0, deadline - time.perf_counter())


def finish(problem: Problem, row_of: np.ndarray, choice_red: np.ndarray, bound: float, method: str,
           t0: float, info: dict | None = None, spread: float = 0.0) -> Solution:
    """Expand a reduced choice, recompute objective/totals from the tables, decide the status.

    ``bound`` (loss units) must be a proven lower bound on the optimum or ``-inf``. A bound above
    the objective (float round-off) is clipped to it; the raw value is kept in ``info``.
    """
    info = dict(info or {})
    choice = np.asarray(choice_red, dtype=np.int64)[row_of]                # (L,)
    obj, totals = problem.evaluate(choice)
    bound = float(bound)
    if bound > obj:
        info["bound_raw"] = bound
        bound = obj
    status = "optimal" if proven(obj, bound, spread) else "feasible"
    return Solution(choice, obj, bound, status, method, time.perf_counter() - t0, totals, info)


def new_highs():
    """A ``highspy.Highs()`` with output off, without the banner highspy >= 1.16 prints to the
    process's stdout (file descriptor 1, from C++) when one is constructed: a library must not write
    there. The descriptor is pointed at /dev/null only while the object is built."""
    import os
    import sys

    import highspy
    try:
        sys.stdout.flush()
        fd = sys.__stdout__.fileno() if sys.__stdout__ is not None else 1
        saved = os.dup(fd)
    except (OSError, ValueError, AttributeError):          # no real stdout (embedded, closed): nothing to hide
        h = highspy.Highs()
    else:
        try:
            with open(os.devnull, "w") as null:
                os.dup2(null.fileno(), fd)
                try:
                    h = highspy.Highs()
                finally:
                    os.dup2(saved, fd)
        finally:
            os.close(saved)
    h.setOptionValue("output_flag", False)
    return h
