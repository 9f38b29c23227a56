"""Allocation solvers: one ``Problem`` in, one ``Solution`` out.

Example:
    >>> from bitplan.allocator import Problem, solve
    >>> s = solve(Problem(loss, {"size": size}, {"size": 4e6}))          # method="auto"
    >>> sols = frontier(problem, "size", [2e6, 3e6, 4e6])
"""
if __name__ == "bitplan.allocator":
    from .problem import Problem, Solution
    from .registry import SOLVERS, available, register, solve
    from . import auto, bruteforce, convex, dp, highs, ilp, lagrange  # noqa: F401  (fill the registry)
    from .frontier import frontier
    from .groups import group_table, with_group_budgets
    from .errors import InfeasibleBudgetError

    __all__ = ["Problem", "Solution", "solve", "InfeasibleBudgetError", "frontier", "with_group_budgets", "group_table", "register",
               "available", "SOLVERS"]
else:   # this source folder imported as a top-level 'allocator' (the repository root is on sys.path): stay
    __all__ = []   # empty, so it never shadows another distribution of that name (e.g. HF's 'kernels')
