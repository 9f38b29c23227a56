"""auto picks a solver and says which; frontier sweeps budgets; per-group budgets; honest status."""
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from strategies import problems

from bitplan.allocator import Problem, frontier, solve, with_group_budgets
from bitplan.allocator.registry import SOLVERS
from bitplan.allocator import InfeasibleBudgetError


def _problem(L=300, seed=0, K=1):
    rng = np.random.default_rng(seed)
    bits = np.array([2, 3, 4, 8])
    n = rng.integers(10_000, 1_000_000, L).astype(float)
    loss = rng.lognormal(0, 1, L)[:, None] * n[:, None] * 4.0 ** -bits
    size = np.ceil(n[:, None] * bits / 8)
    bops = n[:, None] * bits * 8
    costs = {"size": size, "bops": bops}
    caps = {"size": float(size[:, 2].sum()), "bops": float(bops[:, 2].sum() * 0.95)}
    names = list(costs)[:K]
    return Problem(loss, {k: costs[k] for k in names}, {k: caps[k] for k in names})


def test_auto_is_default_and_says_what_ran():
    s = solve(_problem(K=2))
    assert s.info["auto"]["ran"][0] == "lagrange"
    assert s.method in ("lagrange", "highs") and s.info["auto"]["reason"]
    assert s.status == "optimal"          # 300 rows: the exact path proves it


def test_auto_skips_exact_solver_above_threshold():
    s = solve(_problem(L=2000), method="auto", exact_cells=1000)
    assert s.info["auto"]["ran"] == ["lagrange"] and s.method == "lagrange"
    assert "exact_cells" in s.info["auto"]["reason"] or "closes" in s.info["auto"]["reason"]


def test_status_optimal_only_with_proof():
    p = _problem(L=3000, K=2)
    for method in ("highs", "lagrange", "auto"):
        s = solve(p, method=method, time_limit=0.5)
        assert p.violations(s.choice) == []
        if s.status == "optimal":
            assert s.objective - s.bound <= 1e-9 * abs(s.objective) + 1e-12 * abs(s.objective) + 1e-12
        else:
            assert s.status == "feasible" and s.gap > 0


def test_highs_time_limit_respected():
    p = _problem(L=20_000, K=2)
    s = solve(p, method="highs", time_limit=2.0)
    assert s.seconds < 2.0 + 3.0            # HiGHS may overrun a little (presolve probing is off)
    assert p.violations(s.choice) == []


def test_frontier_is_monotone_and_marks_infeasible():
    p = _problem(L=200)
    lo = p.smallest_feasible()["size"]
    hi = float(p.costs["size"].max(1).sum())
    values = [hi, 0.5 * lo, lo, 0.5 * (lo + hi), 0.8 * lo + 0.2 * hi]
    for method in ("auto", "lagrange", "highs"):
        sols = frontier(p, "size", values, method=method)
        assert sols[1] is None
        objs = {v: s.objective for v, s in zip(values, sols) if s is not None}
        order = sorted(objs)
        assert all(objs[a] >= objs[b] - 1e-9 * objs[a] for a, b in zip(order, order[1:]))
        for v, s in zip(values, sols):
            if s is not None:
                assert s.totals["size"] <= v * (1 + 1e-9)
                assert s.info["frontier_value"] == v
    with pytest.raises(InfeasibleBudgetError):
        frontier(p, "size", [0.5 * lo], skip_infeasible=False)
    with pytest.raises(ValueError, match="budget 'lat'"):
        frontier(p, "lat", [1.0])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(budgets=(1, 2)))
def test_frontier_matches_single_solves(p):
    name = next(iter(p.budgets))
    vals = [p.budgets[name], p.budgets[name] + 3]
    sols = frontier(p, name, vals, method="highs")
    for v, s in zip(vals, sols):
        try:
            ref = solve(p.with_budgets(**{name: v}), method="bruteforce")
        except InfeasibleBudgetError:
            assert s is None
            continue
        assert s.objective == pytest.approx(ref.objective, rel=1e-9, abs=1e-9)
        assert p.with_budgets(**{name: v}).violations(s.choice) == []


def test_group_budgets_respected():
    p = _problem(L=60)
    attn, ffn = list(range(0, 30)), list(range(30, 60))
    cap_attn = float(p.costs["size"][attn, 1].sum())
    q = with_group_budgets(p, "size", {"attn": attn, "ffn": ffn}, {"attn": cap_attn, "ffn": 1e18})
    assert sorted(q.budgets) == ["size", "size[attn]", "size[ffn]"]
    for method in ("highs", "lagrange", "auto"):
        s = solve(q, method=method)
        assert p.costs["size"][attn, s.choice[attn]].sum() <= cap_attn
    with pytest.raises(ValueError, match="unknown rows"):
        with_group_budgets(p, "size", {"g": ["nope"]}, {"g": 1.0})


def test_infeasible_budget_names_smallest_values():
    p = _problem(L=20, K=2)
    small = p.smallest_feasible()
    q = p.with_budgets(size=small["size"] * 0.5)
    with pytest.raises(InfeasibleBudgetError, match="size") as e:
        solve(q)
    assert e.value.smallest["size"] == pytest.approx(small["size"])
    assert set(e.value.smallest) == {"size", "bops"}


def test_conflicting_ties_and_fixed_are_named():
    loss = np.ones((3, 2))
    with pytest.raises(ValueError, match=r"conv1.*conv2|fixed"):
        Problem(loss, {"s": loss}, {"s": 9.0}, ties=[[0, 1]], names=["conv1", "conv2", "fc"],
                fixed={0: 0, 1: 1})


def test_every_solver_honours_ties_fixed_allowed():
    rng = np.random.default_rng(3)
    loss, size = rng.random((6, 4)), rng.integers(1, 9, (6, 4)).astype(float)
    allowed = np.ones((6, 4), bool)
    allowed[5, 3] = False
    p = Problem(loss, {"s": size}, {"s": float(size.sum(1).mean() * 1.5)}, ties=[[0, 2], [3, 4]],
                fixed={1: 2}, allowed=allowed)
    for method in sorted(set(SOLVERS) - {"bruteforce"}):
        s = solve(p, method=method)
        assert p.violations(s.choice) == [], method
        assert s.choice[0] == s.choice[2] and s.choice[3] == s.choice[4] and s.choice[1] == 2
        assert s.choice[5] != 3


def test_lean_import():
    code = ("import sys, bitplan, bitplan.allocator; "
            "bad = [m for m in ('pulp', 'highspy', 'cvxpy', 'scipy.optimize') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_large_problem_reduced_is_fast():
    import time
    L = 200_000
    p = Problem(np.ones((L, 3)), {"s": np.ones((L, 3))}, {"s": float(L)})
    t0 = time.perf_counter()
    red, row_of = p.reduced()
    assert red is p and len(row_of) == L
    assert p.violations(np.zeros(L, int)) == []
    assert time.perf_counter() - t0 < 2.0


def test_isolated_highs_matches_in_process():
    from bitplan.allocator import highs
    from bitplan.allocator.common import Tables
    p = _problem(L=100, K=2)
    t = Tables.of(p)
    a = highs.run(t, 20.0, isolate=False)
    b = highs.run(t, 20.0, isolate=True)
    assert b[2]["isolated"] and not a[2]["isolated"]
    assert t.objective(a[0]) == pytest.approx(t.objective(b[0]), rel=1e-12)


def test_exact_solvers_do_not_trust_a_failed_greedy_warm_start():
    """Regression (hypothesis found it): the Lagrangian's greedy repair finds no feasible plan here,
    yet a plan exists; the exact solvers must still find the optimum, `lagrange` must not call the
    problem infeasible as if proven."""
    loss = np.array([[9.3, .5, .4, 2.2], [1.8, 3.1, .6, 6.7], [9.8, 2., 9.9, 8.1], [9.1, 8.8, .2, 3.7],
                     [4.7, 8.6, 6.4, .1], [1.3, 4.8, 6.7, 8.3]])
    c0 = np.array([[13., 1, 3, 13], [1, 12, 9, 1], [19, 3, 19, 6], [4, 7, 3, 7], [19, 12, 5, 13], [5, 11, 4, 8]])
    c1 = np.array([[0., 12, 13, 16], [15, 10, 10, 15], [12, 3, 9, 5], [4, 3, 8, 8], [14, 19, 19, 13], [6, 8, 11, 18]])
    allowed = np.array([[1, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1], [0, 1, 1, 1], [0, 1, 1, 0], [0, 0, 1, 0]], bool)
    p = Problem(loss, {"c0": c0, "c1": c1}, {"c0": 35.0, "c1": 54.0}, fixed={5: 2}, allowed=allowed)
    best = solve(p, method="bruteforce").objective
    for m in ("highs", "ilp", "auto"):
        assert solve(p, method=m).objective == pytest.approx(best)
    assert frontier(p, "c0", [35.0], method="highs")[0].objective == pytest.approx(best)
    try:
        assert solve(p, method="lagrange").objective >= best - 1e-9
    except InfeasibleBudgetError as e:
        assert "not a proof" in str(e)
