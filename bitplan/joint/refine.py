"""``bitplan.refine``: improve a plan by measuring whole plans, past the additive model.

Every allocator bitplan matches assumes a plan's loss is the sum of its layers' one-at-a-time losses.
It is not (EvoPress, ICML 2025; bitplan's own ``benchmarks/sensitivity_validity.py``), least of all at
2-3 average bits. ``refine`` starts from a plan (the exact optimum of the additive model), searches
level swaps that keep EVERY budget (size, BOPs, latency), measures each candidate's real loss on the
calibration data with fake quantization, corrects the additive table from those measurements and
re-solves it exactly, and returns the best plan it measured: never worse than the start, never over a
budget, the same plan for the same seed and the same number of measured candidates
(``max_evals=``; with only a time limit the result depends on how far the search got). The search
and the correction are in ``refine_search.py``, the fast measuring in ``refine_eval.py``.

What it records in ``plan.solver["refine"]``: the start's predicted vs measured loss (the additivity
gap), the final measured loss, candidates measured, seconds, where the result came from ("start",
"search" or "resolve": the corrected re-solve), and the held-out loss of start and result when
``heldout=`` batches are given (the search optimises the calibration loss; held-out shows overfitting).

Example:
    >>> plan = bitplan.allocate(model, budget_mb=5.0, calib_data=batches)
    >>> better = bitplan.refine(model, plan, batches, seconds=60)
    >>> better.solver["refine"]["measured"], better.solver["refine"]["start_measured"]
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
import time
import warnings

import numpy as np
import torch

from ..plan import Plan

__all__ = ["refine"]

_MADE_BY_MAKE_PLAN = {"bitplan_version", "torch_version", "python", "created", "base_bytes", "layer_shapes",
                      "layer_kinds", "layer_bytes", "aliases", "skipped", "layer_order"}


def _options(graph, plan: Plan, options):
    """Options (specs + (L, B) allowed) of the run: given, recorded in the plan, or the defaults."""
    from ..core.spec import QuantSpec, spec_from_dict
    from ..options import Options, resolve_options
    if isinstance(options, Options):
        return options
    if options is not None:
        return resolve_options(graph, options=options)
    rec = plan.estimator.get("options")
    if rec:
        return resolve_options(graph, options=[spec_from_dict(d, "plan.estimator.options") for d in rec])
    base = resolve_options(graph).specs
    extra = tuple(dict.fromkeys(s for s in plan.layers.values() if isinstance(s, QuantSpec) and s not in base))
    return resolve_options(graph, options=base + extra)


def _problem(graph, plan: Plan, opts, loss: np.ndarray, base: int, latency_profile, latency_fixed,
             latency_tokens, keep):
    """The allocator Problem of the plan's budgets (net of fixed bytes / ms), rebuilt from the plan."""
    from ..api import build_problem
    from ..costmodels import MB
    b = dict(plan.budgets)
    if not b:                                  # a plan without budgets (uniform): never grow it
        b = {"size_bytes": float(plan.predicted["size_bytes"])}
    unknown = sorted(set(b) - {"size_bytes", "bops", "latency_ms"})
    if unknown:
        raise ValueError(f"plan budgets {unknown} are not known to refine (size_bytes, bops, latency_ms)")
    if "latency_ms" in b and latency_profile is None:
        raise ValueError("the plan has a latency budget: pass latency_profile= (the profile it was planned "
                         "with) so every candidate can be checked against it")
    tbl = type("T", (), {"loss": loss, "allowed": opts.allowed})
    p, _ = build_problem(graph, tbl, opts, base, b["size_bytes"] / MB if "size_bytes" in b else None,
                         b.get("bops"), latency_profile, b.get("latency_ms"), plan.meta.get("tie"), keep,
                         latency_fixed, latency_tokens)
    return p


def _check(seconds, seed, plan, model):
    if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real) or not math.isfinite(float(seconds)) \
            or seconds <= 0:
        raise ValueError(f"seconds={seconds!r} must be a positive finite number")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed={seed!r} must be an int")
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a bitplan.Plan (e.g. bitplan.Plan.load(path)), got {type(plan).__name__}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _config(opts: dict):
    from .search import Config
    known = {f.name for f in dataclasses.fields(Config)}
    bad = sorted(set(opts) - known)
    if bad:
        raise TypeError(f"refine got unknown option(s) {bad}; search options are {sorted(known)}")
    return Config(**opts)


def _weight_error_table(meter, allowed: np.ndarray) -> np.ndarray:
    """(L, B) relative weight error ‖Q_b(W) − W‖² / ‖W‖² (HIGGS's t_l(b)); scaled per layer by the fit."""
    out = np.zeros(allowed.shape)
    for i, j in zip(*np.nonzero(allowed)):
        w = meter.fp[i].float()
        out[i, j] = float((meter._q(int(i), int(j)).float() - w).pow(2).sum() / w.pow(2).sum().clamp(min=1e-30))
    return out


def refine(model: torch.nn.Module, plan: Plan, calib_data, loss_fn=None, seconds: float = 60, *, table=None,
           problem=None, options=None, seed: int = 0, heldout=None, latency_profile=None,
           latency_fixed: str | None = None, latency_tokens: int | None = None, keep: dict | None = None,
           cache_mb: float = 1024.0, **search_opts) -> Plan:
    """A plan at least as good as ``plan`` on the measured calibration loss, within the same budgets.

    ``loss_fn`` as in :func:`bitplan.allocate` (None: label-free KL / MSE to the fp model's output).
    ``seconds`` bounds the wall time up to the end of the search (the model copy, the fp references
    and a table without ``table=`` count; the start is measured on every batch even past the limit;
    the held-out measurements come after). ``table`` (a Sensitivity for the plan's
    options, or its path) and ``problem`` (the allocator Problem, budgets net of fixed costs) are what
    :func:`bitplan.allocate` passes; without them the problem is rebuilt from the plan (its options,
    budgets and tie mode; ``latency_profile`` is then needed for a latency budget, ``keep`` re-pins
    layers) and the table is each layer's relative weight error, scaled per layer from the
    measurements. ``heldout``: batches on which the start and the result are also measured.
    ``search_opts``: :class:`bitplan.refine_search.Config` fields (``max_evals``, ``offspring``, ...).
    The model and torch's global RNG are never touched.

    Example:
        >>> better = bitplan.refine(model, plan, batches, seconds=120, heldout=held)
        >>> better.solver["refine"]["additivity_gap"]
    """
    from ..allocator import SOLVERS
    from ..apply import check_plan
    from ..assemble import make_plan
    from ..core.batches import as_batches
    from ..core.graph import LayerGraph
    from ..costmodels import base_nbytes
    from .meter import PlanMeter
    from .search import Search

    t0 = time.perf_counter()
    _check(seconds, seed, plan, model)
    deadline = t0 + float(seconds)
    cfg = _config(search_opts)
    batches = as_batches(calib_data)
    held = as_batches(heldout, "heldout") if heldout is not None else None
    check_plan(model, plan)
    graph = LayerGraph.build(model, batches[0], forward=(lambda m, b: loss_fn(m, b)) if callable(loss_fn) else None)
    base = base_nbytes(model, graph.names)
    opts = _options(graph, plan, options)
    specs = list(opts.specs)
    pos = {s: j for j, s in enumerate(specs)}
    missing = [n for n in graph.names if plan.layers[n] not in pos]
    if missing:
        raise ValueError(f"{len(missing)} layer(s) of the plan use options that are not among the run's "
                         f"options, e.g. {missing[0]}: {plan.layers[missing[0]].label}")
    start = np.array([pos[plan.layers[n]] for n in graph.names])                       # (L,)
    meter = PlanMeter(model, graph, specs, batches, loss_fn, cache_mb, held)
    try:
        real = table is not None or problem is not None         # a loss table in the loss's units
        if table is not None:
            from ..sensitivity import Sensitivity, load as load_table
            if not isinstance(table, Sensitivity):
                if not isinstance(table, (str, os.PathLike)):
                    raise TypeError(f"table must be a Sensitivity or a path to one, got {type(table).__name__}")
                table = load_table(table)
            table.check_matches(graph.names, specs, graph.fingerprint, "refine's table")
            T, what = np.asarray(table.loss, float), f"sensitivity table ({table.method})"
        elif problem is not None:
            T, what = np.asarray(problem.loss, float), "the problem's loss table"
        else:
            T, what = _weight_error_table(meter, opts.allowed), "relative weight error (HIGGS t_l), no table given"
        if problem is None:
            problem = _problem(graph, plan, opts, T, base, latency_profile, latency_fixed, latency_tokens, keep)
        if problem.shape != (len(graph.names), len(specs)) or list(problem.names) != graph.names:
            raise ValueError(f"problem has shape {problem.shape} over {problem.names[:2]}...; the model and "
                             f"options give {(len(graph.names), len(specs))} over {graph.names[:2]}...")
        bad = problem.violations(start)
        if bad:
            raise ValueError(f"the plan to refine does not meet its own problem: {bad[:3]}")
        solver = cfg.solver or (plan.solver.get("name") if plan.solver.get("name") in SOLVERS else "auto")
        search = Search(meter, problem, T, start, cfg, int(seed), deadline, solver)
        with torch.random.fork_rng(devices=[]):
            best = search.run()
        if problem.violations(best):           # cannot happen (every candidate is checked); never risk it
            warnings.warn(f"refine: the best plan breaks {problem.violations(best)[:2]}; returning the start",
                          RuntimeWarning, stacklevel=2)
            best = start
        pred0 = float(T[np.arange(len(start)), start].sum()) if real else plan.predicted.get("loss")
        rec = _record(search, meter, T, start, best, what, pred0, seconds, t0, seed)
    finally:
        meter.close()
    same = bool((best == start).all())
    layers = {n: specs[int(c)] for n, c in zip(graph.names, best)}
    predicted = dict(plan.predicted)
    _, now = problem.evaluate(start)
    _, new = problem.evaluate(best)
    for k in problem.costs:                    # recorded totals = net totals + the fixed part
        predicted[k] = float(new[k] + (plan.predicted[k] - now[k] if k in plan.predicted else 0.0))
    if real:
        predicted["loss"] = float(T[np.arange(len(best)), best].sum())
    elif not same:
        predicted.pop("loss", None)            # the plan's table is not here: no prediction for the result
    meta = {k: v for k, v in plan.meta.items() if k not in _MADE_BY_MAKE_PLAN}
    if "kernels_here" in meta:
        from ..api import expected_kernels
        meta["kernels_here"] = expected_kernels(graph, layers)[0]
    return make_plan(graph, layers, base, budgets=plan.budgets, predicted=predicted, estimator=plan.estimator,
                     solver={**plan.solver, "refine": rec}, meta=meta)


def _record(search, meter, T, start, best, what, pred0, seconds, t0, seed) -> dict:
    """What ``plan.solver["refine"]`` says (every number a JSON value; losses are increases over fp)."""
    L = np.arange(len(start))
    m0 = meter.full(start) - meter.fp_loss                 # the start is always measured on every batch
    m1 = meter.full(best) - meter.fp_loss
    src = search.source.get(search.key(search.sp.of_layers(best)), "start")
    a = search.alpha
    rec = {"seconds": time.perf_counter() - t0, "search_s": search.seconds, "time_limit_s": float(seconds), "stopped": search.stopped,
           "seed": int(seed), "loss": meter.desc, "batches": len(meter.batches), "cheap_batches": len(search.cheap),
           "fp_loss": meter.fp_loss, "table": what,
           "start_predicted": None if pred0 is None else float(pred0), "start_measured": m0,
           "additivity_gap": (None if pred0 is None or not m0 else float((pred0 - m0) / m0)),
           "measured": m1, "source": src, "gain": None if not m0 else float(1 - m1 / m0),
           "accepted": dict(search.accepted), "candidates": len(search.seen), "forwards": meter.forwards,
           "trace": [{"s": t + search.t0 - t0, "measured": v - meter.fp_loss, "source": s, "candidates": n}
                     for t, v, s, n in search.trace],                # every step down, s since the call
           "generations": search.generations, "resolves": search.resolves, "fits": search.fits,
           "corrected_predicted": float((search.alpha[search.sp.row_of] * T[L, best]).sum()),
           "alpha": {"common": float(search.alpha0), "min": float(a.min()), "median": float(np.median(a)),
                     "max": float(a.max())}}
    if meter.heldout is not None:
        h0 = meter.heldout_loss(start) - meter.held_fp
        rec["heldout_start"] = h0
        rec["heldout"] = h0 if (best == start).all() else meter.heldout_loss(best) - meter.held_fp
        rec["heldout_batches"] = len(meter.heldout)
    return rec
