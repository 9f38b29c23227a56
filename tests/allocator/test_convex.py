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
    for bad in ([2, 2, 2], [2, 4], [2, np.nan, 4]):
        with pytest.raises(ValueError, match="bits"):
            solve(p, method="convex", bits=bad)
    with pytest.raises(ValueError, match="bits"):
        Problem(np.ones((2, 3)), {"s": np.ones((2, 3))}, {"s": 5.0}, bits=(2, 4))


def _uneven_problem():
    """Options at bits (2, 4, 8), loss exactly c_l 2^(-θ_l b): BAQ's model fits bits exactly, option
    indices (0, 1, 2, spaced evenly) cannot (the 4->8 step is twice the 2->4 step)."""
    rng = np.random.default_rng(3)
    bits = np.array([2.0, 4.0, 8.0])
    n = rng.integers(1000, 20000, 12).astype(float)
    loss = (rng.lognormal(0, 1, 12) * n)[:, None] * 2.0 ** (-1.7 * bits)
    size = n[:, None] * bits / 8
    return Problem(loss, {"size": size}, {"size": float(size[:, 1].sum())}, bits=tuple(bits)), bits


def test_convex_fits_real_bits_not_indices():
    p, bits = _uneven_problem()
    s = solve(p, method="convex")                         # bits come from problem.bits
    assert s.info["bits_source"] == "problem.bits" and s.info["bits"] == bits.tolist()
    assert s.info["fit_median_rel_error"] < 1e-6          # fails with indices 0..B-1 (~100 %)
    idx = solve(p, method="convex", bits=[0, 1, 2])
    assert idx.info["fit_median_rel_error"] > 0.1          # what fitting indices gave
    assert solve(Problem(p.loss, p.costs, p.budgets), method="convex").info["bits_source"].startswith("option index")


def test_convex_records_scs_fallback(monkeypatch):
    import cvxpy as cp
    p, _ = _uneven_problem()
    real = cp.Problem.solve

    def failing(self, *a, solver=None, **kw):
        if solver == "CLARABEL":
            raise cp.error.SolverError("forced failure")
        return real(self, *a, solver=solver, **kw)
    monkeypatch.setattr(cp.Problem, "solve", failing)
    s = solve(p, method="convex")
    assert s.info["cvxpy_solver"] == "SCS" and "forced failure" in s.info["solver_fallback"]
    assert s.info["record"]["solver_fallback"] == s.info["solver_fallback"]
    assert p.violations(s.choice) == []
    ok = solve(p, method="convex", solver="SCS")
    assert ok.info["solver_fallback"] is None
