"""``bitplan.allocate``: model + calibration data + budgets -> Plan.

model -> LayerGraph -> sensitivity table (L x B) -> cost tables (L x B) -> Problem -> Solution -> Plan.
"""
from __future__ import annotations

import math
import platform
import time
import warnings

import torch

from . import __version__
from .errors import InfeasibleBudgetError
from .graph import LayerGraph
from .kernels.formats import QuantSpec, check_bits
from .plan import Plan

__all__ = ["allocate", "build_problem"]


def _positive(name, v):
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
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


def build_problem(graph: LayerGraph, table, specs, base_bytes: int, budget_mb=None, max_bops=None,
                  latency_profile=None, max_latency_ms=None, tie=None, keep=None,
                  latency_fixed=None, latency_tokens=None):
    """Assemble the allocator Problem (budgets on the quantizable part: fixed bytes and fixed ms
    subtracted). Returns ``(problem, fixed_latency_ms)``."""
    from .allocator import Problem
    from .costmodels import MB, cost_table
    costs, budgets = {"size_bytes": cost_table("size", graph.layers, specs)}, {}
    fixed_ms = 0.0
    if budget_mb is not None:
        budgets["size_bytes"] = budget_mb * MB - base_bytes
    if max_bops is not None:
        costs["bops"] = cost_table("bops", graph.layers, specs)
        budgets["bops"] = max_bops
    if max_latency_ms is not None:
        if latency_profile is None:
            raise ValueError("max_latency_ms needs latency_profile (a path or LatencyProfile from "
                             "`bitplan calibrate`)")
        from .costmodels.latency import latency_table, load_profile
        prof = load_profile(latency_profile)
        costs["latency_ms"] = latency_table(graph.layers, specs, prof, tokens=latency_tokens)
        fixed_ms = fixed_latency_ms(prof, latency_fixed)
        budgets["latency_ms"] = max_latency_ms - fixed_ms
    fixed = {}
    for name, b in (keep or {}).items():
        if name not in graph.names:
            raise ValueError(f"keep={{{name!r}: {b}}}: no quantizable layer of that name")
        opts = [s.bits for s in specs]
        if b not in opts:
            raise ValueError(f"keep={{{name!r}: {b}}}: {b} bits is not among the options {opts}")
        fixed[graph.index(name)] = opts.index(b)
    return Problem(table.loss, costs, budgets, graph.tie_groups(tie), graph.names, fixed), fixed_ms


def allocate(model: torch.nn.Module, budget_mb: float | None = None, calib_data=None, loss_fn=None,
             bits=(2, 3, 4, 8), sensitivity: str = "hessian", solver: str = "ilp",
             latency_profile=None, max_latency_ms: float | None = None, max_bops: float | None = None,
             seed: int = 0, group_size: int | None = None, symmetric: bool = True,
             tie: str | None = None, keep: dict | None = None, sensitivity_table=None,
             sensitivity_opts: dict | None = None, solver_opts: dict | None = None,
             latency_fixed: str | None = None, latency_tokens: int | None = None) -> Plan:
    """Choose every quantizable layer's weight bits to lose the least under the budgets.

    ``budget_mb`` is the whole model after packing (1 MB = 10**6 bytes, every parameter and buffer).
    ``keep`` fixes layers (fqn -> bits); ``tie="shared_input"`` makes q/k/v-style siblings share bits;
    ``sensitivity_table`` (a Sensitivity or a path) re-solves without re-scoring. The model is never
    mutated. ``max_latency_ms`` bounds Σ per-layer kernel times from ``latency_profile`` (at
    ``latency_tokens`` rows per matmul, default the calibration batch's tokens per sample) plus the
    profile's fixed cost ``latency_fixed`` (the non-quantized ops, measured by `bitplan calibrate`).

    Example:
        >>> plan = bitplan.allocate(model, budget_mb=5.0, calib_data=batches, bits=(2, 3, 4, 8))
        >>> plan.bits["fc1"], plan.predicted["size_bytes"]
    """
    from .batches import as_batches
    from .costmodels import MB, base_nbytes, cost_table
    from .sensitivity import load as load_table, score
    from .allocator import solve

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    budget_mb, max_latency_ms, max_bops = (_positive("budget_mb", budget_mb),
                                           _positive("max_latency_ms", max_latency_ms),
                                           _positive("max_bops", max_bops))
    if budget_mb is None and max_latency_ms is None and max_bops is None:
        raise ValueError("give at least one budget: budget_mb, max_latency_ms or max_bops")
    bits = tuple(check_bits(b) for b in bits)
    specs = [QuantSpec(b, group_size, symmetric) for b in bits]
    batches = as_batches(calib_data) if calib_data is not None else None
    # graph (one forward under hooks on the first batch; static when no data)
    fwd = (lambda m, b: loss_fn(m, b)) if callable(loss_fn) else None
    graph = LayerGraph.build(model, batches[0] if batches else None, forward=fwd)
    base = base_nbytes(model, graph.names)
    if budget_mb is not None:        # fail fast, before the expensive scoring
        size = cost_table("size", graph.layers, specs)
        smallest = (base + size.min(1).sum()) / MB
        if budget_mb * MB < base + size.min(1).sum():
            raise InfeasibleBudgetError(
                f"budget_mb={budget_mb} is below the smallest feasible size {smallest:.6f} MB "
                f"(every layer at {min(bits)} bits; {base / MB:.6f} MB is not quantizable)",
                {"size_mb": smallest})
    # sensitivity
    if sensitivity_table is not None:
        table = load_table(sensitivity_table) if not hasattr(sensitivity_table, "loss") else sensitivity_table
        if table.names != graph.names or tuple(table.bits) != bits:
            raise ValueError(f"sensitivity_table does not match: its layers/bits {len(table.names)} x "
                             f"{table.bits} vs model {len(graph.names)} x {bits}")
    else:
        table = score(model, batches, method=sensitivity, bits=bits, loss_fn=loss_fn, seed=seed,
                      group_size=group_size, symmetric=symmetric, graph=graph, **(sensitivity_opts or {}))
    # costs -> problem -> solution
    problem, fixed_ms = build_problem(graph, table, specs, base, budget_mb, max_bops, latency_profile,
                            max_latency_ms, tie, keep, latency_fixed, latency_tokens)
    try:
        sol = solve(problem, method=solver, **(solver_opts or {}))
    except InfeasibleBudgetError as e:
        small = dict(e.smallest)       # the solver saw budgets net of the fixed bytes / fixed ms
        if "size_bytes" in small:
            small["size_mb"] = (small["size_bytes"] + base) / MB
        if "latency_ms" in small:
            small["latency_ms"] += fixed_ms
        fixed = [f"{base} bytes" if "size_bytes" in small else "",
                 f"{fixed_ms:.6g} ms" if "latency_ms" in small else ""]
        note = " and ".join(f for f in fixed if f)
        raise InfeasibleBudgetError(f"{e} (values net of the fixed {note} no option changes); "
                                    f"smallest feasible totals: {small}", small) from e
    layers = {n: specs[c] for n, c in zip(graph.names, sol.choice)}
    predicted = {k: float(v) for k, v in sol.totals.items()}
    predicted["size_bytes"] = float(base + sol.totals["size_bytes"])
    budgets = {}
    if budget_mb is not None:
        budgets["size_bytes"] = budget_mb * MB
    if max_bops is not None:
        budgets["bops"] = max_bops
    if max_latency_ms is not None:
        budgets["latency_ms"] = max_latency_ms
        predicted["latency_ms"] = float(sol.totals["latency_ms"] + fixed_ms)
        predicted["latency_fixed_ms"] = float(fixed_ms)
    finite = lambda v: float(v) if math.isfinite(v) else None     # noqa: E731  (JSON has no inf)
    return Plan(
        model_fingerprint=graph.fingerprint, layers=layers, predicted=predicted, budgets=budgets,
        estimator={"name": table.method, "seconds": float(table.meta.get("seconds", 0.0)),
                   "loss": str(table.meta.get("loss", "")), "bits": list(bits),
                   "group_size": group_size, "symmetric": symmetric,
                   "probes": table.meta.get("probes")},
        solver={"name": sol.method, "status": sol.status, "objective": sol.objective,
                "bound": finite(sol.bound), "gap": finite(sol.gap), "seconds": sol.seconds},
        meta={"bitplan_version": __version__, "torch_version": torch.__version__,
              "python": platform.python_version(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "base_bytes": base, "tie": tie, "seed": seed,
              "layer_shapes": {l.name: list(l.weight_shape) for l in graph.layers},
              "layer_kinds": {l.name: l.kind for l in graph.layers}})
