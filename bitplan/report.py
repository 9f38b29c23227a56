"""Plain-text tables of a plan and of a sensitivity table (what ``bitplan show`` prints).

Example:
    >>> print(format_plan(Plan.load("plan.json")))
"""
from __future__ import annotations

import re
from collections import Counter

import numpy as np

__all__ = ["format_plan", "format_sensitivity", "layer_rows", "depth_order", "layer_nk", "layer_kinds"]

# How each layer kind stores its weight, and the (N out, K in) matrix bitplan quantizes (graph.py):
# Linear / Embedding / lm_head (N, K); Conv (N, C_in/groups, *kernel) -> (N, prod(rest));
# transformers' Conv1D (GPT-2) stores (K, N): its 2-D view is the transpose.
_TRANSPOSED = ("hf_conv1d",)


def layer_nk(shape, kind: str | None = None) -> tuple[int, int]:
    """(N out, K in) of a weight stored as ``shape`` by a layer of ``kind`` (None = Linear layout).

    Example: ``layer_nk([64, 256], "hf_conv1d")`` == (256, 64)
    """
    shape = [int(x) for x in shape]
    if len(shape) < 2:
        raise ValueError(f"weight shape {shape} has fewer than 2 dimensions")
    if kind in _TRANSPOSED:
        if len(shape) != 2:
            raise ValueError(f"{kind} weight must be 2-D, got shape {shape}")
        return shape[1], shape[0]
    return shape[0], int(np.prod(shape[1:]))


def layer_kinds(plan) -> dict[str, str] | None:
    """{layer: kind} recorded by the plan (``meta["layer_kinds"]``), or None for plans made before
    kinds were recorded (their 2-D weights are then read in Linear layout)."""
    kinds = plan.meta.get("layer_kinds")
    return dict(kinds) if isinstance(kinds, dict) else None


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


def layer_rows(plan, device: str = "cpu") -> list[dict]:
    """One dict per layer: name, kind, nk (N out, K in), shape (as stored), params, bits, group_size,
    symmetric, act_bits, method, label, kernel, bytes.

    ``bytes`` comes from the size model the plan was solved with: ``meta["layer_bytes"]`` (recorded by
    every plan bitplan 0.2 makes; reading it needs no torch), else — for older plans — the storage
    of the kernel packed apply picks on ``device`` (imports the kernel registry), so the rows plus
    ``meta["base_bytes"]`` add up to ``predicted["size_bytes"]``. None when the plan records no shape.
    ``kernel`` is what ran after a packed apply, else what was expected on the planning machine.
    """
    shapes = plan.meta.get("layer_shapes", {})
    kinds = layer_kinds(plan) or {}
    recorded = plan.meta.get("layer_bytes") if isinstance(plan.meta.get("layer_bytes"), dict) else {}
    here = plan.meta.get("kernels_here", {})
    rows = []
    for name in depth_order(plan.layers)[0]:
        s = plan.layers[name]
        shape, kind = shapes.get(name), kinds.get(name)
        nk = layer_nk(shape, kind) if shape else None
        nbytes = recorded.get(name)
        if nbytes is None and nk:
            from .kernels.registry import kernel_nbytes
            nbytes = kernel_nbytes(s, nk[0], nk[1], device, kind or "linear")
        rows.append({"name": name, "kind": kind, "nk": nk, "shape": tuple(shape) if shape else None,
                     "params": nk[0] * nk[1] if nk else None, "bits": s.bits, "group_size": s.group_size,
                     "symmetric": s.symmetric, "act_bits": s.act_bits, "method": s.method, "label": s.label,
                     "kernel": plan.kernels.get(name) or here.get(name), "bytes": nbytes})
    return rows


def format_plan(plan) -> str:
    """Per-layer table then totals (params-weighted average bits, histogram, sizes, budgets, solver)."""
    rows = layer_rows(plan)
    w = max([len("layer")] + [len(r["name"]) for r in rows])
    head = (f"{'layer':<{w}}  {'kind':>9}  {'out x in':>14}  {'params':>10}  {'bits':>4}  {'group':>6}  {'sym':>3}  "
            f"{'act':>4}  {'method':>8}  {'kernel':>13}  {'bytes':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        shape = "x".join(map(str, r["nk"])) if r["nk"] else "?"
        lines.append(f"{r['name']:<{w}}  {r['kind'] or '?':>9}  {shape:>14}  {r['params'] if r['params'] is not None else '?':>10}  "
                     f"{r['bits']:>4}  {r['group_size'] or 'chan':>6}  {'y' if r['symmetric'] else 'n':>3}  "
                     f"{r['act_bits'] or '-':>4}  {r['method']:>8}  {r['kernel'] or '-':>13}  "
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
    base = plan.meta.get("base_bytes")
    if base is not None:
        lines.append(f"not quantized (biases, norms, ...): {base / 1e6:.6f} MB")
        if len(known) == len(rows) and "size_bytes" in plan.predicted:
            total = base + sum(r["bytes"] for r in rows)
            pred = plan.predicted["size_bytes"]
            lines.append(f"layer bytes + not quantized = {total:,} B" + (
                "  (= predicted size)" if total == pred else
                f"  (predicted {pred:,.0f} B: differs by {total - pred:+,.0f} B; the plan was sized on "
                "another device or torch build, or its layer kinds are not recorded)"))
    if layer_kinds(plan) is None:
        lines.append("layer kinds not recorded in this plan: 2-D weights read as (out, in); a GPT-2 "
                     "(Conv1D, stored in x out) plan shows transposed shapes and bytes")
    est, sol = plan.estimator, plan.solver
    if est:
        lines.append(f"sensitivity: {est.get('name')}  probes={est.get('probes')}  loss: {est.get('loss') or '-'}")
    if sol:
        gap = sol.get("gap")
        lines.append(f"solver: {sol.get('name')}  status={sol.get('status')}  objective={sol.get('objective')}"
                     + (f"  gap={gap:.3g}" if isinstance(gap, (int, float)) else ""))
    ref = sol.get("refine") if sol else None
    if isinstance(ref, dict):
        lines += _refine_lines(ref)
    return "\n".join(lines)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _refine_lines(r: dict) -> list[str]:
    """The additivity gap and what ``bitplan.refine`` measured (``plan.solver["refine"]``)."""
    out = []
    p, m = r.get("start_predicted"), r.get("start_measured")
    if _num(p) and _num(m):
        out.append(f"additivity gap: start plan predicted {p:.6g}, measured {m:.6g}"
                   + (f" (table off by {100 * (p - m) / m:+.1f} %)" if m else ""))
    f = r.get("measured")
    if _num(f):
        vs = "" if not (_num(m) and m) else " (the start: nothing measured better)" if f >= m \
            else f" ({-100 * (1 - f / m):+.1f} % vs start)"
        out.append(f"refine: measured {f:.6g}{vs}"
                   + f", from {r.get('source', '?')}; {r.get('candidates', '?')} candidates"
                   + (f" in {r['seconds']:.1f} s" if _num(r.get("seconds")) else "")
                   + f" (stopped: {r.get('stopped', '?')})")
    if _num(r.get("heldout_start")) and _num(r.get("heldout")):
        out.append(f"held-out loss: start {r['heldout_start']:.6g}, refined {r['heldout']:.6g}")
    return out


def format_sensitivity(table) -> str:
    """Layers x options table of predicted loss increases ('-' where a layer cannot take the option),
    the most sensitive layer at the smallest option marked."""
    w = max([len("layer")] + [len(n) for n in table.names])
    labels = [o.label for o in table.options]
    cw = max(11, max(len(x) for x in labels))
    head = f"{'layer':<{w}}  " + "  ".join(f"{x:>{cw}}" for x in labels)
    lines = [head, "-" * len(head)]
    for n, row, ok in zip(table.names, table.loss, table.allowed):
        lines.append(f"{n:<{w}}  " + "  ".join(f"{v:>{cw}.4g}" if a else f"{'-':>{cw}}" for v, a in zip(row, ok)))
    lines.append("-" * len(head))
    j = int(np.argmin(table.bits))
    top = int(np.argmax(np.where(table.allowed[:, j], table.loss[:, j], -1)))
    lines.append(f"{table.method}: {len(table.names)} layers x {len(labels)} options; most sensitive at "
                 f"{labels[j]}: {table.names[top]}")
    return "\n".join(lines)
