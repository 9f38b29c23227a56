"""Allocation solvers: one ``Problem`` in, one ``Solution`` out.

Example:
    >>> from bitplan.allocator import Problem, solve
    >>> s = solve(Problem(loss, {"size": size}, {"size": 4e6}), method="ilp")
"""
from .problem import Problem, Solution
from .registry import SOLVERS, available, register, solve
from . import bruteforce, dp, highs, ilp, lagrange  # noqa: F401  (fill the registry)

__all__ = ["Problem", "Solution", "solve", "register", "available", "SOLVERS"]
