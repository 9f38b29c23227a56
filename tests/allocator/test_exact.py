"""Exact solvers (ilp, highs, dp, auto on small problems) equal brute force on random problems."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from strategies import problems

from bitplan.allocator import Problem, solve
from bitplan.allocator.problem import FEAS_RTOL
from bitplan.allocator import InfeasibleBudgetError

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _truth(p):
    try:
        return solve(p, method="bruteforce")
    except InfeasibleBudgetError:
        return None


def _check_exact(p, method, **opts):
    truth = _truth(p)
    if truth is None:
        with pytest.raises(InfeasibleBudgetError):
            solve(p, method=method, **opts)
        return
    s = solve(p, method=method, **opts)
    assert p.violations(s.choice) == []
    assert s.status == "optimal", (method, s.status, s.objective, s.bound, s.info)
    assert s.objective == pytest.approx(truth.objective, rel=1e-9, abs=1e-9)
    assert s.bound <= truth.objective + 1e-9 * max(1.0, abs(truth.objective))
    for k, cap in p.budgets.items():
        assert s.totals[k] <= cap


@SETTINGS
@given(problems())
def test_highs_equals_bruteforce(p):
    _check_exact(p, "highs")


@SETTINGS
@given(problems())
def test_highs_cold_equals_bruteforce(p):
    _check_exact(p, "highs", warm_start=False)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_ilp_equals_bruteforce(p):
    _check_exact(p, "ilp")


@SETTINGS
@given(problems(budgets=(1, 1)))
def test_dp_equals_bruteforce_integer_costs(p):
    # integer costs and a free budget < max_bins: bin width = gcd of the shifted costs, exact
    _check_exact(p, "dp")


@SETTINGS
@given(problems())
def test_auto_equals_bruteforce(p):
    _check_exact(p, "auto")


@SETTINGS
@given(problems(budgets=(1, 1), integer_costs=False))
def test_dp_float_costs_bound_and_plan_are_honest(p):
    truth = _truth(p)
    if truth is None:
        return
    # Problem's feasibility has a FEAS_RTOL slack, brute force none: with float costs a plan can sit
    # within 1e-9 over a budget; the optimum over plans Problem accepts is the relaxed brute force
    (name, cap), = p.budgets.items()
    loose = _truth(p.with_budgets(**{name: cap + FEAS_RTOL * max(abs(cap), 1.0)}))
    s = solve(p, method="dp", max_bins=2000)
    assert p.violations(s.choice) == []
    assert s.objective >= loose.objective - 1e-9 * max(1, loose.objective)
    assert s.bound <= truth.objective + 1e-9 * max(1, truth.objective)
    if s.status == "optimal":
        assert loose.objective - 1e-9 <= s.objective <= truth.objective + 1e-9 * max(1, truth.objective)


def test_dp_reports_grid_and_rejects_two_budgets():
    p = Problem(np.array([[4., 1.], [9., 2.]]), {"a": np.array([[2., 8.], [2., 8.]])}, {"a": 10.0})
    s = solve(p, method="dp")
    assert s.info["exact"] and s.info["bin_width"] == 6.0 and s.status == "optimal"
    q = Problem(p.loss, {"a": p.costs["a"], "b": p.costs["a"]}, {"a": 10.0, "b": 12.0})
    with pytest.raises(ValueError, match="exactly one budget"):
        solve(q, method="dp")


def test_solvers_never_write_to_stdout(capfd):
    """highspy >= 1.16 prints a banner on fd 1 whenever a Highs object is built; a library must not."""
    import numpy as np

    from bitplan.allocator import Problem, solve
    rng = np.random.default_rng(0)
    loss, size = rng.random((30, 4)), np.tile(np.array([1.0, 2.0, 3.0, 4.0]), (30, 1))
    for method in ("highs", "lagrange", "auto"):
        solve(Problem(loss, {"size": size}, {"size": 75.0}), method=method)
    out, _ = capfd.readouterr()
    assert out == "", out
