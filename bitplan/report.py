"""Plain-text tables of a plan and of a sensitivity table (what ``bitplan show`` prints).

Example:
    >>> print(format_plan(Plan.load("plan.json")))
"""
from __future__ import annotations

import re
from collections import Counter

import numpy as np

__all__ = ["format_plan", "format_sensitivity", "layer_rows", "depth_order"]


def _natural(name: str):
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)]


def depth_order(names) -> tuple[list[str], bool]:
    """(names in network order as well as known, whether that order is the recorded one).

    A plan read from JSON has its layers sorted by name (``sort_keys``), which puts ``layer.10`` before
    ``layer.2``; such a list is re-sorted with numbers compared as numbers (block order is then right,
    order inside a block is by name). Any other order is taken as the recorded network order.
    """
    names = list(names)
    if len(names) > 1 and names == sorted(names):
        return sorted(names, key=_natural), False
    return names, True


def layer_rows(plan) -> list[dict]:
    """One dict per layer: name, shape, params, bits, group_size, symmetric, act_bits, kernel, bytes.

    ``bytes`` is the layer's packed weight (codes + fp16 scales/zeros) for a weight seen as
    (shape[0], prod(shape[1:])) — Linear / Conv layout; None when the plan records no shape.
    """
    shapes = plan.meta.get("layer_shapes", {})
    rows = []
    for name in depth_order(plan.layers)[0]:
        s = plan.layers[name]
        shape = shapes.get(name)
        n = int(np.prod(shape)) if shape else None
        nbytes = s.nbytes(shape[0], n // shape[0]) if shape else None
        rows.append({"name": name, "shape": tuple(shape) if shape else None, "params": n, "bits": s.bits,
                     "group_size": s.group_size, "symmetric": s.symmetric, "act_bits": s.act_bits,
                     "kernel": s.kernel, "bytes": nbytes})
    return rows


def format_plan(plan) -> str:
    """Per-layer table then totals (params-weighted average bits, histogram, sizes, budgets, solver)."""
    rows = layer_rows(plan)
    w = max([len("layer")] + [len(r["name"]) for r in rows])
    head = f"{'layer':<{w}}  {'shape':>14}  {'params':>10}  {'bits':>4}  {'group':>6}  {'sym':>3}  {'act':>4}  {'kernel':>13}  {'bytes':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        shape = "x".join(map(str, r["shape"])) if r["shape"] else "?"
        lines.append(f"{r['name']:<{w}}  {shape:>14}  {r['params'] if r['params'] is not None else '?':>10}  "
                     f"{r['bits']:>4}  {r['group_size'] or 'chan':>6}  {'y' if r['symmetric'] else 'n':>3}  "
                     f"{r['act_bits'] or '-':>4}  {r['kernel'] or '-':>13}  "
                     f"{r['bytes'] if r['bytes'] is not None else '?':>10}")
    lines.append("-" * len(head))
    known = [r for r in rows if r["params"]]
    n = sum(r["params"] for r in known)
    hist = dict(sorted(Counter(r["bits"] for r in rows).items()))
    lines.append(f"layers: {len(rows)}   quantized weights: {n:,} elements   bits histogram (layers): {hist}")
    if n:
        avg = sum(r["params"] * r["bits"] for r in known) / n
        store = sum(r["bytes"] for r in known) * 8 / n
        lines.append(f"average weight bits: {avg:.3f} (codes only), {store:.3f} (with scales/zeros)   "
                     f"layer weights: {sum(r['bytes'] for r in known) / 1e6:.6f} MB")
    for k, v in sorted(plan.predicted.items()):
        unit = " MB" if k == "size_bytes" else ""
        lines.append(f"predicted {k}: {v / 1e6 if k == 'size_bytes' else v:.6g}{unit}"
                     + (f"   (budget {plan.budgets[k] / 1e6 if k == 'size_bytes' else plan.budgets[k]:.6g}{unit})"
                        if k in plan.budgets else ""))
    if plan.meta.get("base_bytes") is not None:
        lines.append(f"not quantized (biases, embeddings, norms): {plan.meta['base_bytes'] / 1e6:.6f} MB")
    est, sol = plan.estimator, plan.solver
    if est:
        lines.append(f"sensitivity: {est.get('name')}  probes={est.get('probes')}  loss: {est.get('loss') or '-'}")
    if sol:
        gap = sol.get("gap")
        lines.append(f"solver: {sol.get('name')}  status={sol.get('status')}  objective={sol.get('objective')}"
                     + (f"  gap={gap:.3g}" if isinstance(gap, (int, float)) else ""))
    return "\n".join(lines)


def format_sensitivity(table) -> str:
    """Layers x bits table of predicted loss increases, most sensitive layer (at min bits) marked."""
    w = max([len("layer")] + [len(n) for n in table.names])
    head = f"{'layer':<{w}}  " + "  ".join(f"{f'{b} bits':>11}" for b in table.bits)
    lines = [head, "-" * len(head)]
    for n, row in zip(table.names, table.loss):
        lines.append(f"{n:<{w}}  " + "  ".join(f"{v:>11.4g}" for v in row))
    lines.append("-" * len(head))
    j = int(np.argmin(table.bits))
    top = int(np.argmax(table.loss[:, j]))
    lines.append(f"{table.method}: {len(table.names)} layers x {len(table.bits)} options; most sensitive at "
                 f"{table.bits[j]} bits: {table.names[top]}; group_size={table.group_size}, "
                 f"symmetric={table.symmetric}")
    return "\n".join(lines)
