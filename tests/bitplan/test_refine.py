"""bitplan.refine: the measured optimum on a model small enough to enumerate, never worse than the
start, every candidate within every budget (size, BOPs, latency, ties), deterministic for a seed,
the time limit honoured, the record in plan.solver and `bitplan show`."""
import copy
import itertools
import time
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import bitplan
from bitplan.assemble import make_plan
from bitplan.core.graph import LayerGraph
from bitplan.core.spec import QuantSpec
from bitplan.costmodels import MB, base_nbytes
from bitplan.joint.search import Search
from bitplan.sensitivity import Sensitivity
from bitplan.sensitivity.losses import resolve_loss
from tests.fixtures_models import tiny

BITS = (2, 3, 4)
OPTS = [QuantSpec(b) for b in BITS]


@pytest.fixture(scope="module")
def tiny_all():
    """TinyMLP (4 layers), its batches, and EVERY plan over {2,3,4} bits per channel measured:
    [(calibration loss, bits tuple, size bytes)] — the label-free MSE of apply_plan_(copy, plan, 'fake')."""
    torch.set_num_threads(1)
    model, batches = tiny()
    g = LayerGraph.build(model, batches[0])
    base = base_nbytes(model, g.names)
    fn, _ = resolve_loss(None, model, batches)
    out = []
    for combo in itertools.product(BITS, repeat=len(g.names)):
        p = make_plan(g, {n: QuantSpec(b) for n, b in zip(g.names, combo)}, base)
        m = bitplan.apply_plan_(copy.deepcopy(model), p, "fake")
        with torch.no_grad():
            out.append((float(np.mean([float(fn(m, b)) for b in batches])), combo, p.predicted["size_bytes"]))
    return model, batches, g, out


def measured(model, batches, plan):
    fn, _ = resolve_loss(None, model, batches)
    m = bitplan.apply_plan_(copy.deepcopy(model), plan, "fake")
    with torch.no_grad():
        return float(np.mean([float(fn(m, b)) for b in batches]))


def misleading_table(g):
    """A table that ranks the layers the wrong way round (first layers 'robust', last 'fragile')."""
    loss = np.array([[(i + 1) * 4.0 ** (4 - b) for b in BITS] for i in reversed(range(len(g.names)))])
    return Sensitivity(g.names, tuple(OPTS), loss, "made_up", model_fingerprint=g.fingerprint)


@pytest.mark.parametrize("frac", [0.35, 0.6])
def test_refined_plan_is_the_measured_optimum(tiny_all, frac):
    model, batches, g, everything = tiny_all
    sizes = [s for _, _, s in everything]
    budget = (min(sizes) + frac * (max(sizes) - min(sizes))) / MB
    feasible = sorted((y, c) for y, c, s in everything if s <= budget * MB)
    best = feasible[0][0]
    kw = dict(budget_mb=budget, calib_data=batches, options=OPTS, sensitivity_table=misleading_table(g))
    start = bitplan.allocate(model, **kw)
    y0 = dict((c, y) for y, c in feasible)[tuple(start.bits[n] for n in g.names)]
    assert y0 > best * 1.05                                   # the misleading table's plan is clearly off
    for plan in (bitplan.allocate(model, refine_seconds=60, **kw),            # Problem from allocate
                 bitplan.refine(model, start, batches, seconds=60)):          # rebuilt from the plan
        rec = plan.solver["refine"]
        got = dict((c, y) for y, c in feasible)[tuple(plan.bits[n] for n in g.names)]
        assert got == pytest.approx(best, rel=1e-9)           # THE measured optimum of all feasible plans
        assert rec["measured"] == pytest.approx(measured(model, batches, plan), rel=1e-6)   # = fake apply
        assert rec["start_measured"] == pytest.approx(y0, rel=1e-6)
        assert plan.predicted["size_bytes"] <= budget * MB
        assert rec["stopped"] in ("exhausted", "patience") and rec["source"] in ("search", "resolve")
        assert rec["candidates"] < len(feasible) + 1


def test_never_worse_than_the_start_and_returns_it_when_it_is_best(tiny_all):
    model, batches, g, everything = tiny_all
    sizes = [s for _, _, s in everything]
    budget = min(sizes) + 0.5 * (max(sizes) - min(sizes))
    feasible = sorted((y, c) for y, c, s in everything if s <= budget)
    base = base_nbytes(model, g.names)
    rng = np.random.default_rng(0)
    for k in [0] + list(rng.choice(len(feasible), 3, replace=False)):     # the optimum and 3 random starts
        y0, combo = feasible[int(k)]
        start = make_plan(g, {n: QuantSpec(b) for n, b in zip(g.names, combo)}, base,
                          budgets={"size_bytes": budget}, estimator={"options": [s.to_dict() for s in OPTS]})
        plan = bitplan.refine(model, start, batches, seconds=30, max_evals=12)
        rec = plan.solver["refine"]
        assert rec["measured"] <= y0 * (1 + 1e-9) and measured(model, batches, plan) <= y0 * (1 + 1e-6)
        assert plan.predicted["size_bytes"] <= budget
        if k == 0:                                             # nothing beats the optimum: the start back
            assert plan.layers == start.layers and rec["source"] == "start" and rec["gain"] == 0.0


class Siblings(nn.Module):
    """Two layers reading the same input (tie='shared_input' ties them) + two more."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)
        self.c, self.head = nn.Linear(128, 64), nn.Linear(64, 16)

    def forward(self, x):                                      # (n, 64) -> (n, 16)
        h = torch.cat([torch.relu(self.a(x)), torch.tanh(self.b(x))], -1)
        return self.head(torch.relu(self.c(h)))


def synthetic_profile(g, specs):
    """A deterministic latency profile for the layers of ``g`` (ms grows with N*K and bits, W8A8 cheaper)."""
    from bitplan.kernels.profile import LatencyProfile, device_fingerprint, option_key
    from bitplan.kernels.registry import kernel_for
    p = LatencyProfile(device_fingerprint("cpu"))
    for s in specs:
        for l in g.layers:
            key = option_key(s, kernel_for(s, l.out_features, l.in_features, "cpu"))
            for m in (1, 8):
                ms = 1e-5 * l.out_features * l.in_features * (s.bits if s.act_bits is None else 1.5) * (1 + m / 8)
                p.entries[(key, l.out_features, l.in_features, m)] = {
                    "median_ms": ms, "p25_ms": ms, "p75_ms": ms, "spread": 0.0, "batches": 9, "dropped": 0,
                    "inner": 1, "retries": 0, "stable": True}
    p.fixed["toy"] = {"median_ms": 0.5, "spread": 0.0}
    return p


def test_every_candidate_meets_size_bops_latency_and_ties(monkeypatch):
    torch.manual_seed(0)
    model = Siblings().eval()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(8, 64, generator=gen) for _ in range(4)]
    specs = [QuantSpec(2, 32), QuantSpec(3), QuantSpec(4, 32), QuantSpec(4), QuantSpec(8), QuantSpec(8, act_bits=8)]
    g = LayerGraph.build(model, batches[0])
    prof = synthetic_profile(g, specs)
    from bitplan.costmodels import cost_table
    from bitplan.costmodels.latency import latency_table
    lat = latency_table(g.layers, specs, prof)                 # (L, B) ms
    bops = cost_table("bops", g.layers, specs)
    size = cost_table("size", g.layers, specs)
    base = base_nbytes(model, g.names)
    mid = lambda t: float(t.min(1).sum() + 0.45 * (t.max(1).sum() - t.min(1).sum()))   # noqa: E731
    kw = dict(budget_mb=(base + mid(size)) / MB, max_bops=mid(bops), latency_profile=prof,
              max_latency_ms=mid(lat) + 0.5, calib_data=batches, options=specs, tie="shared_input",
              sensitivity_opts={"max_probes": 4, "min_probes": 4})
    checked = []
    orig = Search.loss

    def spy(self, c, idx):
        checked.append(self.problem.violations(self.sp.to_layers(c)))
        return orig(self, c, idx)
    monkeypatch.setattr(Search, "loss", spy)
    with warnings.catch_warnings():             # layers without a real kernel here: not this test's business
        warnings.simplefilter("ignore", RuntimeWarning)
        start = bitplan.allocate(model, **kw)
        plan = bitplan.allocate(model, refine_seconds=60, refine_opts={"max_evals": 80}, **kw)
    assert len(checked) > 40 and not any(checked)             # every measured candidate meets every budget
    rec = plan.solver["refine"]
    assert rec["measured"] <= rec["start_measured"] and plan.layers["a"] == plan.layers["b"]
    for k, cap in plan.budgets.items():
        assert plan.predicted[k] <= cap * (1 + 1e-9), k
    assert plan.predicted["latency_ms"] == pytest.approx(float(lat[np.arange(4), [specs.index(plan.layers[n])
                                                                                   for n in g.names]].sum()) + 0.5)
    assert rec["measured"] == pytest.approx(measured(model, batches, plan), rel=1e-6)   # act-quant hooks too
    # a user call rebuilds the Problem from the plan: same invariants; a latency budget needs the profile
    checked.clear()
    again = bitplan.refine(model, start, batches, seconds=60, latency_profile=prof, max_evals=40)
    assert len(checked) > 20 and not any(checked)
    assert again.layers["a"] == again.layers["b"] and again.solver["refine"]["measured"] <= rec["start_measured"]
    with pytest.raises(ValueError, match="latency_profile"):
        bitplan.refine(model, start, batches, seconds=5)


def test_deterministic_for_a_seed(tiny_all):
    model, batches, g, _ = tiny_all
    base = base_nbytes(model, g.names)
    opts = [QuantSpec(b, gs) for b in (2, 3, 4, 8) for gs in (None, 32)]
    start = make_plan(g, {n: QuantSpec(3) for n in g.names}, base, estimator={"options": [s.to_dict() for s in opts]})
    runs = [bitplan.refine(model, start, batches, seconds=120, seed=s, max_evals=30) for s in (7, 7, 8)]
    a, b = runs[0].solver["refine"], runs[1].solver["refine"]
    assert runs[0].layers == runs[1].layers
    for k in ("measured", "candidates", "forwards", "generations", "source", "accepted", "alpha"):
        assert a[k] == b[k], k
    assert a["candidates"] == 30 and a["stopped"] == "max_evals"
    assert runs[2].solver["refine"]["seed"] == 8
    assert runs[0].predicted["size_bytes"] <= start.predicted["size_bytes"]    # no budgets: never grows


def test_time_limit_is_honoured():
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(10) for m in (nn.Linear(128, 128), nn.GELU())]).eval()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(64, 128, generator=gen) for _ in range(4)]
    plan = bitplan.allocate(model, budget_mb=bitplan.budgets.avg_bits_budget_mb(model, 3.5), calib_data=batches,
                            sensitivity_opts={"max_probes": 4, "min_probes": 4})
    t0 = time.perf_counter()
    # patience out of reach: on a fast machine the search would otherwise end by patience before 2 s
    out = bitplan.refine(model, plan, batches, seconds=2.0, patience=10 ** 9)
    wall = time.perf_counter() - t0
    rec = out.solver["refine"]
    assert rec["stopped"] == "time" and rec["candidates"] > 1
    assert rec["search_s"] <= rec["seconds"] and wall < 2.0 + 3.0   # one forward / one re-solve past it at most
    assert rec["measured"] <= rec["start_measured"]


def test_record_round_trips_and_show_prints_the_gap(tiny_all, tmp_path):
    from bitplan.report import format_plan
    model, batches, g, everything = tiny_all
    sizes = [s for _, _, s in everything]
    budget = (min(sizes) + 0.4 * (max(sizes) - min(sizes))) / MB
    held = [torch.randn(8, 32, generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    plan = bitplan.allocate(model, budget_mb=budget, calib_data=batches, options=OPTS,
                            sensitivity_table=misleading_table(g), refine_seconds=30,
                            refine_opts={"heldout": held, "max_evals": 20})
    plan.save(tmp_path / "p.json")
    back = bitplan.Plan.load(tmp_path / "p.json")
    assert back.solver == plan.solver and back.layers == plan.layers
    rec = back.solver["refine"]
    for k in ("start_predicted", "start_measured", "additivity_gap", "measured", "candidates", "seconds",
              "source", "heldout_start", "heldout"):
        assert k in rec, k
    assert rec["heldout"] == pytest.approx(measured(model, held, plan), rel=1e-6)
    text = format_plan(back)
    assert "additivity gap: start plan predicted" in text and "refine: measured" in text
    assert "held-out loss: start" in text


def test_bad_inputs(tiny_all):
    model, batches, g, _ = tiny_all
    base = base_nbytes(model, g.names)
    plan = make_plan(g, {n: QuantSpec(4) for n in g.names}, base)
    with pytest.raises(ValueError, match="seconds"):
        bitplan.refine(model, plan, batches, seconds=0)
    with pytest.raises(TypeError, match="unknown option.*offspring"):
        bitplan.refine(model, plan, batches, seconds=1, ofspring=3)
    with pytest.raises(ValueError, match="offspring"):
        bitplan.refine(model, plan, batches, seconds=1, offspring=0)
    with pytest.raises(bitplan.PlanMismatchError):
        bitplan.refine(nn.Sequential(nn.Linear(32, 16)), plan, batches, seconds=1)
    with pytest.raises(ValueError, match="not among the run's options"):
        bitplan.refine(model, plan, batches, seconds=1, options=OPTS[:2])
    over = plan.replace(budgets={"size_bytes": plan.predicted["size_bytes"] - 1})
    with pytest.raises(ValueError, match="does not meet"):
        bitplan.refine(model, over, batches, seconds=1)


def test_cli_plan_refine_and_show(tmp_path):
    import json
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "p.json"
    p = subprocess.run([sys.executable, "-m", "bitplan", "plan", "--model", "tests.fixtures_models:tiny",
                        "--avg-bits", "3", "--bits", "2,3,4", "--refine", "3", "--out", str(out), "--quiet"],
                       cwd=root, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr
    rec = json.loads(out.read_text())["solver"]["refine"]
    assert rec["time_limit_s"] == 3.0 and rec["measured"] <= rec["start_measured"]
    s = subprocess.run([sys.executable, "-m", "bitplan", "show", str(out)], cwd=root, env=env,
                       capture_output=True, text=True, timeout=120)
    assert s.returncode == 0 and "additivity gap: start plan predicted" in s.stdout, s.stderr
