"""The budget sweep behind ``bitplan frontier``: many size budgets from ONE sensitivity table.

Example:
    >>> front = sweep(model, batches, table, opts, graph, points=8)
    >>> [p["size_mb"] for p in front["points"]], front["points"][0]["measured_loss"]
"""
from __future__ import annotations

import copy
import logging

import numpy as np

__all__ = ["sweep"]

log = logging.getLogger("bitplan")


def sweep(model, calib_data, table, opts, graph, budgets_mb=None, points: int = 8, solver: str = "ilp",
          loss_fn=None, eval_data=None, measure: bool = True, quiet: bool = False, metric=None) -> dict:
    """Pareto frontier over size budgets from one sensitivity table.

    For each budget (default: ``points`` sizes evenly spaced between the smallest and largest
    feasible size of ``opts``) solve for a plan (``allocator.frontier``: warm-started solves in
    increasing budget order); record its predicted size, predicted loss (Σ of the table entries it
    picks) and, when ``measure``, the loss measured with the plan fake-applied to a copy of the model
    (on ``eval_data``, else the calibration batches) — or ``metric(model) -> float`` when given
    (e.g. cosine to fp32 for sentence encoders; its name in ``metric.__name__``). Uniform plans
    (every layer at one bit-width) are added as baselines. The model is never modified.

    Returns a JSON-ready dict: ``points``, ``uniform``, ``metric``, ``measured_on``, ``estimator``,
    ``options``, ``base_loss``, ``size_range_mb``, ``layers``.

    Example: ``sweep(model, batches, table, opts, graph, points=8)``
    """
    from .allocator.frontier import frontier
    from .api import build_problem
    from .apply import apply_plan_
    from .assemble import make_plan, uniform_plan
    from .budgets import size_range_mb
    from .core.batches import as_batches
    from .core.spec import QuantSpec
    from .costmodels import MB, base_nbytes
    from .evaluate import measure_loss
    from .progress import progress_bar
    from .sensitivity.losses import resolve_loss

    batches = as_batches(calib_data)
    table.check_matches(graph.names, opts.specs, graph.fingerprint)
    base = base_nbytes(model, graph.names)
    lo, hi = size_range_mb(model, opts, graph)
    if budgets_mb is None:
        if not isinstance(points, int) or isinstance(points, bool) or points < 2:
            raise ValueError(f"points={points!r} must be an int >= 2")
        budgets_mb = list(np.linspace(lo, hi, points))
        budgets_mb[0] = lo * (1 + 1e-9)              # float slack: the all-min plan must stay feasible
    eval_batches = as_batches(eval_data) if eval_data is not None else batches
    if metric is not None:
        metric_name, evaluate = getattr(metric, "__name__", "metric"), metric
    elif measure:
        fn, metric_name = resolve_loss(loss_fn, model, eval_batches)
        evaluate = lambda m: measure_loss(m, fn, eval_batches)      # noqa: E731
    else:
        metric_name, evaluate = None, None
    base_value = evaluate(model) if evaluate else None

    def measured(plan):
        if not evaluate:
            return None
        return evaluate(apply_plan_(copy.deepcopy(model), plan, mode="fake", calib_data=batches, loss_fn=loss_fn))

    problem, _ = build_problem(graph, table, opts, base, budget_mb=hi * 2)
    sols = frontier(problem, "size_bytes", [b * MB - base for b in budgets_mb], method=solver)
    n = np.array([l.n_params for l in graph.layers], dtype=float)                  # (L,)
    row = np.arange(len(graph.names))
    out_points = []
    bits_u = sorted({s.bits for s in opts.specs})
    with progress_bar("frontier", total=len(budgets_mb) + len(bits_u), unit=" plans", quiet=quiet) as bar:
        for b, sol in zip(budgets_mb, sols):
            bar.update()
            if sol is None:
                log.warning("budget %.6f MB skipped: infeasible (smallest %.6f MB)", b, lo)
                continue
            specs = {nm: opts.specs[c] for nm, c in zip(graph.names, sol.choice)}
            plan = make_plan(graph, specs, base, budgets={"size_bytes": float(b) * MB},
                             estimator={"name": table.method}, solver={"name": sol.method, "status": sol.status})
            out_points.append({
                "budget_mb": float(b), "size_mb": plan.predicted["size_bytes"] / MB,
                "predicted_loss": float(table.loss[row, sol.choice].sum()), "measured": measured(plan),
                "avg_bits": float((n * np.array([s.bits for s in opts.specs])[sol.choice]).sum() / n.sum()),
                "solver": sol.method, "solver_status": sol.status,
                "gap": float(sol.gap) if np.isfinite(sol.gap) else None,
                "layers": {k: v.label for k, v in plan.layers.items()}})
        uniform = []
        for bits in bits_u:              # the smallest option of these bits each layer can take
            cand = [s for s in opts.specs if s.bits == bits]
            spec = max(cand, key=lambda s: (s.act_bits is None, s.group_size is None, -(s.group_size or 0)))
            try:
                up = uniform_plan(graph, spec, base)
            except ValueError:
                continue
            cols = [opts.specs.index(up.layers[nm]) if up.layers[nm] in opts.specs else None for nm in graph.names]
            pred = float(sum(table.loss[i, c] for i, c in enumerate(cols) if c is not None))
            uniform.append({"bits": bits, "label": spec.label if bits != 16 else QuantSpec(16).label,
                            "size_mb": up.predicted["size_bytes"] / MB, "predicted_loss": pred,
                            "measured": measured(up)})
            bar.update()
    return {"points": out_points, "uniform": uniform, "options": [s.label for s in opts.specs],
            "estimator": table.method, "metric": metric_name, "measured_on": None if evaluate is None else
            ("eval data" if eval_data is not None else "calibration batches"),
            "base_value": base_value, "size_range_mb": [lo, hi], "layers": list(graph.names)}
