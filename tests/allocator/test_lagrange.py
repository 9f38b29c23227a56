"""Lagrangian: bound <= optimum <= objective on random problems; tight on large ones."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from strategies import problems

from bitplan.allocator import Problem, solve
from bitplan.allocator import InfeasibleBudgetError


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_lagrange_within_reported_gap_of_bruteforce(p):
    try:
        truth = solve(p, method="bruteforce")
    except InfeasibleBudgetError:
        return
    try:
        s = solve(p, method="lagrange")
    except InfeasibleBudgetError as e:   # the greedy may give up on a feasible problem; it must say so
        assert "not a proof" in str(e)
        return
    tol = 1e-9 * max(1.0, abs(truth.objective))
    assert p.violations(s.choice) == []
    assert s.bound <= truth.objective + tol                 # a valid lower bound
    assert truth.objective <= s.objective + tol             # never better than the optimum
    assert s.objective - truth.objective <= s.objective - s.bound + tol     # within its gap
    if s.status == "optimal":
        assert s.objective == pytest.approx(truth.objective, rel=1e-9, abs=1e-9)


def _realistic(L, K, seed=0):
    rng = np.random.default_rng(seed)
    bits = np.array([2, 3, 4, 6, 8])
    n = rng.choice([768 * 768, 768 * 3072, 1024 * 4096], L).astype(float)
    loss = rng.lognormal(0, 1.5, L)[:, None] * n[:, None] * 4.0 ** -bits * rng.lognormal(0, .1, (L, 5))
    size = np.ceil(n[:, None] * bits / 8)
    lat = 3 + size / 2e4 + n[:, None] * np.isin(bits, [3, 6]) * 2e-5
    costs = {"size": size, "lat": lat}
    caps = {k: float(v.min(1).sum() + 0.35 * (v.max(1).sum() - v.min(1).sum())) for k, v in costs.items()}
    names = list(costs)[:K]
    return Problem(loss, {k: costs[k] for k in names}, {k: caps[k] for k in names})


@pytest.mark.parametrize("K", [1, 2])
def test_lagrange_gap_small_at_20k_rows(K):
    p = _realistic(20_000, K)
    s = solve(p, method="lagrange")
    assert p.violations(s.choice) == []
    assert s.gap < 1e-4, s.gap
    assert s.info["lambda"][0] > 0


def test_lagrange_unconstrained_is_optimal():
    p = Problem(np.array([[3., 1.], [5., 2.]]), {"s": np.ones((2, 2))}, {"s": 10.0})
    s = solve(p, method="lagrange")
    assert s.status == "optimal" and s.objective == 3.0 and s.gap == 0
