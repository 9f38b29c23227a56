"""The joint search behind :func:`bitplan.refine`: level swaps under every budget, staged selection
on measured loss, and an additive model corrected from the measurements and re-solved exactly.

Search (EvoPress: Sieberling et al., "EvoPress: Accurate Dynamic Model Compression via Evolutionary
Search", ICML 2025). The parent is the best plan measured so far (the solver's plan at first). An
offspring raises 1..``max_swaps`` layers one or two rungs of their option ladder (allowed options
sorted by the primary cost: size when it is a budget) and lowers other layers until every budget
(size, BOPs, latency) holds again — a lowering never raises any cost — then spends leftover budget on
a few more raises. Selection is staged: the surrogate (below) ranks a pool of offspring; the best half
plus a random half are measured on a few calibration batches (the cheap stage, the same batches for
the whole run so losses compare); the best ``survivors`` of them are measured on all batches, and the
best of those replaces the parent only when its full loss is lower (elitism: never worse than the
start). A plan measured on all batches is never proposed again, one measured on the cheap batches
costs nothing to rank again, so a search that runs out of new offspring has measured its whole
neighbourhood on all batches: it stops at a measured local optimum ("exhausted"). Tie groups and pinned layers are rows of the reduced problem, so they move together.

Correction (HIGGS: Malinovskii et al., "Pushing the Limits of Large Language Model Quantization via
the Linearity Theorem", NAACL 2025 — loss ≈ Σ_l α_l t_l(b); ModelOpt auto_quantize fits per-layer
factors the same way). First every row is probed one rung down from the start (a slope per layer at
the operating point, measured on the cheap batches). From every plan measured on the cheap batches,
``y ≈ β + Σ_r α_r T[r, c_r]`` is fitted by least squares with a ridge towards one common factor α0
and α_r ≥ 0.05 α0; every ``resolve_every`` generations the corrected tables ``α_r · T`` of three ridge
strengths are re-solved exactly (``allocator.solve``) and their plans join the candidates — kept
only when they measure better, like any offspring. The middle fit also ranks the offspring pool.

Example:
    >>> s = Search(meter, problem, table, start, Config(), seed=0, deadline=time.perf_counter() + 60)
    >>> best_choice = s.run()
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np

from .space import Space

__all__ = ["Config", "Search", "fit_alpha"]


@dataclass
class Config:
    """Knobs of the search (``bitplan.refine(..., **opts)``); defaults sized for a 2-core CPU."""
    offspring: int = 8              # candidates measured on the cheap batches per generation (λ)
    pool: int = 6                   # offspring proposed per measured one, ranked by the surrogate
    survivors: int = 2              # best candidates of the cheap stage measured on all batches
    cheap_batches: int | None = None   # batches of the cheap stage; None = ceil(batches / 4)
    max_swaps: int = 3              # most layers raised by one offspring (each with its lowerings)
    probes: bool = True             # measure every layer one rung down first (slopes for the fit)
    resolve_every: int = 3          # generations between corrected re-solves
    patience: int = 40              # generations without a better plan before stopping
    max_evals: int | None = None    # most distinct plans measured (any stage); None = time only
    ridge: float = 3.0              # pull of each α_r towards the common factor (relative to its data)
    solver: str | None = None       # re-solve with this registered solver; None = the plan's, else "auto"

    def __post_init__(self):
        for k in ("offspring", "pool", "survivors", "max_swaps", "resolve_every", "patience"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{k}={v!r} must be a positive int")
        for k in ("cheap_batches", "max_evals"):
            v = getattr(self, k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{k}={v!r} must be None or a positive int")
        if not isinstance(self.ridge, (int, float)) or not self.ridge >= 0:
            raise ValueError(f"ridge={self.ridge!r} must be a number >= 0")


def fit_alpha(X: np.ndarray, y: np.ndarray, ridge: float, floor: float = 0.05) -> tuple[np.ndarray, float]:
    """α (R,) with ``y ≈ β + X α`` (X (P, R): the table entry of each row in each measured plan),
    ridge towards one common factor α0 (fitted first on the row sums), α >= ``floor`` · α0 (a row
    the data calls free would otherwise be dropped to its lowest option); returns (α, α0).

    Factors under the floor are pinned to it and the others refitted (an active set, at most R rounds)."""
    Xc, yc = X - X.mean(0), y - y.mean()
    s = Xc.sum(1)
    a0 = float(s @ yc / (s @ s)) if s @ s > 0 else 1.0
    a0 = a0 if a0 > 0 else 1.0
    d = (Xc ** 2).sum(0)                                        # (R,) data energy of each column
    lam = ridge * d + 1e-6 * max(d.mean(), 1e-300)              # no data on a row: α stays α0
    G, h = Xc.T @ Xc + np.diag(lam), Xc.T @ yc + lam * a0        # normal equations of the ridge fit
    lb = floor * a0
    alpha = np.full(len(d), lb)
    free = np.ones(len(d), bool)
    while free.any():                                           # α = lb on pinned rows, solve the rest
        rhs = h[free] - G[np.ix_(free, ~free)] @ alpha[~free]
        sub = np.linalg.solve(G[np.ix_(free, free)], rhs)
        if (sub >= lb).all():
            alpha[free] = sub
            break
        free[np.flatnonzero(free)[sub < lb]] = False
    return alpha, a0


class Search:
    """One refine run: measure, mutate, select, fit, re-solve, until time / patience / max_evals."""

    def __init__(self, meter, problem, table: np.ndarray, start: np.ndarray, cfg: Config, seed: int,
                 deadline: float, solver: str = "auto"):
        self.meter, self.problem, self.cfg, self.deadline, self.solver = meter, problem, cfg, deadline, solver
        self.table = np.asarray(table, float)                          # (L, B) additive table
        self.sp = Space(problem, self.table)
        self.rng = np.random.default_rng(seed)
        nb = len(meter.batches)
        k = cfg.cheap_batches or math.ceil(nb / 4)
        self.cheap = list(range(min(k, nb)))                            # the cheap stage's batches
        self.all = list(range(nb))
        self.parent = self.sp.of_layers(np.asarray(start))
        self.start = self.parent.copy()
        self.alpha = np.ones(self.sp.red.shape[0])
        self.alpha0 = 1.0
        self.seen: set[tuple] = set()                                  # reduced plans measured (any stage)
        self.done: set[tuple] = set()                                  # ... measured on every batch
        self.source = {self.key(self.start): "start"}
        self.accepted = {"search": 0, "resolve": 0}
        self.generations, self.resolves, self.stopped = 0, 0, None
        self.fits, self.seconds = 0, 0.0
        self.t0 = time.perf_counter()
        self.trace: list[tuple] = []                                   # (s, full loss, source, candidates) per step

    # ------------------------------------------------------------------ measuring
    def key(self, c) -> tuple:
        return tuple(int(x) for x in c)

    def time_left(self) -> bool:
        return time.perf_counter() < self.deadline

    def budget_left(self) -> bool:
        return self.cfg.max_evals is None or len(self.seen) < self.cfg.max_evals

    def loss(self, c, idx) -> float | None:
        k = self.key(c)
        if k not in self.seen:
            if not self.budget_left():
                return None
            self.seen.add(k)
        v = self.meter.measure(self.sp.to_layers(c), idx, self.deadline)
        if v is not None and len(idx) == len(self.all):
            self.done.add(k)
        return v

    def full(self, c) -> float | None:
        return self.meter.full(self.sp.to_layers(c))

    def cheap_loss(self, c) -> float | None:
        """Loss on the cheap batches if already measured there (no forward)."""
        row = self.meter.losses.get(self.key(self.sp.to_layers(c)))
        if row is None or np.isnan(row[self.cheap]).any():
            return None
        return float(row[self.cheap].mean())

    # ------------------------------------------------------------------ selection
    def consider(self, cands: list, origin: str) -> bool:
        """Cheap stage on ``cands`` then all batches for the best few; True when the parent improved."""
        scored = []
        for c in cands:
            if not self.time_left():
                break
            v = self.loss(c, self.cheap)
            if v is not None:
                scored.append((v, len(scored), c))
        best, best_v = None, self.full(self.parent)
        for v, _, c in sorted(scored, key=lambda t: (t[0], t[1]))[:self.cfg.survivors]:
            f = self.loss(c, self.all)
            if f is not None and f < best_v:
                best, best_v = c, f
        if best is None:
            return False
        self.parent = best
        src = self.source.setdefault(self.key(best), origin)
        self.accepted[src] += 1
        self.trace.append((time.perf_counter() - self.t0, best_v, src, len(self.seen)))
        return True

    def proposals(self) -> list:
        """λ new offspring of the parent: the surrogate's best half + a random half of a larger pool.
        When small level swaps find nothing new, wide ones (any number of rows, long raises) are tried."""
        return self._proposals(self.cfg.max_swaps, 0.5) or self._proposals(self.sp.red.shape[0], 0.2)

    def _proposals(self, max_swaps: int, p: float) -> list:
        want = self.cfg.offspring * self.cfg.pool
        pool, keys = [], set()
        for _ in range(4 * want):                                # a spent neighbourhood ends the pool
            if len(pool) >= want:
                break
            c = self.sp.mutate(self.parent, self.rng, max_swaps, p)
            if c is None:
                continue
            k = self.key(c)
            if k in keys or k in self.done:                      # fully measured: nothing to learn
                continue
            keys.add(k)
            pool.append(c)
        if not pool:
            return []
        pred = np.array([self.predict(c) for c in pool])
        order = np.argsort(pred, kind="stable")
        n_best = (self.cfg.offspring + 1) // 2
        chosen = list(order[:n_best])
        rest = order[n_best:]
        if len(rest):
            chosen += list(self.rng.choice(rest, size=min(len(rest), self.cfg.offspring - n_best), replace=False))
        return [pool[i] for i in chosen]

    def predict(self, c) -> float:
        R = len(c)
        return float((self.alpha * self.sp.T[np.arange(R), c]).sum())

    # ------------------------------------------------------------------ correction
    def fit(self, ridge: float) -> np.ndarray | None:
        """α (R,) fitted on every plan measured on the cheap batches; None with fewer than 2 plans."""
        X, y = [], []
        R = self.sp.red.shape[0]
        for key, row in self.meter.losses.items():
            if np.isnan(row[self.cheap]).any():
                continue
            c = self.sp.of_layers(np.array(key))
            X.append(self.sp.T[np.arange(R), c])
            y.append(float(row[self.cheap].mean()))
        if len(y) < 2:
            return None
        alpha, self.alpha0 = fit_alpha(np.array(X), np.array(y), ridge)
        self.fits += 1
        return alpha

    def corrected_problem(self, alpha: np.ndarray):
        """The Problem with the corrected table α_r · T (layer rows take their reduced row's α)."""
        loss = alpha[self.sp.row_of][:, None] * self.table
        return dataclasses.replace(self.problem, loss=loss)

    def resolve(self) -> None:
        """Fit α at three ridge strengths (ridge / 3, ridge, 3 ridge), re-solve each corrected table
        exactly and consider the new plans like offspring; the middle fit ranks later offspring."""
        from ..allocator import solve
        cands, keys = [], set()
        for f in (1 / 3, 1.0, 3.0):
            if not self.time_left():
                return
            alpha = self.fit(self.cfg.ridge * f)
            if alpha is None:
                return
            if f == 1.0:
                self.alpha = alpha
            left = max(0.5, self.deadline - time.perf_counter())
            try:
                sol = solve(self.corrected_problem(alpha), method=self.solver, time_limit=min(30.0, left))
            except (ValueError, RuntimeError):    # a solver that cannot take this problem: keep searching
                continue
            self.resolves += 1
            c = self.sp.of_layers(np.asarray(sol.choice))
            k = self.key(c)
            if k not in self.done and k not in keys:
                keys.add(k)
                self.source.setdefault(k, "resolve")
                cands.append(c)
        if cands:
            self.consider(cands, "resolve")

    # ------------------------------------------------------------------ the run
    def probe(self) -> None:
        """Every row one rung down from the start, on the cheap batches (slopes for the first fit)."""
        for r in self.rng.permutation(self.sp.red.shape[0]):
            if not self.time_left() or not self.budget_left():
                return
            o = self.sp.below(self.parent, r)
            if o is None:
                continue
            c = self.parent.copy()
            c[r] = o
            self.loss(c, self.cheap)

    def run(self) -> np.ndarray:
        """The best plan measured (layer choice (L,)); the start when nothing measured better."""
        t0 = self.t0 = time.perf_counter()
        self.seen.add(self.key(self.start))
        self.done.add(self.key(self.start))
        self.meter.measure(self.sp.to_layers(self.start), self.all)          # always, even past the limit
        try:
            return self._run()
        finally:
            self.seconds = time.perf_counter() - t0

    def _run(self) -> np.ndarray:
        if self.cfg.probes:
            self.probe()
        self.resolve()
        stall = 0
        while True:
            if not self.time_left():
                self.stopped = "time"
                break
            if not self.budget_left():
                self.stopped = "max_evals"
                break
            cands = self.proposals()
            if not cands:
                self.resolve()                    # the neighbourhood is spent: one last corrected try
                if not self.proposals():
                    self.stopped = "exhausted"
                    break
                continue
            self.generations += 1
            if self.consider(cands, "search"):
                stall = 0
            else:
                stall += 1
            if self.generations % self.cfg.resolve_every == 0:
                self.resolve()
            if stall >= self.cfg.patience:
                self.resolve()
                self.stopped = "patience"
                break
        return self.sp.to_layers(self.parent)
