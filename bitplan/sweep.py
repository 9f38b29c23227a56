"""Front-door helpers the CLI and examples share: budgets from average bits, ``--keep`` globs, scoring
with a cache and a progress bar, and the budget sweep behind ``bitplan frontier``.

Example:
    >>> table = scored_table(model, batches, cache="sens.json")          # scores once, then reloads
    >>> front = sweep(model, batches, table=table, points=8)              # size budgets, one scoring
    >>> [p["size_mb"] for p in front["points"]], front["points"][0]["measured_loss"]
"""
from __future__ import annotations

import copy
import fnmatch
import logging
import os

import numpy as np
import torch

__all__ = ["avg_bits_budget_mb", "resolve_keep", "scored_table", "size_range_mb", "sweep",
           "measure_loss", "first_sample", "to_device"]

log = logging.getLogger("bitplan")


def avg_bits_budget_mb(model: torch.nn.Module, avg_bits: float) -> float:
    """Size budget (MB, 10**6 bytes) that gives the quantizable weights ``avg_bits`` bits per element.

    The bits count everything the packed weights store (codes + fp16 scales/zeros), so uniform 4-bit
    with per-channel scales needs slightly more than 4.0. Parameters that are not quantized
    (biases, embeddings, norms) are added at their own size.

    Example: ``avg_bits_budget_mb(model, 4.5)``  -> MB to pass as ``budget_mb``
    """
    from .costmodels import MB, base_nbytes
    from .graph import find_layers
    if isinstance(avg_bits, bool) or not isinstance(avg_bits, (int, float)) or not 0 < avg_bits <= 32:
        raise ValueError(f"avg_bits={avg_bits!r} must be a number in (0, 32] (bits per weight element)")
    layers = find_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no quantizable layers (Linear / Conv1d / Conv2d)")
    n = sum(l.n_params for l in layers)
    return (base_nbytes(model, [l.name for l in layers]) + n * avg_bits / 8) / MB


def resolve_keep(names: list[str], patterns) -> dict[str, int]:
    """``["*.head=8", "fc1=16"]`` -> {fqn: bits} for every layer whose name matches the glob.

    Later patterns win. A pattern that matches no layer is an error (a typo would silently do nothing).
    """
    keep: dict[str, int] = {}
    for item in patterns or []:
        pat, sep, b = str(item).rpartition("=")
        if not sep or not pat:
            raise ValueError(f"--keep {item!r}: expected LAYER_GLOB=BITS, e.g. 'encoder.*.output.dense=8'")
        try:
            bits = int(b)
        except ValueError:
            raise ValueError(f"--keep {item!r}: BITS={b!r} is not an integer") from None
        hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise ValueError(f"--keep {item!r}: the glob {pat!r} matches no quantizable layer; layers are "
                             f"e.g. {names[:5]}")
        keep.update({n: bits for n in hits})
    return keep


def first_sample(batch):
    """The batch cut to its first sample (leading dim 1) — tensor, tuple/list or dict of tensors."""
    if isinstance(batch, torch.Tensor):
        return batch[:1]
    if isinstance(batch, dict):
        return {k: first_sample(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(first_sample(v) for v in batch)
    return batch


def to_device(batch, device):
    """The batch with every tensor moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def scored_table(model, calib_data, method: str = "hessian", bits=(2, 3, 4, 8), loss_fn=None,
                 seed: int = 0, group_size=None, symmetric: bool = True, cache=None,
                 sensitivity_opts: dict | None = None, quiet: bool = False):
    """The sensitivity table: loaded from ``cache`` when that file exists, else scored (with a progress
    bar counting loss evaluations) and saved to ``cache`` when given.

    A cached table must match the model's layers and the requested bits / group size / symmetry;
    otherwise ``ValueError`` says what differs (delete the file or pick another one to re-score).
    """
    from .batches import as_batches
    from .graph import find_layers, fingerprint
    from .progress import counting_loss, progress_bar
    from .sensitivity import load, score
    bits = tuple(bits)
    if cache is not None and os.path.exists(cache):
        table = load(cache)
        want = fingerprint(sorted(find_layers(model), key=lambda l: l.name))
        diffs = []
        if set(table.names) != {l.name for l in find_layers(model)}:
            diffs.append(f"layers ({len(table.names)} in the cache)")
        elif table.model_fingerprint and table.model_fingerprint != want:
            diffs.append("weight shapes (fingerprint)")
        if tuple(table.bits) != bits:
            diffs.append(f"bits {table.bits} vs {bits}")
        if table.group_size != group_size or table.symmetric != symmetric:
            diffs.append(f"group_size/symmetric {table.group_size}/{table.symmetric} vs {group_size}/{symmetric}")
        if diffs:
            raise ValueError(f"sensitivity cache {cache} does not match this run: {'; '.join(diffs)}; "
                             "delete it or give another file to re-score")
        log.info("loaded sensitivity table %s (%s, %d layers x %d options); not re-scoring",
                 cache, table.method, len(table.names), len(table.bits))
        return table
    batches = as_batches(calib_data)
    log.info("scoring %s sensitivity on %d calibration batches", method, len(batches))
    with progress_bar(f"scoring ({method})", unit="loss eval", quiet=quiet) as bar:
        fn = counting_loss(loss_fn, model, batches, bar)
        table = score(model, batches, method=method, bits=bits, loss_fn=fn, seed=seed,
                      group_size=group_size, symmetric=symmetric, **(sensitivity_opts or {}))
    if cache is not None:
        table.save(cache)
        log.info("saved sensitivity table to %s", cache)
    return table


def size_range_mb(model, bits, group_size=None, symmetric: bool = True) -> tuple[float, float]:
    """(smallest, largest) whole-model size in MB over the bit options (all-min, all-max)."""
    from .costmodels import MB, base_nbytes, cost_table
    from .graph import find_layers
    from .kernels.formats import QuantSpec
    layers = find_layers(model)
    size = cost_table("size", layers, [QuantSpec(b, group_size, symmetric) for b in bits])   # (L, B) bytes
    base = base_nbytes(model, [l.name for l in layers])
    return (base + size.min(1).sum()) / MB, (base + size.max(1).sum()) / MB


@torch.no_grad()
def measure_loss(model, loss_fn, batches) -> float:
    """Mean of ``loss_fn(model, batch)`` over ``batches`` (no gradients)."""
    return float(np.mean([float(loss_fn(model, b)) for b in batches]))


def sweep(model, calib_data, budgets_mb=None, points: int = 8, bits=(2, 3, 4, 8), table=None,
          sensitivity: str = "hessian", solver: str = "ilp", loss_fn=None, seed: int = 0,
          group_size=None, symmetric: bool = True, eval_data=None, measure: bool = True,
          sensitivity_opts: dict | None = None, quiet: bool = False) -> dict:
    """Pareto frontier over size budgets from ONE sensitivity table.

    For each budget (default: ``points`` sizes evenly spaced between all-min-bits and all-max-bits)
    solve for a plan (``bitplan.allocator.frontier``: one problem, warm-started solves in increasing
    budget order); record its predicted size, predicted loss increase (Σ of the table entries it
    picks) and, when ``measure``, the loss measured with the plan fake-applied to a copy of the model
    (on ``eval_data``, else the calibration batches). Uniform plans (every layer at one option) are
    added as baselines. The model is never modified.

    Returns a JSON-ready dict: ``points`` (one per feasible budget), ``uniform``, ``metric`` (what the
    losses are), ``measured_on``, ``estimator``, ``bits``, ``base_loss`` (the unquantized model).
    """
    from .allocator.frontier import frontier
    from .api import build_problem
    from .batches import as_batches
    from .costmodels import MB, base_nbytes
    from .demo import uniform_plan
    from .graph import LayerGraph
    from .kernels.apply import apply_plan_
    from .kernels.formats import QuantSpec
    from .plan import Plan
    from .progress import progress_bar
    from .sensitivity.losses import resolve_loss

    bits = tuple(bits)
    batches = as_batches(calib_data)
    if table is None:
        table = scored_table(model, batches, sensitivity, bits, loss_fn, seed, group_size, symmetric,
                             sensitivity_opts=sensitivity_opts, quiet=quiet)
    graph = LayerGraph.build(model, batches[0], forward=loss_fn if callable(loss_fn) else None)
    if table.names != graph.names or tuple(table.bits) != bits:
        raise ValueError(f"sensitivity table ({len(table.names)} layers x {table.bits}) does not match the "
                         f"model ({len(graph.names)} layers x {bits})")
    specs = [QuantSpec(b, group_size, symmetric) for b in bits]
    base = base_nbytes(model, graph.names)
    lo, hi = size_range_mb(model, bits, group_size, symmetric)
    if budgets_mb is None:
        if not isinstance(points, int) or points < 2:
            raise ValueError(f"points={points!r} must be an int >= 2")
        budgets_mb = list(np.linspace(lo, hi, points))
        budgets_mb[0] = lo * (1 + 1e-9)              # float slack: the all-min plan must stay feasible
    eval_batches = as_batches(eval_data) if eval_data is not None else batches
    metric_fn, metric = resolve_loss(loss_fn, model, eval_batches) if measure else (None, "")
    base_loss = measure_loss(model, metric_fn, eval_batches) if measure else None

    def measured(plan):
        if not measure:
            return None
        return measure_loss(apply_plan_(copy.deepcopy(model), plan, mode="fake"), metric_fn, eval_batches)

    problem, _ = build_problem(graph, table, specs, base, budget_mb=hi * 2)
    sols = frontier(problem, "size_bytes", [b * MB - base for b in budgets_mb], method=solver)
    shapes = {l.name: list(l.weight_shape) for l in graph.layers}
    n = np.array([l.n_params for l in graph.layers], dtype=float)                  # (L,)
    out_points, row = [], np.arange(len(graph.names))
    with progress_bar("frontier", total=len(budgets_mb) + len(bits), unit="plan", quiet=quiet) as bar:
        for b, sol in zip(budgets_mb, sols):
            bar.update()
            if sol is None:
                log.warning("budget %.6f MB skipped: infeasible (smallest %.6f MB)", b, lo)
                continue
            plan = Plan(graph.fingerprint, {nm: specs[c] for nm, c in zip(graph.names, sol.choice)},
                        {"size_bytes": float(base + sol.totals["size_bytes"])}, {"size_bytes": float(b) * MB},
                        {"name": table.method}, {"name": sol.method, "status": sol.status},
                        {"layer_shapes": shapes, "base_bytes": base,
                         "layer_kinds": {l.name: l.kind for l in graph.layers}})
            out_points.append({
                "budget_mb": float(b), "size_mb": plan.predicted["size_bytes"] / MB,
                "predicted_loss": float(table.loss[row, sol.choice].sum()), "measured_loss": measured(plan),
                "avg_bits": float((n * np.array(bits)[sol.choice]).sum() / n.sum()),
                "solver": sol.method, "solver_status": sol.status,
                "gap": float(sol.gap) if np.isfinite(sol.gap) else None, "bits": plan.bits})
        uniform = []
        for j, b in enumerate(bits):
            up = uniform_plan(graph, b, group_size, symmetric, base)
            uniform.append({"bits": b, "size_mb": up.predicted["size_bytes"] / MB,
                            "predicted_loss": float(table.loss[:, j].sum()), "measured_loss": measured(up)})
            bar.update()
    return {"points": out_points, "uniform": uniform, "bits": list(bits), "estimator": table.method,
            "metric": metric or None, "measured_on": None if not measure else
            ("eval data" if eval_data is not None else "calibration batches"),
            "base_loss": base_loss, "size_range_mb": [lo, hi], "layers": list(graph.names)}
