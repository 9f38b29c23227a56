"""Allocation solvers: one ``Problem`` in, one ``Solution`` out.

Example:
    >>> from bitplan.allocator import Problem, solve
    >>> s = solve(Problem(loss, {"size": size}, {"size": 4e6}))          # method="auto"
    >>> sols = frontier(problem, "size", [2e6, 3e6, 4e6])
"""
from .problem import Problem, Solution
from .registry import SOLVERS, available, register, solve
from . import auto, bruteforce, convex, dp, highs, ilp, lagrange  # noqa: F401  (fill the registry)
from .frontier import frontier
from .groups import group_table, with_group_budgets

__all__ = ["Problem", "Solution", "solve", "frontier", "with_group_budgets", "group_table", "register",
           "available", "SOLVERS"]
