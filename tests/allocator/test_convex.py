"""BAQ convex relaxation: feasible plans, valid bound, rounding loss reported."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from strategies import problems

from bitplan.allocator import Problem, solve
from bitplan.allocator.convex import fit
from bitplan.allocator import InfeasibleBudgetError


def test_fit_recovers_exponential_model():
    bits = np.array([2., 3., 4., 8.])
    c, th = np.array([5.0, 0.1]), np.array([2.0, 1.5])
    loss = c[:, None] * 2.0 ** (-th[:, None] * bits)
    c2, th2 = fit(loss, np.ones_like(loss, bool), bits)
    assert np.allclose(c2, c) and np.allclose(th2, th)


def test_convex_reports_rounding_loss_and_bound():
    rng = np.random.default_rng(0)
    bits = np.array([2, 3, 4, 8])
    n = rng.integers(1000, 100000, 200).astype(float)
    loss = rng.lognormal(0, 1, 200)[:, None] * n[:, None] * 4.0 ** -bits
    size = n[:, None] * bits / 8
    p = Problem(loss, {"size": size}, {"size": float(size[:, 2].sum())})
    s = solve(p, method="convex", bits=bits)
    exact = solve(p, method="highs")
    assert p.violations(s.choice) == []
    assert s.bound <= exact.objective * (1 + 1e-9)
    assert s.objective >= exact.objective * (1 - 1e-9)
    for key in ("continuous_objective", "rounded_objective", "rounding_loss", "fit_median_rel_error"):
        assert np.isfinite(s.info[key])
    assert s.gap < 0.05


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(max_rows=6, max_options=4))
def test_convex_plan_feasible_and_bound_valid(p):
    try:
        truth = solve(p, method="bruteforce")
    except InfeasibleBudgetError:
        return
    try:
        s = solve(p, method="convex")
    except InfeasibleBudgetError:
        return
    tol = 1e-7 * max(1.0, abs(truth.objective))
    assert p.violations(s.choice) == []
    assert s.bound <= truth.objective + tol and s.objective >= truth.objective - tol


def test_convex_rejects_bad_bits():
    p = Problem(np.ones((2, 3)), {"s": np.ones((2, 3))}, {"s": 5.0})
    with pytest.raises(ValueError, match="bits"):
        solve(p, method="convex", bits=[2, 2, 4])
