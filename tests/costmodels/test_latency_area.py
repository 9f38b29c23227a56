"""latency / area / energy / size tables through the registry: shapes, units, properties, errors."""
import numpy as np
import pytest
import torch

from bitplan.costmodels import COST_MODELS, cost_table, predict_latency_ms
from bitplan.core.graph import LayerGraph, LayerInfo
from bitplan.kernels.formats import QuantSpec
from bitplan.kernels.profile import LatencyProfile, device_fingerprint, option_key
from bitplan.kernels.registry import kernel_for

SPECS = [QuantSpec(8), QuantSpec(8, act_bits=8), QuantSpec(4, 32), QuantSpec(3, 128)]


def layer(name, n, k, m=128):
    return LayerInfo(name, "linear", (n, k), n, k, n * k, True, "torch.float32", macs_per_sample=n * k * m)


LAYERS = [layer("q", 384, 384), layer("up", 1536, 384), layer("down", 384, 3072)]


def profile():
    p = LatencyProfile(device_fingerprint("cpu"))
    for s in SPECS:
        for l in LAYERS[:2]:
            key = option_key(s, kernel_for(s, l.out_features, l.in_features, "cpu"))
            for m in (1, 16, 128):
                ms = 1e-6 * l.out_features * l.in_features * (1 + m / 16) * s.bits
                p.entries[(key, l.out_features, l.in_features, m)] = {
                    "median_ms": ms, "p25_ms": ms, "p75_ms": ms, "spread": 0.0, "batches": 9, "dropped": 0,
                    "inner": 1, "retries": 0, "stable": True}
    p.fixed["toy"] = {"median_ms": 2.0, "spread": 0.0}
    return p


def test_registry_names():
    assert {"size", "bops", "latency", "area", "energy"} <= set(COST_MODELS)
    with pytest.raises(ValueError, match="unknown cost model 'speed'.*latency"):
        cost_table("speed", LAYERS, SPECS)


def test_latency_table_reads_profile_and_interpolates():
    p = profile()
    t = cost_table("latency", LAYERS[:2], SPECS, profile=p, tokens=16)
    assert t.shape == (2, 4)
    assert t[0, 2] == pytest.approx(1e-6 * 384 * 384 * 2 * 4)
    t8 = cost_table("latency", LAYERS[:2], SPECS, profile=p, tokens=8)        # between M=1 and M=16
    assert np.all((t8 > cost_table("latency", LAYERS[:2], SPECS, profile=p, tokens=1)) & (t8 < t))
    mid = layer("mid", 768, 384)                          # N*K a third of the way from q to up
    tm = cost_table("latency", [mid], SPECS, profile=p, tokens=16)
    assert np.allclose(tm[0], t[0] + (t[1] - t[0]) / 3)                      # exact: data affine in N*K
    total = predict_latency_ms(LAYERS[:2], [SPECS[0], SPECS[2]], p, tokens=16, fixed="toy")
    assert total == pytest.approx(t[0, 0] + t[1, 2] + 2.0)


def test_latency_errors_name_layer_shape_and_option(tmp_path):
    p = profile()
    with pytest.raises(ValueError, match=r"layer 'down' \(N=384, K=3072, M=16\), option w8.*\(N=384, K=3072\).*outside"):
        cost_table("latency", LAYERS, SPECS, profile=p, tokens=16)
    with pytest.raises(ValueError, match="option w2g32.*no option 'w2g32@lowbit_unpack'"):
        cost_table("latency", LAYERS[:1], [QuantSpec(2, 32)], profile=p, tokens=16)
    with pytest.raises(ValueError, match="no fixed cost 'bert'"):
        predict_latency_ms(LAYERS[:1], SPECS[:1], p, tokens=16, fixed="bert")
    with pytest.raises(TypeError, match="LatencyProfile or a path"):
        cost_table("latency", LAYERS[:1], SPECS, profile={"entries": []}, tokens=16)
    bad = tmp_path / "p.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="p.json: latency profile is not valid JSON"):
        cost_table("latency", LAYERS[:1], SPECS, profile=str(bad), tokens=16)


def test_latency_uses_recorded_tokens_by_default():
    p = profile()
    assert np.allclose(cost_table("latency", LAYERS[:2], SPECS, profile=p),
                       cost_table("latency", LAYERS[:2], SPECS, profile=p, tokens=128))


def test_area_energy_follow_the_model():
    specs = [QuantSpec(2), QuantSpec(4), QuantSpec(8), QuantSpec(8, act_bits=8), QuantSpec(16)]
    a = cost_table("area", LAYERS, specs)
    e = cost_table("energy", LAYERS, specs)
    assert a.shape == e.shape == (3, 5) and np.all(a > 0) and np.all(e > 0)
    assert np.all(np.diff(a[:, :3], axis=1) > 0) and np.all(np.diff(e[:, :3], axis=1) > 0)   # more bits, more
    assert np.all(a[:, 3] < a[:, 2]) and np.all(e[:, 3] < e[:, 2])            # 8-bit acts < 16-bit acts
    # multiplier area ∝ b_w·b_a: (8x16 − 4x16) = 282·64/64 per unit
    units = LAYERS[0].macs_per_sample / 1e6
    assert a[0, 2] - a[0, 1] == pytest.approx(units * 282 * (8 * 16 - 4 * 16) / 64)
    with pytest.raises(ValueError, match="MACs per sample"):
        cost_table("energy", [LayerInfo("x", "linear", (4, 4), 4, 4, 16, False, "torch.float32")], specs)


def test_size_table_is_kernel_aware_and_matches_packed_model():
    from bitplan.costmodels import base_nbytes, model_nbytes
    from bitplan.core.graph import fingerprint
    from bitplan.apply import apply_plan_
    from bitplan.plan import Plan
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 128),
                                torch.nn.ReLU(), torch.nn.Linear(128, 96))
    g = LayerGraph.build(model)
    specs = [QuantSpec(4, 32), QuantSpec(8, act_bits=8), QuantSpec(2, 64, symmetric=False)]
    sizes = cost_table("size", g.layers, specs)                                # (L, B)
    plan = Plan(fingerprint(sorted(g.layers, key=lambda l: l.name)), dict(zip(g.names, specs)))
    packed = apply_plan_(model, plan, mode="packed")
    assert model_nbytes(packed) == base_nbytes(torch.nn.Sequential(*[
        torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 128), torch.nn.ReLU(),
        torch.nn.Linear(128, 96)]), g.names) + int(np.trace(sizes))


def test_latency_range_is_the_cost_of_the_extreme_plans():
    from bitplan.costmodels import latency_range
    prof, layers = profile(), LAYERS[:2]
    r = latency_range(prof, layers, SPECS)
    assert r["min_ms"] <= r["max_ms"] and r["fixed_ms"] == 2.0
    assert r["min_ms"] == pytest.approx(predict_latency_ms(layers, r["fastest"], prof, fixed="toy"), rel=1e-12)
    assert r["max_ms"] == pytest.approx(predict_latency_ms(layers, r["slowest"], prof, fixed="toy"), rel=1e-12)
    for s in SPECS:                                          # every uniform plan lies inside the range
        t = predict_latency_ms(layers, [s] * len(layers), prof, fixed="toy")
        assert r["min_ms"] - 1e-12 <= t <= r["max_ms"] + 1e-12
    # options a layer cannot take are never its extreme; an Options-like object brings its own mask
    allowed = np.ones((len(layers), len(SPECS)), bool)
    allowed[:, [SPECS.index(r["fastest"][0])]] = False
    opts = type("Opts", (), {"specs": tuple(SPECS), "allowed": allowed})()
    r2 = latency_range(prof, layers, opts)
    assert all(s != r["fastest"][0] for s in r2["fastest"]) and r2["min_ms"] >= r["min_ms"]
    with pytest.raises(ValueError, match="no allowed option"):
        latency_range(prof, layers, SPECS, allowed=np.zeros((2, len(SPECS)), bool))
    with pytest.raises(ValueError, match="no fixed cost 'other'"):
        latency_range(prof, layers, SPECS, fixed="other")
