"""time_interleaved on a synthetic clock: preempted batches dropped, unstable ones re-measured."""
import pytest

from bitplan.kernels.timing import time_interleaved


class Clock:
    def __init__(self):
        self.t = 0.0
        self.calls = 0

    def __call__(self):
        return self.t


def test_preemptions_dropped_and_median_exact():
    clk = Clock()

    def work(cost):
        def f():
            clk.calls += 1
            clk.t += cost
            if clk.calls % 37 == 0:          # another process takes the core for 8 ms
                clk.t += 0.008
        return f
    t = time_interleaved({"a": work(1e-4), "b": work(3e-4)}, reps=31, target_ms=1.0, clock=clk)
    assert t["a"].median_ms == pytest.approx(0.1) and t["b"].median_ms == pytest.approx(0.3)
    assert t["a"].dropped + t["b"].dropped > 0 and t["a"].stable and t["b"].stable
    assert t["a"].inner == 10 and t["b"].inner == 3


def test_unstable_is_remeasured_and_flagged():
    clk = Clock()
    state = {"i": 0}

    def noisy():                              # alternates 1x / 1.5x: spread ~0.5, never stable
        state["i"] += 1
        clk.t += 1e-3 * (1.5 if state["i"] % 2 else 1.0)
    t = time_interleaved({"n": noisy}, reps=9, target_ms=1.0, retries=2, max_spread=0.1, clock=clk)["n"]
    assert t.retries == 2 and not t.stable and t.spread > 0.1


def test_needs_a_callable():
    with pytest.raises(ValueError):
        time_interleaved({})
