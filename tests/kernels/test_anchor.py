"""Anchoring a latency profile to whole forwards (kernels/anchor.py): the fit recovers a known fixed
cost and factor, reproduces the forwards it was fitted on within their measured spread, agrees with
the cost model, and on a real model is never further from the measured anchors than the raw profile."""
import copy
import math

import pytest
import torch

from bitplan.core.graph import LayerGraph
from bitplan.costmodels import predict_latency_ms
from bitplan.kernels.anchor import anchor_profile, fit_anchor, measure_anchors, mixed_plans, uniform_plans
from bitplan.kernels.calibrate import calibrate, measure_fixed_cost
from bitplan.kernels.formats import QuantSpec
from bitplan.kernels.profile import LatencyProfile, device_fingerprint

SPECS = [QuantSpec(8), QuantSpec(4, 32), QuantSpec(3, 32)]


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64),
                               torch.nn.GELU(), torch.nn.Linear(64, 64)).eval()


def test_fit_recovers_fixed_cost_and_factor():
    P = [3.0, 5.0, 11.0, 20.0]
    F, s = fit_anchor(P, [1.5 + 0.8 * p for p in P])
    assert F == pytest.approx(1.5, rel=1e-9) and s == pytest.approx(0.8, rel=1e-9)
    F, s = fit_anchor(P, [0.9 * p for p in P])                       # no fixed cost at all
    assert F == pytest.approx(0.0, abs=1e-9) and s == pytest.approx(0.9, rel=1e-9)


def test_fit_keeps_fixed_cost_non_negative_and_handles_one_anchor():
    P = [10.0, 20.0, 40.0]
    F, s = fit_anchor(P, [2 * p - 5 for p in P])                     # unconstrained F would be -5
    assert F == 0.0 and s > 0
    P, T = [10.0, 20.0, 30.0], [30.0, 21.0, 12.0]                   # times fall as sums rise: slope < 0
    F, s = fit_anchor(P, T)
    obj = lambda F, s: sum(((F + s * p) / t - 1) ** 2 for p, t in zip(P, T))          # noqa: E731
    assert F >= 0 and s > 0 and all(obj(F, s) <= obj(f, 1.0) + 1e-12 for f in (0.0, 5.0, 10.0, 20.0))
    assert fit_anchor([10.0], [12.0]) == (2.0, 1.0)                   # factor not identifiable: s = 1
    assert fit_anchor([10.0, 10.0], [9.0, 9.0]) == (0.0, 1.0)
    with pytest.raises(ValueError, match="positive finite"):
        fit_anchor([1.0, math.nan], [1.0, 2.0])
    with pytest.raises(ValueError, match="as many"):
        fit_anchor([1.0], [1.0, 2.0])


def synthetic_case(noise):
    """A profile of 3 layers x 2 options and anchors measured as 0.7 ms + 1.3 x Σ layers, each off by
    at most ``noise`` (relative) — the measurement spread."""
    p = LatencyProfile(device_fingerprint("cpu"))
    for o, base in (("fp32@dense", 1.0), ("w8@int8_wo", 0.4)):
        for n, k, m in ((64, 32, 8), (64, 64, 8)):
            ms = base * n * k / 2048
            p.entries[(o, n, k, m)] = {"median_ms": ms, "p25_ms": ms, "p75_ms": ms, "spread": 0.0, "batches": 9,
                                       "dropped": 0, "inner": 1, "retries": 0, "stable": True}
    layers = [("a", 64, 32, 8), ("b", 64, 64, 8), ("c", 64, 64, 8)]
    plans = {"fp32": {n: "fp32@dense" for n, *_ in layers}, "w8": {n: "w8@int8_wo" for n, *_ in layers}}
    mixed = {"a": "w8@int8_wo", "b": "fp32@dense", "c": "w8@int8_wo"}
    plans["mix"] = mixed
    timings = {}
    for (name, plan), eps in zip(plans.items(), (noise, -noise, noise / 2)):
        raw = sum(p.entries[(plan[l], n, k, m)]["median_ms"] for l, n, k, m in layers)
        timings[name] = {"median_ms": (0.7 + 1.3 * raw) * (1 + eps), "spread": 2 * noise}
    return p, {"layers": layers, "plans": plans, "timings": timings, "clock": "wall"}


@pytest.mark.parametrize("noise", [0.0, 0.02])
def test_anchored_profile_reproduces_its_anchors_within_spread(noise):
    p, anchors = synthetic_case(noise)
    raw = copy.deepcopy(p)
    anchor_profile(p, anchors=anchors, fixed_name="toy")
    a = p.meta["anchor"]
    assert p.fixed["toy"]["median_ms"] == a["fixed_ms"] >= 0 and a["scale"] > 0
    for r in a["anchors"]:
        tol = 1e-9 + r["spread"]                              # what the measurement itself can tell apart
        assert abs(r["rel_error"]) <= tol, r
        assert r["predicted_ms"] == pytest.approx(a["fixed_ms"] + a["scale"] * r["raw_predicted_ms"])
    if noise == 0:
        assert a["fixed_ms"] == pytest.approx(0.7) and a["scale"] == pytest.approx(1.3)
    for key, e in p.entries.items():                         # every entry scaled by the same factor
        assert e["median_ms"] == pytest.approx(a["scale"] * raw.entries[key]["median_ms"], rel=1e-12)


def test_anchor_without_predictable_plans_is_a_clear_error():
    p, anchors = synthetic_case(0.0)
    p.entries = {k: v for k, v in p.entries.items() if k[0] == "other@dense"}
    with pytest.raises(ValueError, match="no anchor plan"):
        anchor_profile(p, anchors=anchors)
    with pytest.raises(ValueError, match="model and batch"):
        anchor_profile(p)


def test_uniform_plans_cover_fp32_and_every_spec():
    g = LayerGraph.build(mlp(), torch.randn(4, 64))
    plans = uniform_plans(g.layers, SPECS + [QuantSpec(4, 48)])
    assert list(plans) == ["fp32", "w8", "w4g32", "w3g32", "w4g48"]
    assert all(v == "fp32@dense" for v in plans["w4g48"].values())    # 48 divides no K here: layers stay fp32
    assert all(isinstance(v, QuantSpec) for v in plans["w4g32"].values())


def test_anchor_on_a_real_model_beats_the_raw_profile_on_its_anchors():
    torch.manual_seed(0)
    model, x = mlp(), torch.randn(1, 64)
    g = LayerGraph.build(model, x)
    prof = calibrate(g.layers, tokens=(1,), kernels=SPECS, quiet=True, reps=7, max_seconds=0.02, retries=0,
                     repeat_check=0)
    prof.fixed["mlp"] = measure_fixed_cost(model, x, reps=7, max_seconds=0.02, retries=0)
    raw = copy.deepcopy(prof)
    anchors = measure_anchors(model, x, SPECS, reps=9, max_seconds=0.05, graph=g, mixed=2)
    assert set(anchors["plans"]) == {"fp32", "w8", "w4g32", "w3g32", "mix0", "mix1"}
    assert anchors["kinds"]["mix0"] == "mixed" and anchors["kinds"]["w8"] == "uniform"
    anchor_profile(prof, anchors=anchors, fixed_name="mlp")
    a = prof.meta["anchor"]
    assert a["scale"] > 0 and a["fixed_ms"] >= 0 and len(a["anchors"]) == 6
    # the cost model, reading the anchored profile, predicts each uniform plan as the fit says
    by_label = {s.label: s for s in SPECS}
    for r in a["anchors"]:
        if r["plan"] in by_label:                             # the fp32 anchor reads dense entries: no spec
            per_layer = [by_label[r["plan"]]] * len(g.layers)
            assert predict_latency_ms(g.layers, per_layer, prof, fixed="mlp") == pytest.approx(
                r["predicted_ms"], rel=1e-9)
    # least squares over (F >= 0, s > 0) contains the raw profile (its stub fixed cost, s = 1)
    F_raw = raw.fixed["mlp"]["median_ms"]
    w = {"uniform": 1 / 4, "mixed": 1 / 2}                   # each kind of anchor weighs the same
    sq = lambda rows, f: sum(w[r["kind"]] * f(r) ** 2 for r in rows)                   # noqa: E731
    anchored = sq(a["anchors"], lambda r: r["rel_error"])
    unfitted = sq(a["anchors"], lambda r: (F_raw + r["raw_predicted_ms"]) / r["measured_ms"] - 1)
    assert anchored <= unfitted * (1 + 1e-9)


def test_mixed_plans_are_seeded_and_take_only_options_a_layer_can_take():
    g = LayerGraph.build(mlp(), torch.randn(4, 64))
    specs = SPECS + [QuantSpec(4, 48)]                        # 48 divides no K here: never chosen
    a, b = mixed_plans(g.layers, specs, 3, seed=7), mixed_plans(g.layers, specs, 3, seed=7)
    assert a == b and list(a) == ["mix0", "mix1", "mix2"]
    assert all(s in SPECS for plan in a.values() for s in plan.values())
    assert mixed_plans(g.layers, specs, 3, seed=8) != a


def test_weighted_fit_follows_the_heavier_anchors():
    P, T = [10.0, 20.0, 30.0, 20.0], [12.0, 22.0, 32.0, 26.0]          # the last anchor runs 4 ms slower
    light, heavy = fit_anchor(P, T, [1, 1, 1, 0.01]), fit_anchor(P, T, [1, 1, 1, 100])
    pred = lambda c: c[0] + c[1] * 20.0                                                  # noqa: E731
    assert abs(pred(light) - 22) < abs(pred(light) - 26) and abs(pred(heavy) - 26) < abs(pred(heavy) - 22)
    with pytest.raises(ValueError, match="weights"):
        fit_anchor(P, T, [1, 1, 1])


def test_pairwise_anchors_hold_one_copy_at_a_time_and_give_the_same_record():
    torch.manual_seed(0)
    model, x = mlp(), torch.randn(1, 64)
    a = measure_anchors(model, x, SPECS[:2], reps=7, max_seconds=0.02, mixed=1, pairwise=True)
    assert a["pairwise"] and set(a["plans"]) == set(a["timings"]) == {"fp32", "w8", "w4g32", "mix0"}
    assert all(t["median_ms"] > 0 for t in a["timings"].values())
    assert [type(m) for m in model] == [torch.nn.Linear, torch.nn.GELU, torch.nn.Linear, torch.nn.GELU,
                                        torch.nn.Linear]                         # the model is untouched
