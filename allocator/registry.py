"""Solver registry: one dict name -> solve function, filled by ``@register``."""
from __future__ import annotations

import time
from typing import Callable

from .errors import InfeasibleBudgetError

from .problem import Problem, Solution

__all__ = ["SOLVERS", "register", "solve", "available"]

SOLVERS: dict[str, Callable[..., Solution]] = {}


def register(name: str):
    """Decorator: ``@register("ilp") def solve(problem, **opts) -> Solution``."""
    def deco(fn):
        if name in SOLVERS:
            raise ValueError(f"solver {name!r} is registered twice")
        SOLVERS[name] = fn
        return fn
    return deco


def available() -> list[str]:
    return sorted(SOLVERS)


def solve(problem: Problem, method: str = "auto", **opts) -> Solution:
    """Solve ``problem`` with a registered solver; the returned plan is re-checked here.

    ``method="auto"`` (default) runs the Lagrangian and, when the problem is small enough, HiGHS
    (see ``auto.py``); ``Solution.method`` names the solver whose plan came back.
    Example: ``s = solve(Problem(loss, {"size": size}, {"size": 1e6}), method="ilp")``
    """
    if not isinstance(problem, Problem):
        raise TypeError(f"solve expects a Problem, got {type(problem).__name__}")
    if method not in SOLVERS:
        raise ValueError(f"unknown solver {method!r}; known: {available()}")
    problem.check_budgets()
    t0 = time.perf_counter()
    try:
        sol = SOLVERS[method](problem, **opts)
    except InfeasibleBudgetError as e:           # make every solver's message name the smallest values
        if e.smallest:
            raise
        small = problem.smallest_feasible()
        msg = ", ".join(f"{k!r}: {v:.10g}" for k, v in small.items())
        raise InfeasibleBudgetError(f"{e}; smallest feasible value of each budget on its own: {msg}",
                                    small) from e
    bad = problem.violations(sol.choice)
    if bad:          # a solver bug or a tolerance slip: never hand back a plan that breaks a budget
        raise RuntimeError(f"solver {method!r} returned an infeasible plan: {bad[:5]}")
    if sol.seconds <= 0:
        object.__setattr__(sol, "seconds", time.perf_counter() - t0)
    return sol
