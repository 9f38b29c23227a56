"""Per-group budgets (MixDQ): a budget on a subset of rows is a cost table that is zero elsewhere.

Example:
    >>> p = with_group_budgets(p, "size", {"attn": attn_rows, "ffn": ffn_rows},
    ...                        {"attn": 2e6, "ffn": 5e6})
    >>> sorted(p.budgets)          # the original budgets plus "size[attn]", "size[ffn]"
    ['size', 'size[attn]', 'size[ffn]']
"""
from __future__ import annotations

import numpy as np

from .problem import Problem

__all__ = ["group_table", "with_group_budgets"]


def group_table(table, rows) -> np.ndarray:
    """(L, B) copy of ``table`` with every row outside ``rows`` set to 0.

    Example: ``group_table(size, [0, 3, 4])``
    """
    t = np.asarray(table, dtype=np.float64)
    if t.ndim != 2:
        raise ValueError(f"table must be (layers x options), got shape {t.shape}")
    idx = np.asarray(list(rows), dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= t.shape[0]):
        raise ValueError(f"group rows {idx.tolist()[:10]} out of range 0..{t.shape[0] - 1}")
    out = np.zeros_like(t)
    out[idx] = t[idx]
    return out


def with_group_budgets(problem: Problem, cost: str, groups: dict, budgets: dict) -> Problem:
    """A copy of ``problem`` with one extra budget ``f"{cost}[{group}]"`` per group.

    ``groups`` maps a group name to its rows (indices, or row names from ``problem.names``);
    ``budgets`` maps the same group names to the cap in the unit of ``problem.costs[cost]``.
    """
    if cost not in problem.costs:
        raise ValueError(f"cost {cost!r} is not a cost table; tables: {sorted(problem.costs)}")
    if set(groups) != set(budgets):
        raise ValueError(f"groups {sorted(groups)} and budgets {sorted(budgets)} must name the same groups")
    index = {n: i for i, n in enumerate(problem.names)}
    costs, caps = dict(problem.costs), dict(problem.budgets)
    for g, rows in groups.items():
        rows = [index[r] if isinstance(r, str) and r in index else r for r in rows]
        bad = [r for r in rows if isinstance(r, str)]
        if bad:
            raise ValueError(f"group {g!r} names unknown rows {bad[:5]}")
        key = f"{cost}[{g}]"
        if key in costs:
            raise ValueError(f"budget {key!r} already exists")
        costs[key] = group_table(problem.costs[cost], rows)
        caps[key] = float(budgets[g])
    return Problem(problem.loss, costs, caps, problem.ties, problem.names, problem.fixed, problem.allowed,
                   problem.bits)
