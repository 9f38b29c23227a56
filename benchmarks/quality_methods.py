"""Methods of the quality benchmark: each turns one task + one size budget into a Plan.

Every estimator is scored ONCE per task (timed) and re-solved at every budget. Anchors, each as its
paper describes it, all with per-channel symmetric weights (the shared quantizer):

- ``uniform``    every layer at b bits, b = 3..8 (the reference line; budgets are its sizes).
- ``random``     10 random plans per budget over {2,3,4,6,8}: start at 2 bits everywhere, then raise a
                 random layer one option at a time while the budget allows (fills the budget).
- ``hawq_v3``    Yao et al. 2021: Tr(H_l)/n_l · ‖ΔW‖² (``hessian``), options {4, 8} only, ILP.
- ``modelopt``   NVIDIA ModelOpt auto_quantize-style: ``fisher`` (output Taylor) scores + ILP.
- ``lwq_lim`` / ``lwq_zd``  Dumitru et al. 2024: rank layers by LIM or ZD importance, most important
                 first, and cut: a prefix of the ranking gets the high level, the rest the low one;
                 two levels, (2, 4) below the uniform-4 size and (4, 8) from it on.
- ``calibtip``   Hubara et al. 2021: ``measured`` one-layer-at-a-time Δloss + ILP.
- ``bitplan[...]`` candidates: an estimator + ILP over {2,3,4,6,8} × {per-channel, group g}; the
                 report names the one that wins.
Anchors other than HAWQ-V3 get options {2,3,4,6,8} per channel so they differ from bitplan's
candidates only in the estimator (and LWQ in its rank-and-cut rule).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from bitplan.allocator import Problem, solve
from bitplan.costmodels import size_table
from bitplan.allocator import InfeasibleBudgetError
from bitplan.core.spec import QuantSpec, option_grid
from bitplan.costmodels.size import storage_kind
from bitplan.kernels.quantizer import fake_quantize
from bitplan.kernels.registry import kernel_nbytes
from bitplan.plan import Plan
from bitplan.sensitivity import ESTIMATORS, Sensitivity, score

__all__ = ["Context", "Scored", "get_table", "hessian_with_specs", "solve_plan", "uniform",
           "random_plans", "rank_and_cut", "make_plan", "BITS"]

BITS = (2, 3, 4, 6, 8)          # options of every mixed-precision method except HAWQ-V3 ({4, 8})


@dataclass
class Context:
    """One task prepared for the methods."""
    model: torch.nn.Module
    graph: object                    # bitplan LayerGraph
    base: int                        # bytes that are never quantized (embeddings, biases, norms)
    calib: list
    loss_fn: object
    seed: int = 0
    estimator_opts: dict = field(default_factory=dict)     # estimator name -> score() options
    estimator_calib: dict = field(default_factory=dict)    # estimator name -> calib batches (subset)
    tables: dict = field(default_factory=dict)             # cache: (est, group_size) -> Scored


@dataclass
class Scored:
    table: Sensitivity | None
    seconds: float
    error: str | None = None         # why the estimator could not run on this model


def get_table(ctx: Context, est: str, group_size=None, bits=BITS) -> Scored:
    """Score estimator ``est`` once (cached per group size); errors are kept, not raised."""
    key = (est, group_size, tuple(bits))
    if key in ctx.tables:
        return ctx.tables[key]
    if est not in ESTIMATORS:
        out = Scored(None, 0.0, f"estimator {est!r} not registered (have {sorted(ESTIMATORS)})")
    else:
        t0 = time.perf_counter()
        try:
            tab = score(ctx.model, ctx.estimator_calib.get(est, ctx.calib), method=est,
                        options=option_grid(bits, group_size), loss_fn=ctx.loss_fn, seed=ctx.seed,
                        graph=ctx.graph, **ctx.estimator_opts.get(est, {}))
            out = Scored(tab, time.perf_counter() - t0)
        except ValueError as e:          # e.g. lim on a model without blocks
            out = Scored(None, time.perf_counter() - t0, f"{type(e).__name__}: {e}")
    ctx.tables[key] = out
    return out


def hessian_with_specs(ctx: Context, specs: list[QuantSpec]) -> Scored:
    """HAWQ-V3 table for arbitrary (bits, group) columns from ONE trace estimate.

    loss[l, s] = ½ · max(Tr H_l, 0)/n_l · ‖Q_s(W_l) − W_l‖² (the ``hessian`` estimator's formula):
    the traces do not depend on the quantizer, so only ‖ΔW‖² is recomputed per column.
    """
    base = get_table(ctx, "hessian", None)
    if base.table is None:
        return base
    t0 = time.perf_counter()
    tr = np.maximum(np.asarray(base.table.meta["trace"], dtype=np.float64), 0.0)   # (L,)
    rows = []
    for lay in ctx.graph.layers:
        w = _weight_2d(ctx.model, lay).detach().float()                             # (N, K)
        rows.append([float((fake_quantize(w, s.bits, s.group_size, s.symmetric).float() - w).pow(2).sum())
                     for s in specs])
    n = np.array([lay.n_params for lay in ctx.graph.layers], dtype=np.float64)
    loss = 0.5 * (tr / n)[:, None] * np.array(rows)                                 # (L, S)
    tab = Sensitivity(base.table.names, tuple(specs), loss, "hessian", None, base.table.model_fingerprint,
                      dict(base.table.meta))
    return Scored(tab, base.seconds + time.perf_counter() - t0)


def _weight_2d(model, lay):
    from bitplan.core.graph import layer_weight_2d
    return layer_weight_2d(model.get_submodule(lay.name), lay.kind)


def nbytes(spec, layer) -> int:
    return kernel_nbytes(spec, layer.out_features, layer.in_features, "cpu", storage_kind(layer))


def make_plan(ctx: Context, specs: list[QuantSpec], name: str, extra: dict | None = None) -> Plan:
    """A Plan with one spec per layer (graph order) and its exact predicted size."""
    from bitplan.assemble import make_plan as build
    return build(ctx.graph, {l.name: s for l, s in zip(ctx.graph.layers, specs)}, ctx.base,
                 estimator={"name": name, **(extra or {})}, solver={"name": name})


def solve_plan(ctx: Context, loss: np.ndarray, specs: list[QuantSpec], budget: float, name: str,
               solver: str = "ilp"):
    """ILP over the given columns under ``budget`` bytes (whole model); (Plan | None, seconds, status)."""
    from bitplan.options import resolve_options
    t0 = time.perf_counter()
    size = size_table(ctx.graph.layers, specs)                                        # (L, S) bytes
    allowed = resolve_options(ctx.graph, options=specs).allowed       # e.g. no g32 where K % 32 != 0
    prob = Problem(np.where(allowed, loss, 0.0), {"size_bytes": np.where(allowed, size, 0.0)},
                   {"size_bytes": budget - ctx.base}, names=ctx.graph.names, allowed=allowed)
    try:
        sol = solve(prob, method=solver)
    except InfeasibleBudgetError:
        return None, time.perf_counter() - t0, "infeasible"
    plan = make_plan(ctx, [specs[c] for c in sol.choice], name,
                     {"solver": sol.method, "status": sol.status})
    return plan, time.perf_counter() - t0, sol.status


def uniform(ctx: Context, bits: int) -> Plan:
    return make_plan(ctx, [QuantSpec(bits)] * len(ctx.graph.layers), f"uniform-{bits}")


def random_plans(ctx: Context, budget: float, n: int, seed: int, bits=BITS) -> list[Plan]:
    """``n`` random plans that fill ``budget``: raise random layers one option at a time."""
    size = size_table(ctx.graph.layers, [QuantSpec(b) for b in bits])                # (L, B)
    cap = budget - ctx.base
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        c = np.zeros(len(size), dtype=np.int64)
        total = size[:, 0].sum()
        while True:
            up = [l for l in range(len(c)) if c[l] + 1 < size.shape[1]
                  and total - size[l, c[l]] + size[l, c[l] + 1] <= cap]
            if not up:
                break
            l = up[rng.integers(len(up))]
            total += size[l, c[l] + 1] - size[l, c[l]]
            c[l] += 1
        out.append(make_plan(ctx, [QuantSpec(bits[j]) for j in c], "random"))
    return out


def rank_and_cut(ctx: Context, importance: np.ndarray, budget: float, levels: tuple[int, int]):
    """LWQ: layers by importance (desc, ties in network order); the longest prefix that fits gets
    ``levels[1]`` bits, the rest ``levels[0]``. None if even all-low does not fit."""
    lo, hi = QuantSpec(levels[0]), QuantSpec(levels[1])
    layers = ctx.graph.layers
    s_lo = np.array([nbytes(lo, l) for l in layers], dtype=np.float64)
    s_hi = np.array([nbytes(hi, l) for l in layers], dtype=np.float64)
    total = ctx.base + s_lo.sum()
    if total > budget:
        return None
    order = sorted(range(len(layers)), key=lambda i: (-importance[i], i))
    specs = [lo] * len(layers)
    for i in order:
        if total - s_lo[i] + s_hi[i] > budget:
            break                                  # cut: the ranking is a prefix
        total += s_hi[i] - s_lo[i]
        specs[i] = hi
    return make_plan(ctx, specs, "lwq")
