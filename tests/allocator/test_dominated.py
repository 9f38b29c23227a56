"""Dominated-option elimination (highs.dominated, used by highs.prune) keeps the exact optimum."""
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import problems
from test_exact import _check_exact

from bitplan.allocator import Problem
from bitplan.allocator.common import Tables
from bitplan.allocator.highs import dominated

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def with_dominated(draw):
    """A random problem where some options copy another option of the row, worse or equal in
    loss and every cost (exact duplicates included)."""
    p = draw(problems())
    L, B = p.shape
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    loss, costs = p.loss.copy(), {k: v.copy() for k, v in p.costs.items()}
    if B >= 2:
        for r in range(L):
            if rng.random() < 0.6:
                b, b2 = rng.choice(B, 2, replace=False)                  # b becomes dominated by b2
                loss[r, b] = loss[r, b2] + float(rng.integers(0, 3))
                for k in costs:
                    costs[k][r, b] = costs[k][r, b2] + float(rng.integers(0, 3))
    return Problem(loss, costs, p.budgets, p.ties, p.names, p.fixed, p.allowed)


@SETTINGS
@given(with_dominated())
def test_highs_with_dominated_options_equals_bruteforce(p):
    _check_exact(p, "highs")
    _check_exact(p, "auto")


@SETTINGS
@given(with_dominated())
def test_dominated_keeps_one_undominated_option_per_row(p):
    red, _ = p.reduced()
    t = Tables.of(red)
    d = dominated(t)
    assert not (d & ~t.allowed).any()
    assert (t.allowed & ~d).any(0).all()                                 # every row keeps an option
