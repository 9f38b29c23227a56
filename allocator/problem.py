"""The bit-allocation problem (a multiple-choice knapsack) and its solution.

    minimise    Σ_l loss[l, c_l]
    subject to  Σ_l cost_k[l, c_l] <= budget_k      for every budget k
                c_l = c_m                           for every tie group containing l and m
                c_l = fixed[l]                      for fixed layers
                allowed[l, c_l]                     (ragged option sets)

Rows are layers (or groups of weights), columns are options (e.g. bit-widths).

Example:
    >>> p = Problem(loss=np.array([[4., 1.], [9., 2.]]), costs={"size": np.array([[2., 8.], [2., 8.]])},
    ...             budgets={"size": 10.0})
    >>> p.evaluate(np.array([1, 0]))
    (10.0, {'size': 10.0})
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .errors import InfeasibleBudgetError

__all__ = ["Problem", "Solution", "FEAS_RTOL"]

FEAS_RTOL = 1e-9      # relative slack when re-checking a budget (float sums of large byte counts)


def _as_table(name: str, a, shape=None) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D (layers x options) table, got shape {arr.shape}")
    if shape is not None and arr.shape != shape:
        raise ValueError(f"{name} has shape {arr.shape}; the loss table has shape {shape}")
    return arr


@dataclass(frozen=True)
class Problem:
    """One allocation problem; validated on construction (bad values raise ``ValueError``)."""
    loss: np.ndarray                              # (L, B) loss increase of layer l at option b
    costs: dict[str, np.ndarray]                  # name -> (L, B) cost (bytes, ms, BOPs, ...)
    budgets: dict[str, float]                     # name -> upper bound on Σ cost (same unit)
    ties: list[list[int]] = field(default_factory=list)   # groups of rows that take one option
    names: list[str] | None = None                # (L,) row names, for messages and plans
    fixed: dict[int, int] = field(default_factory=dict)   # row -> option index it must take
    allowed: np.ndarray | None = None             # (L, B) bool; None = every option allowed
    bits: tuple | None = None                     # (B,) weight bits of each option (convex's BAQ fit); None = unknown

    def __post_init__(self):
        loss = _as_table("loss", self.loss)
        L, B = loss.shape
        if not np.all(np.isfinite(loss)):
            bad = np.argwhere(~np.isfinite(loss))[0]
            raise ValueError(f"loss[{bad[0]}, {bad[1]}] = {loss[tuple(bad)]} is not finite")
        if not isinstance(self.costs, dict) or not isinstance(self.budgets, dict):
            raise TypeError("costs and budgets must be dicts name -> table / float")
        costs = {}
        for k, v in self.costs.items():
            c = _as_table(f"costs[{k!r}]", v, loss.shape)
            if not np.all(np.isfinite(c)):
                raise ValueError(f"costs[{k!r}] has non-finite entries")
            costs[k] = c
        budgets = {}
        for k, v in self.budgets.items():
            if k not in costs:
                raise ValueError(f"budget {k!r} has no cost table; cost tables: {sorted(costs)}")
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) \
                    or not math.isfinite(float(v)):
                raise ValueError(f"budget {k!r} = {v!r} must be a finite number")
            budgets[k] = float(v)
        names = list(self.names) if self.names is not None else [f"row{i}" for i in range(L)]
        if len(names) != L:
            raise ValueError(f"names has {len(names)} entries for {L} rows")
        allowed = np.ones((L, B), bool) if self.allowed is None else np.asarray(self.allowed, bool)
        if allowed.shape != (L, B):
            raise ValueError(f"allowed has shape {allowed.shape}; expected {(L, B)}")
        allowed = allowed.copy()
        fixed = {}
        for r, b in dict(self.fixed).items():
            if not (0 <= int(r) < L) or not (0 <= int(b) < B):
                raise ValueError(f"fixed choice row {r} -> option {b} is out of range ({L} rows, {B} options)")
            if not allowed[int(r), int(b)]:
                raise ValueError(f"fixed choice {names[int(r)]} -> option {b} is not an allowed option")
            fixed[int(r)] = int(b)
            allowed[int(r)] = False
            allowed[int(r), int(b)] = True
        ties = []
        for g in self.ties:
            g = sorted({int(i) for i in g})
            if any(not 0 <= i < L for i in g):
                raise ValueError(f"tie group {g} has rows out of range 0..{L - 1}")
            if len(g) > 1:
                ties.append(g)
        object.__setattr__(self, "loss", loss)
        object.__setattr__(self, "costs", costs)
        object.__setattr__(self, "budgets", budgets)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "fixed", fixed)
        object.__setattr__(self, "ties", ties)
        object.__setattr__(self, "allowed", allowed)
        if self.bits is not None:
            bits = tuple(float(b) for b in np.asarray(self.bits, dtype=np.float64).reshape(-1))
            if len(bits) != B or not all(math.isfinite(b) and b > 0 for b in bits):
                raise ValueError(f"bits={list(self.bits)!r} must be {B} positive finite numbers (one per option)")
            object.__setattr__(self, "bits", bits)
        for grp in self.tie_groups():                     # a tie group must share an allowed option
            if not allowed[grp].all(0).any():
                fx = {names[i]: fixed[i] for i in grp if i in fixed}
                raise ValueError(f"tied layers {[names[i] for i in grp]} have no option allowed for all"
                                 + (f" (fixed choices {fx} conflict)" if fx else ""))

    @property
    def shape(self) -> tuple[int, int]:
        return self.loss.shape

    def tie_groups(self) -> list[list[int]]:
        """Ties merged transitively (union-find); singletons omitted."""
        if not self.ties:                                 # fast path: 10^5..10^6 rows, no ties
            return []
        parent = list(range(self.loss.shape[0]))

        def find(i):
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i
        for g in self.ties:
            for i in g[1:]:
                parent[find(i)] = find(g[0])
        groups: dict[int, list[int]] = {}
        for i in range(len(parent)):
            groups.setdefault(find(i), []).append(i)
        return [g for g in groups.values() if len(g) > 1]

    def with_budgets(self, **budgets: float) -> "Problem":
        """A copy with some budgets replaced (same tables)."""
        return Problem(self.loss, self.costs, {**self.budgets, **budgets}, self.ties, self.names,
                       self.fixed, self.allowed, self.bits)

    def reduced(self) -> tuple["Problem", np.ndarray]:
        """Contract tie groups into single rows (tables summed, allowed intersected).

        Returns ``(problem_without_ties, row_of)`` where ``row_of[l]`` is the reduced row of layer l;
        a reduced choice ``c`` expands to ``c[row_of]``. Without ties this is ``(self, arange(L))``
        (fixed choices are already encoded in ``allowed``): no copy of 10^6-row tables.

        Example: ``red, row_of = p.reduced(); choice = red_choice[row_of]``
        """
        L = self.loss.shape[0]
        groups = self.tie_groups()
        if not groups:                                    # nothing to contract (fixed is in allowed)
            return self, np.arange(L)
        row_of = np.arange(L)
        for g in groups:
            row_of[g] = g[0]
        reps, row_of = np.unique(row_of, return_inverse=True)
        R = len(reps)

        def add(t):                                       # (L, B) -> (R, B), rows of a group summed
            out = np.zeros((R, t.shape[1]))
            np.add.at(out, row_of, t)
            return out
        allowed = np.ones((R, self.loss.shape[1]), bool)
        np.logical_and.at(allowed, row_of, self.allowed)
        members: list[list[str]] = [[] for _ in range(R)]
        for i, r in enumerate(row_of.tolist()):           # O(L), not O(L·R)
            members[r].append(self.names[i])
        names = ["+".join(m) for m in members]
        p = Problem(add(self.loss), {k: add(v) for k, v in self.costs.items()}, dict(self.budgets),
                    [], names, {}, allowed, self.bits)
        return p, row_of

    def evaluate(self, choice) -> tuple[float, dict[str, float]]:
        """Objective and per-budget totals of a choice vector (L,)."""
        c = np.asarray(choice, dtype=np.int64)
        rows = np.arange(len(c))
        return (float(self.loss[rows, c].sum()),
                {k: float(v[rows, c].sum()) for k, v in self.costs.items()})

    def violations(self, choice) -> list[str]:
        """Human-readable list of every constraint a choice breaks (empty = feasible)."""
        c = np.asarray(choice, dtype=np.int64)
        L, B = self.loss.shape
        if c.shape != (L,) or c.min() < 0 or c.max() >= B:
            return [f"choice must be {L} option indices in 0..{B - 1}"]
        out = [f"{self.names[l]} takes option {c[l]}, not allowed" for l in np.flatnonzero(
            ~self.allowed[np.arange(L), c])]
        out += [f"tied layers {[self.names[i] for i in g]} take different options"
                for g in self.tie_groups() if len(set(c[g])) > 1]
        _, totals = self.evaluate(c)
        for k, cap in self.budgets.items():
            if totals[k] > cap + FEAS_RTOL * max(abs(cap), 1.0):
                out.append(f"budget {k!r}: total {totals[k]:.10g} > {cap:.10g}")
        return out

    def smallest_feasible(self) -> dict[str, float]:
        """For each budget, the smallest value it can take on its own (ties, fixed, allowed honoured)."""
        red, _ = self.reduced()
        out = {}
        for k in self.budgets:
            c = np.where(red.allowed, red.costs[k], np.inf)
            out[k] = float(c.min(1).sum())
        return out

    def check_budgets(self) -> None:
        """Raise :class:`InfeasibleBudgetError` if some budget is infeasible even on its own."""
        small = self.smallest_feasible()
        bad = {k: v for k, v in small.items() if v > self.budgets[k] + FEAS_RTOL * max(abs(v), 1.0)}
        if bad:
            msg = "; ".join(f"budget {k!r} = {self.budgets[k]:.10g} is below the smallest feasible "
                            f"value {v:.10g}" for k, v in bad.items())
            raise InfeasibleBudgetError(msg, small)


@dataclass(frozen=True)
class Solution:
    """A solver's answer. ``status`` is ``"optimal"`` only when ``bound`` proves it (gap <= tol)."""
    choice: np.ndarray            # (L,) option index per row
    objective: float              # Σ loss at choice, recomputed from the tables
    bound: float                  # proven lower bound on the optimum (-inf when none)
    status: str                   # "optimal" | "feasible"
    method: str                   # registry name of the solver that produced it
    seconds: float                # wall time of build + solve
    totals: dict[str, float]      # name -> Σ cost at choice
    info: dict = field(default_factory=dict)   # solver-specific details (build_s, solve_s, nodes, ...)

    @property
    def gap(self) -> float:
        """Relative optimality gap (objective − bound) / max(|objective|, 1e-12); 0 when proven."""
        if not math.isfinite(self.bound):
            return math.inf
        return max(0.0, self.objective - self.bound) / max(abs(self.objective), 1e-12)
