"""Pieces every solver shares: normalised tables, honest status, and assembling a ``Solution``.

Solvers work on the tie-contracted problem (``Problem.reduced()``: one row per tie group, fixed
choices already encoded in ``allowed``) and expand the choice back with ``choice[row_of]``.

Example:
    >>> t = Tables.of(problem)                 # (R, B) arrays, costs shifted so each row's min is 0
    >>> sol = finish(problem, row_of, choice_red, bound, "lagrange", t0, {"iters": 40})
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from .problem import Problem, Solution

__all__ = ["OPT_RTOL", "Tables", "proven", "finish", "remaining"]

OPT_RTOL = 1e-9       # "optimal" needs (objective − bound) <= OPT_RTOL · max(|objective|, loss spread)


@dataclass
class Tables:
    """Dense, normalised view of a tie-free problem, shared by the heuristics and the MILP builders.

    loss is shifted per row and divided by ``spread`` (Σ over rows of the loss range), so the
    objective ranges over [0, 1]; each budgeted cost is shifted per row and divided by its free
    budget ``cap − Σ_rows min cost`` so its right-hand side is 1. Disallowed cells hold +inf loss.
    """
    loss: np.ndarray          # (R, B) (loss − row min) / spread; +inf where not allowed
    cost: np.ndarray          # (K, R, B) (cost_k − row min) / scale_k; 0 where not allowed
    cap: np.ndarray           # (K,) normalised right-hand sides (1.0, or 0/-x when no freedom)
    allowed: np.ndarray       # (R, B) bool
    offset: float             # Σ_rows min loss  (loss units)
    spread: float             # loss units per normalised unit
    cost_offset: np.ndarray   # (K,) Σ_rows min cost_k (cost units)
    cost_scale: np.ndarray    # (K,) cost units per normalised unit
    names: list[str]          # (K,) budget names

    @classmethod
    def of(cls, red: Problem) -> "Tables":
        """Normalise ``red`` (a problem without ties, e.g. from ``Problem.reduced()``)."""
        allowed = red.allowed
        masked = np.where(allowed, red.loss, np.inf)                      # (R, B)
        row_min = masked.min(1)                                           # (R,)
        loss = masked - row_min[:, None]
        spread = float(np.where(allowed, loss, 0.0).max(1).sum())
        spread = spread if spread > 0 else 1.0
        loss /= spread
        names = list(red.budgets)
        K, (R, B) = len(names), red.shape
        cost = np.empty((K, R, B))
        cap = np.empty(K)
        offs, scales = np.empty(K), np.empty(K)
        for k, name in enumerate(names):
            c = np.where(allowed, red.costs[name], np.inf)
            cmin = c.min(1)                                               # (R,)
            off = float(cmin.sum())
            free = red.budgets[name] - off                                # budget above the cheapest plan
            ref = float(np.where(allowed, c - cmin[:, None], 0).max(1).sum())
            scale = free if free > 1e-12 * max(ref, 1e-300) else (ref if ref > 0 else 1.0)
            cost[k] = np.where(allowed, c - cmin[:, None], 0.0) / scale
            cap[k] = free / scale
            offs[k], scales[k] = off, scale
        return cls(loss, cost, cap, allowed, float(row_min.sum()), spread, offs, scales, names)

    def totals(self, choice: np.ndarray) -> np.ndarray:
        """(K,) normalised cost totals of a reduced choice (R,)."""
        rows = np.arange(self.loss.shape[0])
        return self.cost[:, rows, choice].sum(1) if len(self.cost) else np.zeros(0)

    def objective(self, choice: np.ndarray) -> float:
        """Normalised objective of a reduced choice (R,)."""
        return float(self.loss[np.arange(self.loss.shape[0]), choice].sum())

    def to_loss(self, v: float) -> float:
        """Normalised objective/bound -> loss units."""
        return v * self.spread + self.offset


def proven(objective: float, bound: float, spread: float = 0.0, rtol: float = OPT_RTOL) -> bool:
    """True when ``bound`` proves ``objective`` optimal within ``rtol`` (relative to |obj| or spread)."""
    if not math.isfinite(bound):
        return False
    return objective - bound <= rtol * max(abs(objective), spread, 1e-300)


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
