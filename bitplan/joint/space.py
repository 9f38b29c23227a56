"""The moves of :func:`bitplan.refine`'s search: level swaps that keep every budget.

:class:`Space` is the tie-reduced allocator Problem (a tie group is one row; pinned layers have one
allowed option) as plain lists: each row's ladder (its allowed options sorted by the primary cost,
size when it is a budget), the costs of every option under every budget, and, per option, the
options that raise no cost (the repair's lowerings). :meth:`Space.mutate` moves a few rows up (or
down) their ladders, lowers other rows until every budget holds — a lowering never raises any cost,
so size, BOPs and latency budgets all hold together — then spends what is left on a few raises.
The tolerance on a budget is the allocator's (``Problem.violations``), so a candidate is feasible
exactly when the Problem says so.

Example:
    >>> sp = Space(problem, table)                    # (L, B) table, summed over tie groups
    >>> child = sp.mutate(sp.of_layers(start), np.random.default_rng(0), max_swaps=3)
"""
from __future__ import annotations

import numpy as np

__all__ = ["Space"]


class Space:
    """The reduced problem (tie groups = one row): costs, caps, each row's option ladder, and the
    lowerings each option allows. Mutations run on plain lists (a few budgets, rows in the hundreds:
    Python floats beat numpy calls on length-3 vectors)."""

    def __init__(self, problem, table: np.ndarray):
        from ..allocator.problem import FEAS_RTOL
        self.red, self.row_of = problem.reduced()
        R, B = self.red.shape
        self.keys = list(problem.budgets)
        costs = np.stack([self.red.costs[k] for k in self.keys]) if self.keys else np.zeros((0, R, B))
        caps = np.array([problem.budgets[k] for k in self.keys], float)
        self.caps = (caps + FEAS_RTOL * np.maximum(np.abs(caps), 1.0)).tolist()   # Problem.violations' slack
        self.allowed = self.red.allowed
        self.T = self.rows(table)                                         # (R, B) additive table
        p = self.keys.index("size_bytes") if "size_bytes" in self.keys else 0
        prim = costs[p] if self.keys else -self.T
        self.ladder = [sorted(np.flatnonzero(self.allowed[r]).tolist(), key=lambda o: (prim[r, o], -self.T[r, o]))
                       for r in range(R)]
        self.top = [len(l) - 1 for l in self.ladder]                      # (R,) highest rung
        self.rank = np.full((R, B), -1)
        for r, lad in enumerate(self.ladder):
            self.rank[r, lad] = np.arange(len(lad))
        self.cost = [[costs[:, r, o].tolist() for o in range(B)] for r in range(R)]   # [r][o] -> K floats
        # [r][o]: options of row r that raise no cost from o, highest rung first (the repair's lowerings)
        self.down = [[[q for q in reversed(self.ladder[r]) if q != o and (costs[:, r, q] <= costs[:, r, o]).all()]
                      for o in range(B)] for r in range(R)]

    def rows(self, t: np.ndarray) -> np.ndarray:
        """(L, B) layer table -> (R, B), members of a tie group summed."""
        out = np.zeros((self.red.shape[0], t.shape[1]))
        np.add.at(out, self.row_of, t)
        return out

    def to_layers(self, c: np.ndarray) -> np.ndarray:
        return np.asarray(c)[self.row_of]

    def of_layers(self, choice: np.ndarray) -> np.ndarray:
        c = np.zeros(self.red.shape[0], np.int64)
        c[self.row_of] = choice
        return c

    def totals(self, c) -> list[float]:
        return [sum(self.cost[r][o][k] for r, o in enumerate(c)) for k in range(len(self.keys))]

    def _over(self, tot) -> list[int]:
        return [k for k, (t, cap) in enumerate(zip(tot, self.caps)) if t > cap]

    def lower(self, c, r, over) -> int | None:
        """Gentlest option of row r that lowers an over-budget cost and raises none; None if there is none."""
        cur = self.cost[r][c[r]]
        for q in self.down[r][c[r]]:
            if any(self.cost[r][q][k] < cur[k] for k in over):
                return q
        return None

    def below(self, c, r) -> int | None:
        """One rung down for a probe: the next lower option on the ladder that raises no cost."""
        d = [q for q in self.down[r][c[r]] if self.rank[r, q] < self.rank[r, c[r]]]
        return d[0] if d else None

    def _move(self, c, tot, r, o) -> None:
        old, new = self.cost[r][c[r]], self.cost[r][o]
        for k in range(len(tot)):
            tot[k] += new[k] - old[k]
        c[r] = o

    def mutate(self, c: np.ndarray, rng, max_swaps: int, p: float = 0.5) -> np.ndarray | None:
        """A level-swap offspring of ``c`` (R,) that meets every budget, or None.

        Moves a geometric(``p``) number of rows (at most ``max_swaps``) a geometric number of rungs,
        up with probability 3/4 (a loss that is not monotone in the bits makes downward moves worth
        trying too), lowers other rows until every budget holds, then raises a few rows into what is
        left."""
        c = [int(x) for x in c]
        R = len(c)
        tot = self.totals(c)
        up, down = set(), set()
        for _ in range(min(max_swaps, int(rng.geometric(p)))):
            can = [r for r in range(R) if r not in up and self.top[r] > 0]
            if not can:
                break
            u = can[int(rng.integers(len(can)))]
            step = int(rng.geometric(p)) * (1 if rng.random() < 0.75 else -1)
            self._move(c, tot, u, self.ladder[u][min(max(self.rank[u, c[u]] + step, 0), self.top[u])])
            up.add(u)
        if not up:
            return None
        order = rng.permutation(R).tolist()
        over, i, tried = self._over(tot), 0, 0
        while over:                                            # lower random rows until every budget holds
            r = order[i % R]
            i += 1
            o = None if r in up else self.lower(c, r, over)
            if o is None:
                tried += 1
                if tried > R:                                  # no row can help any more
                    return None
                continue
            self._move(c, tot, r, o)
            down.add(r)
            over, tried = self._over(tot), 0
        raises = len(up)
        for r in rng.permutation(R).tolist():                  # spend what is left: a few more raises
            if raises >= 2 * max_swaps:
                break
            if r in down or self.rank[r, c[r]] >= self.top[r]:
                continue
            o = self.ladder[r][self.rank[r, c[r]] + 1]
            if all(t + n - v <= cap for t, n, v, cap in zip(tot, self.cost[r][o], self.cost[r][c[r]], self.caps)):
                self._move(c, tot, r, o)
                raises += 1
        return np.array(c, np.int64)
