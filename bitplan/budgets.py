"""Budgets users think in, turned into what ``allocate`` takes: MB from average bits, the feasible
size range of an option set, ``--keep`` globs.

Example:
    >>> budget_mb = avg_bits_budget_mb(model, 4.5)
    >>> lo, hi = size_range_mb(model, bits=(2, 4, 8))
"""
from __future__ import annotations

import fnmatch
import math
import numbers

import numpy as np
import torch

__all__ = ["avg_bits_budget_mb", "resolve_keep", "size_range_mb"]


def avg_bits_budget_mb(model: torch.nn.Module, avg_bits: float) -> float:
    """Size budget (MB, 10**6 bytes) that gives the quantizable weights ``avg_bits`` bits per element.

    The bits count everything the packed weights store (codes + fp16 scales/zeros), so uniform 4-bit
    with per-channel scales needs slightly more than 4.0. Parameters that are not quantized
    (biases, norms) are added at their own size.

    Example: ``avg_bits_budget_mb(model, 4.5)``  -> MB to pass as ``budget_mb``
    """
    from .core.graph import find_layers
    from .costmodels import MB, base_nbytes
    if isinstance(avg_bits, bool) or not isinstance(avg_bits, numbers.Real) or not math.isfinite(avg_bits) \
            or not 0 < avg_bits <= 32:
        raise ValueError(f"avg_bits={avg_bits!r} must be a number in (0, 32] (bits per weight element)")
    layers = find_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no quantizable layers (Linear / Conv / Embedding)")
    n = sum(l.n_params for l in layers)
    return (base_nbytes(model, [l.name for l in layers]) + n * float(avg_bits) / 8) / MB


def resolve_keep(names: list[str], patterns, graph=None) -> dict[str, int]:
    """``["*.head=8", "fc1=16"]`` -> {fqn: bits} for every layer whose name matches the glob.

    Later patterns win. A pattern that matches no layer is an error (a typo would silently do nothing).
    With ``graph``, a glob may also name a module tied to a layer (``lm_head`` tied to the embedding).

    Example: ``resolve_keep(graph.names, ["encoder.*.output.dense=8"])``
    """
    owner = {m: l.name for l in graph.layers for m in l.modules} if graph is not None else {n: n for n in names}
    keep: dict[str, int] = {}
    for item in patterns or []:
        pat, sep, b = str(item).rpartition("=")
        if not sep or not pat:
            raise ValueError(f"--keep {item!r}: expected LAYER_GLOB=BITS, e.g. 'encoder.*.output.dense=8'")
        try:
            bits = int(b)
        except ValueError:
            raise ValueError(f"--keep {item!r}: BITS={b!r} is not an integer") from None
        hits = sorted({owner[n] for n in owner if fnmatch.fnmatchcase(n, pat)})
        if not hits:
            raise ValueError(f"--keep {item!r}: the glob {pat!r} matches no quantizable layer; layers are "
                             f"e.g. {list(names)[:5]}")
        keep.update({n: bits for n in hits})
    return keep


def size_range_mb(model, opts=None, graph=None, **grid) -> tuple[float, float]:
    """(smallest, largest) whole-model size in MB over the options (per layer min / max).

    ``opts`` is an ``options.Options``; otherwise ``grid`` (bits=, group_size=, act_bits=,
    quant_method=, symmetric=) builds one (defaults: ``options.DEFAULTS``).

    Example: ``size_range_mb(model, bits=(2, 3, 4, 8), group_size=(None, 128))``
    """
    from .core.graph import LayerGraph
    from .costmodels import MB, base_nbytes, cost_table
    from .options import resolve_options
    graph = graph or LayerGraph.build(model)
    opts = opts or resolve_options(graph, **grid)
    size = cost_table("size", graph.layers, list(opts.specs), allowed=opts.allowed)      # (L, B) bytes
    base = base_nbytes(model, graph.names)
    return ((base + np.where(opts.allowed, size, np.inf).min(1).sum()) / MB,
            (base + np.where(opts.allowed, size, -np.inf).max(1).sum()) / MB)


GROUP_RULES = ("proportional",)


def split_group_budgets(problem, groups: dict, rule="proportional", cost: str = "size_bytes"):
    """MixDQ per-group budgets: ``(problem with one extra budget per group, {group: cap})``.

    ``groups`` maps a group name to its layer names (``Sensitivity.meta["groups"]`` of the
    ``decoupled`` estimator). ``rule="proportional"``: every group gets the same fraction of its own
    size range, cap_g = min_g + (budget − Σ min) · range_g / Σ range (min / max = every layer of the
    group at its smallest / largest allowed option), so the caps add up to the budget and are
    feasible whenever the whole budget is. A dict {group: fraction of the budget} sets them directly
    (fractions > 0, sum <= 1). Empty groups get no budget.

    Example: ``p, caps = split_group_budgets(problem, table.meta["groups"])``
    """
    from .allocator.groups import with_group_budgets
    if cost not in problem.budgets:
        raise ValueError(f"group budgets split the {cost!r} budget; give budget_mb (budgets: {sorted(problem.budgets)})")
    index = {n: i for i, n in enumerate(problem.names)}
    unknown = {g: [n for n in names if n not in index] for g, names in groups.items()}
    if any(unknown.values()) or not any(groups.values()):
        raise ValueError(f"group layers must be the problem's layers; unknown: {unknown}")
    groups = {g: [index[n] for n in names] for g, names in groups.items() if names}
    table = np.where(problem.allowed, problem.costs[cost], np.nan)            # (L, B)
    lo, hi = np.nanmin(table, 1), np.nanmax(table, 1)                          # (L,)
    total = problem.budgets[cost]
    if isinstance(rule, dict):
        if set(rule) != set(groups) or not all(isinstance(v, numbers.Real) and v > 0 for v in rule.values()) \
                or sum(rule.values()) > 1 + 1e-9:
            raise ValueError(f"group_budgets={rule!r} must map each group {sorted(groups)} to a fraction > 0 "
                             "of the budget, summing to <= 1")
        caps = {g: float(rule[g]) * total for g in groups}
    elif rule == "proportional":
        mins = {g: float(lo[r].sum()) for g, r in groups.items()}
        spans = {g: float((hi - lo)[r].sum()) for g, r in groups.items()}
        free = total - sum(mins.values())
        span = sum(spans.values())
        caps = {g: mins[g] + (free * spans[g] / span if span > 0 else free / len(groups)) for g in groups}
    else:
        raise ValueError(f"group_budgets={rule!r} is not supported; allowed: {list(GROUP_RULES)} or a dict "
                         "group -> fraction of the size budget")
    return with_group_budgets(problem, cost, groups, caps), caps
