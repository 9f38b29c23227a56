"""``bitplan.allocate``: model + calibration data + budgets -> Plan.

model -> LayerGraph -> options (bits x group size x act bits x method, masked per layer) ->
sensitivity table (L x B) -> cost tables (L x B) -> Problem -> Solution -> Plan [-> refine].
"""
from __future__ import annotations

import math
import numbers
import warnings

import numpy as np
import torch

from .assemble import make_plan
from .core.graph import LayerGraph
from .core.spec import QuantSpec
from .options import DEFAULTS, Options, resolve_options
from .plan import Plan

__all__ = ["allocate", "build_problem", "expected_kernels"]


def _budget(name, v):
    if v is None:
        return None
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)) \
            or float(v) <= 0:
        raise ValueError(f"{name}={v!r} must be a positive finite number")
    return float(v)


def fixed_latency_ms(profile, name: str | None) -> float:
    """ms of the ops no option changes: ``profile.fixed[name]``; with ``name=None`` the profile's only
    fixed entry, or 0 (the budget then covers the quantizable layers alone) when it has none."""
    if name is None:
        if len(profile.fixed) > 1:
            raise ValueError(f"the latency profile has fixed costs for {sorted(profile.fixed)}; "
                             "say which one with latency_fixed=")
        if not profile.fixed:
            warnings.warn("latency profile has no fixed cost: max_latency_ms bounds the quantizable "
                          "layers only", stacklevel=3)
            return 0.0
        name = next(iter(profile.fixed))
    if name not in profile.fixed:
        raise ValueError(f"latency_fixed={name!r} is not in the profile; known: {sorted(profile.fixed)}")
    return float(profile.fixed[name]["median_ms"])


def _keep_mask(graph: LayerGraph, opts: Options, keep) -> np.ndarray:
    """(L, B) allowed after ``keep`` pins (fqn -> bits or QuantSpec; a tied module's alias names its layer)."""
    allowed = opts.allowed.copy()
    if keep is None:
        return allowed
    if not isinstance(keep, dict):
        raise TypeError(f"keep={keep!r} must be a dict layer name -> bits (int) or QuantSpec, "
                        "e.g. {'classifier': 8}")
    owner = {m: l.name for l in graph.layers for m in l.modules}
    for name, want in keep.items():
        if name not in owner:
            raise ValueError(f"keep={{{name!r}: ...}}: no quantizable layer of that name; layers are e.g. "
                             f"{graph.names[:3]}")
        i = graph.index(owner[name])
        if isinstance(want, QuantSpec):
            cols = [j for j, s in enumerate(opts.specs) if s == want]
        elif isinstance(want, (int, np.integer)) and not isinstance(want, (bool, np.bool_)):
            cols = [j for j, s in enumerate(opts.specs) if s.bits == int(want)]
        else:
            raise TypeError(f"keep={{{name!r}: {want!r}}}: give the bits as an int (e.g. 8) or a QuantSpec, "
                            f"not {type(want).__name__}")
        row = np.zeros(len(opts.specs), bool)
        row[cols] = True
        if not (row & allowed[i]).any():
            have = sorted({s.label for s, a in zip(opts.specs, allowed[i]) if a})
            raise ValueError(f"keep={{{name!r}: {want!r}}}: not among the options this layer can take {have}")
        allowed[i] &= row
    return allowed


def build_problem(graph: LayerGraph, table, opts: Options, base_bytes: int, budget_mb=None, max_bops=None,
                  latency_profile=None, max_latency_ms=None, tie=None, keep=None, latency_fixed=None,
                  latency_tokens=None, allowed=None):
    """Assemble the allocator Problem (budgets on the quantizable part: fixed bytes and fixed ms
    subtracted). Returns ``(problem, fixed_latency_ms)``."""
    from .allocator import Problem
    from .costmodels import MB, cost_table
    allowed = (_keep_mask(graph, opts, keep) if allowed is None else allowed) & table.allowed
    specs = list(opts.specs)
    costs = {"size_bytes": cost_table("size", graph.layers, specs, allowed=allowed)}
    budgets, fixed_ms = {}, 0.0
    if budget_mb is not None:
        budgets["size_bytes"] = budget_mb * MB - base_bytes
    if max_bops is not None:
        costs["bops"] = cost_table("bops", graph.layers, specs, allowed=allowed)
        budgets["bops"] = max_bops
    if max_latency_ms is not None:
        if latency_profile is None:
            raise ValueError("max_latency_ms needs latency_profile (a path or LatencyProfile from "
                             "`bitplan calibrate`)")
        from .costmodels.latency import load_profile
        prof = load_profile(latency_profile)
        costs["latency_ms"] = cost_table("latency", graph.layers, specs, allowed=allowed, profile=prof,
                                         tokens=latency_tokens)
        fixed_ms = fixed_latency_ms(prof, latency_fixed)
        budgets["latency_ms"] = max_latency_ms - fixed_ms
    bits = tuple(float(s.bits) for s in specs)         # (B,) each option's weight bits (convex fits BAQ on them)
    return Problem(table.loss, costs, budgets, graph.tie_groups(tie), graph.names, {}, allowed, bits), fixed_ms


def expected_kernels(graph: LayerGraph, specs: dict, device="cpu") -> tuple[dict, list[str]]:
    """({layer: kernel packed apply will run on ``device``}, [fallback lines]) for chosen specs."""
    from .costmodels.size import storage_kind
    from .kernels.registry import select_kernel
    out, falls = {}, []
    for l in graph.layers:
        s = specs[l.name]
        kname, why = select_kernel(s, l.out_features, l.in_features, device, storage_kind(l))
        out[l.name] = kname
        if why:
            falls.append(f"{l.name} ({s.label}, N={l.out_features}, K={l.in_features}): {why}")
    return out, falls


def _infeasible(e, base: int, fixed_ms: float):
    """The solver saw budgets net of the fixed bytes / ms: restate every number as a total."""
    from .allocator import InfeasibleBudgetError
    from .costmodels import MB
    small = {}
    for k, v in e.smallest.items():
        if k == "size_bytes":
            small["size_mb"] = (v + base) / MB
        elif k == "latency_ms":
            small["latency_ms"] = v + fixed_ms
        else:
            small[k] = v
    parts = [f"size {small['size_mb']:.6f} MB" if "size_mb" in small else "",
             f"latency {small['latency_ms']:.4f} ms" if "latency_ms" in small else "",
             f"BOPs {small['bops']:.6g}" if "bops" in small else ""]
    parts += [f"{k} {v:.6g}" for k, v in small.items() if k not in ("size_mb", "latency_ms", "bops")]
    msg = ("no plan meets the budgets together" if not any("below the smallest" in a for a in e.args)
           else "a budget is below its smallest feasible value")
    return InfeasibleBudgetError(f"{msg}; smallest feasible value of each budget on its own (totals): "
                                 + ", ".join(p for p in parts if p), small)


def allocate(model: torch.nn.Module, budget_mb: float | None = None, calib_data=None, loss_fn=None,
             bits=DEFAULTS["bits"], group_size=DEFAULTS["group_size"], act_bits=DEFAULTS["act_bits"],
             quant_method=DEFAULTS["quant_method"], refine_seconds: float | None = None,
             sensitivity: str = "hessian", solver: str = "ilp", latency_profile=None,
             max_latency_ms: float | None = None, max_bops: float | None = None, seed: int = 0,
             symmetric=DEFAULTS["symmetric"], tie: str | None = None, keep: dict | None = None,
             sensitivity_table=None, sensitivity_opts: dict | None = None, solver_opts: dict | None = None,
             latency_fixed: str | None = None, latency_tokens: int | None = None, options=None,
             refine_opts: dict | None = None, group_budgets=None) -> Plan:
    """Choose every quantizable layer's option to lose the least under the budgets.

    Options are the product of ``bits``, ``group_size`` (None = per channel), ``act_bits`` (None =
    fp activations), ``quant_method`` and ``symmetric`` — each a value or a tuple — masked per layer
    (a group must divide the layer's input dim), or the explicit ``options`` (QuantSpecs).
    ``budget_mb`` is the whole model after packing (1 MB = 10**6 bytes, every parameter and buffer).
    ``keep`` pins layers (fqn -> bits or QuantSpec); ``tie="shared_input"`` makes q/k/v-style siblings
    share an option; ``sensitivity_table`` (a Sensitivity or a path) re-solves without re-scoring and
    must have been scored for the same options. ``max_latency_ms`` bounds Σ per-layer kernel times from
    ``latency_profile`` plus its fixed cost. ``refine_seconds`` runs the joint search
    (:func:`bitplan.refine`) on the solver's plan. The model, its BatchNorm statistics and torch's
    global RNG are never touched. ``group_budgets`` (with ``sensitivity="decoupled"``, MixDQ): split the
    size budget over the table's metric groups (``"proportional"`` or {group: fraction}, see
    :func:`bitplan.budgets.split_group_budgets`); the caps are recorded in ``plan.solver``.

    Example:
        >>> plan = bitplan.allocate(model, budget_mb=5.0, calib_data=batches, bits=(2, 3, 4, 8),
        ...                         group_size=(None, 128))
        >>> plan.bits["fc1"], plan.predicted["size_bytes"]
    """
    from .allocator import InfeasibleBudgetError, solve
    from .allocator.problem import FEAS_RTOL
    from .core.batches import as_batches
    from .costmodels import MB, base_nbytes, cost_table
    from .sensitivity import Sensitivity, load as load_table, score

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    budget_mb, max_latency_ms, max_bops = (_budget("budget_mb", budget_mb),
                                           _budget("max_latency_ms", max_latency_ms),
                                           _budget("max_bops", max_bops))
    if budget_mb is None and max_latency_ms is None and max_bops is None:
        raise ValueError("give at least one budget: budget_mb, max_latency_ms or max_bops")
    if refine_seconds is not None:
        refine_seconds = _budget("refine_seconds", refine_seconds)
    batches = as_batches(calib_data) if calib_data is not None else None
    fwd = (lambda m, b: loss_fn(m, b)) if callable(loss_fn) else None
    graph = LayerGraph.build(model, batches[0] if batches else None, forward=fwd)
    base = base_nbytes(model, graph.names)
    opts = resolve_options(graph, bits, group_size, act_bits, quant_method, symmetric, options)
    allowed = _keep_mask(graph, opts, keep)
    if budget_mb is not None:        # fail fast, before the expensive scoring (the solver's slack)
        size = cost_table("size", graph.layers, list(opts.specs), allowed=allowed)
        smallest = base + np.where(allowed, size, np.inf).min(1).sum()
        net = budget_mb * MB - base
        if net + FEAS_RTOL * max(abs(net), 1.0) < smallest - base:
            raise InfeasibleBudgetError(
                f"budget_mb={budget_mb} is below the smallest feasible size {smallest / MB:.6f} MB (every "
                f"layer at its smallest option; {base / MB:.6f} MB of it is not quantizable)",
                {"size_mb": smallest / MB})
    if sensitivity_table is not None:
        table = sensitivity_table if isinstance(sensitivity_table, Sensitivity) else load_table(sensitivity_table)
        table.check_matches(graph.names, opts.specs, graph.fingerprint)
    else:
        table = score(model, batches, method=sensitivity, loss_fn=loss_fn, seed=seed, options=opts.specs,
                      graph=graph, **(sensitivity_opts or {}))
    problem, fixed_ms = build_problem(graph, table, opts, base, budget_mb, max_bops, latency_profile,
                                      max_latency_ms, tie, keep, latency_fixed, latency_tokens, allowed)
    group_rec = None
    if group_budgets is not None:
        from .budgets import split_group_budgets
        if not table.meta.get("groups"):
            raise ValueError(f"group_budgets needs a sensitivity table with layer groups (sensitivity='decoupled'); "
                             f"this one is {table.method!r}")
        problem, caps = split_group_budgets(problem, table.meta["groups"], group_budgets)
        group_rec = {"rule": group_budgets if isinstance(group_budgets, str) else "fractions",
                     "caps_bytes": caps, "groups": {g: list(v) for g, v in table.meta["groups"].items() if v}}
    try:
        sol = solve(problem, method=solver, **(solver_opts or {}))
    except InfeasibleBudgetError as e:
        raise _infeasible(e, base, fixed_ms) from e
    specs = {n: opts.specs[c] for n, c in zip(graph.names, sol.choice)}
    predicted = {k: float(v) for k, v in sol.totals.items() if k in ("bops", "latency_ms")}
    predicted["loss"] = float(sol.objective)
    budgets = {}
    if budget_mb is not None:
        budgets["size_bytes"] = budget_mb * MB
    if max_bops is not None:
        budgets["bops"] = max_bops
    if max_latency_ms is not None:
        budgets["latency_ms"] = max_latency_ms
        predicted["latency_ms"] = float(sol.totals["latency_ms"] + fixed_ms)
        predicted["latency_fixed_ms"] = float(fixed_ms)
    kernels_here, falls = expected_kernels(graph, specs)
    if falls:
        warnings.warn(f"{len(falls)} layer(s) of this plan have no real kernel on this CPU and will run "
                      f"the reference 'dequant' path after packed apply, e.g. {'; '.join(falls[:3])}",
                      RuntimeWarning, stacklevel=2)
    finite = lambda v: float(v) if math.isfinite(v) else None     # noqa: E731  (JSON has no inf)
    plan = make_plan(
        graph, specs, base, budgets=budgets, predicted=predicted,
        estimator={"name": table.method, "seconds": float(table.meta.get("seconds", 0.0)),
                   "loss": str(table.meta.get("loss", "")), "probes": table.meta.get("probes"),
                   "options": [s.to_dict() for s in opts.specs]},
        solver={"name": sol.method, "status": sol.status, "objective": float(sol.objective),
                "bound": finite(sol.bound), "gap": finite(sol.gap), "seconds": float(sol.seconds),
                **({"info": dict(sol.info["record"])} if sol.info.get("record") else {}),
                **({"group_budgets": group_rec} if group_rec else {})},
        meta={"tie": tie, "seed": seed, "kernels_here": kernels_here})
    if refine_seconds is not None:
        from .joint import refine
        plan = refine(model, plan, batches, loss_fn=loss_fn, seconds=refine_seconds, table=table,
                      problem=problem, options=opts, seed=seed, **(refine_opts or {}))
    return plan
